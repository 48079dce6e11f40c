"""The admin API's HTTP server hardening: what uvicorn alone does not bound.

- `HeaderDeadlineProtocol`: uvicorn's h11 protocol with a deadline for a request's head. A
  connection that has not delivered a complete request line and headers within
  ``admin.header_timeout_s`` of connecting (or of its previous response) is closed. uvicorn's
  own keep-alive timer is cancelled by every byte received, so a client trickling a request
  head held its descriptor forever. And at most ``admin.max_connections`` connections may
  wait for a head: a new one evicts the longest-waiting. A request that sends its head at
  once (``/healthz``, an operator's PUT) is served however many slow clients there are;
  uvicorn's ``limit_concurrency`` would answer it 503 instead.
- `raise_fd_limit`: the soft RLIMIT_NOFILE raised to the hard one at start-up, so the link and
  the admin API have the most descriptors the host allows.
- `RepeatFilter`: a log line that repeats (uvicorn's "socket.accept() out of system
  resource" under descriptor exhaustion was logged 615,108 times in 50 s) is logged once,
  then at most once per ``every_s`` with the count of the ones held back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, ClassVar

from uvicorn.protocols.http.h11_impl import H11Protocol


class HeaderDeadlineProtocol(H11Protocol):
    """h11 with a request-head deadline (``header_timeout_s``, set by `with_deadline`)."""

    header_timeout_s = 10.0
    max_waiting = 512
    waiting: ClassVar[dict[int, HeaderDeadlineProtocol]] = {}  # per `with_deadline` class

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_deadline: asyncio.TimerHandle | None = None
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._head_deadline = self.loop.call_later(self.header_timeout_s, self._head_late)
        self.waiting[id(self)] = self
        while len(self.waiting) > self.max_waiting:  # evict the longest-waiting connection
            oldest = self.waiting.pop(next(iter(self.waiting)))
            oldest._disarm()
            if not oldest.transport.is_closing():
                oldest.transport.close()

    def _disarm(self) -> None:
        self.waiting.pop(id(self), None)
        deadline = getattr(self, "_head_deadline", None)
        if deadline is not None:
            deadline.cancel()
            self._head_deadline = None

    def _head_late(self) -> None:
        self._head_deadline = None
        waiting = self.cycle is None or self.cycle.response_complete  # for a request head
        if waiting and not self.transport.is_closing():
            self.transport.close()

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a request head arrived: its handler owns the time now
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request's head has the same deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def with_deadline(header_timeout_s: float, max_waiting: int) -> type[HeaderDeadlineProtocol]:
    """A `HeaderDeadlineProtocol` class with this deadline [s] and cap on connections waiting
    for a head (uvicorn takes a class; the class holds its own waiting set)."""
    return type("HeaderDeadlineProtocol", (HeaderDeadlineProtocol,),
                {"header_timeout_s": header_timeout_s, "max_waiting": max_waiting,
                 "waiting": {}})


def raise_fd_limit(log: logging.Logger) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns (soft, hard) after."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("could not raise the descriptor limit from %d to %d: %s", soft, hard,
                        exc)
    return soft, hard


class RepeatFilter(logging.Filter):
    """Passes the first record of each message template, then at most one per ``every_s``
    (suffixed with how many were held back)."""

    def __init__(self, every_s: float = 10.0) -> None:
        super().__init__()
        self.every_s = every_s
        self._last: dict[Any, float] = {}
        self._held: dict[Any, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg).split("\n", 1)[0])
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.every_s:
            self._held[key] = self._held.get(key, 0) + 1
            return False
        if len(self._last) > 1024:  # bounded: forget the oldest templates
            for old in list(self._last)[:512]:
                self._last.pop(old, None)
                self._held.pop(old, None)
        self._last[key] = now
        held = self._held.pop(key, 0)
        if held:
            record.msg = f"{record.msg} ({held} similar held back)"
        return True
