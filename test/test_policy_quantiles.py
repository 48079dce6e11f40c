"""Histogram math used when scraping runtimes directly (Prometheus histogram_quantile rules)."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from lynx_policy.quantiles import bucket_delta, histogram_quantile, merge, parse_histograms

INF = math.inf


def test_quantile_interpolates_inside_the_bucket() -> None:
    buckets = {0.1: 0.0, 0.2: 100.0, INF: 100.0}
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.15)
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.199)
    # First bucket starts at 0.
    assert histogram_quantile(0.5, {0.1: 10.0, INF: 10.0}) == pytest.approx(0.05)


def test_quantile_edge_cases_follow_prometheus() -> None:
    assert histogram_quantile(0.99, {0.1: 0.0, INF: 0.0}) is None  # no observations
    assert histogram_quantile(0.99, {0.1: 5.0}) is None  # no +Inf bucket
    # Rank in the +Inf bucket answers the highest finite bound.
    assert histogram_quantile(0.99, {0.1: 1.0, 0.2: 2.0, INF: 10.0}) == 0.2
    with pytest.raises(ValueError):
        histogram_quantile(1.5, {INF: 1.0})


def test_parse_sums_label_sets_and_accepts_both_name_spellings() -> None:
    registry = CollectorRegistry()
    histogram = Histogram("sglang:inter_token_latency_seconds", "itl", ["model_name"],
                          buckets=(0.1, 0.2), registry=registry)
    histogram.labels(model_name="a").observe(0.05)
    histogram.labels(model_name="b").observe(0.15)
    histogram.labels(model_name="b").observe(0.5)
    text = generate_latest(registry).decode()
    found = parse_histograms(text, {"sglang:inter_token_latency_seconds"})
    assert found == {"sglang:inter_token_latency_seconds": {0.1: 1.0, 0.2: 2.0, INF: 3.0}}
    escaped = text.replace("sglang:", "sglang_")
    assert parse_histograms(escaped, {"sglang:inter_token_latency_seconds"}) == found
    assert parse_histograms(text, {"sglang:time_to_first_token_seconds"}) == {}


def test_delta_between_scrapes_and_counter_reset() -> None:
    older = {0.1: 10.0, 0.2: 20.0, INF: 20.0}
    newer = {0.1: 10.0, 0.2: 120.0, INF: 120.0}
    assert bucket_delta(newer, older) == {0.1: 0.0, 0.2: 100.0, INF: 100.0}
    restarted = {0.1: 1.0, 0.2: 2.0, INF: 2.0}
    assert bucket_delta(restarted, older) == restarted
    assert bucket_delta(newer, None) == newer
    total = dict(older)
    merge(total, restarted)
    assert total == {0.1: 11.0, 0.2: 22.0, INF: 22.0}
