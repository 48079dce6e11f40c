"""Small helpers that keep failures from flooding logs or spinning loops (after kopf)."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence


class Backoff:
    """Delays for consecutive failures: steps through ``delays``, then repeats the last one."""

    def __init__(self, delays: Sequence[float]) -> None:
        if not delays:
            raise ValueError("Backoff needs at least one delay")
        self.delays = tuple(delays)
        self.failures = 0

    def failed(self) -> float:
        """Record a failure; returns how long to wait before the next try [s]."""
        delay = self.delays[min(self.failures, len(self.delays) - 1)]
        self.failures += 1
        return delay

    def succeeded(self) -> bool:
        """Record a success; True if this ends a run of failures (a recovery)."""
        recovered = self.failures > 0
        self.failures = 0
        return recovered

    @property
    def degraded(self) -> bool:
        return self.failures > 0


class RateLimitedLog:
    """Logs the first event of each kind at once, then at most one summary per ``every_s``."""

    def __init__(self, logger: logging.Logger, every_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.every_s = every_s
        self.clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()

    def warning(self, kind: str, message: str, *args: object) -> None:
        now = self.clock()
        last = self._last.get(kind)
        if last is not None and now - last < self.every_s:
            self._suppressed[kind] += 1
            return
        self._last[kind] = now
        suppressed = self._suppressed.pop(kind, 0)
        suffix = f" ({suppressed} similar suppressed)" if suppressed else ""
        self.logger.warning(message + suffix, *args)


class PeerThrottle:
    """Failed attempts per peer within a sliding ``window_s``; a peer with ``limit`` of them
    is throttled until the oldest leaves the window. At most ``max_peers`` peers are tracked
    (the least recently failing is forgotten first), so a spoofed-address flood cannot grow
    memory without bound."""

    def __init__(self, limit: int, window_s: float, max_peers: int = 4096,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self.window_s, self.max_peers, self.clock = limit, window_s, max_peers, clock
        self._failures: dict[str, list[float]] = {}

    def _recent(self, peer: str, now: float) -> list[float]:
        times = [t for t in self._failures.get(peer, []) if now - t < self.window_s]
        if times:
            self._failures[peer] = times
        else:
            self._failures.pop(peer, None)
        return times

    def throttled(self, peer: str) -> float:
        """Seconds until ``peer`` may try again (0: not throttled)."""
        now = self.clock()
        times = self._recent(peer, now)
        return self.window_s - (now - times[0]) if len(times) >= self.limit else 0.0

    def failed(self, peer: str) -> None:
        now = self.clock()
        times = self._recent(peer, now)
        self._failures.pop(peer, None)  # re-insert: most recent last (eviction order)
        self._failures[peer] = [*times[-(self.limit - 1):], now] if self.limit > 1 else [now]
        while len(self._failures) > self.max_peers:
            self._failures.pop(next(iter(self._failures)))


class SampledCount:
    """At most ``per_interval`` events of each kind per ``interval_s`` pass (the rest are
    counted); `take` says whether this one passes and how many were held back since the last
    one that passed."""

    def __init__(self, per_interval: int, interval_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.per_interval, self.interval_s, self.clock = per_interval, interval_s, clock
        self._window: dict[str, tuple[float, int]] = {}
        self._held: Counter[str] = Counter()

    def take(self, kind: str) -> tuple[bool, int]:
        now = self.clock()
        start, used = self._window.get(kind, (now, 0))
        if now - start >= self.interval_s:
            start, used = now, 0
        if used >= self.per_interval:
            self._window[kind] = (start, used)
            self._held[kind] += 1
            return False, 0
        self._window[kind] = (start, used + 1)
        return True, self._held.pop(kind, 0)
