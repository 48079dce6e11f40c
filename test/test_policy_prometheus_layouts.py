"""A rolling restart that changes the runtimes' latency buckets, read through a real Prometheus
(Debian package ``prometheus``): the controller's query keeps, per runtime, only the series
that exist both now and at the window's start, and merges the runtimes at the edges they share
(`lynx_policy.observe.promql_for`, `lynx_policy.quantiles.common_edges`)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
from test_policy_control_loop import running_prometheus
from test_policy_observe import FINE, SGLANG_DEFAULT

from lynx_policy.config import ObserveConfig, SloTarget
from lynx_policy.decide import LatencyReading
from lynx_policy.observe import PrometheusObserver, promql_for
from lynx_policy.quantiles import CumulativeBuckets
from lynx_policy.testing import LatencySource

# serial: Prometheus scrapes against wall-clock waits
pytestmark = pytest.mark.serial

P90 = SloTarget(metric="itl", quantile=0.9, target_ms=100.0)
WINDOW_S = 6


def look(url: str) -> tuple[dict[str, set[float]], LatencyReading]:
    """Each runtime's edges in the controller's query, and its P90 reading."""
    config = ObserveConfig(prometheus_url=url, rate_window_s=WINDOW_S, min_tail_samples=5)

    async def run() -> tuple[list[CumulativeBuckets], LatencyReading]:
        async with httpx.AsyncClient() as client:
            observer = PrometheusObserver(config, client)
            per_instance = await observer._buckets(promql_for(P90, config))
            (reading,) = await observer.observe([P90])
            return per_instance, reading

    per_instance, reading = asyncio.run(run())
    return {str(i): set(b) - {float("inf")} for i, b in enumerate(per_instance)}, reading


def wait_for(url: str, instances: int, timeout_s: float = 30.0
             ) -> tuple[dict[str, set[float]], LatencyReading]:
    deadline = time.monotonic() + timeout_s
    while True:
        edges, reading = look(url)
        if len(edges) == instances and reading.observed_s is not None:
            return edges, reading
        assert time.monotonic() < deadline, f"no reading from {instances} runtimes: {edges}"
        time.sleep(0.5)


def assert_coarse_reading(reading: LatencyReading) -> None:
    """Half the ITLs at 50 ms, half at 150 ms: the P90 lies in SGLang's (0.1, 0.2] bucket."""
    assert reading.observed_s is not None and 0.1 < reading.observed_s <= 0.2
    assert (reading.lower_s, reading.upper_s) == (pytest.approx(0.1), pytest.approx(0.2))


@pytest.mark.slow  # ~30 s: two restarts, each waited out for a window
def test_a_rolling_restart_onto_finer_buckets_is_read_at_the_shared_edges(tmp_path: Path
                                                                          ) -> None:
    fast = LatencySource(0.05, buckets=SGLANG_DEFAULT)
    slow = LatencySource(0.15, buckets=SGLANG_DEFAULT)
    try:
        with running_prometheus(tmp_path / "prometheus", [fast.port, slow.port]) as url:
            time.sleep(WINDOW_S + 1)
            edges, reading = wait_for(url, 2)
            assert all(e == set(SGLANG_DEFAULT) for e in edges.values())
            assert_coarse_reading(reading)

            slow.close()  # the upgrade: restarted in place with Lynx's buckets
            slow = LatencySource(0.15, buckets=FINE, port=slow.port)
            time.sleep(2.5)  # two scrapes: inside the window, its fine edges are young
            edges, reading = wait_for(url, 2)
            assert all(e <= set(SGLANG_DEFAULT) for e in edges.values()), edges
            assert_coarse_reading(reading)

            time.sleep(WINDOW_S + 1)  # a window later the fine edges count, the merge is coarse
            edges, reading = wait_for(url, 2)
            assert max(len(e) for e in edges.values()) > len(SGLANG_DEFAULT)
            assert_coarse_reading(reading)

            slow.close()  # rolled back: the fine series go stale and leave the query
            slow = LatencySource(0.15, buckets=SGLANG_DEFAULT, port=slow.port)
            time.sleep(2.5)
            edges, reading = wait_for(url, 2)
            assert all(e <= set(SGLANG_DEFAULT) for e in edges.values()), edges
            assert_coarse_reading(reading)
    finally:
        fast.close()
        slow.close()
