"""The one-shot GPU check starts: its --dry-run runs every stage's set-up on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_covers_every_router_and_stage(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--dry-run",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    selection = json.loads((tmp_path / "selection.json").read_text())
    assert selection["ok"] and selection["failures"] == []
    assert selection["cells"] == 8 * 4 * 4  # routers x batch sizes x policies (torch only)
    assert json.loads((tmp_path / "capture.json").read_text())["ok"]
    assert "[gpu_check] selection: ok" in done.stdout
