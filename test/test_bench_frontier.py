"""The frontier benchmark's verdicts (`benchmark.frontier`): which points are on the frontier,
whether the calibrated curve is above the published policies, the best point within budget."""

from __future__ import annotations

from typing import Any

from benchmark.frontier import (
    best_within_budget,
    curve_at,
    mark_above_published,
    mark_frontier,
    target_row,
)


def point(policy: str, knob: Any, speedup: float, ppl_rise: float) -> dict[str, Any]:
    return {"policy": policy, "knob": knob, "speedup": speedup, "ppl_rise": ppl_rise}


def test_frontier_marks_only_undominated_points() -> None:
    pts = [point("budget", 64, 1.2, 0.001), point("budget", 32, 1.9, 0.04),
           point("affinity", "a1b1", 1.1, 0.006),  # slower and worse than budget:64
           point("calibrated", "40", 1.7, 0.005)]
    mark_frontier(pts)
    assert [p["frontier"] for p in pts] == [True, True, False, True]


def test_curve_is_linear_between_its_points_and_undefined_outside() -> None:
    curve = [point("calibrated", "56", 1.2, 0.002), point("calibrated", "40", 1.7, 0.006)]
    assert curve_at(curve, 0.004) == 1.45
    assert curve_at(curve, 0.001) is None and curve_at(curve, 0.01) is None


def test_above_published_compares_at_the_same_perplexity_rise() -> None:
    pts = [point("calibrated", "56", 1.2, 0.002), point("calibrated", "48", 1.1, 0.003),
           point("calibrated", "40", 1.7, 0.006),
           point("piggyback", 4, 1.3, 0.003),  # envelope at 0.003: 1.325 (48 is outrun)
           point("affinity", "a0.7b1", 1.6, 0.004),  # envelope at 0.004: 1.45 -> not above
           point("budget", 8, 2.5, 0.09), point("coverage", 0.9, 1.0, 0.004)]
    mark_above_published(pts)
    assert pts[3]["above_published"] is True
    assert pts[4]["above_published"] is False
    assert pts[5]["above_published"] is None  # outside the calibrated range
    assert "above_published" not in pts[6]  # coverage is ours, not a published policy
    result = {"points": pts, "ppl_budget": 0.01, "speed_target": 1.5, "batch": 32,
              "model": "m"}
    best = best_within_budget(result)
    assert best is not None and best["knob"] == "40"
    row = target_row(result)
    assert "1.70x (calibrated:40, +0.60%)" in row[1]
    assert "at least as fast as 1 of 2 published points" in row[1]
