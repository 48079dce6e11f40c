"""What every keep set must contain, whatever the policy.

Shape legend: T rows, E experts, K top_k.

- every pruned row keeps its own top-1 expert;
- at least K experts are kept, all of them inside the pruned rows' stock union (an expert no
  pruned row routes to would only give remapped slots somewhere new to go; a policy's picks
  outside it, e.g. AffinityBinning's re-ranked ones, are dropped);
- grouped routers: a pruned row routes within the groups its stock routing chose (groups never
  change under Lynx), so it needs K kept experts there; a row that would find fewer gets its
  whole stock top-K kept (it then routes exactly as stock; the experts are in the union);
- with no pruned row in the step, every expert is kept.
All additions follow a fixed order (importance, then lower index), so the rules are
deterministic and add only experts of the stock union.

Batch importance is summed in fixed point (`IMPORTANCE_SCALE`, exact int64 sums; a gate below
2^-32 counts as 0) and rounded to fp32 once: for the same gates, the same value whatever the
order of the rows, their number of padding rows or the reduction order a compiler or kernel
picks, so near-ties cannot flip with row order. (Gates themselves may differ by rounding
between implementations, e.g. a Triton softmax and torch's.)
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from lynx.selection.ranking import rank_descending
from lynx.selection.routers import RouterSpec, StockRouting

RANK_FIRST = 1.0e9  # score offset that ranks a set of experts ahead of all others
IMPORTANCE_SCALE = float(1 << 32)  # fixed-point unit of summed gate mass: exact int64 sums


class BatchRouting(NamedTuple):
    """The stock routing of a step and its per-expert totals over the pruned rows."""

    stock: StockRouting
    importance: torch.Tensor  # [E] fp32 sum over pruned rows of stock gate mass on the expert
    top1_votes: torch.Tensor  # [E] fp32 pruned rows whose top-1 is the expert
    union: torch.Tensor  # [E] bool experts in some pruned row's stock top-K


def fixed_point(mass: torch.Tensor) -> torch.Tensor:
    """int64 image of fp32 gate mass ``mass`` (any shape, values in [0, 2^31)): truncated
    ``mass * IMPORTANCE_SCALE``, exact (a power-of-two scale), so sums of it are exact and
    independent of their order."""
    return (mass.float() * IMPORTANCE_SCALE).to(torch.int64)


def from_fixed_point(total: torch.Tensor) -> torch.Tensor:
    """fp32 value of a sum of `fixed_point` images (one rounding, so equal sums give equal
    floats)."""
    return (total.to(torch.float64) / IMPORTANCE_SCALE).to(torch.float32)


def gate_mass_fixed(stock: StockRouting, rows: torch.Tensor,
                    weight: torch.Tensor | None = None) -> torch.Tensor:
    """[E] int64 `fixed_point` sum over ``rows`` [T] bool of the stock top-K gate mass on each
    expert (each row scaled by ``weight`` [T] when given); rows outside ``rows`` never enter
    the sum. Exact, so it does not depend on the order of the rows (or of the ranks adding
    their sums: `lynx.selection.global_batch`)."""
    gate = stock.gate.float() if weight is None else stock.gate.float() * weight.float()[:, None]
    gate = fixed_point(torch.where(rows[:, None], gate, 0.0))
    dense = torch.zeros(stock.choice.shape, dtype=torch.int64, device=stock.ids.device)
    return dense.scatter(1, stock.ids, gate).sum(dim=0)


def gate_mass(stock: StockRouting, rows: torch.Tensor, weight: torch.Tensor | None = None
              ) -> torch.Tensor:
    """[E] fp32 `gate_mass_fixed`: the stock top-K gate mass on each expert over ``rows``."""
    return from_fixed_point(gate_mass_fixed(stock, rows, weight))


def batch_totals(stock: StockRouting, rows: torch.Tensor) -> BatchRouting:
    """Per-expert totals over ``rows`` [T] (deterministic: dense scatter then a column sum,
    no atomics; rows outside ``rows`` never enter a sum, whatever their values)."""
    rows_n, experts = stock.choice.shape
    dense = torch.zeros(rows_n, experts, dtype=torch.float32, device=stock.ids.device)
    importance = gate_mass(stock, rows)
    weight = rows.to(torch.float32)[:, None]
    member = dense.scatter(1, stock.ids, weight.expand_as(stock.ids)).sum(dim=0)
    top1_votes = dense.scatter(1, stock.ids[:, :1], weight).sum(dim=0)
    return BatchRouting(stock, importance, top1_votes, member > 0)


def weighted_importance(batch: BatchRouting, rows: torch.Tensor, weight: torch.Tensor
                        ) -> BatchRouting:
    """``batch`` with its importance re-summed with a vote weight per row (``weight`` [T]
    fp32, e.g. `lynx.selection.speculative.verify_row_weights`); the union and the top-1
    votes (hence every must-keep rule) stay unweighted."""
    return batch._replace(importance=gate_mass(batch.stock, rows, weight))


def must_keep(batch: BatchRouting) -> torch.Tensor:
    """[E] bool: experts no policy may drop (the top-1 of every pruned row)."""
    return batch.top1_votes > 0


def with_top_k_floor(keep: torch.Tensor, batch: BatchRouting, top_k: int) -> torch.Tensor:
    """``keep`` plus, if it holds fewer than K experts, the most important others of the
    stock union (union experts rank first even where a gate underflowed to 0), ranked by the
    importance itself: an offset added to it in fp32 (1e3 + 0.99977 == 1e3 + 0.99976) tied
    near-equal experts and broke the ties by id, against the order `coverage` and `budget`
    rank them in, so a smaller target could keep an expert a larger one did not."""
    score = torch.where(keep, RANK_FIRST, torch.where(batch.union, batch.importance, -1.0))
    return keep | (rank_descending(score) < top_k)


def row_groups(stock: StockRouting) -> torch.Tensor:
    """[T,E] bool: the experts of each row's stock groups (all experts if not grouped)."""
    return torch.isfinite(stock.choice)


def with_viable_rows(keep: torch.Tensor, batch: BatchRouting, router: RouterSpec,
                     rows: torch.Tensor) -> torch.Tensor:
    """Grouped routers: pruned rows with fewer than K kept experts in their stock groups get
    their whole stock top-K kept (one pass: adding experts only helps the other rows)."""
    stock = batch.stock
    available = (row_groups(stock) & keep[None, :]).sum(dim=-1)  # [T]
    short = rows & (available < router.top_k)
    rows_n, experts = stock.choice.shape
    dense = torch.zeros(rows_n, experts, dtype=torch.bool, device=keep.device)
    needed = dense.scatter(1, stock.ids, short[:, None].expand_as(stock.ids)).any(dim=0)
    return keep | needed


def finalize_keep(keep: torch.Tensor, batch: BatchRouting, must: torch.Tensor,
                  router: RouterSpec, rows: torch.Tensor) -> torch.Tensor:
    """Apply every rule above to a policy's keep set [E]."""
    keep = with_top_k_floor((keep & batch.union) | must, batch, router.top_k)
    if router.grouped:
        keep = with_viable_rows(keep, batch, router, rows)
    return keep | ~rows.any()
