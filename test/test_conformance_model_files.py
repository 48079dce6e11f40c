"""``TopK`` built by SGLang 0.5.23's own MoE block classes (``Glm4MoeSparseMoeBlock``,
``DeepseekV2MoE``) from the checkpoints' config values, so with exactly the arguments the model
files pass: a router whose model file leaves a field at its default must still be pruned by the
rule SGLang executes.

Found with a tiny GLM-4.5 checkpoint served on the CPU engine: ``glm4_moe.py`` builds a grouped
``TopK`` with a correction bias and no ``scoring_func`` (default "softmax"), and SGLang then
runs ``biased_grouped_topk``, which scores by sigmoid whatever ``scoring_func`` says. The plugin
read "softmax" from the config and rerouted pruned rows by softmax gates: other experts and
other weights than SGLang's own routing restricted to the kept experts. Its neighbour: an
ungrouped softmax router with a bias (ERNIE-4.5) is biased only where SGLang's path adds it.

Shape legend: T rows, E experts, K top_k.
"""

from __future__ import annotations

import pytest
import torch
from conformance_configs import BY_NAME, draw_inputs
from topk_harness import build_topk, call, make_runtime, policy_spec, sglang_topology, standard
from topk_harness import stock as stock_call

from lynx.sglang_plugin.formats import router_spec
from lynx.sglang_plugin.step_state import StepLayout

pytest.importorskip("sglang.srt.layers.moe.topk")

# Checkpoint -> (the SGLang model file's MoE block, the router values of `lynx.reference.tiny`
# or the conformance configs): the TopK is the one that block builds, so a later SGLang that
# changes what its model file passes is tested as it is.
MODEL_FILES = {
    "glm4_moe.py (GLM-4.5-Air)": ("GLM-4.5-Air", "glm4_moe", "Glm4MoeSparseMoeBlock"),
    "glm4_moe.py (GLM-4.5, DeepSeek-V3's groups)": ("GLM-4.5-DSV3-router", "glm4_moe",
                                                    "Glm4MoeSparseMoeBlock"),
    "deepseek_v2.py (DeepSeek-V3)": ("DeepSeek-V3", "deepseek_v2", "DeepseekV2MoE"),
}


def model_file_topk(checkpoint: str, module: str, block: str, bias: torch.Tensor) -> object:
    """The ``TopK`` of SGLang's own MoE ``block`` class built from ``checkpoint``'s router
    values (inside `sglang_topology`), its correction bias set to ``bias`` [E]."""
    import importlib

    from lynx.reference.tiny import tiny_config

    layer = getattr(importlib.import_module(f"sglang.srt.models.{module}"), block)(
        tiny_config(checkpoint), 1)
    with torch.no_grad():
        layer.gate.e_score_correction_bias.copy_(bias)  # the TopK holds the same tensor
    return layer.topk


@pytest.mark.parametrize("model_file", sorted(MODEL_FILES))
def test_pruned_rows_follow_the_rule_sglang_executes(model_file: str) -> None:
    checkpoint, module, block = MODEL_FILES[model_file]
    model = BY_NAME["DeepSeek-V3" if "DSV3" in checkpoint else checkpoint]
    e, k, rows = model.experts, model.top_k, 32
    logits, bias = draw_inputs(model, rows, seed=5)
    assert bias is not None
    with sglang_topology():
        topk = model_file_topk(checkpoint, module, block, bias)
        topk.topk_config.torch_native = True
        assert router_spec(topk.topk_config).scoring == "sigmoid"
        runtime = make_runtime(policy_spec("budget", budget=2 * k), e, k, layers=2)
        torch.manual_seed(0)
        out = standard(call(runtime, topk, logits, StepLayout("decode", rows, 0)))
        ref = standard(stock_call(topk, logits))
    ids, weights = out.topk_ids.long(), out.topk_weights.float()
    rerouted = (ids.sort(1).values != ref.topk_ids.long().sort(1).values).any(-1)
    assert int(rerouted.sum()) >= rows // 4  # budget 2K prunes a random batch hard
    gate = torch.sigmoid(logits.float())  # biased_grouped_topk's scores
    used = torch.zeros(e, dtype=torch.bool)
    used[ids.flatten()] = True
    groups = model.groups or 1
    size = e // groups
    for row in rerouted.nonzero().flatten().tolist():
        # the weights: SGLang's sigmoid gates at the chosen ids, renormalised
        want = gate[row, ids[row]] / gate[row, ids[row]].sum()
        torch.testing.assert_close(weights[row], want, rtol=1e-5, atol=1e-6)
        # the ids: the best K by sigmoid + bias among the experts in use, inside the row's
        # stock groups (groups never change under Lynx)
        stock_groups = torch.zeros(groups, dtype=torch.bool)
        stock_groups[ref.topk_ids[row].long() // size] = True
        allowed = used & stock_groups.repeat_interleave(size)
        choice = torch.where(allowed, gate[row] + bias, -torch.inf)
        assert set(ids[row].tolist()) == set(choice.topk(k).indices.tolist()), row


def _topk_softmax(weights: torch.Tensor, ids: torch.Tensor, gating: torch.Tensor,
                  renormalize: bool) -> None:
    """The CUDA kernel ``topk_softmax`` SGLang's ``fused_topk`` calls (it takes no bias; no
    CUDA here): softmax, top-K, renormalised, written in place."""
    top = torch.softmax(gating.float(), -1).topk(ids.shape[1], dim=-1)
    values = top.values / top.values.sum(-1, keepdim=True) if renormalize else top.values
    weights.copy_(values)
    ids.copy_(top.indices)


def test_an_ungrouped_softmax_bias_is_followed_only_where_sglang_uses_it(monkeypatch) -> None:
    """ERNIE-4.5's model file (``ernie4.py``) builds an ungrouped softmax ``TopK`` with a
    correction bias. SGLang's torch-native router adds the bias to the choice scores; its CUDA
    path (``fused_topk``: ``topk_softmax``) ignores it. Pruned rows follow the rule of the
    path that ran: on ``cuda`` the bias-free softmax top-K among the experts in use."""
    import sglang.srt.layers.moe.topk as sglang_topk

    monkeypatch.setattr(sglang_topk, "topk_softmax", _topk_softmax, raising=False)
    e, k, rows = 64, 8, 32
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(rows, e, generator=gen) * 1.5
    bias = torch.randn(e, generator=gen) * 0.02  # the softmax gates are ~1/E
    kwargs = {"renormalize": True, "correction_bias": bias}
    for path, with_bias in (("native", True), ("cuda", False)):
        with sglang_topology():
            topk = build_topk(experts=e, top_k=k, **kwargs)
            if path == "cuda":
                topk.topk_config.torch_native = False
            runtime = make_runtime(policy_spec("budget", budget=2 * k), e, k, layers=1)
            torch.manual_seed(0)
            out = standard(call(runtime, topk, logits, StepLayout("decode", rows, 0), path))
            ref = standard(stock_call(topk, logits, path))
        ids = out.topk_ids.long()
        rerouted = (ids.sort(1).values != ref.topk_ids.long().sort(1).values).any(-1)
        assert int(rerouted.sum()) >= rows // 4, path
        used = torch.zeros(e, dtype=torch.bool)
        used[ids.flatten()] = True
        choice = torch.softmax(logits, -1) + (bias if with_bias else 0.0)
        for row in rerouted.nonzero().flatten().tolist():
            best = torch.where(used, choice[row], -torch.inf).topk(k).indices
            assert set(ids[row].tolist()) == set(best.tolist()), (path, row)
