"""`benchmark/ep_balance.py` (issue 24), quick: at the same routing-mass target, the per-rank
level never loads the busiest EP rank more than the global budget or stock routing does."""

from __future__ import annotations

from benchmark.ep_balance import allreduce_cost, run


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


def test_the_dp_attention_all_reduce_model_is_stated_and_grows_with_the_ranks() -> None:
    rows = allreduce_cost([4, 8], alpha_us=5.0, gbs=400.0)
    ds = [r for r in rows if r["model"] == "DeepSeek-V3"]
    assert [r["bytes"] for r in ds] == [3 * 256 * 8] * 2  # [3, E] int64
    assert ds[0]["us_per_layer"] < ds[1]["us_per_layer"]
    assert abs(ds[1]["us_per_layer"] - (14 * 5.0 + 14 / 8 * 6144 / 400e3)) < 1e-3
    assert abs(ds[1]["ms_per_step"] - ds[1]["us_per_layer"] * 58 / 1e3) < 1e-3
    assert ds[1]["tree_us_per_layer"] < ds[1]["us_per_layer"]  # 2 log2(8) = 6 steps, not 14
