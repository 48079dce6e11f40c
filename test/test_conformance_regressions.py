"""Each failure observed with real checkpoints' routers (issue: real-model conformance) as a
named regression test, through SGLang's real ``TopK`` and the plugin's hook.

Shape legend: T rows, E experts, K routed top_k, S fused shared slots.
"""

from __future__ import annotations

import pytest
import torch
from topk_harness import build_topk, call, make_runtime, policy_spec, sglang_topology
from topk_harness import stock as stock_call

from lynx.selection import RouterSpec, make_knobs, select_layer_step, statistics_dict
from lynx.selection import stock_routing as library_stock
from lynx.selection.statistics import STAT_FIELDS
from lynx.sglang_plugin.step_state import StepLayout

pytest.importorskip("sglang.srt.layers.moe.topk")
NONFINITE = STAT_FIELDS.index("nonfinite_rows")


@pytest.fixture(scope="module", autouse=True)
def topology():
    with sglang_topology():
        yield


def _stats(runtime, layer: int = 0) -> dict[str, float]:
    return statistics_dict(runtime.exporter.layer_totals()[layer].float())


@pytest.mark.parametrize("policy", ["off", "budget"])
def test_bypassed_output_is_returned_not_rewritten(policy: str) -> None:
    """1. BYPASSED + the hook raised ``Got unexpected field names: ['router_logits']``."""
    runtime = make_runtime(policy_spec(policy, budget=8), 64, 8)
    topk = build_topk(experts=64, top_k=8, fmt="BYPASSED", renormalize=True)
    logits = torch.randn(16, 64, generator=torch.Generator().manual_seed(0)) * 2
    out = call(runtime, topk, logits, StepLayout("decode", 16, 0), path="cuda")
    assert type(out).__name__ == "BypassedTopKOutput"
    routed = out.to_standard()
    ours_union = routed.topk_ids.unique().numel()
    stock_union = stock_call(topk, logits).topk_ids.unique().numel()
    if policy == "off":
        assert torch.equal(out.raw_router_logits, logits)
    else:  # the kernel routes from the masked logits: pruned, top-1 kept
        stats = _stats(runtime)
        assert ours_union == stats["kept"] < stock_union
        assert stats["top1_kept"] == stats["rows"] == 16


def test_bypassed_biased_router_passes_through_and_reports_nothing() -> None:
    """2. Kimi-K2-like BYPASSED sigmoid + bias: stats said 32 kept while routing was stock."""
    runtime = make_runtime(policy_spec("budget", budget=32), 384, 8)
    bias = torch.randn(384, generator=torch.Generator().manual_seed(1)) * 0.1
    topk = build_topk(experts=384, top_k=8, fmt="BYPASSED", renormalize=True,
                      scoring_func="sigmoid", correction_bias=bias,
                      use_grouped_topk=True, num_expert_group=1, topk_group=1)
    logits = torch.randn(16, 384, generator=torch.Generator().manual_seed(2))
    out = call(runtime, topk, logits, StepLayout("decode", 16, 0), path="cuda")
    assert torch.equal(out.to_standard().topk_ids, stock_call(topk, logits).topk_ids)
    assert float(runtime.exporter.accumulator.abs().sum()) == 0.0  # no pruning reported
    assert runtime.plans[(0, "cuda")].reason == "bypassed_shared_bias"
    assert runtime.exporter.passed_through["bypassed_shared_bias"] == 1


@pytest.mark.parametrize("on_output", [False, True])
def test_grouped_softmax_without_renormalize_keeps_gate_mass_and_scale(on_output: bool
                                                                        ) -> None:
    """3. DeepSeek-V2 236B router: weight sums were 1.42x stock, 0.06x with the x16 factor
    applied on output."""
    runtime = make_runtime(policy_spec("budget", budget=24), 160, 6)
    topk = build_topk(experts=160, top_k=6, use_grouped_topk=True, num_expert_group=8,
                      topk_group=3, renormalize=False, routed_scaling_factor=16.0,
                      apply_routed_scaling_factor_on_output=on_output)
    logits = torch.randn(16, 160, generator=torch.Generator().manual_seed(3)) * 2
    out = call(runtime, topk, logits, StepLayout("decode", 16, 0))
    ref = stock_call(topk, logits)
    ratio = out.topk_weights.sum(-1) / ref.topk_weights.sum(-1)
    assert torch.allclose(ratio, torch.ones(16), atol=1e-5), ratio
    assert _stats(runtime)["kept"] < ref.topk_ids.unique().numel()


def test_raw_logit_runner_weights_stay_raw_logits() -> None:
    """4. flashinfer TRT-LLM routed runner (weights = raw logits): max |w| went to 9.6e19."""
    runtime = make_runtime(policy_spec("budget", budget=16), 64, 8)
    topk = build_topk(experts=64, top_k=8, renormalize=False,
                      runner="flashinfer_trtllm_routed")
    logits = torch.randn(16, 64, generator=torch.Generator().manual_seed(4)) - 1.0
    out = call(runtime, topk, logits, StepLayout("decode", 16, 0), path="cuda")
    ref = stock_call(topk, logits, path="cuda")
    assert float(out.topk_weights.abs().max()) <= float(logits.abs().max())
    assert torch.equal(out.topk_weights, logits.gather(1, out.topk_ids.long()))
    assert out.topk_ids.unique().numel() < ref.topk_ids.unique().numel()


def test_fused_shared_slot_is_neither_pruned_nor_counted() -> None:
    """5. DeepSeek-V3 with shared-expert fusion: top_k 9 was taken as routed (union 99)."""
    runtime = make_runtime(policy_spec("budget", budget=64), 256, 8)
    gen = torch.Generator().manual_seed(5)
    bias = torch.randn(256, generator=gen) * 0.05 + 5.0
    topk = build_topk(experts=256, top_k=8, shared=1, use_grouped_topk=True,
                      num_expert_group=8, topk_group=4, renormalize=True,
                      scoring_func="sigmoid", correction_bias=bias, routed_scaling_factor=2.5)
    logits = torch.randn(32, 256, generator=gen) * 2
    torch.manual_seed(0)
    ref = stock_call(topk, logits)
    torch.manual_seed(0)  # SGLang draws the shared slot's id at random
    out = call(runtime, topk, logits, StepLayout("decode", 32, 0))
    assert out.topk_ids.shape == ref.topk_ids.shape == (32, 9)
    assert torch.equal(out.topk_ids[:, 8], ref.topk_ids[:, 8])  # the shared slot
    assert torch.equal(out.topk_weights[:, 8], ref.topk_weights[:, 8])
    assert bool((out.topk_ids[:, :8] < 256).all())
    stats = _stats(runtime)
    assert stats["stock_union"] == ref.topk_ids[:, :8].unique().numel()
    assert stats["kept"] <= stats["stock_union"]


def test_biased_router_keeps_top1_when_scores_are_not_positive() -> None:
    """6. Sigmoid + bias, logits of a row at -100, biases < 0: the row lost its top-1."""
    gen = torch.Generator().manual_seed(6)
    bias = -0.3 + torch.rand(16, generator=gen) * 0.25
    logits = torch.randn(8, 16, generator=gen)
    logits[3] = -100.0
    router = RouterSpec(top_k=4, scoring="sigmoid", has_correction_bias=True)
    rows = torch.ones(8, dtype=torch.bool)
    for policy in ("budget", "affinity", "piggyback"):
        sel = select_layer_step(policy, logits, router, make_knobs(budget=4), rows, rows, bias)
        top1 = int((torch.sigmoid(logits[3]) + bias).argmax())
        assert int(sel.topk_ids[3, 0]) == top1 and bool(sel.keep[top1]), policy


@pytest.mark.parametrize("garbage", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_padding_never_poisons_statistics(garbage: float) -> None:
    """7. NaN padding rows made the statistics (and every later window) NaN."""
    runtime = make_runtime(policy_spec("budget", budget=4), 16, 4)
    gen = torch.Generator().manual_seed(7)
    bias = torch.randn(16, generator=gen) * 0.1
    topk = build_topk(experts=16, top_k=4, use_grouped_topk=True, num_expert_group=4,
                      topk_group=2, scoring_func="sigmoid", correction_bias=bias)
    clean = torch.randn(8, 16, generator=gen)
    poisoned = clean.clone()
    poisoned[5:] = garbage
    call(runtime, topk, poisoned, StepLayout("decode", 5, 0))
    after_garbage = runtime.exporter.accumulator.clone()
    call(runtime, topk, clean, StepLayout("decode", 5, 0))
    assert bool(torch.isfinite(runtime.exporter.accumulator).all())
    assert torch.allclose(runtime.exporter.accumulator, 2 * after_garbage)  # same 5 real rows
    window = runtime.exporter.flush(runtime.state)
    assert all(v == v for v in (window.mass_kept, window.top1_kept, *window.experts_kept))
    # a NaN in a real row: routed stock, counted, kept out of the sums
    poisoned[:5] = clean[:5]
    poisoned[2, 3] = float("nan")
    rows = torch.arange(8) < 5
    sel = select_layer_step("budget", poisoned, RouterSpec(top_k=4, scoring="sigmoid",
                            has_correction_bias=True, num_expert_group=4, topk_group=2),
                            make_knobs(budget=4), rows, rows, bias)
    assert not bool(sel.apply_rows[2]) and float(sel.stats[NONFINITE]) == 1.0
    assert bool(torch.isfinite(sel.stats).all())


@pytest.mark.parametrize("scale", [2.0, 4.0])
def test_deepseek_v3_shape_is_pruned_in_nearly_every_decode_step(scale: float) -> None:
    """8. DeepSeek-V3 (E256, G8/tg4, top-8, sigmoid + bias ~+5): the old shared-bias guard
    left most steps unpruned. Budget pinned at 64; every decode step must be pruned (all rows
    through the selection, top-1 kept) and hold fewer experts than stock wherever the stock
    union exceeds the budget."""
    router = RouterSpec(top_k=8, scoring="sigmoid", num_expert_group=8, topk_group=4,
                        has_correction_bias=True, routed_scaling_factor=2.5)
    knobs = make_knobs(budget=64)
    for batch in (16, 32, 64):
        applied = cut = over_budget = 0
        for seed in range(20):
            gen = torch.Generator().manual_seed(seed)
            logits = torch.randn(batch, 256, generator=gen) * scale
            bias = 5.0 + torch.randn(256, generator=gen) * 0.05
            rows = torch.ones(batch, dtype=torch.bool)
            sel = select_layer_step("budget", logits, router, knobs, rows, rows, bias)
            stats = statistics_dict(sel.stats)
            top1 = library_stock(logits, router, bias).ids[:, 0]
            assert torch.equal(sel.topk_ids[:, 0], top1)
            applied += int(bool(sel.apply_rows.all()) and stats["top1_kept"] == batch)
            if stats["stock_union"] > 64:
                over_budget += 1
                cut += int(stats["kept"] < stats["stock_union"])
        assert applied == 20, (batch, applied)
        assert cut >= 0.9 * over_budget, (batch, cut, over_budget)


@pytest.mark.parametrize("scoring", ["sigmoid", "softmax"])
def test_masking_cannot_leak_at_extreme_logits(scoring: str) -> None:
    """Logits around +-1e4: a fixed -1e4 mask let row 0 route to a dropped expert."""
    logits = torch.tensor([[1e4, 1e4, -1e4], [-1e4, -1e4, 1e4]])
    if scoring == "softmax":
        logits = torch.tensor([[0.0, -5000.0, -6000.0], [-6000.0, -5000.0, 0.0]])
    router = RouterSpec(top_k=2, scoring=scoring)  # type: ignore[arg-type]
    rows = torch.ones(2, dtype=torch.bool)
    sel = select_layer_step("budget", logits, router, make_knobs(budget=0), rows, rows)
    assert bool(sel.keep[sel.topk_ids].all())
    from lynx.selection import apply_logit_bias, masking_logit_bias

    masked = apply_logit_bias(logits, masking_logit_bias(logits, sel.allowed))
    assert bool(torch.isfinite(masked).all())
    dropped = ~sel.allowed
    assert bool((masked[dropped] < logits.min() - 5000).all())


def test_statistics_are_kept_per_decode_batch_bucket() -> None:
    """Per batch-size bucket (what the controller's latency model is fitted on): steps,
    latency and the pruned layer-steps' kept / union, accumulated through a device index."""
    runtime = make_runtime(policy_spec("budget", budget=4), 16, 4, layers=1)
    topk = build_topk(experts=16, top_k=4)
    gen = torch.Generator().manual_seed(9)
    kept_by_rows = {}
    for rows in (3, 3, 20):
        logits = torch.randn(rows, 16, generator=gen) * 2
        before = runtime.exporter.layer_totals()[0].clone()
        call(runtime, topk, logits, StepLayout("decode", rows, 0))
        runtime.exporter.after_step(runtime.state, StepLayout("decode", rows, 0), 0.004)
        kept_by_rows.setdefault(rows, []).append(
            float(runtime.exporter.layer_totals()[0][1] - before[1]))
    window = runtime.exporter.flush(runtime.state)
    buckets = {b["max_batch"]: b for b in window.decode_buckets}
    assert set(buckets) == {4, 32}
    assert buckets[4]["steps"] == 2 and buckets[32]["steps"] == 1
    assert buckets[4]["latency_counts"][2] == 2  # 4 ms: in the (2, 5] ms bucket
    assert buckets[4]["experts_kept_mean"] == pytest.approx(sum(kept_by_rows[3]) / 2)
    assert buckets[32]["experts_kept_mean"] == pytest.approx(kept_by_rows[20][0])
    assert 0 < buckets[32]["routing_mass_kept"] <= 1
    from lynx_protocol.messages import DecodeBucket

    assert DecodeBucket(**buckets[32]).steps == 1  # what the link sends validates
