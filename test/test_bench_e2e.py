"""The end-to-end benchmark's ceiling arithmetic (`benchmark.e2e_latency.latency_row`)."""

from __future__ import annotations

import pytest

from benchmark.common import budget_variant
from benchmark.e2e_latency import amdahl, latency_row


def _arm(tpot_ms: float, moe_ms: float | None = None, forward_ms: float | None = None
         ) -> dict[str, float]:
    arm = {"median_tpot_ms": tpot_ms, "p99_tpot_ms": 2 * tpot_ms, "median_itl_ms": tpot_ms,
           "p99_itl_ms": 2 * tpot_ms, "output_throughput": 1000 / tpot_ms, "completed": 32.0,
           "failed": 0.0, "cpu_ms_per_token": tpot_ms}
    if moe_ms is not None:
        arm |= {"moe_ms_per_step": moe_ms, "forward_ms_per_step": forward_ms or moe_ms}
    return arm


def test_amdahl_bound_of_a_step_whose_moe_share_runs_faster() -> None:
    assert amdahl(0.5, 2.0) == pytest.approx(1 / 0.75)
    assert amdahl(0.0, 10.0) == 1.0 and amdahl(1.0, 3.0) == pytest.approx(3.0)


def test_latency_row_reports_the_bound_and_how_much_of_it_reached_the_user() -> None:
    # off: 100 ms TPOT of which 40 ms MoE; Lynx halves the MoE time (S = 2) and its TPOT is
    # 85 ms (1.176x); the Amdahl bound is 1/(0.6 + 0.2) = 1.25x.
    # The stock server (another process) ran at 110 ms: the bound is held against off / Lynx.
    lat = {"stock": _arm(110.0), "lynx": _arm(85.0, 20.0, 60.0), "off": _arm(100.0, 40.0, 80.0)}
    row = latency_row("m", budget_variant(8), 32, lat, kept_over_union=0.5)
    assert row["moe_share"] == pytest.approx(0.4) and row["moe_speedup"] == pytest.approx(2.0)
    assert row["amdahl_bound"] == pytest.approx(1.25)
    assert row["weights_bound"] == pytest.approx(1.25)  # union / kept = 2 here too
    assert row["tpot_ratio_off"] == pytest.approx(100 / 85, abs=1e-3)
    assert row["fraction_of_amdahl"] == pytest.approx((100 / 85) / 1.25, abs=1e-3)
    assert row["forward_ratio"] == pytest.approx(80 / 60, abs=1e-3)
    assert row["tpot_ratio"] == pytest.approx(110 / 85, abs=1e-3)
    assert row["plugin_off_ratio"] == pytest.approx(1.1)


def test_a_row_without_moe_timing_has_no_bound() -> None:
    row = latency_row("m", budget_variant(8), 32, {"stock": _arm(100.0), "lynx": _arm(90.0)},
                      kept_over_union=0.5)
    assert row["tpot_ratio"] == pytest.approx(100 / 90, abs=1e-3)
    assert "amdahl_bound" not in row and row["tpot_off_ms"] is None
    # a server without LYNX_TIME_MOE reports zero MoE time: no bound, no division by zero
    row = latency_row("m", budget_variant(8), 32, {"stock": _arm(100.0), "lynx": _arm(
        90.0, 0.0, 60.0), "off": _arm(100.0, 0.0, 80.0)}, kept_over_union=0.5)
    assert "amdahl_bound" not in row
