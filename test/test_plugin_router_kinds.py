"""The plugin's TopK hook around SGLang's real routing code (``select_experts``, torch-native
path) for each router kind: softmax (renormalised or not), grouped softmax, and sigmoid with a
correction bias (DeepSeek-V3 style, where the bias is masked instead of the logits).

``TopK`` itself needs a running engine's published config, so the hook wraps a function that
does what ``TopK.forward_native`` does: call ``select_experts`` with the layer's TopKConfig.
The softmax kind also runs inside real SGLang servers in test_e2e_lynx.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from sglang.srt.layers.moe.topk import TopKConfig, select_experts

from lynx.sglang_plugin import hooks
from lynx.sglang_plugin.step_state import RuntimeState, StepLayout
from lynx_protocol.policy import BudgetBucket, PolicySpec

T, E, K, BUDGET = 32, 16, 4, 6


def _kinds() -> dict[str, TopKConfig]:
    bias = torch.linspace(-0.2, 0.2, E)
    return {
        "softmax": TopKConfig(top_k=K, renormalize=True, torch_native=True),
        "softmax-no-renorm": TopKConfig(top_k=K, renormalize=False, torch_native=True),
        "grouped-softmax": TopKConfig(top_k=K, renormalize=True, torch_native=True,
                                      use_grouped_topk=True, num_expert_group=4, topk_group=2),
        "sigmoid-bias": TopKConfig(top_k=K, renormalize=True, torch_native=True,
                                   use_grouped_topk=True, num_expert_group=4, topk_group=2,
                                   scoring_func="sigmoid", correction_bias=bias),
    }


def real_forward(topk: SimpleNamespace, hidden: torch.Tensor, logits: torch.Tensor):
    return select_experts(hidden_states=hidden, router_logits=logits,
                          topk_config=topk.topk_config, layer_id=topk.layer_id)


@pytest.fixture
def runtime(monkeypatch) -> RuntimeState:
    policy = PolicySpec(name="budget", budgets=[BudgetBucket(max_batch=10_000, all_layers=BUDGET)])
    state = RuntimeState(1, E, K, torch.device("cpu"), policy)
    monkeypatch.setattr(hooks, "_state", state)
    monkeypatch.setattr(hooks, "_exporter", None)
    return state


def _step(runtime: RuntimeState, layout: StepLayout, config: TopKConfig, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=gen) * 1.5 + torch.randn(E, generator=gen)[None] * 1.5
    hidden = torch.randn(T, 8, generator=gen)
    topk = SimpleNamespace(topk_config=config, layer_id=0, is_draft=False)
    stock = real_forward(topk, hidden, logits)
    runtime.begin_step(layout)
    ours = hooks.around_topk_forward(real_forward, topk, hidden, logits)
    runtime.step_active = False
    return logits, stock, ours


@pytest.mark.parametrize("kind", list(_kinds()))
def test_decode_step_is_pruned_keeping_top1_and_gate_mass(runtime: RuntimeState,
                                                           kind: str) -> None:
    config = _kinds()[kind]
    stock_bias = config.correction_bias
    _, stock, ours = _step(runtime, StepLayout("decode", T, 0), config)
    assert config.correction_bias is stock_bias  # restored after the call
    stock_top1 = stock.topk_ids.gather(1, stock.topk_weights.argmax(-1, keepdim=True))
    if config.correction_bias is None:  # softmax kinds: every row keeps its top-1 expert
        assert bool((ours.topk_ids == stock_top1).any(-1).all()), "a row lost its top-1 expert"
    else:  # the bias was masked: no row is routed to an expert whose bias was masked
        masked = (runtime.effective_bias[0] - config.correction_bias) < -1.0
        assert int(masked.sum()) > 0 and not bool(masked[ours.topk_ids.long()].any())
    distinct_top1 = int(stock_top1.unique().numel())
    groups_extra = 2 * 4 if config.use_grouped_topk else 0  # at most 2 added per group
    allowed = max(BUDGET, distinct_top1, K) + groups_extra
    assert ours.topk_ids.unique().numel() <= allowed
    assert ours.topk_ids.unique().numel() < stock.topk_ids.unique().numel()
    assert torch.isfinite(ours.topk_weights).all()
    if config.scoring_func == "softmax":
        assert torch.allclose(ours.topk_weights.sum(-1), stock.topk_weights.sum(-1), atol=1e-4)


@pytest.mark.parametrize("kind", list(_kinds()))
def test_prefill_rows_are_exactly_stock(runtime: RuntimeState, kind: str) -> None:
    config = _kinds()[kind]
    _, stock, ours = _step(runtime, StepLayout("prefill", T, T), config)
    assert torch.equal(ours.topk_ids, stock.topk_ids)
    assert torch.equal(ours.topk_weights, stock.topk_weights)
    # Mixed chunked-prefill step: the 20 prefill rows stay stock; sigmoid+bias routers share one
    # bias across rows, so such a step is not pruned at all.
    _, stock, ours = _step(runtime, StepLayout("mixed", T, 20), config, seed=1)
    assert torch.equal(ours.topk_ids[:20], stock.topk_ids[:20])
    assert torch.allclose(ours.topk_weights[:20], stock.topk_weights[:20])
    if config.correction_bias is not None:
        assert torch.equal(ours.topk_ids, stock.topk_ids)
    else:
        assert ours.topk_ids[20:].unique().numel() <= stock.topk_ids[20:].unique().numel()


def test_biased_grouped_router_never_moves_a_row_off_its_top1(runtime: RuntimeState) -> None:
    """One correction bias is shared by all rows, and groups are scored by their top-2
    ``score + bias``: a masked expert lowers its group's score and could push a row into other
    groups. The glue replays the router and repairs (or skips) such layer-steps; without that,
    about 4 in 10 of these steps moved a row off its top-1 expert."""
    from lynx.selection.routers import RouterSpec, stock_routing

    spec = RouterSpec(top_k=K, scoring="sigmoid", num_expert_group=4, topk_group=2,
                      has_correction_bias=True)
    pruned = 0
    for seed in range(60):
        bias = torch.randn(E, generator=torch.Generator().manual_seed(1000 + seed)) * 0.3
        config = TopKConfig(top_k=K, renormalize=True, torch_native=True, use_grouped_topk=True,
                            num_expert_group=4, topk_group=2, scoring_func="sigmoid",
                            correction_bias=bias)
        logits, stock, ours = _step(runtime, StepLayout("decode", T, 0), config, seed=seed)
        top1 = stock_routing(logits, spec, bias).ids[:, :1]
        assert torch.equal(stock_routing(logits, spec, bias).ids.sort(-1).values,
                           stock.topk_ids.long().sort(-1).values)  # our replay is SGLang's
        assert bool((ours.topk_ids == top1).any(-1).all()), f"seed {seed}: a row lost its top-1"
        if ours.topk_ids.unique().numel() < stock.topk_ids.unique().numel():
            pruned += 1
    assert pruned >= 30, pruned  # the guard repairs most steps instead of skipping them


@pytest.mark.parametrize("kind", ["softmax", "sigmoid-bias"])
def test_policy_switch_reaches_a_captured_step_without_recapture(kind: str) -> None:
    """Where CUDA graphs capture the TopK hook (``graph_safe``), the policy is picked on the
    device: one compiled (fullgraph) trace of the glue follows budget → piggyback → affinity →
    off switches made by `stage_policy`, each matching the eager named policy exactly."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from lynx.sglang_plugin.selection_glue import select_for_layer

    torch._dynamo.reset()
    config = _kinds()[kind]
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(T, E, generator=gen) * 1.5 + torch.randn(E, generator=gen)[None]
    budget = PolicySpec(name="budget", budgets=[BudgetBucket(max_batch=10_000, all_layers=6)])
    captured = RuntimeState(1, E, K, torch.device("cpu"), budget)
    captured.graph_safe = True
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda z: select_for_layer(captured, z, config, 0),
                             fullgraph=True, backend=counter)
    policies = [budget, PolicySpec(name="piggyback", k0=1), PolicySpec(name="affinity"),
                PolicySpec(name="off")]
    seen = []
    for version, policy in enumerate(policies, start=1):
        captured.stage_policy(policy, version)
        captured.begin_step(StepLayout("decode", T, 0))
        eager_state = RuntimeState(1, E, K, torch.device("cpu"), policy)
        eager_state.begin_step(StepLayout("decode", T, 0))
        bias, stats = compiled(logits)
        want_bias, want_stats = select_for_layer(eager_state, logits, config, 0)
        assert torch.equal(bias, want_bias), policy.name
        assert torch.equal(stats, want_stats), policy.name
        seen.append(int((bias < -1).sum()))
    assert counter.frame_count == 1  # one trace served every policy
    assert len(set(seen[:3])) > 1 and seen[3] == 0  # the policies really differ; off prunes none
