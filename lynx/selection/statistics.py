"""Per layer-step statistics of a keep set, as one small device tensor (no host sync).

Shape legend: T rows, E experts, K top_k. Sums run over the pruned rows only (``torch.where``,
never a multiplication by a row flag, so a NaN outside them cannot leak in); add the vectors of
many steps on the device and read them on the host when exporting.
"""

from __future__ import annotations

import torch

from lynx.selection.keep_rules import BatchRouting

STAT_FIELDS: tuple[str, ...] = (
    "layer_steps",  # 1 if the step pruned any row, else 0
    "kept",  # experts in the keep set (0 when no row was pruned)
    "stock_union",  # distinct experts in the stock top-K of the pruned rows
    "mass_kept",  # stock top-K gate mass of pruned rows that lands on kept experts
    "mass_total",  # stock top-K gate mass of pruned rows
    "top1_kept",  # pruned rows whose top-1 expert is kept
    "rows",  # pruned rows
    "nonfinite_rows",  # valid rows whose router logits hold NaN/inf (routed stock, not counted)
    "rerouted_rows",  # pruned rows whose stock top-K held a dropped expert (routing changed)
    "rank_kept_max",  # kept experts on the busiest EP rank (= kept without EP; 0: no row)
    "rank_union_max",  # stock-union experts on the busiest EP rank (what stock would read)
    "pairs",  # (pruned row, expert) pairs: rows x K (mean per EP rank = pairs / R)
    "rank_pairs_max",  # (pruned row, expert) pairs routed to the EP rank with the most (Lynx)
    "rank_stock_pairs_max",  # the same under the stock top-K (what stock would compute)
)


def rank_pairs_max(ids: torch.Tensor, rows: torch.Tensor, experts: int, ranks: int
                   ) -> torch.Tensor:
    """0-dim fp32: the most (row, expert) pairs of ``rows`` [T] bool that ``ids`` [T,K]
    (expert ids in [0, E)) sends to one EP rank (rank r holds experts [r*E/R, (r+1)*E/R)):
    the token pairs the busiest rank computes. Static shapes (a scatter-add over R slots)."""
    rank = (ids.clamp(0, experts - 1) // (experts // ranks)).flatten()  # [T*K]
    weight = rows[:, None].expand_as(ids).flatten().to(torch.float32)
    return torch.zeros(ranks, dtype=torch.float32, device=ids.device
                       ).scatter_add(0, rank, weight).max()


def layer_statistics(batch: BatchRouting, keep: torch.Tensor, rows: torch.Tensor,
                     nonfinite_rows: torch.Tensor, rerouted: torch.Tensor, ranks: int = 1,
                     ids: torch.Tensor | None = None) -> torch.Tensor:
    """[len(STAT_FIELDS)] fp32 statistics of one layer-step over ``rows`` [T] bool (the
    pruned rows of ``batch``); ``nonfinite_rows`` and ``rerouted`` [T] bool are only counted.
    ``ranks``: EP ranks R holding contiguous blocks of E / R experts (the busiest rank's
    experts and token pairs, Lynx's and stock's, are counted per step: the MoE step waits for
    that rank). ``ids`` [T,K]: the routing Lynx wrote (None: the stock top-K)."""
    stock = batch.stock
    gate = torch.where(rows[:, None], stock.gate.float(), 0.0)  # [T,K]
    kept_of_stock = keep[stock.ids]  # [T,K]
    n_rows = rows.sum().to(torch.float32)
    any_row = (n_rows > 0).to(torch.float32)
    return torch.stack([
        any_row,
        keep.sum().to(torch.float32) * any_row,
        batch.union.sum().to(torch.float32),
        torch.where(kept_of_stock, gate, 0.0).sum(),
        gate.sum(),
        (kept_of_stock[:, 0] & rows).sum().to(torch.float32),
        n_rows,
        nonfinite_rows.sum().to(torch.float32),
        rerouted.sum().to(torch.float32),
        keep.view(ranks, -1).sum(dim=1).max().to(torch.float32) * any_row,
        batch.union.view(ranks, -1).sum(dim=1).max().to(torch.float32),
        n_rows * stock.ids.shape[1],
        rank_pairs_max(stock.ids if ids is None else ids, rows, keep.shape[0], ranks),
        rank_pairs_max(stock.ids, rows, keep.shape[0], ranks),
    ])


def statistics_dict(stats: torch.Tensor) -> dict[str, float]:
    """Host-side view of a statistics vector (syncs: use outside the step)."""
    return dict(zip(STAT_FIELDS, stats.tolist(), strict=True))
