"""Per layer-step statistics of a keep set, as one small device tensor (no host sync).

Shape legend: T rows, E experts, K top_k. Sums run over the pruned rows only; add the
vectors of many steps on the device and read them on the host when exporting.
"""

from __future__ import annotations

import torch

from lynx.selection.routers import StockRouting

STAT_FIELDS: tuple[str, ...] = (
    "layer_steps",  # 1 if the step pruned any row, else 0
    "kept",  # experts in the keep set (0 when no row was pruned)
    "stock_union",  # distinct experts in the stock top-K of the pruned rows
    "mass_kept",  # stock top-K gate mass of pruned rows that lands on kept experts
    "mass_total",  # stock top-K gate mass of pruned rows
    "top1_kept",  # pruned rows whose top-1 expert is kept
    "rows",  # pruned rows
)


def layer_statistics(stock: StockRouting, keep: torch.Tensor, rows: torch.Tensor
                     ) -> torch.Tensor:
    """[len(STAT_FIELDS)] fp32 statistics of one layer-step over ``rows`` [T] bool."""
    experts = keep.shape[0]
    weight = rows.to(torch.float32)  # [T]
    gate = stock.gate.float()  # [T,K]
    rows_n, top_k = stock.ids.shape
    in_stock = torch.zeros(rows_n, experts, dtype=torch.float32, device=keep.device)
    in_stock.scatter_(1, stock.ids, weight[:, None].expand(rows_n, top_k))
    kept_of_stock = keep[stock.ids].to(torch.float32)  # [T,K]
    n_rows = weight.sum()
    any_row = (n_rows > 0).to(torch.float32)
    return torch.stack([
        any_row,
        keep.sum().to(torch.float32) * any_row,
        (in_stock.sum(dim=0) > 0).sum().to(torch.float32),
        ((gate * kept_of_stock).sum(dim=-1) * weight).sum(),
        (gate.sum(dim=-1) * weight).sum(),
        (kept_of_stock[:, 0] * weight).sum(),
        n_rows,
    ])


def statistics_dict(stats: torch.Tensor) -> dict[str, float]:
    """Host-side view of a statistics vector (syncs: use outside the step)."""
    return dict(zip(STAT_FIELDS, stats.tolist(), strict=True))
