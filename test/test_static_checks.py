"""The code's own static checks as tests, so CI (``make test``) runs them: ruff over the tree,
mypy (``--check-untyped-defs``) over the controller and the protocol package it shares with
the runtime. Each reports every finding on failure."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def test_ruff_is_clean() -> None:
    result = run("ruff", "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_on_the_controller_and_protocol() -> None:
    result = run("mypy", "lynx_policy", "lynx_protocol")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success" in result.stdout
