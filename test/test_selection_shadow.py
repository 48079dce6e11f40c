"""Shadow statistics (`lynx.selection.shadow`): what the ``budget`` policy would keep at every
candidate budget, from one ranking, equal budget by budget to what `select_layer_step` with
that budget reports, for the routers of real checkpoints (grouped and biased ones included)."""

from __future__ import annotations

import pytest
import torch
from conformance_configs import MODELS, ModelRouter, draw_inputs

from lynx.selection import make_knobs, select_layer_step, statistics_dict, torch_batch_routing
from lynx.selection.shadow import (
    SHADOW_BASE,
    SHADOW_PER_BUDGET,
    shadow_budgets,
    shadow_statistics,
    shadow_width,
)

ROUTERS = [m for m in MODELS if not m.custom_routing]


def shadow_dict(vector: torch.Tensor, budgets: list[int]) -> dict[str, float | dict]:
    values = vector.tolist()
    base = dict(zip(SHADOW_BASE, values, strict=False))
    width = len(SHADOW_PER_BUDGET)
    return {**base, "per_budget": {
        m: dict(zip(SHADOW_PER_BUDGET, values[len(SHADOW_BASE) + i * width:][:width],
                    strict=True)) for i, m in enumerate(budgets)}}


@pytest.mark.parametrize("model", ROUTERS, ids=lambda m: m.name)
@pytest.mark.parametrize("rows", [1, 16, 64])
@pytest.mark.parametrize("ties", [False, True])
def test_shadow_equals_the_budget_policy_at_every_candidate(model: ModelRouter, rows: int,
                                                            ties: bool) -> None:
    """``ties``: logits rounded to steps of 2 (many exact ties in importance and in the
    top-K, as bf16 logits give): the order's tie rule (lower index) decides."""
    spec = model.spec()
    budgets = shadow_budgets(model.experts, model.top_k)
    assert budgets and budgets[0] == model.top_k and budgets[-1] < model.experts
    for seed in range(3):
        logits, bias = draw_inputs(model, rows + 2, seed)
        if ties:
            logits = (logits / 2).round() * 2
        valid = torch.arange(rows + 2) < rows + 1
        decode = torch.arange(rows + 2) >= 1  # row 0: a prefill row, never measured
        measured = valid & decode
        batch = torch_batch_routing(logits, spec, bias, measured)
        vector = shadow_statistics(batch, measured, spec, torch.tensor(budgets))
        assert vector.shape == (shadow_width(len(budgets)),)
        shadow = shadow_dict(vector, budgets)
        for m in budgets:
            knobs = make_knobs(policy="budget", budget=m)
            stats = statistics_dict(select_layer_step("budget", logits, spec, knobs, valid,
                                                      decode, bias).stats)
            got = shadow["per_budget"][m]
            assert got["kept"] == stats["kept"], (model.name, rows, seed, m)
            assert got["top1_kept"] == stats["top1_kept"] == rows
            assert got["mass_kept"] == pytest.approx(stats["mass_kept"], rel=1e-5)
        assert shadow["rows"] == rows and shadow["layer_steps"] == 1.0
        assert shadow["stock_union"] == stats["stock_union"]
        assert shadow["mass_total"] == pytest.approx(stats["mass_total"], rel=1e-5)
        kept = [shadow["per_budget"][m]["kept"] for m in budgets]
        # a larger budget computes no fewer experts, except on grouped routers: there a small
        # budget leaves rows short of K experts in their groups, and each such row gets its
        # whole stock top-K (`keep_rules.with_viable_rows`): DeepSeek-V3 at 16 rows computed
        # 29 experts at budget 8 and 24 at budget 16. What a budget costs is measured, not
        # assumed from the budget.
        assert model.grouped or kept == sorted(kept)


def test_a_step_without_decode_rows_counts_nothing() -> None:
    model = next(m for m in ROUTERS if m.name == "Qwen3-30B-A3B")
    logits, _ = draw_inputs(model, 8, 0)
    none = torch.zeros(8, dtype=torch.bool)
    batch = torch_batch_routing(logits, model.spec(), None, none)
    vector = shadow_statistics(batch, none, model.spec(), torch.tensor([8, 16, 32]))
    assert torch.count_nonzero(vector) == 0


@pytest.mark.parametrize("name", ["Qwen3-30B-A3B", "DeepSeek-V3"])
def test_shadow_statistics_trace_as_one_graph(name: str) -> None:
    """CUDA-graph safety without a GPU: the recorder's math traces as one graph
    (``fullgraph``: no host sync, no branch on a tensor value), equal to eager."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = next(m for m in ROUTERS if m.name == name)
    spec = model.spec()
    budgets = torch.tensor(shadow_budgets(model.experts, model.top_k))
    logits, bias = draw_inputs(model, 24, 5)
    rows = torch.arange(24) < 20

    def step(z: torch.Tensor) -> torch.Tensor:
        return shadow_statistics(torch_batch_routing(z, spec, bias, rows), rows, spec, budgets)

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    assert torch.allclose(compiled(logits), step(logits), rtol=1e-5)
    assert counter.frame_count == 1
