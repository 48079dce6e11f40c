"""The control loop: observe → decide → act, every ``loop.interval_s`` seconds.

- observe: latency quantiles (`lynx_policy.observe`) + live batch mix and expert count from
  the replicas' StepStats (`lynx_policy.hub`);
- decide: the pure `lynx_policy.decide.decide`;
- act: persist the new policy as a new version (`StateKeeper.change`), send it to every
  connected replica.

A failing tick (latency source unreachable, ...) holds the policy, slows the loop down along
``loop.backoff_s`` and never ends it; the loop logs once when it degrades and once when it
recovers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lynx_policy.config import ControllerConfig
from lynx_policy.decide import Decision, Memory, Observation, decide
from lynx_policy.hub import Hub
from lynx_policy.metrics import ControllerMetrics
from lynx_policy.observe import ObserveError, Observer
from lynx_policy.state import StateKeeper
from lynx_policy.throttle import Backoff

log = logging.getLogger(__name__)


@dataclass
class TickReport:
    at: float
    """Unix time the tick finished [s]."""
    signal: str
    direction: str
    reason: str
    latencies: list[dict[str, Any]]
    version: int


class ControlLoop:
    def __init__(self, config: ControllerConfig, keeper: StateKeeper, hub: Hub,
                 metrics: ControllerMetrics, observer: Observer,
                 on_change: Callable[[], None]) -> None:
        self.config = config
        self.keeper = keeper
        self.hub = hub
        self.metrics = metrics
        self.observer = observer
        self.on_change = on_change
        self.memory = Memory()
        self.backoff = Backoff(config.loop.backoff_s)
        self.ticks = 0
        self.last_report: TickReport | None = None
        self.last_error = ""
        self.last_tick_monotonic = time.monotonic()

    @property
    def degraded(self) -> bool:
        return self.backoff.degraded

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # every failure slows the loop, none ends it
                delay = self._failed(exc)
            else:
                delay = self.config.loop.interval_s
                if self.backoff.succeeded():
                    self.metrics.loop_degraded.set(0)
                    log.info("control loop recovered")
                    self.last_error = ""
            finally:
                self.metrics.loop_duration.observe(time.monotonic() - started)
                self.last_tick_monotonic = time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)

    def _failed(self, exc: Exception) -> float:
        first = not self.backoff.degraded
        delay = self.backoff.failed()
        self.last_error = f"{type(exc).__name__}: {exc}"[:300]
        if first:
            self.metrics.loop_degraded.set(1)
            if isinstance(exc, ObserveError):
                log.warning("control loop degraded, holding the policy: %s", self.last_error)
            else:
                log.exception("control loop degraded, holding the policy")
        return delay

    async def tick(self) -> Decision:
        self.hub.housekeeping()
        state = self.keeper.state
        readings = await self.observer.observe(state.slo)
        state = self.keeper.state  # admin changes may have landed while we awaited
        observation = Observation(
            latencies=readings,
            batch_steps=self.hub.batch_steps(self.config.loop.stats_window_s),
            num_experts=self.hub.num_experts() or self.config.adaptive.default_num_experts,
        )
        decision = decide(observation, state.policy, self.memory, mode=state.mode,
                          settings=self.config.adaptive, floor=state.floor)
        self.memory = decision.memory
        self.ticks += 1
        self.metrics.decisions.labels(direction=decision.direction).inc()
        for reading in readings:
            labels = {"metric": reading.target.metric, "quantile": f"{reading.target.quantile:g}"}
            self.metrics.slo_target.labels(**labels).set(reading.target.target_ms / 1000.0)
            self.metrics.latency.labels(**labels).set(
                float("nan") if reading.observed_s is None else reading.observed_s)
        if decision.signal != "no_data":
            self.metrics.record_attainment(decision.signal != "violated")
        if decision.direction != "hold":
            self.keeper.change(actor="controller:adaptive", client="local",
                               action=f"adaptive_{decision.direction}", note=decision.reason,
                               policy=decision.policy)
            log.info("adaptive %s → policy version %d (%s)", decision.direction,
                     self.keeper.state.version, decision.reason)
            self.on_change()
        self.last_report = TickReport(
            at=time.time(), signal=decision.signal, direction=decision.direction,
            reason=decision.reason, version=self.keeper.state.version,
            latencies=[{"metric": r.target.metric, "quantile": r.target.quantile,
                        "target_ms": r.target.target_ms,
                        "observed_ms": None if r.observed_s is None else r.observed_s * 1000.0}
                       for r in readings],
        )
        return decision
