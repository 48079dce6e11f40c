"""The one-shot GPU check starts: its --dry-run runs every stage's set-up on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_covers_every_router_and_stage(tmp_path: Path) -> None:
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry-run",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stderr[-2000:]
    selection = json.loads((tmp_path / "selection.json").read_text())
    assert selection["ok"] and selection["failures"] == []
    assert selection["cells"] == 8 * 4 * 4  # routers x batch sizes x policies (torch only)
    assert json.loads((tmp_path / "capture.json").read_text())["ok"]
    nondrop = json.loads((tmp_path / "nondrop.json").read_text())
    assert nondrop["ok"] and nondrop["routers"] == 8 and nondrop["failures"] == []
    assert "[gpu_check] selection: ok" in done.stdout
    layer = json.loads((tmp_path / "moe_layer.json").read_text())
    assert layer["ok"] and len(layer["rows"]) == 2 * 3  # tiny shapes x batch sizes
    for row in layer["rows"]:
        assert row["experts_lynx"] <= row["experts_stock"] and row["stock_ms"] > 0
        assert row["bound_speedup"] == round(row["experts_stock"] / row["experts_lynx"], 3)
    verify = json.loads((tmp_path / "verify.json").read_text())
    assert verify["ok"] and verify["cells"] == 8 * 2  # routers x (16x4, 16x12) draft rows
    cost = json.loads((tmp_path / "selection_cost.json").read_text())
    assert cost["ok"] and all(r["eager_ms"] > 0 for r in cost["rows"])


def test_moe_layer_reference_matches_a_dense_computation() -> None:
    """The per-expert grouped MoE the GPU stage times is the dense mixture it stands for."""
    import sys

    import torch

    sys.path.insert(0, str(REPO / "scripts"))
    from gpu_moe import moe_layer

    gen = torch.Generator().manual_seed(0)
    experts, hidden, ffn, rows, top_k = 6, 8, 5, 7, 2
    w13 = torch.randn(experts, 2 * ffn, hidden, generator=gen)
    w2 = torch.randn(experts, hidden, ffn, generator=gen)
    x = torch.randn(rows, hidden, generator=gen)
    weights, ids = torch.softmax(torch.randn(rows, experts, generator=gen), -1).topk(top_k)
    want = torch.zeros(rows, hidden)
    for t in range(rows):
        for k in range(top_k):
            gate, up = (w13[ids[t, k]] @ x[t]).chunk(2)
            want[t] += weights[t, k] * (w2[ids[t, k]] @ (torch.nn.functional.silu(gate) * up))
    assert torch.allclose(moe_layer(x, ids, weights, w13, w2), want, atol=1e-4)
