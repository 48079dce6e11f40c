"""Observers: a quantile from a window with too few observations above it is no reading.

The runtime side is a real prometheus_client histogram rendered as text; the HTTP layer is
httpx's MockTransport (the live Prometheus path runs in test_policy_control_loop)."""

from __future__ import annotations

import asyncio
import math
from urllib.parse import parse_qs, urlparse

import httpx
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from lynx_policy.config import ObserveConfig, SloTarget
from lynx_policy.observe import (
    PrometheusObserver,
    ScrapeObserver,
    promql_for,
    usable,
    windows,
)
from lynx_policy.quantiles import histogram_quantile

P99 = SloTarget(metric="itl", quantile=0.99, target_ms=100.0)
P90 = SloTarget(metric="itl", quantile=0.9, target_ms=100.0)


def test_usable_needs_enough_samples_above_the_quantile() -> None:
    config = ObserveConfig(min_tail_samples=5)
    assert usable(0.2, 499, P99, config) is None  # 4.99 above the P99
    assert usable(0.2, 500, P99, config) == 0.2
    assert usable(0.2, 50, P90, config) == 0.2  # 5 above the P90
    assert usable(0.2, 49, P90, config) is None
    assert usable(None, 10_000, P99, config) is None
    assert usable(0.2, None, P99, config) == 0.2  # count unknown: kept
    assert usable(0.2, 1, P99, ObserveConfig(min_tail_samples=0)) == 0.2


class Runtime:
    """A runtime's ``/metrics``: one ITL histogram the test observes into."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.itl = Histogram("sglang:inter_token_latency_seconds", "ITL", buckets=(
            0.01, 0.02, 0.05, 0.1, 0.2, 0.4), registry=self.registry)

    def handler(self, request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=generate_latest(self.registry))

    def observe(self, value: float, times: int) -> None:
        for _ in range(times):
            self.itl.observe(value)


@pytest.mark.parametrize(("fast", "outliers", "expect_reading"), [
    (100, 1, False),  # one stream for 4 s: the P99 would be the one outlier
    (600, 10, True),  # 610 samples: 6.1 above the P99, in the outliers' bucket
])
def test_scrape_observer_drops_an_undersampled_quantile(fast: int, outliers: int,
                                                        expect_reading: bool) -> None:
    runtime = Runtime()
    now = [0.0]
    config = ObserveConfig(scrape_urls=["http://runtime/metrics"], rate_window_s=4.0)

    async def run() -> tuple:
        async with httpx.AsyncClient(transport=httpx.MockTransport(runtime.handler)) as client:
            observer = ScrapeObserver(config, client, lambda: [], clock=lambda: now[0])
            await observer.observe([P99])  # the window's base
            runtime.observe(0.03, fast)
            runtime.observe(0.35, outliers)
            now[0] = 4.0
            return await observer.observe([P99])

    (reading,) = asyncio.run(run())
    assert reading.samples == fast + outliers
    if expect_reading:
        assert reading.observed_s is not None and 0.2 < reading.observed_s <= 0.4
    else:
        assert reading.observed_s is None


def test_prometheus_observer_asks_for_the_count_and_drops_a_thin_window() -> None:
    asked: list[str] = []
    counts = {"value": 120.0}

    def prometheus(request: httpx.Request) -> httpx.Response:
        query = parse_qs(urlparse(str(request.url)).query)["query"][0]
        asked.append(query)
        value = counts["value"] if "_count" in query else 0.3
        return httpx.Response(200, json={"status": "success", "data": {
            "resultType": "vector", "result": [{"metric": {}, "value": [0, str(value)]}]}})

    config = ObserveConfig(prometheus_url="http://prom:9090", rate_window_s=30,
                           label_selector='job="runtime"')

    async def run() -> tuple:
        async with httpx.AsyncClient(transport=httpx.MockTransport(prometheus)) as client:
            observer = PrometheusObserver(config, client)
            thin = await observer.observe([P99])
            counts["value"] = 5000.0
            full = await observer.observe([P99])
            asked.clear()
            both = await observer.observe([P99, P90])  # one histogram: one count query
            assert [q for q in asked if "_count" in q] == [promql_for(P90, config, count=True)]
            # and one bucket query (the bounds) for both targets of the histogram and window
            assert [q for q in asked if q.startswith("sum by (le)")] == [
                promql_for(P90, config, buckets=True)]
            assert [r.observed_s for r in both] == [0.3, 0.3]
            return thin + full

    thin, full = asyncio.run(run())
    assert thin.observed_s is None and thin.samples == 120.0
    assert full.observed_s == 0.3 and full.samples == 5000.0
    count_query = promql_for(P99, config, count=True)
    assert 'sglang:inter_token_latency_seconds_count{job="runtime"}[30s]' in count_query
    assert "sglang_inter_token_latency_seconds_count" in count_query  # both spellings
    assert math.isclose(thin.target.quantile, 0.99)


def test_at_low_traffic_the_scrape_observer_widens_its_window_instead_of_going_blind(
        ) -> None:
    """2.5 requests/s: a 4 s window holds 10 observations (a P90 needs 50); with
    max_window_s = 32 the reading comes from the narrowest window that holds enough (4, 8,
    16 s: 10, 20, 40; 32 s: 80), and only from scrapes inside it (older slow ones do not
    count)."""
    runtime = Runtime()
    now = [0.0]
    config = ObserveConfig(scrape_urls=["http://runtime/metrics"], rate_window_s=4.0,
                           max_window_s=32.0)
    narrow = ObserveConfig(scrape_urls=["http://runtime/metrics"], rate_window_s=4.0)

    async def run(cfg: ObserveConfig) -> tuple:
        async with httpx.AsyncClient(transport=httpx.MockTransport(runtime.handler)) as client:
            observer = ScrapeObserver(cfg, client, lambda: [], clock=lambda: now[0])
            now[0] = 0.0
            await observer.observe([P90])
            runtime.observe(0.35, 40)  # slow, and more than 32 s before the last scrape
            for second in range(1, 41):
                now[0] = 20.0 + second
                runtime.observe(0.03, 2 if second % 2 else 3)  # 2.5 per second, fast
                last = await observer.observe([P90])
            return last

    (wide,) = asyncio.run(run(config))
    assert wide.observed_s is not None and wide.observed_s <= 0.05  # not the old outliers
    assert wide.samples == 80  # the 16 s window (40) was too thin
    (blind,) = asyncio.run(run(narrow))
    assert blind.observed_s is None and blind.samples == 10  # the 4 s window alone
    assert windows(config) == [4.0, 8.0, 16.0, 32.0]
    assert windows(ObserveConfig(rate_window_s=5.0, max_window_s=12.0)) == [5.0, 10.0, 12.0]
    with pytest.raises(ValueError, match="max_window_s"):
        ObserveConfig(rate_window_s=30.0, max_window_s=10.0)


def test_the_prometheus_observer_widens_a_thin_window_too() -> None:
    per_second = 2.5

    def prometheus(request: httpx.Request) -> httpx.Response:
        query = parse_qs(urlparse(str(request.url)).query)["query"][0]
        window = float(query.split("[")[1].split("s]")[0])
        value = per_second * window if "_count" in query else 0.08
        return httpx.Response(200, json={"status": "success", "data": {
            "resultType": "vector", "result": [{"metric": {}, "value": [0, str(value)]}]}})

    config = ObserveConfig(prometheus_url="http://prom:9090", rate_window_s=4,
                           max_window_s=64)

    async def run() -> tuple:
        async with httpx.AsyncClient(transport=httpx.MockTransport(prometheus)) as client:
            return await PrometheusObserver(config, client).observe([P90])

    (reading,) = asyncio.run(run())
    assert reading.observed_s == 0.08 and reading.samples == 80.0  # the 32 s window


def test_readings_carry_the_quantile_bounds_from_the_same_window() -> None:
    """Both observers read the bounds at `confidence_levels` from the window the estimate came
    from, at the edges of the buckets those ranks fall in: 20 ITLs, 17 fast and 3 slow. The
    P90 lies in the slow bucket, its lower bound (P81) among the fast ones: a miss the window
    does not confirm."""
    runtime = Runtime()
    now = [0.0]
    config = ObserveConfig(scrape_urls=["http://runtime/metrics"], rate_window_s=4.0,
                           min_tail_samples=2.0)

    async def scrape() -> tuple:
        async with httpx.AsyncClient(transport=httpx.MockTransport(runtime.handler)) as client:
            observer = ScrapeObserver(config, client, lambda: [], clock=lambda: now[0])
            await observer.observe([P90])
            runtime.observe(0.015, 17)
            runtime.observe(0.3, 3)
            now[0] = 4.0
            return await observer.observe([P90])

    (reading,) = asyncio.run(scrape())
    assert reading.window_s == 4.0 and reading.samples == 20
    assert reading.lower_s is not None and reading.upper_s is not None
    assert reading.lower_s <= 0.02 < 0.2 < reading.observed_s <= reading.upper_s <= 0.4
    unbounded = ObserveConfig(scrape_urls=["http://runtime/metrics"], rate_window_s=4.0,
                              min_tail_samples=2.0, confidence=0.5)
    config = unbounded
    now[0] = 0.0
    runtime = Runtime()
    (plain,) = asyncio.run(scrape())
    assert plain.observed_s is not None  # at 0.5 the estimate is its own bound
    assert plain.bounds_s() == (plain.observed_s, plain.observed_s)

    asked: list[str] = []
    # Prometheus holds the same window: 16 fast ITLs and 4 slow, as rates over 8 s
    rates = {0.01: 0.0, 0.02: 2.0, 0.05: 2.0, 0.1: 2.0, 0.2: 2.0, 0.4: 2.5, math.inf: 2.5}

    def prometheus(request: httpx.Request) -> httpx.Response:
        query = parse_qs(urlparse(str(request.url)).query)["query"][0]
        asked.append(query)
        if "_count" in query:
            result = [{"metric": {}, "value": [0, "20"]}]
        elif query.startswith("histogram_quantile("):
            level = float(query.split("(")[1].split(",")[0])
            result = [{"metric": {}, "value": [0, str(histogram_quantile(level, rates))]}]
        else:  # the bucket rates by le
            result = [{"metric": {"le": "+Inf" if math.isinf(le) else f"{le:g}"},
                       "value": [0, str(v)]} for le, v in rates.items()]
        return httpx.Response(200, json={"status": "success", "data": {
            "resultType": "vector", "result": result}})

    prom = ObserveConfig(prometheus_url="http://prom:9090", rate_window_s=8,
                         min_tail_samples=2.0)

    async def query() -> tuple:
        async with httpx.AsyncClient(transport=httpx.MockTransport(prometheus)) as client:
            return await PrometheusObserver(prom, client).observe([P90])

    (reading,) = asyncio.run(query())
    assert reading.observed_s == pytest.approx(0.3) and reading.window_s == 8
    # the P81 (rank 16.2 of 20) lies in (0.2, 0.4]: its lower edge; the P99 in the same bucket
    assert reading.lower_s == 0.2 and reading.upper_s == 0.4
    assert all("[8s]" in q for q in asked) and len(asked) == 3  # estimate, count, buckets
    assert asked[-1] == promql_for(P90, prom, window_s=8, buckets=True)


def test_a_registered_metrics_url_is_fetched_only_from_an_allowed_host() -> None:
    """No blind SSRF: a runtime's metrics_url must name the address its link came from (a
    local ipc:// runtime: loopback) or a host in observe.metrics_hosts."""
    import asyncio

    from lynx_policy.observe import scrape_allowed

    def allowed(url: str, peer: str, hosts: list[str] | None = None) -> bool:
        return asyncio.run(scrape_allowed(url, peer, hosts or []))

    assert allowed("http://10.0.0.7:30000/metrics", "10.0.0.7")  # the link's own peer
    assert not allowed("http://10.0.0.8:30000/metrics", "10.0.0.7")  # someone else
    assert not allowed("http://169.254.169.254/latest/meta-data", "10.0.0.7")
    assert allowed("http://localhost:30000/metrics", "")  # ipc:// runtime: loopback only
    assert not allowed("http://10.0.0.8:30000/metrics", "")
    assert allowed("http://sglang-1:30000/metrics", "10.0.0.9", ["sglang-1"])  # allow-listed
    assert not allowed("file:///etc/passwd", "")
    assert not allowed("http://no-such-host.invalid/metrics", "10.0.0.7")


def test_a_tarpit_cannot_hold_a_tick_past_the_deadline() -> None:
    """Twelve endpoints that accept and never answer: all are scraped at once under one
    deadline (sequential scrapes took 12 x the timeout and stalled /healthz)."""
    import asyncio
    import socket
    import time

    from lynx_policy.observe import ObserveError

    tarpit = socket.socket()
    tarpit.bind(("127.0.0.1", 0))
    tarpit.listen(64)
    port = tarpit.getsockname()[1]
    config = ObserveConfig(scrape_urls=[f"http://127.0.0.1:{port}/m{i}" for i in range(12)],
                           timeout_s=0.5)

    async def tick() -> float:
        async with httpx.AsyncClient() as client:
            observer = ScrapeObserver(config, client, lambda: [])
            started = time.monotonic()
            with pytest.raises(ObserveError, match="all 12 runtime /metrics scrapes failed"):
                await observer.observe([SloTarget()])
            return time.monotonic() - started

    try:
        assert asyncio.run(tick()) < 1.5
    finally:
        tarpit.close()
