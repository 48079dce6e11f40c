"""Bridge between SGLang's TopK call and the engine-agnostic selection library.

Builds the row masks from the step's device knobs and runs `lynx.selection.select_layer_step`
(the specification; its Triton variant on CUDA) for the layer: keep set, additive masking bias
for the prunable rows, statistics. Correction-bias routers (DeepSeek-V3 style) get an expert
bias for the router's shared correction bias instead. All static-shape device math (no host
sync), so it is CUDA-graph capturable.
"""

from __future__ import annotations

from typing import Any

import torch

from lynx.selection import select_layer_step
from lynx.selection.routers import RouterSpec, StockRouting, stock_routing
from lynx.selection.routing import MASK_VALUE
from lynx.selection.statistics import STAT_FIELDS, layer_statistics
from lynx.sglang_plugin.step_state import RuntimeState

__all__ = ["STAT_FIELDS", "policy_for_step", "router_spec", "row_masks", "select_for_layer"]


def row_masks(runtime: RuntimeState, num_rows: int, device: torch.device
              ) -> tuple[torch.Tensor, torch.Tensor]:
    knobs = runtime.knobs
    rows = torch.arange(num_rows, device=device)
    valid = rows < knobs.n_valid
    prunable = valid & (rows >= knobs.prunable_start) & knobs.enabled
    return valid, prunable


def choice_logits(router_logits: torch.Tensor, topk_config: Any) -> torch.Tensor:
    """Logits whose softmax ranks experts the way the router chooses them.

    Softmax or plain sigmoid routers: the router logits. Routers with a correction bias
    (DeepSeek-V3 style) choose by ``score(z) + bias``: log of that, so its softmax is the
    normalised choice score (a batch-importance proxy with the router's exact ranking)."""
    logits = router_logits.float()
    bias = topk_config.correction_bias
    if bias is None:
        return logits
    scores = torch.sigmoid(logits) if topk_config.scoring_func == "sigmoid" else torch.softmax(
        logits, dim=-1)
    return torch.log((scores + bias.float()[None, :]).clamp_min(1e-6))


def policy_for_step(runtime: RuntimeState) -> str:
    """The policy name the selection math is traced with: ``by_code`` where a CUDA graph may
    capture it (the device-side ``knobs.policy_code`` then picks the policy at replay, so a
    policy switch needs no recapture), the applied policy's own name otherwise."""
    return "by_code" if runtime.graph_safe else runtime.policy.name


def router_spec(topk_config: Any) -> RouterSpec:
    """The library's description of an SGLang ``TopKConfig`` (a constant per layer)."""
    grouped = bool(topk_config.use_grouped_topk and topk_config.num_expert_group)
    return RouterSpec(
        top_k=int(topk_config.top_k), renormalize=bool(topk_config.renormalize),
        scoring=topk_config.scoring_func,
        num_expert_group=topk_config.num_expert_group if grouped else None,
        topk_group=(topk_config.topk_group or 1) if grouped else None,
        has_correction_bias=topk_config.correction_bias is not None)


def select_for_layer(runtime: RuntimeState, router_logits: torch.Tensor, topk_config: Any,
                     layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(bias, stats [len(STAT_FIELDS)]) for one MoE layer in this step.

    Routers without a correction bias: ``lynx.selection.select_layer_step`` (the Triton
    variant on CUDA), and the bias is its logit bias [T,E]. Routers with one: an expert bias
    [E] to add to the correction bias SGLang reads (shared by all rows, so only pure-decode
    steps are pruned; see `_select_for_biased_router`). Static-shape device math only.
    """
    spec = router_spec(topk_config)
    if spec.has_correction_bias:
        return _select_for_biased_router(runtime, router_logits, topk_config, spec, layer)
    valid, prunable = row_masks(runtime, router_logits.shape[0], router_logits.device)
    step = select_layer_step
    if router_logits.is_cuda:
        from lynx.triton_selection.launcher import select_layer_step_triton as step
    selection = step(policy_for_step(runtime), router_logits, spec,
                     runtime.knobs.for_layer(layer), valid, prunable)
    assert selection.logit_bias is not None
    return selection.logit_bias, selection.stats


def _select_for_biased_router(runtime: RuntimeState, router_logits: torch.Tensor,
                              topk_config: Any, spec: RouterSpec, layer: int
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    from lynx.selection import (
        batch_importance,
        batch_keep_mask,
        ensure_groups,
        restrict_to_groups,
    )

    logits = choice_logits(router_logits, topk_config)
    grouped = bool(topk_config.use_grouped_topk and topk_config.num_expert_group)
    if grouped:  # a row's top-1 is the best expert of the groups it actually routes to
        logits = restrict_to_groups(logits, topk_config.num_expert_group,
                                    topk_config.topk_group or 1, top2_sum=True)
    valid, prunable = row_masks(runtime, logits.shape[0], logits.device)
    knobs = runtime.knobs
    prunable = prunable & (knobs.prunable_start == 0)  # one bias for all rows: pure decode
    top_k = topk_config.top_k
    keep = batch_keep_mask(
        policy_for_step(runtime), logits, top_k=top_k, row_valid=valid, row_prunable=prunable,
        budget=knobs.budget[layer], alpha=knobs.alpha, beta=knobs.beta, k0=knobs.k0,
        policy_code=knobs.policy_code,
    )
    probs = torch.softmax(logits, dim=-1)
    if grouped:
        importance = batch_importance(probs, top_k, prunable)[0]
        keep = ensure_groups(keep, importance, topk_config.num_expert_group,
                             topk_config.topk_group or 1, min_per_group=2)
    expert_bias = torch.where(prunable.any() & ~keep, MASK_VALUE, 0.0)
    if grouped:
        expert_bias, keep = _unless_a_top1_moves(router_logits, topk_config.correction_bias,
                                                 spec, expert_bias, keep, prunable)
    stock_mass, stock_ids = probs.topk(top_k, dim=-1)
    return expert_bias, layer_statistics(StockRouting(probs, stock_ids, stock_mass), keep,
                                         prunable)


def _unless_a_top1_moves(router_logits: torch.Tensor, correction_bias: torch.Tensor,
                         spec: RouterSpec, expert_bias: torch.Tensor, keep: torch.Tensor,
                         prunable: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped routers scoring groups by their top-2 ``score + bias`` with one bias shared by
    all rows: masking an expert lowers its group's score, which can move a row into other
    groups and off its own top-1 expert. Replay the router with the masked bias; rows that
    lose their top-1 get their stock top-K experts back, and if a replay still moves a row off
    its top-1 this layer-step is not pruned (stock bias, stock keep set).
    Static-shape device math (a second routing pass over [T,E]), no host sync."""
    if not spec.groups_score_top2:
        return expert_bias, keep
    stock_bias = correction_bias.float()
    stock_ids = stock_routing(router_logits, spec, stock_bias).ids

    def moved_rows(bias: torch.Tensor) -> torch.Tensor:  # [T] pruned rows off their top-1
        routed_ids = stock_routing(router_logits, spec, stock_bias + bias).ids
        return prunable & ~(routed_ids == stock_ids[:, :1]).any(-1)

    def experts_of(rows: torch.Tensor) -> torch.Tensor:  # [E] stock experts of these rows
        votes = torch.zeros(keep.shape[0], device=keep.device).index_add_(
            0, stock_ids.flatten(), rows.float().repeat_interleave(spec.top_k))
        return votes > 0

    # One repair round: rows that moved get their whole stock top-K back, then re-check.
    repaired = keep | experts_of(moved_rows(expert_bias))
    repaired_bias = torch.where(prunable.any() & ~repaired, MASK_VALUE, 0.0)
    safe = ~moved_rows(repaired_bias).any()
    return (torch.where(safe, repaired_bias, 0.0),
            torch.where(safe, repaired, keep | experts_of(prunable)))
