"""Evaluation mode (``LYNX_EVALUATION=prefill-as-decode``) through the plugin's TopK hook on
SGLang's real ``TopK``: a prefill forward's rows at one position are pruned together as one
decode step of that many rows, exactly as the transformers calibration hook
(`calibrate.tables.RouterHook`) prunes B windows at one position; without the mode, or with
policy ``off``, prefill stays SGLang's own; the mode is refused unless asked for by name and
unless the radix cache is off."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conformance_configs import BY_NAME, MODELS, draw_inputs
from topk_harness import (
    build_topk,
    call,
    make_runtime,
    policy_spec,
    sglang_topology,
    standard,
)
from topk_harness import stock as stock_call

from lynx.calibrate.tables import RouterHook, single_layer_policy
from lynx.selection import RouterSpec
from lynx.selection.statistics import STAT_FIELDS
from lynx.sglang_plugin.config import LynxConfigError, load_config
from lynx.sglang_plugin.evaluation import (
    PrefillAsDecode,
    check_server_args,
    position_groups,
)
from lynx.sglang_plugin.step_state import StepLayout

pytest.importorskip("sglang.srt.layers.moe.topk")
MODEL = BY_NAME["Qwen3-30B-A3B"]


def evaluated(runtime, topk, logits: torch.Tensor, positions: torch.Tensor):
    """One prefill forward's TopK call through the hooks, as the server makes it."""
    from sglang.srt.layers.moe.topk import TopK

    state = runtime.state
    layout = StepLayout("prefill", logits.shape[0], logits.shape[0])
    state.begin_step(layout)
    if runtime.evaluation is not None:
        runtime.evaluation.begin(state, SimpleNamespace(positions=positions), layout)
    try:
        return standard(runtime.around_topk_forward(
            TopK.forward_native, topk, torch.zeros(logits.shape[0], 8), logits, path="native"))
    finally:
        state.step_active = False
        if runtime.evaluation is not None:
            runtime.evaluation.groups = None


def test_position_groups_are_the_rows_at_each_position() -> None:
    positions = torch.tensor([0, 1, 2, 0, 1, 0, 1, 2, 3])  # requests of 3, 2 and 4 tokens
    groups = position_groups(positions)
    assert [g.tolist() for g in groups] == [[0, 3, 5], [1, 4, 6], [2, 7], [8]]


@pytest.mark.parametrize("layer", [0, 1])
def test_prefill_groups_are_pruned_as_the_transformers_calibration_prunes_windows(
        layer: int) -> None:
    batch, length, e, k = 6, 5, MODEL.experts, MODEL.top_k
    policy = single_layer_policy(layer, 2 * k, 2, e)
    # B windows of P tokens, laid out as SGLang packs a prefill: request after request
    logits, _ = draw_inputs(MODEL, batch * length, seed=layer)
    positions = torch.arange(length).repeat(batch)
    with sglang_topology():
        runtime = make_runtime(policy, e, k, layers=2)
        runtime.evaluation = PrefillAsDecode()
        topk = build_topk(experts=e, top_k=k, layer=layer, renormalize=MODEL.renormalize)
        served = evaluated(runtime, topk, logits, positions)
        stock = standard(stock_call(topk, logits))
        # the transformers hook on the same logits: [B*P, E] in (window, position) order
        hook = RouterHook(policy, batch, layer, e,
                          RouterSpec(top_k=k, renormalize=MODEL.renormalize))
        _, weights, ids = hook(None, None, (logits, stock.topk_weights, stock.topk_ids))
        assert torch.equal(served.topk_ids, ids)
        torch.testing.assert_close(served.topk_weights, weights.to(served.topk_weights.dtype))
        assert not torch.equal(served.topk_ids, stock.topk_ids)  # it did prune
        kept = runtime.exporter.layer_totals()[layer]
        assert float(kept[0]) == length  # one pruned layer-step per position
        # the other layer (unpruned in this policy) and policy off stay SGLang's own
        other = build_topk(experts=e, top_k=k, layer=1 - layer, renormalize=MODEL.renormalize)
        assert torch.equal(evaluated(runtime, other, logits, positions).topk_ids,
                           standard(stock_call(other, logits)).topk_ids)
        # ...but counts its experts (the stock union), and no row, mass or rerouting
        counted = dict(zip(STAT_FIELDS, runtime.exporter.layer_totals()[1 - layer].tolist(),
                           strict=True))
        assert counted["layer_steps"] == length and counted["kept"] == counted["stock_union"]
        assert counted["stock_union"] >= length * k and counted["rows"] == 0
        assert counted["mass_total"] == 0 and counted["rerouted_rows"] == 0
        plain = make_runtime(policy, e, k, layers=2)  # no evaluation mode: prefill is stock
        assert torch.equal(evaluated(plain, topk, logits, positions).topk_ids, stock.topk_ids)


def test_evaluation_mode_is_asked_for_by_name_and_needs_the_radix_cache_off() -> None:
    assert load_config({"LYNX_ENABLED": "1",
                        "LYNX_EVALUATION": "prefill-as-decode"}).evaluation
    assert not load_config({"LYNX_ENABLED": "1"}).evaluation
    for bad in ("1", "on", "prefill"):
        with pytest.raises(LynxConfigError, match="only evaluation mode"):
            load_config({"LYNX_ENABLED": "1", "LYNX_EVALUATION": bad})
    assert "disable-radix-cache" in (check_server_args(
        SimpleNamespace(disable_radix_cache=False)) or "")
    assert check_server_args(SimpleNamespace(disable_radix_cache=True)) is None


def _topk_of(model, bias: torch.Tensor | None, shared: int):
    """SGLang's ``TopK`` as the checkpoint's model file builds it (`test_conformance_topk`)."""
    kwargs: dict = {"renormalize": model.renormalize, "scoring_func": model.scoring,
                    "correction_bias": bias,
                    "routed_scaling_factor": model.routed_scaling_factor}
    if model.grouped:
        kwargs.update(use_grouped_topk=True, num_expert_group=model.groups,
                      topk_group=model.topk_group)
    return build_topk(experts=model.experts, top_k=model.top_k, shared=shared, **kwargs)


@pytest.mark.parametrize("name", [m.name for m in MODELS if not m.custom_routing])
def test_every_pruned_router_kind_evaluates_each_position_as_its_decode_step(name: str
                                                                             ) -> None:
    """The server calibration path (issue 25) on every router kind the support table prunes
    (grouped, biased, sigmoid, unnormalised, fused shared slots): each position group of an
    evaluated prefill forward gets exactly what the plugin's decode path gives a decode step
    of those rows, and the layer is counted as pruned, not passed through."""
    model = BY_NAME[name]
    batch, length, e, k = 6, 4, model.experts, model.top_k
    policy = policy_spec("budget", budget=max(k, 2 * k if e > 4 * k else k + 1))
    logits, bias = draw_inputs(model, batch * length, seed=3)
    positions = torch.arange(length).repeat(batch)
    for shared in sorted({0, min(model.shared_experts, 1)}):
        with sglang_topology():
            topk = _topk_of(model, bias, shared)
            runtime = make_runtime(policy, e, k, layers=1)
            runtime.evaluation = PrefillAsDecode()
            torch.manual_seed(0)
            served = evaluated(runtime, topk, logits, positions)
            stock = standard(stock_call(topk, logits))
            decode = make_runtime(policy, e, k, layers=1)
            for group in position_groups(positions):
                torch.manual_seed(0)
                step = standard(call(decode, topk, logits[group],
                                     StepLayout("decode", group.numel(), 0)))
                assert torch.equal(served.topk_ids[group], step.topk_ids), (name, shared)
                torch.testing.assert_close(served.topk_weights[group], step.topk_weights)
            assert not torch.equal(served.topk_ids, stock.topk_ids), (name, shared)
            counted = dict(zip(STAT_FIELDS, runtime.exporter.layer_totals()[0].tolist(),
                               strict=True))
            assert counted["layer_steps"] == length and counted["rows"] == batch * length
            assert counted["kept"] < counted["stock_union"]
