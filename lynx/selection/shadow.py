"""Shadow statistics: what the ``budget`` policy would keep at each of several budgets, measured
on a step that is served stock (issue 25: calibration from live traffic).

Shape legend: T rows, E experts, K top_k, M candidate budgets.

One ranking serves every budget: ``budget`` keeps a prefix of one fixed order (must-keep
first, then batch importance, then lower index; `policies.keep_budget`), and the rules every
keep set obeys (`keep_rules.finalize_keep`) extend it along the same order, so the keep set of
every candidate is a prefix of the union experts in that order (`budget_keep_sets`). For a router
without EP balancing the result equals, budget by budget, what `select_layer_step` with the
``budget`` policy reports in its statistics (``kept``, ``mass_kept``, ``top1_kept``), up to
the order of float additions; budgets spent per EP rank (`selection.ep`) are not modelled.

No engine import, no host sync, static shapes.
"""

from __future__ import annotations

import torch

from lynx.selection.keep_rules import RANK_FIRST, BatchRouting, must_keep, row_groups
from lynx.selection.routers import RouterSpec
from lynx_protocol.shadow import (  # the layout, shared with the readers
    SHADOW_BASE,
    SHADOW_PER_BUDGET,
    shadow_budgets,
    shadow_width,
)

__all__ = ["SHADOW_BASE", "SHADOW_PER_BUDGET", "budget_keep_sets", "shadow_budgets",
           "shadow_statistics", "shadow_width"]

def budget_keep_sets(batch: BatchRouting, rows: torch.Tensor, router: RouterSpec,
                     budgets: torch.Tensor) -> torch.Tensor:
    """[M,E] bool: the ``budget`` policy's final keep set at each of ``budgets`` [M] int64,
    for the pruned ``rows`` [T] bool of ``batch`` (`policies.keep_budget`, then
    `keep_rules.finalize_keep`, for every budget from one ranking).

    ``keep_budget`` keeps the stock-union experts among the first ``limit`` of one order
    (must-keep first, then importance, then lower index); `keep_rules.with_top_k_floor` then
    adds union experts by importance (ties: lower index) up to K: the same order among
    union experts outside the must-keep set. So each final set is the first
    ``max(that count, min(K, union))`` union experts of the order."""
    must = must_keep(batch)  # [E]
    union = batch.union
    score = must.to(torch.float32) * RANK_FIRST + batch.importance
    order = torch.argsort(score, descending=True, stable=True)  # [E]
    union_count = torch.cumsum(union[order].to(torch.int64), dim=0)  # [E] union experts so far
    union_rank = torch.empty_like(union_count).scatter_(0, order, union_count - 1)  # [E]
    limit = torch.maximum(budgets.to(torch.int64), must.sum().clamp_min(router.top_k))  # [M]
    within = union_count[(limit - 1).clamp(0, union.shape[0] - 1)]  # [M] union experts kept
    size = torch.maximum(within, union_count[-1].clamp_max(router.top_k))  # [M]
    keep = union[None, :] & (union_rank[None, :] < size[:, None])  # [M,E]
    if router.grouped:  # `with_viable_rows`: rows short of K kept experts in their groups
        groups = row_groups(batch.stock)  # [T,E]
        available = (groups[None, :, :] & keep[:, None, :]).sum(dim=-1)  # [M,T]
        short = rows[None, :] & (available < router.top_k)  # [M,T]
        member = torch.zeros(groups.shape, dtype=torch.bool, device=keep.device)
        member.scatter_(1, batch.stock.ids, True)  # [T,E]: each row's stock top-K
        keep = keep | (short[:, :, None] & member[None, :, :]).any(dim=1)
    return keep | ~rows.any()


def shadow_statistics(batch: BatchRouting, rows: torch.Tensor, router: RouterSpec,
                      budgets: torch.Tensor) -> torch.Tensor:
    """[`shadow_width`(M)] fp32: `SHADOW_BASE`, then `SHADOW_PER_BUDGET` for each of
    ``budgets`` [M] int64 in turn, over the decode ``rows`` [T] bool of ``batch`` (their
    stock routing and totals, `keep_rules.batch_totals`). Add the vectors of many steps on
    the device; read them on the host outside the step."""
    keep = budget_keep_sets(batch, rows, router, budgets).to(torch.float32)  # [M,E]
    stock = batch.stock
    gate = torch.where(rows[:, None], stock.gate.float(), 0.0)  # [T,K]
    experts = keep.shape[1]
    mass = torch.zeros(experts, device=gate.device).index_add_(  # [E] fp32 gate mass
        0, stock.ids.flatten(), gate.flatten())
    any_row = rows.any().to(torch.float32)
    per_budget = torch.stack([keep.sum(dim=-1) * any_row, keep @ mass,
                              keep @ batch.top1_votes.float()], dim=1)  # [M,3]
    base = torch.stack([any_row, rows.sum().to(torch.float32),
                        batch.union.sum().to(torch.float32), gate.sum()])
    return torch.cat([base, per_budget.flatten()])
