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
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from lynx_policy.config import ControllerConfig
from lynx_policy.decide import Decision, Memory, Observation, decide
from lynx_policy.evidence import StallSteps, stall_counts, stalls_over
from lynx_policy.hub import Hub
from lynx_policy.ladders import LadderStore
from lynx_policy.metrics import ControllerMetrics, replace_series, target_labels
from lynx_policy.model import batch_mix
from lynx_policy.modelstore import ModelStore
from lynx_policy.observe import ObserveError, Observer
from lynx_policy.state import StateKeeper
from lynx_policy.throttle import Backoff
from lynx_protocol.ladder import MASS_LOST, PPL_RISE, Ladder
from lynx_protocol.messages import StepStats

log = logging.getLogger(__name__)
HISTORY = 64
"""Effective-policy changes remembered for the latency windows' table mix."""
RECENT_TICKS = 120
"""Tick reports kept for ``GET /v1/state`` (``loop.recent_ticks``): a minute at 0.5 s ticks."""


@dataclass
class TickReport:
    tick: int
    """The loop's tick number (1 = the first tick that produced a decision)."""
    at: float
    """Unix time the tick finished [s]."""
    signal: str
    direction: str
    reason: str
    latencies: list[dict[str, Any]]
    version: int
    unfixable: str = ""
    """A hold leaving a miss pruning cannot fix: `decide.UNFIXABLE`'s cause ("" otherwise)."""


def stall_steps(stats: Iterable[StepStats]) -> StallSteps | None:
    """Share and mean latency of the prefill/mixed steps in these StepStats (None: no steps)."""
    return stalls_over([stall_counts(s) for s in stats])


class ControlLoop:
    def __init__(self, config: ControllerConfig, keeper: StateKeeper, hub: Hub,
                 metrics: ControllerMetrics, observer: Observer,
                 on_change: Callable[[], None], ladders: LadderStore | None = None) -> None:
        self.config = config
        self.keeper = keeper
        self.hub = hub
        self.metrics = metrics
        self.observer = observer
        self.on_change = on_change
        self.ladders = ladders or LadderStore(config.state.dir)
        self.memory = Memory()
        self.models = ModelStore(config.state.dir)
        self.last_decision: Decision | None = None
        self.backoff = Backoff(config.loop.backoff_s)
        self.ticks = 0
        self.reports: deque[TickReport] = deque(maxlen=RECENT_TICKS)
        self.last_error = ""
        self.last_tick_monotonic = time.monotonic()
        self._applied: deque[tuple[float, Any]] = deque(maxlen=HISTORY)  # (monotonic, table)

    def _history(self) -> tuple[tuple[float, Any], ...]:
        """The effective policies since start-up as (seconds since it took effect, policy),
        newest first (`Observation.history`). A change made elsewhere (admin API) is noticed
        here, at the tick after it."""
        self._note_applied()
        now = time.monotonic()
        return tuple((now - at, policy) for at, policy in reversed(self._applied))

    def _note_applied(self) -> None:
        policy = self.keeper.state.effective_policy()
        if not self._applied or self._applied[-1][1] != policy:
            self._applied.append((time.monotonic(), policy))

    @property
    def last_report(self) -> TickReport | None:
        return self.reports[-1] if self.reports else None

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
                    log.info("control loop recovered")  # logged before the gauge drops
                    self.metrics.loop_degraded.set(0)
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

    def model_view(self) -> dict[str, Any]:
        """The fitted models, the table they imply and why (``GET /v1/model``)."""
        from dataclasses import asdict

        from lynx_protocol.policy import policy_document

        decision = self.last_decision
        settings = self.config.adaptive
        return {
            "planner": decision.planner if decision else None,
            "reason": decision.reason if decision else "no tick yet",
            "replicas": self.models.view(),
            "corrections": [{"metric": m, "quantile": q, "kappa": round(k, 4)}
                            for m, q, k in (decision.memory.corrections if decision else ())],
            "table": policy_document(self.keeper.state.effective_policy()),
            "why": [asdict(plan) for plan in (decision.plans if decision else ())],
            "ladder": self.ladders.view(r.registration for r in self.hub.connected()),
            "settings": {"use_model": settings.use_model, "margin": settings.margin,
                         "headroom": settings.headroom,
                         "max_step_experts": settings.max_step_experts,
                         "relax_after_ticks": settings.relax_after_ticks,
                         "settle": settings.settle,
                         "confidence": self.config.observe.confidence},
        }

    def _model_metrics(self, observation: Observation, decision: Decision,
                       recent: list[tuple[str, Any]], ladder: Ladder | None) -> None:
        from lynx_policy.plan import expected_mass_kept
        from lynx_policy.rungs import expected_quality_cost

        m = self.metrics
        fleet = observation.model
        m.model_ready.set(1 if decision.planner == "model" else 0)
        fits = [f for f in (fleet.fits if fleet else ()) if f.ready and f.mean_ms > 0]
        m.model_rmse.set(max((f.rmse_ms / f.mean_ms for f in fits), default=float("nan")))
        m.set_step_latencies(self.models.compare(recent))
        kappas = {(metric, q): k for metric, q, k in decision.memory.corrections}
        replace_series(m.correction, {  # NaN: not planned from the model (yet)
            target_labels(r.target): kappas.get((r.target.metric, r.target.quantile),
                                                float("nan"))
            for r in observation.latencies})
        policy = self.keeper.state.effective_policy()
        mass: float | None = 1.0
        if policy.name == "budget" and fleet is not None:
            mass = expected_mass_kept(fleet, policy, observation.batch_mix)
        elif policy.name != "off":  # no model of other policies: what the replicas measured
            weights = [(s.routing_mass_kept, s.decode_steps) for _, s in recent]
            total = sum(w for _, w in weights)
            mass = sum(v * w for v, w in weights) / total if total else None
        m.mass_kept.set(float("nan") if mass is None else mass)
        cost = (expected_quality_cost(ladder, policy, observation.batch_mix) if ladder
                else 0.0 if policy.name == "off" else None)
        kind = ladder.kind if ladder else PPL_RISE
        for other in sorted({PPL_RISE, MASS_LOST} - {kind}):  # one series: the ladder's kind
            with contextlib.suppress(KeyError):
                m.quality_cost.remove(other)
        m.quality_cost.labels(kind=kind).set(float("nan") if cost is None else cost)

    async def tick(self) -> Decision:
        self.hub.housekeeping()
        state = self.keeper.state
        readings = await self.observer.observe(state.slo)
        state = self.keeper.state  # admin changes may have landed while we awaited
        history = self._history()
        connected = self.hub.connected()
        self.models.ingest_new(connected)
        now, window = self.hub.clock(), self.config.loop.stats_window_s
        recent = [(r.replica_id, stats) for r in connected for at, stats in r.recent_stats
                  if now - at <= window]
        fleet = self.models.fleet(r.replica_id for r in connected)
        observation = Observation(
            latencies=readings,
            batch_steps=self.hub.batch_steps(window),
            num_experts=self.hub.num_experts() or self.config.adaptive.default_num_experts,
            model=fleet, batch_mix=batch_mix(stats for _, stats in recent),
            stalls=stall_steps(stats for _, stats in recent), history=history,
            mix_history=tuple((now - at, mix) for r in connected for at, mix in r.recent_mix),
            stall_history=tuple((now - at, counts) for r in connected
                                for at, counts in r.recent_stalls),
        )
        ladder = self.ladders.for_planning(r.registration for r in connected)
        decision = decide(observation, state.policy, self.memory, mode=state.mode,
                          settings=self.config.adaptive, floor=state.floor, ladder=ladder)
        self.memory = decision.memory
        self.last_decision = decision
        self.models.save()
        self._model_metrics(observation, decision, recent, ladder)
        self.ticks += 1
        self.metrics.decisions.labels(direction=decision.direction).inc()
        if decision.unfixable:
            self.metrics.unfixable_holds.labels(cause=decision.unfixable).inc()
        replace_series(self.metrics.slo_target, {
            target_labels(r.target): r.target.target_ms / 1000.0 for r in readings})
        replace_series(self.metrics.latency, {
            target_labels(r.target): float("nan") if r.observed_s is None else r.observed_s
            for r in readings})
        if decision.signal != "no_data":
            self.metrics.record_attainment(decision.signal != "violated")
        if decision.direction != "hold":
            self.keeper.change(actor="controller:adaptive", client="local",
                               action=f"adaptive_{decision.direction}", note=decision.reason,
                               policy=decision.policy)
            log.info("adaptive %s → policy version %d (%s)", decision.direction,
                     self.keeper.state.version, decision.reason)
            self._note_applied()
            self.on_change()
        self.reports.append(TickReport(
            tick=self.ticks, at=time.time(), signal=decision.signal,
            direction=decision.direction, unfixable=decision.unfixable,
            reason=decision.reason, version=self.keeper.state.version,
            latencies=[{"metric": r.target.metric, "quantile": r.target.quantile,
                        "target_ms": r.target.target_ms,
                        "observed_ms": None if r.observed_s is None else r.observed_s * 1000.0,
                        "samples": r.samples, "window_s": r.window_s,
                        "bounds_ms": None if (b := r.bounds_s()) is None
                        else [b[0] * 1000.0, b[1] * 1000.0]}
                       for r in readings],
        ))
        return decision
