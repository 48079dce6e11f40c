"""The SLO experiments' arithmetic: windows, run quality, step response, intervals, ratios."""

from __future__ import annotations

import pytest

from benchmark.loadgen import RequestTiming
from benchmark.slo_load import quality_of_run, step_response, windows
from benchmark.slo_ramp import mean_ci, summarize
from benchmark.slo_step import choose_target, target_basis, with_experts_kept


def stream(start: float, gaps: list[float]) -> RequestTiming:
    times, t = [start], start
    for gap in gaps:
        t += gap
        times.append(t)
    return RequestTiming(ok=True, start_s=start, tokens=len(times), itl_s=gaps,
                         itl_at_s=times[1:], chunk_times_s=times)


def test_windows_count_tokens_and_p99_per_window() -> None:
    timings = [stream(0.0, [0.1] * 9), stream(1.0, [0.5, 0.5])]
    wins = windows(timings, [], 0.0, 2.0, 1.0, slo_ms=200.0)
    assert [w["tokens"] for w in wins] == [10, 2]  # [t0, t1): the chunk at 2.0 is out
    assert wins[0]["meets_slo"] and not wins[1]["meets_slo"]
    assert wins[1]["itl_p99_ms"] == pytest.approx(500.0)


def test_quality_of_run_counts_unpruned_rows_as_full_mass() -> None:
    before = dict.fromkeys(("lynx_experts_kept_total", "lynx_experts_stock_union_total",
                            "lynx_layer_pruned_steps_total", "lynx_routing_mass_kept_total",
                            "lynx_routing_mass_total", "lynx_pruned_rows_total",
                            "sglang:generation_tokens_total", "sglang_generation_tokens_total"),
                           0.0)
    after = {**before, "lynx_experts_kept_total": 80.0, "lynx_experts_stock_union_total": 160.0,
             "lynx_layer_pruned_steps_total": 10.0, "lynx_routing_mass_kept_total": 90.0,
             "lynx_routing_mass_total": 100.0, "lynx_pruned_rows_total": 200.0,
             "sglang:generation_tokens_total": 100.0}
    q = quality_of_run(before, after, layers=4)  # 400 row-layers, half of them pruned
    assert q["pruned_row_share"] == 0.5
    assert q["routing_mass_kept"] == pytest.approx(1 - 0.1 * 0.5)
    assert q["experts_kept_mean"] == 8.0 and q["kept_over_union"] == 0.5


def test_step_response_times_the_jump_and_the_drop() -> None:
    stages = [(4, 2.0), (48, 4.0), (4, 4.0)]
    # slow gaps for the first 1.5 s after the jump (t = 2 .. 3.5), fast afterwards
    timings = [stream(0.0, [0.05] * 40), stream(2.0, [0.3] * 5 + [0.05] * 50)]
    timeline = [{"t": t / 2, "target": 4, "pruned_steps": min(t, 15)} for t in range(20)]
    out = step_response(timings, timeline, 0.0, stages, slo_ms=200.0)
    assert out["time_to_slo_s"] == 2.0  # the window [4, 5) is the first that stays met
    assert out["time_to_unprune_s"] == pytest.approx(1.5)  # last increase at t=7.5, drop at 6
    never = step_response([stream(2.0, [0.3] * 20)], [], 0.0, stages, slo_ms=200.0)
    assert never["time_to_slo_s"] is None and never["time_to_unprune_s"] == 0


def test_the_step_target_lies_between_off_and_the_floor_rung_or_is_refused() -> None:
    assert choose_target(200.0, 160.0) == pytest.approx(180.0)
    assert choose_target(200.0, 160.0, share=0.25) == pytest.approx(190.0)
    # a floor rung no faster than off leaves nothing a target could separate
    assert choose_target(200.0, 200.0) is None and choose_target(200.0, 210.0) is None
    assert choose_target(200.0, 0.0) is None


def test_step_target_basis_records_a_missing_target_instead_of_failing() -> None:
    """CI of e9f1f87: a quick run's short probe found the rung no faster than ``off``, and
    rounding the missing target raised TypeError, failing `run_all.py --quick`."""
    basis = target_basis(162.346, "m32", 119.871)
    assert (basis["off_ms"], basis["floor_ms"], basis["target_ms"]) == (162.35, 119.87, 141.11)
    for off_ms, floor_ms in ((150.0, 151.0), (None, 120.0), (150.0, None), (None, None)):
        basis = target_basis(off_ms, "m32", floor_ms)
        assert basis["target_ms"] is None
        assert (basis["off_ms"], basis["floor_ms"]) == (off_ms, floor_ms)


def test_experts_kept_per_sample_interval_counts_only_pruned_layer_steps() -> None:
    points = [{"t": 0.0, "target": 4, "layer_pruned_steps": 0.0, "experts_kept_total": 0.0},
              {"t": 0.5, "target": 4, "layer_pruned_steps": 0.0, "experts_kept_total": 0.0},
              {"t": 1.0, "target": 4, "layer_pruned_steps": 10.0, "experts_kept_total": 480.0},
              {"t": 1.5, "target": 4, "layer_pruned_steps": 30.0, "experts_kept_total": 1120.0}]
    kept = [p["experts_kept"] for p in with_experts_kept(points)]
    assert kept == [None, None, 48.0, 32.0]
    windowed = windows([], with_experts_kept(points), 0.0, 2.0, 1.0, 100.0)
    assert [w["experts_kept"] for w in windowed] == [None, 40.0]


def test_mean_ci_and_paired_ratios() -> None:
    assert mean_ci([1.0])["ci_low"] is None
    ci = mean_ci([1.0, 2.0, 3.0])
    assert ci["mean"] == 2.0 and ci["ci_low"] == pytest.approx(2 - 4.30 / 3 ** 0.5, abs=1e-3)
    runs = [{"mode": m, "throughput_within_slo": v, "slo_attainment": 1.0, "throughput": v,
             "routing_mass_kept": 1.0, "experts_kept_mean": None}
            for m, v in (("off", 100.0), ("adaptive", 150.0), ("static:8", 120.0),
                         ("static:12", 110.0), ("off", 100.0), ("adaptive", 130.0),
                         ("static:8", 130.0), ("static:12", 90.0))]
    out = summarize(runs, ["off", "adaptive", "static:8", "static:12"])
    assert out["best_static"] == "static:8"
    assert out["ratios"]["adaptive_vs_off"]["mean"] == pytest.approx(1.4)
    assert out["ratios"]["adaptive_vs_best_static"]["mean"] == pytest.approx(
        (150 / 120 + 130 / 130) / 2, abs=1e-4)


def test_a_base_without_good_windows_gives_no_ratio_not_nan() -> None:
    runs = [{"mode": m, "throughput_within_slo": v, "slo_attainment": 0.0, "throughput": 1.0,
             "routing_mass_kept": 1.0, "experts_kept_mean": None}
            for m, v in (("off", 0.0), ("adaptive", 5.0), ("static:8", 0.0))]
    out = summarize(runs, ["off", "adaptive", "static:8"])
    assert out["ratios"]["adaptive_vs_off"]["mean"] is None
    assert out["modes"]["off"]["experts_kept_mean"]["mean"] is None
