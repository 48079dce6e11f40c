"""Observe: current latency quantiles for each SLO target.

Two sources, chosen by config:
- `PrometheusObserver` (``observe.prometheus_url`` set): one instant PromQL query per
  histogram and window, each runtime's bucket rates (`promql_for`).
- `ScrapeObserver` (no Prometheus): GETs every runtime ``/metrics`` (configured URLs plus
  those runtimes registered), keeps the scrapes of the last window and takes each runtime's
  bucket deltas across the window.

Both merge the runtimes at the bucket edges all of them export (`quantiles.common_edges`:
during a rolling restart that changes the layout, the coarser shared one) and compute the
quantile as Prometheus' ``histogram_quantile`` does. Both return one `LatencyReading` per
target with the window's observation count and its confidence bounds at the buckets' edges
(`lynx_policy.quantiles.bucket_bounds`); ``observed_s`` is None when the window held no
traffic, too few observations above the quantile to estimate it (`usable`), or runtimes
whose layouts share no finite edge. Both raise `ObserveError` when the source cannot be read
at all.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from typing import Protocol

import httpx

from lynx_policy.config import SLO_HISTOGRAMS, ObserveConfig, SloTarget
from lynx_policy.decide import LatencyReading
from lynx_policy.metrics_hosts import scrape_allowed
from lynx_policy.quantiles import (
    CumulativeBuckets,
    bucket_bounds,
    bucket_delta,
    common_edges,
    confidence_levels,
    histogram_quantile,
    parse_histograms,
    restarted,
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


def promql_for(target: SloTarget, config: ObserveConfig, window_s: float | None = None) -> str:
    """The bucket rates of ``target``'s histogram over the window, by runtime (``instance``)
    and ``le``, of the series that exist both now and at the window's start: a runtime
    restarted inside the window with another bucket layout contributes only the edges its two
    layouts share (each covering the whole window), never a new edge that covers part of it
    or an old one that went stale. Matches the histogram under both spellings of its name.

    prometheus_client >= 0.22 serves OpenMetrics with ``escaping=underscores`` to scrapers that
    do not ask for UTF-8 names (Prometheus 2.x), so ``sglang:x`` is stored as ``sglang_x``
    there and as ``sglang:x`` by Prometheus 3. ``or`` keeps the first spelling that has data,
    never both.
    """
    selector = f"{{{config.label_selector}}}" if config.label_selector else ""
    window = f"{max(1, round(window_s or config.rate_window_s))}s"
    histogram = SLO_HISTOGRAMS[target.metric]
    spellings = dict.fromkeys([histogram, histogram.replace(":", "_")])
    return " or ".join(
        f"sum by (instance, le) (rate({name}_bucket{selector}[{window}]) "
        f"and {name}_bucket{selector} and {name}_bucket{selector} offset {window})"
        for name in spellings)


def reading_of(target: SloTarget, histograms: list[CumulativeBuckets], window_s: float,
               config: ObserveConfig, warnings: RateLimitedLog, per_second: bool = False
               ) -> tuple[float | None, float, float | None, float | None]:
    """(quantile, observations, lower, upper) [s] of ``target`` from the runtimes' cumulative
    bucket counts over ``window_s`` (``per_second``: rates, as Prometheus answers), merged at
    their shared edges (`common_edges`); the quantile None where `usable` says so, or where
    the layouts share no finite edge (warned through ``warnings``)."""
    merged = common_edges(histograms)
    samples = merged.get(math.inf, 0.0) * (window_s if per_second else 1.0)
    value = usable(histogram_quantile(target.quantile, merged), samples, target, config)
    if value is None:
        if samples and len(merged) == 1:
            warnings.warning("layouts", "no %s reading: the runtimes' histograms share no "
                             "finite bucket edge", SLO_HISTOGRAMS[target.metric])
        return None, samples, None, None
    return (value, samples, *reading_bounds(target, samples, merged, config))


class PrometheusObserver:
    def __init__(self, config: ObserveConfig, client: httpx.AsyncClient) -> None:
        self.config = config
        self.client = client
        self.url = config.prometheus_url.rstrip("/") + "/api/v1/query"
        self._warnings = RateLimitedLog(log, every_s=60.0)

    async def observe(self, targets: list[SloTarget]) -> tuple[LatencyReading, ...]:
        """One query per histogram and window (`promql_for`), shared by its targets."""
        readings = []
        rates: dict[tuple[str, float], list[CumulativeBuckets]] = {}
        for target in targets:
            for window in windows(self.config):  # the narrowest window with enough samples
                key = (target.metric, window)
                if key not in rates:
                    rates[key] = await self._buckets(promql_for(target, self.config, window))
                value, samples, low, high = reading_of(target, rates[key], window, self.config,
                                                       self._warnings, per_second=True)
                if value is not None:
                    break
            readings.append(LatencyReading(target, value, samples, low, high, window))
        return tuple(readings)

    async def _buckets(self, query: str) -> list[CumulativeBuckets]:
        """A ``sum by (instance, le)`` vector as cumulative buckets, one per instance."""
        out: dict[str, CumulativeBuckets] = {}
        result = (await self._data(query)).get("result") or []
        for sample in result if isinstance(result, list) else []:
            try:
                labels = sample["metric"]
                rate = float(sample["value"][1])
                out.setdefault(labels.get("instance", ""), {})[float(labels["le"])] = rate
            except (KeyError, IndexError, TypeError, ValueError, AttributeError):
                continue
        return list(out.values())

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


@dataclass(frozen=True)
class Scrape:
    """One runtime ``/metrics`` scrape: when [clock s], which histograms it asked for, and
    the cumulative buckets of those the runtime had."""

    at: float
    asked: frozenset[str]
    histograms: dict[str, CumulativeBuckets]


class ScrapeObserver:
    def __init__(self, config: ObserveConfig, client: httpx.AsyncClient,
                 registered_urls: Callable[[], list[tuple[str, str]]],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.client = client
        self.registered_urls = registered_urls
        self.clock = clock
        self._scrapes: dict[str, deque[Scrape]] = {}
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
            self._remember(url, Scrape(self.clock(), frozenset(names), task.result()))
            fresh.append(url)
        for gone in set(self._scrapes) - set(urls):
            del self._scrapes[gone]
        if urls and failures == len(urls):
            raise ObserveError(f"all {len(urls)} runtime /metrics scrapes failed")
        readings = []
        for t in targets:
            name = SLO_HISTOGRAMS[t.metric]
            for window_s in windows(self.config):  # the narrowest window with enough samples
                deltas = [self._window_delta(url, window_s, name) for url in fresh]
                value, samples, low, high = reading_of(t, deltas, window_s, self.config,
                                                       self._failure_log)
                if value is not None:
                    break
            readings.append(LatencyReading(t, value, samples, low, high, window_s))
        return tuple(readings)

    def _remember(self, url: str, scrape: Scrape) -> None:
        """Keep this scrape, and the scrapes back to the widest window."""
        history = self._scrapes.setdefault(url, deque())
        history.append(scrape)
        horizon = scrape.at - windows(self.config)[-1]
        while len(history) > 2 and history[1].at <= horizon:
            history.popleft()

    def _window_delta(self, url: str, window_s: float, name: str) -> CumulativeBuckets:
        """Bucket deltas of histogram ``name`` between the newest scrape and the newest one
        at or before the window's start (the oldest kept when none is), among the newest
        unbroken run of scrapes that asked for ``name``: one that did not ask holds nothing
        of it (read as 0, the first windows after ``PUT /v1/slo`` were the runtime's whole
        history), and a base from before such a gap (a target removed and set again) would
        make the delta span the gap. A scrape that asked and found no series counts as 0
        (the runtime had observed nothing yet). A count that falls between two scrapes of the
        run (the runtime restarted inside the window) gives the newest counts, those since
        the restart. Empty: no base."""
        run: list[Scrape] = []
        for scrape in reversed(self._scrapes.get(url, ())):
            if name not in scrape.asked:
                break
            run.append(scrape)
        run.reverse()
        if len(run) < 2:
            return {}
        newest = run[-1]
        start = 0
        for i, scrape in enumerate(run):
            if scrape.at > newest.at - window_s:
                break
            start = i
        buckets = newest.histograms.get(name)
        if buckets is None:
            return {}
        for older, newer in pairwise(run[start:]):
            if restarted(older.histograms.get(name), newer.histograms.get(name)):
                return dict(buckets)
        return bucket_delta(buckets, run[start].histograms.get(name))


def make_observer(config: ObserveConfig, client: httpx.AsyncClient,
                  registered_urls: Callable[[], list[tuple[str, str]]]) -> Observer:
    if config.prometheus_url:
        return PrometheusObserver(config, client)
    return ScrapeObserver(config, client, registered_urls)
