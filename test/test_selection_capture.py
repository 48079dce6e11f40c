"""Capturability on the CPU: every step function compiles with ``fullgraph=True`` (no graph
break: no ``.item()``, ``nonzero``, boolean indexing or Python branch on tensor values) and
knob changes (``fill_`` into the same tensors) take effect without recompiling.

Shape legend: T rows, E experts, K top_k. ``backend="aot_eager"`` traces forward and backward
graphs like inductor does but skips code generation (2 CPU cores)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from lynx.selection import (
    POLICY_NAMES,
    LayerSelection,
    RouterSpec,
    SelectionKnobs,
    make_knobs,
    select_layer_step,
)

T, E, K = 24, 16, 4
ROUTERS = {
    "softmax": RouterSpec(top_k=K),
    "grouped-softmax": RouterSpec(top_k=K, num_expert_group=4, topk_group=2),
    "biased-grouped": RouterSpec(top_k=K, scoring="sigmoid", num_expert_group=4, topk_group=2,
                                 has_correction_bias=True),
}


def make_step(policy: str, router: RouterSpec) -> Callable[..., LayerSelection]:
    """A plugin-like step: row masks come from device scalars, like a captured graph's."""
    def step(logits: torch.Tensor, n_valid: torch.Tensor, prunable_start: torch.Tensor,
             knobs: SelectionKnobs, correction_bias: torch.Tensor | None) -> LayerSelection:
        index = torch.arange(logits.shape[0], device=logits.device)
        return select_layer_step(policy, logits, router, knobs, index < n_valid,
                                 index >= prunable_start, correction_bias)

    return step


def _inputs(router: RouterSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(T, E, generator=gen) * 1.5 + torch.randn(E, generator=gen)[None] * 0.5
    bias = torch.linspace(-0.2, 0.2, E) if router.has_correction_bias else None
    return logits.to(torch.bfloat16), bias


def _same(a: LayerSelection, b: LayerSelection) -> bool:
    return all(
        (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
        for x, y in zip(a, b, strict=True)
    )


@pytest.mark.parametrize(("policy", "router_kind"), [
    ("budget", "softmax"), ("affinity", "softmax"), ("piggyback", "softmax"),
    ("off", "softmax"), ("budget", "grouped-softmax"), ("affinity", "biased-grouped"),
])
def test_step_compiles_fullgraph_and_follows_knobs_without_recompiling(
    policy: str, router_kind: str
) -> None:
    torch._dynamo.reset()
    router = ROUTERS[router_kind]
    logits, bias = _inputs(router)
    n_valid, prunable_start = torch.tensor(20), torch.tensor(4)
    knobs = make_knobs(budget=12, alpha=3.0, beta=2.0, k0=2)
    eager = make_step(policy, router)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(eager, fullgraph=True, backend=counter, dynamic=False)
    first = compiled(logits, n_valid, prunable_start, knobs, bias)
    assert _same(first, eager(logits, n_valid, prunable_start, knobs, bias))
    assert counter.frame_count == 1

    settings = [
        lambda: (knobs.budget.fill_(1), knobs.alpha.fill_(1.0), knobs.k0.fill_(1)),
        lambda: (knobs.beta.fill_(0.0), n_valid.fill_(24), prunable_start.fill_(0)),
        lambda: knobs.enabled.fill_(False),
    ]
    outputs = [first]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for change in settings:
            change()
            outputs.append(compiled(logits, n_valid, prunable_start, knobs, bias))
            assert _same(outputs[-1], eager(logits, n_valid, prunable_start, knobs, bias))
    assert counter.frame_count == 1, "a knob change recompiled the step"

    tight, disabled = outputs[1], outputs[3]
    assert not bool(disabled.apply_rows.any()) and bool(disabled.keep.all())
    if policy != "off":
        assert not torch.equal(tight.keep, first.keep), "new knob values were not read"
    if policy == "budget":
        assert int(tight.keep.sum()) < int(first.keep.sum())
    rows_pruned = [int(o.apply_rows.sum()) for o in outputs]
    assert rows_pruned == [16, 16, 24, 0]


def test_policy_code_switches_policies_inside_one_compiled_graph() -> None:
    torch._dynamo.reset()
    router = ROUTERS["softmax"]
    logits, _ = _inputs(router)
    n_valid, prunable_start = torch.tensor(24), torch.tensor(0)
    knobs = make_knobs(budget=5, alpha=3.0, beta=2.0, k0=1)
    eager = make_step("by_code", router)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(eager, fullgraph=True, backend=counter, dynamic=False)
    kept: dict[str, int] = {}
    for code, name in enumerate(POLICY_NAMES):
        knobs.policy_code.fill_(code)
        with torch._dynamo.config.patch(error_on_recompile=code > 0):
            out = compiled(logits, n_valid, prunable_start, knobs, None)
        named = make_step(name, router)(logits, n_valid, prunable_start, knobs, None)
        assert _same(out, named)
        kept[name] = int(out.keep.sum())
    assert counter.frame_count == 1
    assert kept["off"] == E and kept["budget"] < E
