"""Batch-aware expert selection: which experts a layer computes in one decode step.

Pure functions over tensors; no engine import, no globals, no host sync (no ``.item()``,
``nonzero``, boolean indexing or Python branching on tensor values), so every function traces
into one CUDA graph / ``torch.compile(fullgraph=True)`` graph. Knobs are 0-dim device tensors:
changing one is a ``fill_``, never a recompile.

Shapes: T rows (tokens) in the step, E experts, K the router's top-k.
- ``probs``      [T,E] float32  router probabilities (softmax of the logits)
- ``row_valid``  [T]   bool     real rows (padding rows: False; they never vote)
- ``prunable``   [T]   bool     valid decode rows that may be pruned (prefill rows: False)
- result         [E]   bool     the batch's keep set for this layer and step

Guarantees of every policy (property-tested): each prunable row's top-1 expert is kept; at
least K experts are kept; the set depends only on prunable rows.
"""

from __future__ import annotations

import torch

RANK_FIRST = 1.0e9  # score offset that puts must-keep experts ahead of every other expert


def _rank_of(score: torch.Tensor) -> torch.Tensor:
    """Rank of each expert by descending score, ties broken by expert index. [E] int64."""
    order = torch.argsort(score, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(0, order, torch.arange(score.shape[0], device=score.device))
    return ranks


def batch_importance(probs: torch.Tensor, top_k: int, prunable: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(importance [E], top-1 votes [E]): stock top-k routing mass and top-1 counts over the
    prunable rows."""
    num_experts = probs.shape[-1]
    weight = prunable.to(probs.dtype)
    top_values, top_ids = probs.topk(top_k, dim=-1)
    importance = torch.zeros(num_experts, dtype=probs.dtype, device=probs.device)
    importance.index_add_(0, top_ids.flatten(), (top_values * weight[:, None]).flatten())
    top1_votes = torch.zeros(num_experts, dtype=probs.dtype, device=probs.device)
    top1_votes.index_add_(0, top_ids[:, 0], weight)
    return importance, top1_votes


def _with_floor(keep: torch.Tensor, importance: torch.Tensor, top1_votes: torch.Tensor,
                top_k: int) -> torch.Tensor:
    """Add every voted top-1 expert and, if fewer than K remain, the most important others."""
    keep = keep | (top1_votes > 0)
    score = importance + (top1_votes > 0).to(importance.dtype) * RANK_FIRST
    score = score + keep.to(importance.dtype) * (2 * RANK_FIRST)
    return keep | (_rank_of(score) < top_k)


def keep_budget(probs: torch.Tensor, top_k: int, prunable: torch.Tensor,
                budget: torch.Tensor) -> torch.Tensor:
    """``budget``: at most ``m = max(budget, distinct top-1 experts, K)`` experts.

    Experts are ranked must-keep first (the top-1 of some prunable row), then by batch
    importance (summed stock top-k probability of the prunable rows). Keeping a prefix of one
    fixed ranking makes the policy monotone: a smaller budget keeps a subset.
    """
    importance, top1_votes = batch_importance(probs, top_k, prunable)
    must = top1_votes > 0
    score = importance + must.to(importance.dtype) * RANK_FIRST
    limit = torch.maximum(budget.to(torch.int64), must.sum().clamp_min(top_k))
    return _rank_of(score) < limit


def keep_piggyback(probs: torch.Tensor, top_k: int, prunable: torch.Tensor,
                   k0: torch.Tensor) -> torch.Tensor:
    """``piggyback`` (OEA-style): each prunable row keeps its top-``k0``; the union is the set
    the rows' other slots are remapped onto."""
    ranks_in_row = torch.argsort(torch.argsort(probs, dim=-1, descending=True, stable=True),
                                 dim=-1)  # [T,E] rank of each expert within its row
    own = (ranks_in_row < k0) & prunable[:, None]
    keep = own.any(dim=0)
    importance, top1_votes = batch_importance(probs, top_k, prunable)
    return _with_floor(keep, importance, top1_votes, top_k)


def keep_affinity(logits: torch.Tensor, top_k: int, row_valid: torch.Tensor,
                  prunable: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor
                  ) -> torch.Tensor:
    """``affinity``: the published AffinityBinning method (arXiv 2411.08982), batch-aware.

    Bins q = ceil(alpha * (z - max z)) clamped at -beta (beta <= 0: no clamp); batch score
    c_e = sum over valid rows of B^q (B = number of valid rows, not the padded size); each
    prunable row re-ranks by q + (c - own)/B and keeps its top-K; the union is the keep set.
    """
    z = logits.float()
    bins = torch.ceil(alpha * (z - z.max(dim=-1, keepdim=True).values))
    bins = torch.where(beta > 0, torch.maximum(bins, -beta), bins)
    n_valid = row_valid.sum().clamp_min(2).to(z.dtype)
    support = torch.exp(bins * torch.log(n_valid)) * row_valid[:, None].to(z.dtype)
    batch_score = support.sum(dim=0)
    reranked = bins + (batch_score[None, :] - support) / n_valid
    chosen = torch.zeros_like(z, dtype=torch.bool)
    chosen.scatter_(1, reranked.topk(top_k, dim=-1).indices, True)
    keep = (chosen & prunable[:, None]).any(dim=0)
    importance, top1_votes = batch_importance(torch.softmax(z, dim=-1), top_k, prunable)
    return _with_floor(keep, importance, top1_votes, top_k)


def restrict_to_groups(choice_logits: torch.Tensor, num_groups: int, topk_group: int,
                       top2_sum: bool) -> torch.Tensor:
    """Each row's choice logits outside the ``topk_group`` groups it routes to set to -1e4
    (group score: best expert, or the sum of the top-2 scores for sigmoid+bias routers)."""
    rows, experts = choice_logits.shape
    grouped = choice_logits.view(rows, num_groups, experts // num_groups)
    if top2_sum:
        group_score = grouped.exp().topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
    else:
        group_score = grouped.max(dim=-1).values
    chosen = torch.zeros_like(group_score, dtype=torch.bool)
    chosen.scatter_(1, group_score.topk(topk_group, dim=-1).indices, True)
    allowed = chosen[:, :, None].expand_as(grouped).reshape(rows, experts)
    return torch.where(allowed, choice_logits, -1.0e4)


def keep_all(num_experts: int, device: torch.device) -> torch.Tensor:
    return torch.ones(num_experts, dtype=torch.bool, device=device)


def ensure_groups(keep: torch.Tensor, importance: torch.Tensor, num_groups: int,
                  topk_group: int, min_per_group: int = 1) -> torch.Tensor:
    """Grouped routers: make sure ``topk_group`` groups, and every group that already holds a
    kept expert, hold at least ``min_per_group`` kept experts (softmax groups score by their
    best expert: 1; sigmoid+bias groups by the sum of their top-2: 2), adding the most
    important missing experts."""
    experts = keep.shape[0]
    per_group = experts // num_groups
    grouped_keep = keep.view(num_groups, per_group)
    grouped_importance = importance.view(num_groups, per_group)
    kept_count = grouped_keep.sum(dim=1)
    group_score = (grouped_importance.max(dim=1).values
                   + kept_count.to(importance.dtype) * RANK_FIRST)
    chosen_groups = (_rank_of(group_score) < topk_group) | (kept_count > 0)
    for _ in range(min(min_per_group, per_group)):
        needs = chosen_groups & (grouped_keep.sum(dim=1) < min_per_group)
        candidate = torch.where(grouped_keep, -RANK_FIRST, grouped_importance).argmax(dim=1)
        add = torch.zeros_like(grouped_keep)
        add.scatter_(1, candidate[:, None], True)
        grouped_keep = grouped_keep | (add & needs[:, None])
    return grouped_keep.reshape(experts)
