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
    assert layer["grouped_equals_reference"]  # the grouped GEMM is the per-expert loop's layer
    ep = json.loads((tmp_path / "ep_balance.json").read_text())
    assert ep["ok"] and len(ep["rows"]) == 2 * 3  # batch sizes x variants (one shape, R=2)
    assert {r["variant"] for r in ep["rows"]} == {"stock", "global", "ep_aware"}
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


def test_the_grouped_gemm_layer_and_its_ep_blocks_are_the_dense_mixture() -> None:
    """The grouped-GEMM layer the GPU stages time equals the per-expert reference, and the EP
    blocks' partial outputs add up to it (pairs of other blocks skipped, empty groups too)."""
    import sys

    import torch

    sys.path.insert(0, str(REPO / "scripts"))
    from gpu_ep import grouped_moe, grouped_plan
    from gpu_moe import moe_layer

    gen = torch.Generator().manual_seed(1)
    experts, hidden, ffn, rows, top_k, ranks = 16, 64, 32, 10, 4, 4
    block = experts // ranks
    w13 = torch.randn(experts, 2 * ffn, hidden, generator=gen) * 0.1
    w2 = torch.randn(experts, hidden, ffn, generator=gen) * 0.1
    x = torch.randn(rows, hidden, generator=gen)
    logits = torch.randn(rows, experts, generator=gen)
    logits[:, :block] += 3.0  # the first block is busy, others are partly empty
    weights, ids = torch.softmax(logits, -1).topk(top_k)
    want = moe_layer(x, ids, weights, w13, w2)
    whole = grouped_moe(x, weights, grouped_plan(ids, experts), w13, w2)
    parts = sum(grouped_moe(x, weights, grouped_plan(ids, block, r * block),
                            w13[r * block:(r + 1) * block], w2[r * block:(r + 1) * block])
                for r in range(ranks))
    assert torch.allclose(whole, want, atol=1e-5) and torch.allclose(parts, want, atol=1e-5)
    plan = grouped_plan(ids, experts)
    assert plan.size % 16 == 0 and int(plan.offs[-1]) == plan.size  # padded groups
