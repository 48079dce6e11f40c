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
