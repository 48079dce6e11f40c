"""The set-up scripts on a full disk and when pip fails. Stop 20's CI ran out of disk half way
through `make setup` (pip: "[Errno 28] No space left on device"); the Makefile hid pip's status
behind its output filter and went on to an import check that printed only
"ModuleNotFoundError: No module named 'sglang'". Now the space is checked before a big install,
and a failed pip stops the step with its own error."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from lynx.deploy import constants as c

ROOT = c.REPO_ROOT
GIB_KIB = 1024 * 1024


def _stub_df(bin_dir: Path, free_gib: int) -> Path:
    """A `df -Pk` reporting `free_gib` GiB available; it logs the path it was asked about."""
    bin_dir.mkdir(exist_ok=True)
    df = bin_dir / "df"
    df.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> "{bin_dir}/df.calls"\n'
        "echo 'Filesystem 1024-blocks Used Available Capacity Mounted on'\n"
        f"echo '/dev/vda 264241152 1000 {free_gib * GIB_KIB} 1% /'\n")
    df.chmod(0o755)
    return bin_dir


def _bash(script: str, bin_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", **env}
    full_env.pop("LYNX_SKIP_DISK_CHECK", None)
    full_env.update(env)
    return subprocess.run(["bash", "-c", f"set -euo pipefail; source scripts/common.sh; {script}"],
                          cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=60)


def test_need_disk_refuses_with_the_numbers_and_what_to_free(tmp_path: Path) -> None:
    bin_dir = _stub_df(tmp_path / "bin", free_gib=8)
    low = _bash(f'need_disk "{tmp_path}/venv/x" 13 "make setup"; echo not-reached', bin_dir)
    assert low.returncode == 1 and "not-reached" not in low.stdout
    assert low.stderr.splitlines()[0] == (
        f"make setup needs about 13 GiB free on the filesystem of {tmp_path}; 8 GiB are free.")
    assert "make clean-venv" in low.stderr and "LYNX_SKIP_DISK_CHECK=1" in low.stderr
    # a path not made yet is measured at its nearest existing parent
    assert (bin_dir / "df.calls").read_text().split() == ["-Pk", str(tmp_path)]

    enough = _bash(f'need_disk "{tmp_path}" 8 "make setup" && echo ok', bin_dir)
    assert enough.returncode == 0 and enough.stdout == "ok\n"
    skipped = _bash(f'need_disk "{tmp_path}" 99 "x" && echo ok', bin_dir, LYNX_SKIP_DISK_CHECK="1")
    assert skipped.returncode == 0 and skipped.stdout == "ok\n"


def test_pip_filtered_keeps_pips_status_and_drops_only_the_noise(tmp_path: Path) -> None:
    fail = _bash("pip_filtered sh -c 'echo \"ERROR: [Errno 28] No space left on device\"; "
                 "echo \"foo is ignored\"; exit 3' || echo \"rc=$?\"", tmp_path)
    assert fail.stdout.splitlines() == ["ERROR: [Errno 28] No space left on device", "rc=3"]
    plain = _bash("pip_filtered sh -c 'exit 4'; echo not-reached", tmp_path)
    assert plain.returncode == 4 and "not-reached" not in plain.stdout  # set -e stops there


def _fake_venv(venv: Path, pip_rc: int) -> Path:
    """A virtualenv whose python logs its arguments; `-m pip install` fails like pip on a
    full disk when pip_rc is not 0."""
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> "{venv}/calls"\n'
        'if [ "$1 $2 $3" = "-m pip install" ]; then\n'
        "  echo 'ERROR: Could not install packages due to an OSError: [Errno 28] No space left "
        "on device'\n"
        f"  exit {pip_rc}\n"
        "fi\n")
    python.chmod(0o755)
    return venv


def _make_setup(tmp_path: Path, venv: Path, free_gib: int) -> subprocess.CompletedProcess[str]:
    bin_dir = _stub_df(tmp_path / "bin", free_gib)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    env.pop("LYNX_SKIP_DISK_CHECK", None)
    env.pop("MAKEFLAGS", None)
    return subprocess.run(["make", "-s", "setup", f"VENV={venv}", "PYTHON=false"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)


def test_make_setup_stops_at_a_failed_pip_and_leaves_no_stamp(tmp_path: Path) -> None:
    venv = _fake_venv(tmp_path / "venv", pip_rc=1)
    result = _make_setup(tmp_path, venv, free_gib=50)
    assert result.returncode != 0
    assert "[Errno 28] No space left on device" in result.stdout
    assert "make setup: pip install failed" in result.stderr
    assert "ModuleNotFoundError" not in result.stdout + result.stderr
    calls = (venv / "calls").read_text().splitlines()
    assert calls == ["-m pip install -q -e .[runtime,dev,eval]"]  # no import check after it
    assert not (venv / ".lynx-installed").exists()  # the next make setup installs again


def test_make_setup_refuses_a_new_venv_on_a_full_disk_before_installing(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    result = _make_setup(tmp_path, venv, free_gib=8)
    assert result.returncode != 0
    assert "make setup (a new" in result.stderr and "8 GiB are free" in result.stderr
    assert not venv.exists()  # PYTHON=false was never asked to make it


@pytest.mark.parametrize("free_gib, ok", [(1, False), (2, True)])
def test_make_setup_update_needs_little_space(tmp_path: Path, free_gib: int, ok: bool) -> None:
    venv = _fake_venv(tmp_path / "venv", pip_rc=0)
    (venv / ".lynx-installed").touch()
    os.utime(venv / ".lynx-installed", (0, 0))  # older than pyproject.toml: an update
    result = _make_setup(tmp_path, venv, free_gib)
    assert (result.returncode == 0) == ok, result.stderr
    if ok:
        assert (venv / "calls").read_text().splitlines() == [
            "-m pip install -q -e .[runtime,dev,eval]",
            "-c import sglang, lynx, lynx_policy, lynx_protocol, lm_eval"]


def test_compose_smoke_clean_removes_only_its_state(tmp_path: Path) -> None:
    state = tmp_path / "smoke"
    (state / "docker").mkdir(parents=True)
    (state / "wheelhouse").mkdir()
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "compose_smoke.sh"), "--clean"],
        env={**os.environ, "LYNX_SMOKE_DIR": str(state), "PYTHON": "/nonexistent"},
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"removing {state}" in result.stdout
    assert not state.exists() and tmp_path.exists()
