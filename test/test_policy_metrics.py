"""The controller's labelled gauges are replaced per tick without a gap a scrape could see."""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Gauge

from lynx_policy.metrics import ControllerMetrics, replace_series


def series(gauge: Gauge) -> dict[tuple[str, ...], float]:
    return {tuple(s.labels.values()): s.value for m in gauge.collect() for s in m.samples}


def watch_removals(gauge: Gauge) -> list[dict[tuple[str, ...], float]]:
    """What the gauge held each time a series was removed."""
    seen: list[dict[tuple[str, ...], float]] = []
    remove = gauge.remove

    def recording(*labels: str) -> None:
        seen.append(series(gauge))
        remove(*labels)

    gauge.remove = recording  # type: ignore[method-assign]
    return seen


def test_budget_series_are_replaced_new_first_then_stale_removed() -> None:
    metrics = ControllerMetrics()
    metrics.set_budgets([(8, 4.0), (4096, 8.0)])
    seen = watch_removals(metrics.budget)
    metrics.set_budgets([(64, 5.0), (4096, 6.0)])
    assert series(metrics.budget) == {("64",): 5.0, ("4096",): 6.0}
    assert len(seen) == 1  # only the stale max_batch=8 series went
    assert seen[0] == {("8",): 4.0, ("64",): 5.0, ("4096",): 6.0}  # new values already there
    page = metrics.render().decode()
    assert 'lynx_controller_budget_experts{max_batch="4096"} 6.0' in page
    assert 'max_batch="8"' not in page


def test_step_latency_series_keep_current_buckets_through_a_replacement() -> None:
    metrics = ControllerMetrics()
    metrics.set_step_latencies({8: (20.0, 21.0), 32: (30.0, None)})
    observed = watch_removals(metrics.step_observed)
    metrics.set_step_latencies({32: (31.0, 29.0)})
    assert series(metrics.step_observed) == {("32",): 0.031}
    assert series(metrics.step_predicted) == {("32",): 0.029}
    assert observed == [{("8",): 0.02, ("32",): 0.031}]
    metrics.set_step_latencies({64: (40.0, None)})
    assert math.isnan(series(metrics.step_predicted)[("64",)])  # no prediction: NaN, not gone
    metrics.set_step_latencies({})
    assert series(metrics.step_observed) == {} and series(metrics.step_predicted) == {}


def test_two_label_series_replaced_with_values_given_as_numbers() -> None:
    gauge = Gauge("g", "two labels", ["metric", "quantile"], registry=CollectorRegistry())
    replace_series(gauge, {("itl", 0.99): 0.08, ("ttft", 0.5): 1.0})
    seen = watch_removals(gauge)
    # A label value given as a number is the same series as its string (labels are strings).
    replace_series(gauge, {("itl", 0.99): 0.07, ("itl", "0.9"): 0.05})
    assert series(gauge) == {("itl", "0.99"): 0.07, ("itl", "0.9"): 0.05}
    assert seen == [{("itl", "0.99"): 0.07, ("ttft", "0.5"): 1.0, ("itl", "0.9"): 0.05}]
