"""Observe: current latency quantiles for each SLO target.

Two sources, chosen by config:
- `PrometheusObserver` (``observe.prometheus_url`` set): instant PromQL queries per target,
  ``histogram_quantile(q, sum by (le) (rate(<histogram>_bucket{<selector>}[<window>s])))``,
  the window's count, and (for the bounds) the bucket rates themselves.
- `ScrapeObserver` (no Prometheus): GETs every runtime ``/metrics`` (configured URLs plus
  those runtimes registered), keeps the scrapes of the last window and computes the quantile
  from the bucket deltas across the window, summed over runtimes.

Both return one `LatencyReading` per target with the window's observation count and its
confidence bounds at the buckets' edges (`lynx_policy.quantiles.bucket_bounds`);
``observed_s`` is None when the window held no traffic, or too few observations above the
quantile to estimate it (`usable`). Both raise `ObserveError` when the source cannot be read
at all.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

import httpx

from lynx_policy.config import SLO_HISTOGRAMS, ObserveConfig, SloTarget
from lynx_policy.decide import LatencyReading
from lynx_policy.quantiles import (
    CumulativeBuckets,
    bucket_bounds,
    bucket_delta,
    confidence_levels,
    histogram_quantile,
    merge,
    parse_histograms,
)
from lynx_policy.throttle import RateLimitedLog

log = logging.getLogger(__name__)


class ObserveError(RuntimeError):
    """The latency source could not be read (the tick fails and the loop backs off)."""


class Observer(Protocol):
    async def observe(self, targets: list[SloTarget]) -> tuple[LatencyReading, ...]: ...


def usable(value: float | None, samples: float | None, target: SloTarget,
           config: ObserveConfig) -> float | None:
    """``value`` if the window's ``samples`` put at least ``config.min_tail_samples``
    observations above the quantile, else None (an unknown count counts as enough)."""
    if value is None or samples is None:
        return value
    above = samples * (1.0 - target.quantile)
    return value if above >= config.min_tail_samples * (1 - 1e-9) else None  # 50 x 0.1 < 5


def windows(config: ObserveConfig) -> list[float]:
    """The windows a reading tries in turn [s]: ``rate_window_s``, doubled up to
    ``max_window_s`` (the last one exactly)."""
    out = [config.rate_window_s]
    while config.max_window_s is not None and out[-1] < config.max_window_s:
        out.append(min(2 * out[-1], config.max_window_s))
    return out


def reading_bounds(target: SloTarget, samples: float | None, buckets: CumulativeBuckets,
                   config: ObserveConfig) -> tuple[float | None, float | None]:
    """(lower, upper) bounds [s] of ``target``'s quantile in a window of ``samples``
    observations with cumulative ``buckets``: at the bucket edges (`bucket_bounds`), or
    (None, None), the estimate counting as its own bounds, at confidence 0.5 or an unknown
    count."""
    levels = confidence_levels(target.quantile, samples, config.confidence)
    if levels == (target.quantile, target.quantile):
        return None, None
    return bucket_bounds(levels, buckets)


def promql_for(target: SloTarget, config: ObserveConfig, count: bool = False,
               window_s: float | None = None, buckets: bool = False) -> str:
    """The target's quantile query (``count``: the window's observation count instead;
    ``buckets``: the window's bucket rates by ``le``); matches the histogram under both
    spellings of its name.

    prometheus_client >= 0.22 serves OpenMetrics with ``escaping=underscores`` to scrapers that
    do not ask for UTF-8 names (Prometheus 2.x), so ``sglang:x`` is stored as ``sglang_x``
    there and as ``sglang:x`` by Prometheus 3. ``or`` keeps the first spelling that has data,
    never both.
    """
    selector = f"{{{config.label_selector}}}" if config.label_selector else ""
    window = f"{max(1, round(window_s or config.rate_window_s))}s"
    histogram = SLO_HISTOGRAMS[target.metric]
    spellings = dict.fromkeys([histogram, histogram.replace(":", "_")])
    if count:
        return " or ".join(f"sum(increase({name}_count{selector}[{window}]))"
                           for name in spellings)
    rates = " or ".join(f"sum by (le) (rate({name}_bucket{selector}[{window}]))"
                        for name in spellings)
    if buckets:
        return rates
    return f"histogram_quantile({target.quantile:.6g}, {rates})"


class PrometheusObserver:
    def __init__(self, config: ObserveConfig, client: httpx.AsyncClient) -> None:
        self.config = config
        self.client = client
        self.url = config.prometheus_url.rstrip("/") + "/api/v1/query"

    async def observe(self, targets: list[SloTarget]) -> tuple[LatencyReading, ...]:
        readings = []
        counts: dict[tuple[str, float], float | None] = {}  # one count query per histogram
        rates: dict[tuple[str, float], CumulativeBuckets] = {}  # and one bucket query
        for target in targets:
            for window in windows(self.config):  # the narrowest window with enough samples
                value = await self._query(promql_for(target, self.config, window_s=window))
                if (target.metric, window) not in counts:
                    counts[(target.metric, window)] = await self._query(
                        promql_for(target, self.config, count=True, window_s=window))
                samples = counts[(target.metric, window)]
                reading = usable(value, samples, target, self.config)
                if reading is not None:
                    break
            low = high = None
            if reading is not None:
                if (target.metric, window) not in rates:
                    rates[(target.metric, window)] = await self._buckets(
                        promql_for(target, self.config, window_s=window, buckets=True))
                low, high = reading_bounds(target, samples, rates[(target.metric, window)],
                                           self.config)
            readings.append(LatencyReading(target, reading, samples, low, high, window))
        return tuple(readings)

    async def _query(self, query: str) -> float | None:
        return _first_finite(await self._data(query))

    async def _buckets(self, query: str) -> CumulativeBuckets:
        """A ``sum by (le)`` vector as cumulative buckets (rates: their ranks are counts')."""
        out: CumulativeBuckets = {}
        result = (await self._data(query)).get("result") or []
        for sample in result if isinstance(result, list) else []:
            try:
                out[float(sample["metric"]["le"])] = float(sample["value"][1])
            except (KeyError, IndexError, TypeError, ValueError):
                continue
        return out

    async def _data(self, query: str) -> dict:
        try:
            response = await self.client.get(self.url, params={"query": query},
                                             timeout=self.config.timeout_s)
            body = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise ObserveError(f"Prometheus query failed: {type(exc).__name__}: {exc}"
                               ) from None
        if response.status_code != 200 or body.get("status") != "success":
            raise ObserveError(f"Prometheus answered {response.status_code}: "
                               f"{body.get('error', '')[:200]}")
        data = body.get("data", {})
        return data if isinstance(data, dict) else {}


def _first_finite(data: dict) -> float | None:
    if data.get("resultType") != "vector" or not data.get("result"):
        return None
    try:
        value = float(data["result"][0]["value"][1])
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


async def host_addresses(host: str) -> set[str]:
    """The IP addresses ``host`` resolves to (empty when it does not)."""
    import ipaddress
    import socket

    try:
        return {str(ipaddress.ip_address(host))}
    except ValueError:
        pass
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None,
                                                             type=socket.SOCK_STREAM)
    except OSError:
        return set()
    return {str(info[4][0]) for info in infos}


async def scrape_allowed(url: str, peer: str, allowed_hosts: list[str]) -> bool:
    """May the controller fetch a runtime's registered ``metrics_url``? Only http(s) URLs
    whose host is in ``observe.metrics_hosts`` or resolves to the address the link saw the
    runtime connect from (``peer``; a local ``ipc://`` runtime: a loopback address). The
    controller fetches what a runtime names, so an unchecked URL would be a blind SSRF."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    if parts.hostname in allowed_hosts:
        return True
    addresses = await host_addresses(parts.hostname)
    if not peer:
        return bool(addresses) and all(a.startswith("127.") or a == "::1" for a in addresses)
    return peer in addresses


class ScrapeObserver:
    def __init__(self, config: ObserveConfig, client: httpx.AsyncClient,
                 registered_urls: Callable[[], list[tuple[str, str]]],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.client = client
        self.registered_urls = registered_urls
        self.clock = clock
        self._scrapes: dict[str, deque[tuple[float, dict[str, CumulativeBuckets]]]] = {}
        self._failure_log = RateLimitedLog(log, every_s=60.0)

    async def urls(self) -> list[str]:
        """The configured URLs and the registered ones the allow-list lets through."""
        registered = []
        for url, peer in self.registered_urls():
            if url and await scrape_allowed(url, peer, self.config.metrics_hosts):
                registered.append(url)
            elif url:
                self._failure_log.warning(f"refused {url}", "not scraping %s: its host is not "
                                          "in observe.metrics_hosts and is not the address "
                                          "the runtime connected from (%s)", url,
                                          peer or "ipc")
        return sorted({*self.config.scrape_urls, *registered})

    async def _scrape(self, url: str, names: set[str]) -> dict[str, CumulativeBuckets]:
        response = await self.client.get(url, timeout=self.config.timeout_s)
        response.raise_for_status()
        return parse_histograms(response.text, names)

    async def observe(self, targets: list[SloTarget]) -> tuple[LatencyReading, ...]:
        """Every URL scraped concurrently under one deadline (``observe.timeout_s``): a slow
        or tarpitting endpoint fails alone, and never holds the loop past the deadline."""
        names = {SLO_HISTOGRAMS[t.metric] for t in targets}
        try:
            urls = await asyncio.wait_for(self.urls(), self.config.timeout_s)
        except TimeoutError:
            raise ObserveError("resolving the runtimes' metrics hosts timed out") from None
        tasks = {url: asyncio.ensure_future(self._scrape(url, names)) for url in urls}
        if tasks:
            await asyncio.wait(tasks.values(), timeout=self.config.timeout_s)
        failures, fresh = 0, []
        for url, task in tasks.items():
            if not task.done():
                task.cancel()
                failures += 1
                self._failure_log.warning(url, "scrape of %s failed: no answer within %.1f s",
                                          url, self.config.timeout_s)
                continue
            error = task.exception()
            if error is not None:
                failures += 1
                self._failure_log.warning(url, "scrape of %s failed: %s", url, error)
                continue
            self._remember(url, task.result())
            fresh.append(url)
        for gone in set(self._scrapes) - set(urls):
            del self._scrapes[gone]
        if urls and failures == len(urls):
            raise ObserveError(f"all {len(urls)} runtime /metrics scrapes failed")
        readings = []
        for t in targets:
            name = SLO_HISTOGRAMS[t.metric]
            for window_s in windows(self.config):  # the narrowest window with enough samples
                window: CumulativeBuckets = {}
                for url in fresh:
                    merge(window, self._window_delta(url, window_s).get(name, {}))
                samples = window.get(math.inf, 0.0)
                value = histogram_quantile(t.quantile, window)
                reading = usable(value, samples, t, self.config)
                if reading is not None:
                    break
            low, high = (None, None) if reading is None else reading_bounds(
                t, samples, window, self.config)
            readings.append(LatencyReading(t, reading, samples, low, high, window_s))
        return tuple(readings)

    def _remember(self, url: str, histograms: dict[str, CumulativeBuckets]) -> None:
        """Keep this scrape, and the scrapes back to the widest window."""
        now = self.clock()
        history = self._scrapes.setdefault(url, deque())
        history.append((now, histograms))
        horizon = now - windows(self.config)[-1]
        while len(history) > 2 and history[1][0] <= horizon:
            history.popleft()

    def _window_delta(self, url: str, window_s: float) -> dict[str, CumulativeBuckets]:
        """Bucket deltas between the newest scrape and the newest one at or before the
        window's start (the oldest kept when none is)."""
        history = self._scrapes.get(url)
        if not history or len(history) < 2:
            return {}
        now, newest = history[-1]
        base = history[0][1]
        for at, histograms in history:
            if at > now - window_s:
                break
            base = histograms
        return {name: bucket_delta(buckets, base.get(name)) for name, buckets in
                newest.items()}


def make_observer(config: ObserveConfig, client: httpx.AsyncClient,
                  registered_urls: Callable[[], list[tuple[str, str]]]) -> Observer:
    if config.prometheus_url:
        return PrometheusObserver(config, client)
    return ScrapeObserver(config, client, registered_urls)
