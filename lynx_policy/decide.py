"""Decide: a pure function from (observation, current policy, memory, settings) to a decision.

No I/O, no clock, no globals: the control loop (`lynx_policy.loop`) observes, calls `decide`,
and acts on the result. Aggressiveness is the expert ``budget`` per batch-size bucket: a
*tighten* step lowers budgets (more reduction), a *relax* step raises them.

Two planners. Once the latency model of the connected replicas is ready (and
``adaptive.use_model``), every bucket's budget is computed from the model and a correction
factor fitted against the tables the latency window saw (`lynx_policy.plan`, or over a
ladder's rungs at the batch mix: `lynx_policy.ladder_plan`). A model move is taken only on
evidence (`lynx_policy.evidence`): a tighten on a miss the reading's lower bound confirms, a
relax on a meet its upper bound confirms. Before the model is ready, the reactive rules
below step all active buckets together (`lynx_policy.tables.step_policy`); their tighten steps
are also what gives a passively learnt model its spread in m.

- SLO signal (`classify`): ``violated`` if any quantile is above its target, ``headroom`` if
  all observed quantiles are below ``target * (1 - headroom)``, ``within`` in between,
  ``no_data`` when nothing was observed.
- Hysteresis: ``tighten_after_ticks`` consecutive violated ticks before a tighten step,
  ``relax_after_ticks`` consecutive headroom ticks before a relax step; a ``within`` or
  ``no_data`` tick resets both streaks, and every step restarts its streak. A steady latency
  therefore moves the budgets monotonically or not at all: no oscillation.
- Per bucket: tighten only buckets that are active (>= ``min_active_fraction`` of recent decode
  steps; all of them when no batch statistics are known) and not below ``min_batch``; relax
  every bucket that still prunes. Budgets stay within [quality floor, num_experts].
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import msgspec

from lynx_policy.config import AdaptiveConfig, Mode, QualityFloor, SloTarget
from lynx_policy.evidence import (
    StallCounts,
    StallSteps,
    evidence_veto,
    observed_buckets,
    stall_owned,
    window_mix,
    window_stalls,
    window_tables,
)
from lynx_policy.ladder_plan import CANNOT_CLOSE, MixTarget, mix_statistic, plan_ladder
from lynx_policy.model import FleetModel
from lynx_policy.plan import (
    STEP_METRICS,
    BucketPlan,
    plan_table,
    predicted_steps,
    quantile_of,
    smooth,
)
from lynx_policy.tables import adaptive_table, bucket_shares, mean_budgets, step_policy
from lynx_protocol.ladder import Ladder
from lynx_protocol.policy import PolicySpec

Signal = Literal["violated", "within", "headroom", "no_data"]
Direction = Literal["tighten", "relax", "hold"]
DIRECTIONS: tuple[str, ...] = ("tighten", "relax", "hold")
UNFIXABLE: tuple[str, ...] = ("cannot_close_gap", "prefill_stalls")
"""Why a hold leaves a miss alone: the model says even the lowest rung misses the target
(`ladder_plan.CANNOT_CLOSE`), or the misses come from steps pruning does not shorten."""


@dataclass(frozen=True)
class LatencyReading:
    target: SloTarget
    observed_s: float | None
    """Observed quantile [s]; None when the window held no traffic, or too few observations
    to estimate the quantile (``observe.min_tail_samples``)."""
    samples: float | None = None
    """Observations in the window (None: not known)."""
    lower_s: float | None = None
    """Lower confidence bound of the quantile [s] (``observe.confidence``; None: unknown,
    the estimate counts as its own bound)."""
    upper_s: float | None = None
    """Upper confidence bound of the quantile [s] (None: unknown)."""
    window_s: float | None = None
    """The window the quantile was read over [s] (None: unknown)."""

    def bounds_s(self) -> tuple[float, float] | None:
        """(lower, upper) [s]; None without an estimate."""
        if self.observed_s is None:
            return None
        return (self.observed_s if self.lower_s is None else min(self.lower_s,
                                                                 self.observed_s),
                self.observed_s if self.upper_s is None else max(self.upper_s,
                                                                 self.observed_s))


@dataclass(frozen=True)
class Observation:
    latencies: tuple[LatencyReading, ...]
    batch_steps: dict[int, int] | None
    """Recent decode steps by batch size (bucket upper bound) over all replicas; None: unknown."""
    num_experts: int
    """Budget meaning "no pruning" (smallest expert count among replicas)."""
    model: FleetModel | None = None
    """The replicas' latency model (None or not ready: reactive rules)."""
    batch_mix: tuple[tuple[float, int], ...] = ()
    """Recent pure decode steps as (mean decode rows, steps) pairs over all replicas."""
    stalls: StallSteps | None = None
    """Recent prefill/mixed steps (None: unknown)."""
    stall_history: tuple[tuple[float, StallCounts], ...] = ()
    """The forward steps of the recent past as (seconds since their statistics arrived,
    (steps, prefill/mixed steps, their latency sum [ms])), one entry per StepStats message:
    the stalls of a latency reading's own window (`lynx_policy.evidence.window_stalls`);
    empty: only ``stalls`` is known."""
    history: tuple[tuple[float, PolicySpec], ...] = ()
    """The applied tables of the recent past as (seconds since it took effect, table), newest
    first (`lynx_policy.evidence.window_tables`); empty: only the current one is known."""
    mix_history: tuple[tuple[float, tuple[tuple[float, int], ...]], ...] = ()
    """The decode steps of the recent past as (seconds since their statistics arrived, their
    (mean decode rows, steps) pairs), one entry per StepStats message of any replica: the
    batch mix of a latency reading's own window (`lynx_policy.evidence.window_mix`); empty:
    only ``batch_mix`` is known."""

    def stalls_behind(self, reading: LatencyReading, settings: AdaptiveConfig
                      ) -> StallSteps | None:
        """The prefill/mixed steps of ``reading``'s own window (`evidence.window_stalls`)."""
        return window_stalls(reading, self.stall_history, self.stalls, settings)


@dataclass(frozen=True)
class Memory:
    """What decide carries from one tick to the next (the hysteresis streaks)."""

    violated_ticks: int = 0
    headroom_ticks: int = 0
    corrections: tuple[tuple[str, float, float], ...] = ()
    """Model planner: (metric, quantile, kappa) per step target (observed / predicted)."""
    relax_streaks: tuple[int, ...] = ()
    """Model planner: per bucket, consecutive ticks that allowed relaxing."""
    plans: tuple[BucketPlan, ...] = ()
    """Model planner: its last plan of every bucket of ``planned`` (a hold that does not plan
    still says why each bucket has its budget, while that table is in force)."""
    planned: PolicySpec | None = None


@dataclass(frozen=True)
class Decision:
    policy: PolicySpec
    memory: Memory
    signal: Signal
    direction: Direction
    reason: str
    changed_buckets: tuple[int, ...] = ()
    """Indices (in the new policy's table) of buckets whose budget moved."""
    planner: str = "reactive"
    """``model`` or ``reactive``: which rules made this decision."""
    plans: tuple[BucketPlan, ...] = ()
    """Model planner: why each bucket has its budget."""
    unfixable: str = ""
    """A hold that leaves a miss pruning cannot fix: one of `UNFIXABLE` ("" otherwise)."""


def classify(latencies: tuple[LatencyReading, ...], headroom: float) -> Signal:
    pairs = [(r.observed_s, r.target.target_ms / 1000.0) for r in latencies
             if r.observed_s is not None]
    if not pairs:
        return "no_data"
    if any(observed > target for observed, target in pairs):
        return "violated"
    if all(observed < target * (1.0 - headroom) for observed, target in pairs):
        return "headroom"
    return "within"


def decide(
    observation: Observation, policy: PolicySpec, memory: Memory, *, mode: Mode,
    settings: AdaptiveConfig, floor: QualityFloor, ladder: Ladder | None = None,
) -> Decision:
    """One control decision. Only ``adaptive`` mode ever changes the policy. With a
    ``ladder`` (one that fits the replicas), the model planner plans over its rungs
    (`lynx_policy.ladder_plan`, at the batch mix); without one, over uniform budgets
    (`lynx_policy.plan`)."""
    signal = classify(observation.latencies, settings.headroom)
    if mode != "adaptive":
        return Decision(policy, Memory(), signal, "hold", f"mode is {mode}")
    missed = [r for r in observation.latencies if r.observed_s is not None
              and r.observed_s * 1000.0 > r.target.target_ms]
    behind = [(r, observation.stalls_behind(r, settings)) for r in missed]
    if behind and all(stall_owned(r, s) for r, s in behind):
        owners = "; ".join(
            f"{r.target.metric} p{r.target.quantile * 100:g}: {100 * s.share:.1f}% of steps, "
            f"mean {s.mean_ms:.1f} ms" for r, s in behind if s is not None)
        reason = (f"misses come from prefill/mixed steps ({owners}): pruning cannot fix them; "
                  "holds (shorten prefill chunks instead)")
        held = (tuple(replace(p, reason=reason) for p in memory.plans)
                if memory.planned == policy else ())
        return Decision(policy, memory, signal, "hold", reason,
                        planner="model" if memory.corrections else "reactive", plans=held,
                        unfixable="prefill_stalls")
    model = observation.model
    if (settings.use_model and model is not None and model.ready
            and any(r.target.metric in STEP_METRICS for r in observation.latencies)):
        return decide_from_model(observation, model, policy, memory, signal, settings, floor,
                                 ladder)
    if signal == "violated":
        memory = Memory(violated_ticks=memory.violated_ticks + 1)
        wanted: Direction = ("tighten" if memory.violated_ticks >= settings.tighten_after_ticks
                             else "hold")
    elif signal == "headroom":
        memory = Memory(headroom_ticks=memory.headroom_ticks + 1)
        wanted = "relax" if memory.headroom_ticks >= settings.relax_after_ticks else "hold"
    else:
        return Decision(policy, Memory(), signal, "hold", f"latency {signal.replace('_', ' ')}")
    if wanted == "hold":
        streak = max(memory.violated_ticks, memory.headroom_ticks)
        return Decision(policy, memory, signal, "hold", f"{signal} for {streak} tick(s)")
    table = adaptive_table(policy, settings, observation.num_experts)
    shares = bucket_shares(table, observation.batch_steps)
    new_policy, changed = step_policy(table, wanted, shares, settings, floor,
                                      observation.num_experts)
    memory = Memory()  # every step (or a blocked one) restarts its streak
    if not changed:
        limit = "the quality floor" if wanted == "tighten" else "no pruning"
        return Decision(policy, memory, signal, "hold",
                        f"{signal} but every eligible bucket is at {limit}")
    return Decision(new_policy, memory, signal, wanted,
                    f"{signal}: {wanted} buckets {list(changed)}", changed)


def _direction(table: PolicySpec, new_policy: PolicySpec, changed: tuple[int, ...],
               num_experts: int) -> Direction:
    """``tighten`` if any changed bucket's mean budget fell, else ``relax``."""
    before, after = (dict(mean_budgets(p, num_experts)) for p in (table, new_policy))
    return "tighten" if any(after[b.max_batch] < before[b.max_batch]
                            for b in (new_policy.budgets[i] for i in changed)) else "relax"


def decide_from_model(observation: Observation, model: FleetModel, policy: PolicySpec,
                      memory: Memory, signal: Signal, settings: AdaptiveConfig,
                      floor: QualityFloor, ladder: Ladder | None = None) -> Decision:
    """Model planner: update the correction factor of every step target, then plan every
    bucket (`lynx_policy.plan.plan_table`)."""
    previous = {(metric, q): kappa for metric, q, kappa in memory.corrections}
    at_mix = ladder is not None and ladder.model.num_experts == observation.num_experts
    mix = observation.batch_mix
    corrections, targets, mix_targets = [], [], []
    for reading in observation.latencies:
        target = reading.target
        if target.metric not in STEP_METRICS:
            continue
        kappa = previous.get((target.metric, target.quantile))
        if reading.observed_s is not None and not stall_owned(
                reading, observation.stalls_behind(reading, settings)):
            # the model's statistic over the tables and the batch mix the window saw
            # (`evidence.window_tables`, `evidence.window_mix`): at the mix, as the ladder
            # planner predicts (ladder_plan, 1), else step-weighted
            seen = window_mix(reading, observation.mix_history, mix, settings)
            parts = [(share, mix_statistic(points, target.metric, target.quantile) if at_mix
                      else quantile_of(points, target.quantile))
                     for share, table in window_tables(reading, observation.history, policy,
                                                       settings)
                     if (points := predicted_steps(model, table, seen, by_tokens=at_mix))]
            reference = sum(share * value for share, value in parts) / max(
                sum(share for share, _ in parts), 1e-12)
            if parts and reference > 0:
                kappa = smooth(kappa, reading.observed_s * 1000.0 / reference,
                               settings.correction_alpha)
        kappa = 1.0 if kappa is None else kappa
        corrections.append((target.metric, target.quantile, kappa))
        targets.append((target.target_ms, kappa))
        mix_targets.append(MixTarget(target.metric, target.quantile, target.target_ms, kappa))
    table = adaptive_table(policy, settings, observation.num_experts)
    if at_mix and ladder is not None:
        new_policy, plans, streaks, changed = plan_ladder(
            model, ladder, table, observation.batch_mix, mix_targets, memory.relax_streaks,
            settings, floor)
    else:
        new_policy, plans, streaks, changed = plan_table(model, table, targets,
                                                         memory.relax_streaks, settings, floor)
    memory = Memory(corrections=tuple(corrections), relax_streaks=streaks, plans=plans,
                    planned=new_policy if changed else policy)
    kappas = ", ".join(f"{m} p{q * 100:g} kappa {k:.2f}" for m, q, k in corrections)
    if not changed:
        # counted as a miss left alone only when a reading missed: the planner's "cannot
        # close" is a prediction, which a smoothed kappa can still make on a met tick
        gap = signal == "violated" and any(p.reason.startswith(CANNOT_CLOSE) for p in plans)
        return Decision(policy, memory, signal, "hold", f"model: table holds ({kappas})",
                        planner="model", plans=plans,
                        unfixable="cannot_close_gap" if gap else "")
    direction = _direction(table, new_policy, changed, observation.num_experts)
    veto = evidence_veto(direction, observation.latencies, settings)
    if veto is not None:  # the readings speak for the buckets recent steps ran in: they hold
        observed = observed_buckets(table, observation.batch_mix, settings.min_batch)
        kept = tuple(i for i in changed if i not in observed)
        held = tuple(replace(p, reason=f"{veto} (planned: {p.reason})")
                     if i in observed else p for i, p in enumerate(plans))
        if not kept:
            memory = replace(memory, plans=held, planned=policy)
            return Decision(policy, memory, signal, "hold", f"model: {veto} ({kappas})",
                            planner="model", plans=held)
        new_policy = msgspec.structs.replace(new_policy, budgets=[
            table.budgets[i] if i in observed else b for i, b in enumerate(new_policy.budgets)])
        changed, plans = kept, held
        memory = replace(memory, plans=held, planned=new_policy)
        direction = _direction(table, new_policy, changed, observation.num_experts)
    return Decision(new_policy, memory, signal, direction,
                    f"model: {direction} buckets {list(changed)} ({kappas})", changed,
                    planner="model", plans=plans)
