"""What every keep set must contain, whatever the policy.

Shape legend: T rows, E experts, K top_k, G expert groups, P = E // G experts per group.

- every pruned row keeps its own top-1 expert;
- at least K experts are active;
- grouped routers: at least ``topk_group`` groups hold active experts and every group that
  holds any holds enough (`RouterSpec.min_active_per_group`) for a row to find K experts in
  its chosen groups. Groups scored by top-2 sums (biased routers) also activate every group a
  pruned row routes within: there each pruned row is confined to its stock groups by its own
  correction-bias mask (`routing.masked_correction_bias`), since a group chosen only after
  masking could hold an expert that outranks the row's top-1;
- with no pruned row in the step, every expert is kept.
All additions follow a fixed order (importance, then lower index), so a policy whose own set
only grows with its knob (``budget``) stays monotone after these rules.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from lynx.selection.affinity import rank_descending
from lynx.selection.routers import RouterSpec, StockRouting

RANK_FIRST = 1.0e9  # score offset that ranks a set of experts ahead of all others


class BatchRouting(NamedTuple):
    """The stock routing of a step and its per-expert totals over the pruned rows."""

    stock: StockRouting
    importance: torch.Tensor  # [E] fp32 sum over pruned rows of stock gate mass on the expert
    top1_votes: torch.Tensor  # [E] fp32 pruned rows whose top-1 is the expert


def batch_totals(stock: StockRouting, rows: torch.Tensor) -> BatchRouting:
    """Per-expert importance and top-1 votes over ``rows`` [T] (deterministic: dense scatter
    then a column sum, no atomics)."""
    weight = rows.to(torch.float32)[:, None]
    rows_n, experts = stock.choice.shape
    dense = torch.zeros(rows_n, experts, dtype=torch.float32, device=stock.ids.device)
    importance = dense.scatter(1, stock.ids, stock.gate.float() * weight).sum(dim=0)
    top1_votes = dense.scatter(1, stock.ids[:, :1], weight).sum(dim=0)
    return BatchRouting(stock, importance, top1_votes)


def must_keep(batch: BatchRouting) -> torch.Tensor:
    """[E] bool: experts no policy may drop (the top-1 of every pruned row)."""
    return batch.top1_votes > 0


def groups_in_use(stock: StockRouting, router: RouterSpec, rows: torch.Tensor) -> torch.Tensor:
    """[G] bool: groups that some row of ``rows`` routes within (stock group choice)."""
    rows_n, experts = stock.choice.shape
    groups = router.num_expert_group
    assert groups is not None
    allowed = torch.isfinite(stock.choice) & rows[:, None]  # [T,E]
    return allowed.view(rows_n, groups, experts // groups).any(dim=2).any(dim=0)


def with_top_k_floor(keep: torch.Tensor, importance: torch.Tensor, top_k: int) -> torch.Tensor:
    """``keep`` plus, if it holds fewer than K experts, the most important others."""
    score = keep.to(importance.dtype) * RANK_FIRST + importance
    return keep | (rank_descending(score) < top_k)


def with_viable_groups(keep: torch.Tensor, batch: BatchRouting, must: torch.Tensor,
                       router: RouterSpec, rows: torch.Tensor) -> torch.Tensor:
    """Grouped routers: the ``topk_group`` groups ranked first (groups holding a must-keep
    expert, then by total importance), every group holding a kept expert and, for top-2
    scored routers, every group a pruned row routes within get their `min_active_per_group`
    most important experts."""
    assert router.num_expert_group is not None and router.topk_group is not None
    forced = groups_in_use(batch.stock, router, rows) if router.groups_score_top2 else None
    return fill_groups(keep, batch.importance, must, router.num_expert_group,
                       router.topk_group, router.min_active_per_group(), forced)


def fill_groups(keep: torch.Tensor, importance: torch.Tensor, priority_experts: torch.Tensor,
                num_groups: int, min_groups: int, min_per_group: int,
                forced_groups: torch.Tensor | None = None) -> torch.Tensor:
    """`with_viable_groups` with explicit numbers: groups holding ``priority_experts`` [E] rank
    first among the ``min_groups`` groups made active; ``forced_groups`` [G] are active too."""
    experts = keep.shape[0]
    per_group = experts // num_groups
    need = min(min_per_group, per_group)
    grouped_keep = keep.view(num_groups, per_group)
    grouped_importance = importance.view(num_groups, per_group)
    priority = (priority_experts.view(num_groups, per_group).any(dim=1).to(importance.dtype)
                * RANK_FIRST + grouped_importance.sum(dim=1))
    active = grouped_keep.any(dim=1) | (rank_descending(priority) < min_groups)
    if forced_groups is not None:
        active = active | forced_groups
    order = torch.argsort(grouped_importance, dim=1, descending=True, stable=True)
    best_in_group = torch.zeros_like(grouped_keep).scatter_(1, order[:, :need], True)
    return (grouped_keep | (best_in_group & active[:, None])).reshape(experts)


def finalize_keep(keep: torch.Tensor, batch: BatchRouting, must: torch.Tensor,
                  router: RouterSpec, rows: torch.Tensor) -> torch.Tensor:
    """Apply every rule above to a policy's keep set [E]."""
    keep = with_top_k_floor(keep | must, batch.importance, router.top_k)
    if router.grouped:
        keep = with_viable_groups(keep, batch, must, router, rows)
    return keep | ~rows.any()
