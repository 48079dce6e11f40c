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

P99 = SloTarget(metric="itl", quantile=0.99, target_ms=100.0)
P90 = SloTarget(metric="itl", quantile=0.9, target_ms=100.0)
P50 = SloTarget(metric="itl", quantile=0.5, target_ms=100.0)


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

    def __init__(self, buckets: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2, 0.4)) -> None:
        self.registry = CollectorRegistry()
        self.itl = Histogram("sglang:inter_token_latency_seconds", "ITL", buckets=buckets,
                             registry=self.registry)

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


def vector(per_instance: dict[str, dict[float, float]]) -> httpx.Response:
    """Prometheus' answer to a ``sum by (instance, le)`` query: one sample per instance and
    edge."""
    result = [{"metric": {"instance": instance, "le": "+Inf" if math.isinf(le) else f"{le:g}"},
               "value": [0, str(rate)]}
              for instance, rates in per_instance.items() for le, rate in rates.items()]
    return httpx.Response(200, json={"status": "success", "data": {
        "resultType": "vector", "result": result}})


def query_of(request: httpx.Request) -> str:
    return parse_qs(urlparse(str(request.url)).query)["query"][0]


def test_prometheus_observer_counts_from_the_buckets_and_drops_a_thin_window() -> None:
    """One query per histogram and window: the quantile, the count (the +Inf rate times the
    window) and the bounds all come from the same bucket rates."""
    asked: list[str] = []
    per_second = {"value": 4.0}  # 120 ITLs in 30 s: too few above a P99

    def prometheus(request: httpx.Request) -> httpx.Response:
        asked.append(query_of(request))
        total = per_second["value"]
        return vector({"runtime-0:30000": {0.2: 0.0, 0.4: total, math.inf: total}})

    config = ObserveConfig(prometheus_url="http://prom:9090", rate_window_s=30,
                           label_selector='job="runtime"')

    async def run() -> tuple:
        async with httpx.AsyncClient(transport=httpx.MockTransport(prometheus)) as client:
            observer = PrometheusObserver(config, client)
            thin = await observer.observe([P99])
            per_second["value"] = 5000.0 / 30
            full = await observer.observe([P99])
            asked.clear()
            both = await observer.observe([P99, P90])  # one histogram: one query
            assert asked == [promql_for(P90, config)]
            assert [r.observed_s for r in both] == [pytest.approx(0.398),
                                                    pytest.approx(0.38)]
            return thin + full

    thin, full = asyncio.run(run())
    assert thin.observed_s is None and thin.samples == pytest.approx(120.0)
    assert full.observed_s == pytest.approx(0.398) and full.samples == pytest.approx(5000.0)
    query = promql_for(P99, config)
    for name in ("sglang:inter_token_latency_seconds", "sglang_inter_token_latency_seconds"):
        series = f'{name}_bucket{{job="runtime"}}'
        assert (f"sum by (instance, le) (rate({series}[30s]) and {series} and {series} "
                f"offset 30s)") in query  # both spellings, each series present all window
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

    def prometheus(request: httpx.Request) -> httpx.Response:  # the same rates in any window
        return vector({"a:1": {0.05: 0.0, 0.1: per_second, math.inf: per_second}})

    config = ObserveConfig(prometheus_url="http://prom:9090", rate_window_s=4,
                           max_window_s=64)

    async def run() -> tuple:
        async with httpx.AsyncClient(transport=httpx.MockTransport(prometheus)) as client:
            return await PrometheusObserver(config, client).observe([P90])

    (reading,) = asyncio.run(run())
    assert reading.observed_s == pytest.approx(0.095) and reading.samples == 80.0  # 32 s


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
        asked.append(query_of(request))
        return vector({"runtime-0:30000": rates})

    prom = ObserveConfig(prometheus_url="http://prom:9090", rate_window_s=8,
                         min_tail_samples=2.0)

    async def query() -> tuple:
        async with httpx.AsyncClient(transport=httpx.MockTransport(prometheus)) as client:
            return await PrometheusObserver(prom, client).observe([P90])

    (reading,) = asyncio.run(query())
    assert reading.observed_s == pytest.approx(0.3) and reading.window_s == 8
    # the P81 (rank 16.2 of 20) lies in (0.2, 0.4]: its lower edge; the P99 in the same bucket
    assert reading.lower_s == 0.2 and reading.upper_s == 0.4
    assert reading.samples == pytest.approx(20.0)  # the +Inf rate over 8 s
    assert asked == [promql_for(P90, prom, window_s=8)]


SGLANG_DEFAULT = (0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.025, 0.03, 0.035, 0.04,
                  0.06, 0.08, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 2.0, 4.0, 6.0, 8.0)
FINE = tuple(sorted({round(0.001 * 2 ** (k / 8), 6) for k in range(105)} | set(SGLANG_DEFAULT)))


def test_runtimes_with_different_bucket_layouts_merge_at_their_shared_edges() -> None:
    """A rolling restart half done: one runtime on SGLang's default buckets at 50 ms, one on
    Lynx's finer ones (its default edges among them) at 150 ms. Summed over the union of
    edges, a fine edge between 60 and 100 ms holds the slow runtime's 0 but not the fast one's
    500: the cumulative counts fall and go up again, and the P50 came from the wrong bucket.
    At the shared edges the reading is exact at the coarse resolution, its bounds hold the
    true quantile, and a runtime that restarts onto another layout starts its window anew."""
    urls = {"http://old/metrics": Runtime(SGLANG_DEFAULT), "http://new/metrics": Runtime(FINE)}
    now = [0.0]
    config = ObserveConfig(scrape_urls=list(urls), rate_window_s=4.0)

    def handler(request: httpx.Request) -> httpx.Response:
        return urls[str(request.url)].handler(request)

    async def run() -> tuple:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            observer = ScrapeObserver(config, client, lambda: [], clock=lambda: now[0])
            await observer.observe([P90])
            urls["http://old/metrics"].observe(0.05, 500)
            urls["http://new/metrics"].observe(0.15, 500)
            now[0] = 4.0
            mixed = await observer.observe([P50, P90])
            urls["http://new/metrics"] = Runtime(SGLANG_DEFAULT)  # restarted onto the default
            urls["http://new/metrics"].observe(0.15, 100)
            urls["http://old/metrics"].observe(0.05, 100)
            now[0] = 8.0
            return mixed + await observer.observe([P50])

    median, p90, after_restart = asyncio.run(run())
    assert median.samples == p90.samples == 1000
    # P50: rank 500 of (0.04, 0.06] holding the fast 500 -> its upper edge; P90: (0.1, 0.2]
    assert median.observed_s == pytest.approx(0.06)
    assert p90.observed_s == pytest.approx(0.18)
    assert p90.lower_s is not None and p90.upper_s is not None
    assert p90.lower_s <= 0.15 <= p90.upper_s and (p90.lower_s, p90.upper_s) == (0.1, 0.2)
    # the restarted runtime's counters began again: its 100 new ITLs, not 100 - 500
    assert after_restart.samples == 200 and after_restart.observed_s == pytest.approx(0.06)


def test_layouts_with_no_shared_finite_edge_give_no_reading(caplog: pytest.LogCaptureFixture
                                                             ) -> None:
    urls = {"http://a/metrics": Runtime((0.05, 0.1)), "http://b/metrics": Runtime((0.07, 0.2))}
    now = [0.0]
    config = ObserveConfig(scrape_urls=list(urls), rate_window_s=4.0)

    async def run() -> tuple:
        transport = httpx.MockTransport(lambda r: urls[str(r.url)].handler(r))
        async with httpx.AsyncClient(transport=transport) as client:
            observer = ScrapeObserver(config, client, lambda: [], clock=lambda: now[0])
            await observer.observe([P90])
            for runtime in urls.values():
                runtime.observe(0.06, 300)
            now[0] = 4.0
            return await observer.observe([P90])

    (reading,) = asyncio.run(run())
    assert reading.observed_s is None and reading.samples == 600
    assert "share no finite bucket edge" in caplog.text


def test_a_registered_metrics_url_is_fetched_only_from_an_allowed_host() -> None:
    """No blind SSRF: a runtime's metrics_url must name the address its link came from (a
    local ipc:// runtime: loopback) or a host in observe.metrics_hosts."""
    import asyncio

    from lynx_policy.metrics_hosts import scrape_allowed

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


@pytest.mark.serial  # a wall-clock bound (the tick ends within 1.5 s)
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


def scraped_each_second(plan: list[tuple[bool, float, int]]) -> list[tuple]:
    """Second by second from t = 0: the runtime observes ``count`` latencies of ``value`` [s],
    then the observer scrapes, asking for the P90 ITL target when ``asked`` (the loop asks
    only for its targets' histograms). Windows 4 s doubling to 32 s, a P90 needs 20 samples."""
    runtime = Runtime()
    now = [0.0]
    config = ObserveConfig(scrape_urls=["http://runtime/metrics"], rate_window_s=4.0,
                           max_window_s=32.0, min_tail_samples=2)

    async def run() -> list[tuple]:
        out = []
        async with httpx.AsyncClient(transport=httpx.MockTransport(runtime.handler)) as client:
            observer = ScrapeObserver(config, client, lambda: [], clock=lambda: now[0])
            for second, (asked, value, count) in enumerate(plan):
                now[0] = float(second)
                runtime.observe(value, count)
                out.append(await observer.observe([P90] if asked else []))
        return out

    return asyncio.run(run())


def test_a_target_set_later_reads_only_the_traffic_since_its_histogram_was_first_scraped(
        ) -> None:
    """Scrapes taken before a target asked for its histogram (static mode, no SLO yet) hold no
    buckets of it: that is unknown, not zero. Read as zero, the first windows after the SLO is
    set were the runtime's whole history (on the SLO Pareto testbed: a 4 s window of 431
    requests, the profile's 48-stream TPOTs of ~220 ms, while the replay ran at ~85 ms; the
    planner's correction came out 6.5x and it held unpruned for 17 s)."""
    out = scraped_each_second([(False, 0.35, 40)] * 10 + [(True, 0.03, 3)] * 40)
    assert out[:10] == [()] * 10  # no SLO yet: nothing read
    readings = [r for (r,) in out[10:]]
    assert readings[0].observed_s is None and not readings[0].samples  # one scrape of it
    read = [r for r in readings if r.observed_s is not None]
    assert read, "the observer never read the new traffic"
    assert all(r.observed_s <= 0.05 for r in read)  # never the slow past
    assert all(r.samples is not None and r.samples <= 3 * 40 for r in readings)
    last = readings[-1]  # a P90 needs 20: the 4 s window (12) is too thin, the 8 s one is not
    assert last.observed_s is not None and last.samples == 3 * 8 and last.window_s == 8.0


def test_a_target_set_again_after_a_gap_reads_no_window_across_the_gap() -> None:
    """Asked for, then not (the target removed), then asked again: the scrapes from before
    the gap are no base for the new windows, or a "4 s" window would span the gap."""
    out = scraped_each_second([(True, 0.03, 20)] * 10 + [(False, 0.35, 20)] * 10
                              + [(True, 0.03, 20)] * 10)
    after = [r for (r,) in out[20:]]  # from t = 20
    assert after[0].observed_s is None  # one scrape since the gap: no base yet
    assert all(r.observed_s is not None and r.observed_s <= 0.05 for r in after[1:])
    assert after[1].samples == 20  # t=20 -> 21 only, not the gap's 200 slow ones


def test_a_restart_inside_the_window_that_caught_up_is_still_a_restart() -> None:
    """The runtime restarted inside the window and has since observed more than it had at
    the window's start: the two ends alone look like a plain increase; the scrapes between
    show the fall, and the window reads the counts since the restart."""
    runtime = Runtime()
    now = [0.0]
    config = ObserveConfig(scrape_urls=["http://runtime/metrics"], rate_window_s=8.0,
                           min_tail_samples=0)

    async def run() -> tuple:
        async with httpx.AsyncClient(
                transport=httpx.MockTransport(lambda r: runtime.handler(r))) as client:
            observer = ScrapeObserver(config, client, lambda: [], clock=lambda: now[0])
            runtime.observe(0.03, 100)
            await observer.observe([P90])  # t = 0, the window's base: 100 fast
            now[0] = 2.0
            runtime.__init__()  # type: ignore[misc]  # a restart: counts from zero
            runtime.observe(0.35, 50)
            await observer.observe([P90])
            now[0] = 8.0
            runtime.observe(0.03, 110)  # every bucket now at or above the base's
            return await observer.observe([P90])

    (reading,) = asyncio.run(run())
    assert reading.samples == 160  # since the restart; the two ends alone: 160 - 100
    assert reading.observed_s is not None and reading.observed_s > 0.2
