"""Per SGLang ``TopK`` layer: prune its output format on purpose, or pass it through.

Shape legend: T rows, E routed experts, K routed top_k, S fused shared slots (K + S columns).

SGLang 0.5.23's ``TopK`` returns one of these (``TopKConfig.output_format``, fixed per layer):
- STANDARD (``forward_native``/``forward_cpu`` always; ``forward_cuda`` by default): SGLang
  routes every row itself; Lynx then overwrites the K routed columns of the rows whose SGLang
  top-K holds a dropped expert with the library's routing restricted to the kept experts
  (`lynx.selection.select_layer_step`). Every other row keeps SGLang's own output bit for bit
  (pruned rows with nothing dropped included), the S shared columns are never touched, and
  no shared bias or logit penalty is involved, so every router kind is pruned (grouped,
  correction bias, renormalize off, routed scaling factor in the weights or later, raw-logit
  weights of the flashinfer TRT-LLM routed runner).
- BYPASSED (flashinfer TRT-LLM / mxfp4 kernels route inside the MoE kernel) and TRITON_KERNEL
  (GPT-OSS on Hopper: routed from the logits by triton_kernels): Lynx can only change the
  logits those kernels read, so it hands them a finite per-row mask
  (`lynx.selection.mask_rerouted_logits`) in the rows it reroutes, judged before the kernel
  routes (a row whose K-th choice ties with a dropped expert is masked too: the kernel might
  break the tie toward it); the others get SGLang's logits untouched.
  That equals the router's rule restricted to the kept experts only when the weights are
  renormalised over the K and no correction bias takes part (the kernels read one bias shared
  by all rows, and a softmax over all E changes with masked logits); otherwise: pass through.
- anything else passes through unchanged, counted per reason (`PASS_THROUGH_REASONS`), logged
  once: custom routing functions (Llama-4), other scoring functions, per-rank shared slot
  remapping (DeepEP-class layouts), EPLB calls whose dispatch Lynx cannot map back
  (``fake``, ``lp``: `lynx.sglang_plugin.eplb`), Waterfill expansion, packed FlashInfer ids,
  per-token dynamic expert bias, speculative draft layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from lynx.selection import RouterSpec, merge_rerouted

PASS_THROUGH_REASONS: tuple[str, ...] = (
    "custom_routing", "scoring", "expert_remapping", "waterfill", "packed_ids",
    "dynamic_expert_bias", "draft", "bypassed_shared_bias", "bypassed_unnormalized",
    "triton_kernel_router", "unexpected_output", "eplb_dispatch", "evaluation_format",
)

Mode = Literal["standard", "logits", "pass"]


@dataclass(frozen=True)
class LayerPlan:
    """What the hook does with one TopK layer (decided once per layer and call path)."""

    mode: Mode
    reason: str = ""  # one of PASS_THROUGH_REASONS when mode == "pass"
    router: RouterSpec | None = None


def _pass(reason: str) -> LayerPlan:
    return LayerPlan("pass", reason)


def _per_rank_shared_slots(num_shared_slots: int) -> bool:
    """Per-rank shared-slot layouts (DeepEP-class backends): the shared columns' ids differ
    per rank, so the layer passes through. (EPLB's physical ids are decided per call:
    `lynx.sglang_plugin.eplb`.)"""
    from sglang.srt.layers.moe.utils import has_per_rank_fused_shared_slots

    try:
        return bool(has_per_rank_fused_shared_slots(num_shared_slots))
    except (ValueError, AttributeError):  # no published server config (unit tests)
        return False


def output_format_of(topk: Any, path: str) -> str:
    """Name of the TopK output format the call ``path`` ("native", "cpu", "cuda") produces."""
    if path != "cuda":
        return "STANDARD"
    fmt = topk.topk_config.output_format
    return "STANDARD" if fmt is None else fmt.name


def _softmax_bias_used(path: str) -> bool:
    """Whether SGLang's plain (ungrouped) softmax top-K on ``path`` adds the correction bias:
    its torch-native router does (``forward_native``; and ``fused_topk_cpu`` on an AMX CPU);
    ``fused_topk``'s kernels (``topk_softmax`` on CUDA, ROCm and a CPU without AMX) take none."""
    if path == "native":
        return True
    if path == "cpu":
        from sglang.srt.layers.moe import topk as sglang_topk

        return bool(getattr(sglang_topk, "_is_cpu_amx_available", False))
    return False


def router_spec(config: Any, *, raw_logits: bool = False, ep_ranks: int = 1,
                ep_balance: bool = True, path: str = "native") -> RouterSpec:
    """The library's description of an SGLang ``TopKConfig`` (routed experts only), read from
    what SGLang's ``select_experts`` executes on ``path`` rather than from the config fields
    alone:
    - a grouped router with a correction bias runs ``biased_grouped_topk``, which scores by
      sigmoid whatever ``scoring_func`` says (GLM-4.5's model file leaves it at the default
      "softmax"; DeepSeek's passes "sigmoid");
    - an ungrouped softmax router with a bias (ERNIE-4.5) has it added only on the paths of
      `_softmax_bias_used`; elsewhere SGLang routes it without, and so does Lynx.
    ``ep_ranks``: the EP layout (statistics per rank); ``ep_balance``: spend budgets per EP
    rank (`lynx.selection.ep`) instead of one global budget."""
    grouped = bool(config.use_grouped_topk and config.num_expert_group
                   and config.num_expert_group > 1)
    has_bias = config.correction_bias is not None
    biased_grouped = bool(config.use_grouped_topk) and has_bias
    scoring = "sigmoid" if biased_grouped else config.scoring_func
    if has_bias and not config.use_grouped_topk and scoring == "softmax":
        has_bias = _softmax_bias_used(path)
    shared = int(config.num_shared_topk_slots)
    return RouterSpec(
        top_k=int(config.top_k) - shared, renormalize=bool(config.renormalize),
        scoring=scoring,
        num_expert_group=int(config.num_expert_group) if grouped else None,
        topk_group=int(config.topk_group or 1) if grouped else None,
        has_correction_bias=has_bias,
        weights="raw_logits" if raw_logits else "gate",
        routed_scaling_factor=(float(config.routed_scaling_factor)
                               if config.routed_scaling_factor is not None else None),
        scale_on_output=bool(config.apply_routed_scaling_factor_on_output),
        shared_slots=shared, ep_ranks=ep_ranks, ep_balance=ep_balance,
    )


def _raw_logit_runner(config: Any, path: str) -> bool:
    """SGLang's flashinfer TRT-LLM routed runner takes the top-K of the raw logits and uses
    them as weights (``fused_topk_softmax_torch_raw_logits``) on the CUDA STANDARD path."""
    backend = config.runner_backend
    return (path == "cuda" and backend is not None and backend.is_flashinfer_trtllm_routed()
            and config.scoring_func == "softmax" and config.correction_bias is None
            and not config.use_grouped_topk)


def plan_layer(topk: Any, path: str, ep_ranks: int = 1, ep_balance: bool = True
               ) -> LayerPlan:
    """Decide how one TopK call is handled (see the module doc). Never raises for a config
    SGLang accepts: what Lynx cannot prune correctly becomes a pass-through with a reason.
    ``ep_ranks``: the EP ranks (SGLang's contiguous blocks of E / R routed experts per rank;
    the per-rank shared-slot layouts pass through before this), ``ep_balance``:
    spend budgets per rank."""
    config = topk.topk_config
    if getattr(topk, "is_draft", False):
        return _pass("draft")
    if config.custom_routing_function is not None:
        return _pass("custom_routing")
    if config.scoring_func not in ("softmax", "sigmoid") or getattr(
            config, "sqrtsoftplus_log1p", False):
        return _pass("scoring")
    if getattr(topk, "enable_waterfill", False):
        return _pass("waterfill")
    if _per_rank_shared_slots(int(config.num_shared_topk_slots)):
        return _pass("expert_remapping")
    fmt = output_format_of(topk, path)
    if fmt == "STANDARD":
        return LayerPlan("standard", router=router_spec(
            config, raw_logits=_raw_logit_runner(config, path), ep_ranks=ep_ranks,
            ep_balance=ep_balance, path=path))
    if fmt == "BYPASSED":
        if config.correction_bias is not None:
            return _pass("bypassed_shared_bias")
        if not config.renormalize:
            return _pass("bypassed_unnormalized")
        return LayerPlan("logits", router=router_spec(config, ep_ranks=ep_ranks,
                                                      ep_balance=ep_balance))
    if fmt == "TRITON_KERNEL":
        # triton_kernels' routing is a plain softmax top-K of the logits (no groups, bias or
        # shared slots) and renormalises only with sm_first=False.
        if (config.correction_bias is not None or config.use_grouped_topk
                or not config.renormalize or config.num_shared_topk_slots):
            return _pass("triton_kernel_router")
        return LayerPlan("logits", router=router_spec(config, ep_ranks=ep_ranks,
                                                      ep_balance=ep_balance))
    return _pass("unexpected_output")


def standard_routed(output: Any, router: RouterSpec) -> bool:
    """Whether a TopK ``output`` is SGLang's STANDARD format with the router's K routed (+ S
    shared) columns: the only output whose ids Lynx judges on and rewrites."""
    return type(output).__name__ == "StandardTopKOutput" and (
        output.topk_ids.shape[1] == router.top_k + router.shared_slots)


def merge_standard_output(output: Any, routed_weights: Any, routed_ids: Any,
                          rerouted: Any, top_k: int) -> Any:
    """SGLang's STANDARD output with the first ``top_k`` (routed) columns replaced by
    ``routed_weights``/``routed_ids`` [T,K] only in the ``rerouted`` [T] rows: those whose own
    routed ids (SGLang's, the step's ``stock_ids``) hold a dropped expert
    (`lynx.selection.merge_rerouted`). Every other
    row, and the S shared columns, stay SGLang's bit for bit, so a step that drops nothing is
    SGLang's own output. Same dtypes, static shapes, no host sync: capturable."""
    ids, weights = output.topk_ids, output.topk_weights
    new_ids, new_weights = merge_rerouted(ids[:, :top_k], weights[:, :top_k], routed_ids,
                                          routed_weights, rerouted)
    if ids.shape[1] > top_k:
        new_ids = torch.cat([new_ids, ids[:, top_k:]], dim=1)
        new_weights = torch.cat([new_weights, weights[:, top_k:]], dim=1)
    return output._replace(topk_ids=new_ids, topk_weights=new_weights)
