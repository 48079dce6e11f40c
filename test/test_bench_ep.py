"""`benchmark/ep_balance.py` (issue 24), quick: at the same routing-mass target, the per-rank
level never loads the busiest EP rank more than the global budget or stock routing does."""

from __future__ import annotations

from benchmark.ep_balance import run


def test_ep_aware_busiest_rank_is_never_above_global_or_stock() -> None:
    result = run([8, 32], [32], draws=1, target=0.9)
    by_cell: dict[tuple, dict[str, dict]] = {}
    for row in result["rows"]:
        by_cell.setdefault((row["model"], row["ep"], row["batch"]), {})[row["variant"]] = row
    assert len(by_cell) == 6  # 3 models x 2 EP sizes
    for cell, rows in by_cell.items():
        ep, flat, stock = rows["ep_aware"], rows["global"], rows["stock"]
        assert ep["mass_kept"] >= 0.9 and flat["mass_kept"] >= 0.9, cell
        assert ep["max_rank_experts"] <= flat["max_rank_experts"] <= stock["max_rank_experts"]
    assert any(r["ep_aware"]["max_rank_experts"] < r["global"]["max_rank_experts"]
               for r in by_cell.values())
