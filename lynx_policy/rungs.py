"""Planning over a ladder's rungs (`lynx_protocol.ladder`): per batch bucket, the least-pruning
rung whose predicted step latency meets the SLO. Pure (no I/O, no clock); `decide` calls it
instead of `lynx_policy.plan.plan_table` when the controller holds a ladder that fits the
connected replicas.

Method (the latency model and correction kappa of `lynx_policy.plan`, over rungs instead of
integer budgets; a rung is experts computed + quality cost):
- Rung i at a step of B rows computes e_i(B) = mean over layers of min(budget_l, union(B))
  experts, its table for B chosen by the ladder's batch rule (`table_for`; a bucket's table is
  the one for its ``max_batch``, so it does not move with the traffic).
- Usable rungs: rung 0 (no pruning) and every rung whose tables respect the quality floor
  (per-layer budgets, and ``mass_kept`` >= ``floor.min_mass_kept``).
- goal(margin): the first usable rung with kappa * t(B, e_i) <= target * (1 - margin) for
  every step target. When even the last usable rung misses, pruning cannot close the gap: the
  bucket holds and says so instead of tightening.
- Tighten at once toward goal(margin); relax toward goal(headroom) only after
  ``relax_after_ticks`` ticks that all allow it; hold in between (no oscillation). A move
  goes to the furthest rung toward the goal whose experts differ by at most
  ``max_step_experts`` from the current rung's, and at least one rung. Buckets below
  ``adaptive.min_batch`` are not pruned.
"""

from __future__ import annotations

import math

from lynx_policy.config import AdaptiveConfig, QualityFloor
from lynx_policy.model import FleetModel
from lynx_policy.plan import BucketPlan, TablePlan, effective_experts, plan_buckets
from lynx_protocol.ladder import (
    PPL_RISE,
    Ladder,
    Rung,
    rung_bucket,
    rung_of_bucket,
    table_for,
)
from lynx_protocol.policy import BudgetBucket, PolicySpec, bucket_for


def rung_experts(rung: Rung, batch: float, union: float) -> float:
    """Experts per layer a step of ``batch`` rows computes under ``rung`` (stock union
    ``union`` caps every layer's budget)."""
    table = table_for(rung, batch)
    return sum(min(b, union) for b in table.per_layer) / len(table.per_layer)


def usable_rungs(ladder: Ladder, floor: QualityFloor) -> list[int]:
    """Indices of the rungs within the quality floor, rung 0 always first."""
    experts = ladder.model.num_experts
    usable = [0]
    for index, rung in enumerate(ladder.rungs[1:], start=1):
        if all(min(b, experts) >= min(floor.for_layer(layer), experts)
               and t.mass_kept >= floor.min_mass_kept
               for t in rung.tables for layer, b in enumerate(t.per_layer)):
            usable.append(index)
    return usable


def _current(ladder: Ladder, bucket: BudgetBucket, usable: list[int], experts: list[float],
             union: float) -> tuple[int, bool]:
    """(position in ``usable`` of the bucket's rung, whether the bucket is exactly it); a
    table that is no usable rung's maps to the usable rung nearest in experts computed."""
    index = rung_of_bucket(ladder, bucket)
    if index is not None and index in usable:
        return usable.index(index), True
    eff = effective_experts(PolicySpec(name="budget", budgets=[bucket]), bucket.max_batch,
                            union)
    return min(range(len(usable)), key=lambda j: (abs(experts[j] - eff), j)), False


def _move(experts: list[float], current: int, goal: int, max_step: float) -> int:
    """The furthest position from ``current`` toward ``goal`` within ``max_step`` experts,
    and at least one position."""
    direction = 1 if goal > current else -1
    new = current + direction
    while new != goal and abs(experts[new + direction] - experts[current]) <= max_step:
        new += direction
    return new


def plan_rung_bucket(model: FleetModel, ladder: Ladder, usable: list[int], bucket: BudgetBucket,
                     batch: float, targets: list[tuple[float, float]], streak: int,
                     settings: AdaptiveConfig) -> tuple[BudgetBucket, BucketPlan, int]:
    """New rung for one bucket; ``targets``: (bound [ms] before margins, kappa) per step
    target. Returns (bucket, why, new relax streak)."""
    union = model.union(batch)
    rungs = [ladder.rungs[i] for i in usable]
    experts = [rung_experts(r, bucket.max_batch, union) for r in rungs]

    def goal(margin: float) -> int | None:
        for j, e in enumerate(experts):
            if all(kappa * model.predict(batch, e) <= bound * (1 - margin)
                   for bound, kappa in targets):
                return j
        return None

    current, exact = _current(ladder, bucket, usable, experts, union)
    protected = bucket.max_batch < settings.min_batch
    tight = 0 if protected else goal(settings.margin)
    relaxed = 0 if protected else goal(settings.headroom)
    new, streak_out = current, 0
    if tight is None:
        lowest_ms = max(k * model.predict(batch, experts[-1]) for _, k in targets)
        reason = (f"cannot close the gap: the lowest usable rung {rungs[-1].name} predicts "
                  f"{lowest_ms:.1f} ms, above the target; holds")
    elif tight > current:
        new = _move(experts, current, tight, settings.max_step_experts)
        reason = f"tighten: predicted above target, toward rung {rungs[tight].name}"
    elif relaxed is not None and relaxed < current:
        streak_out = streak + 1
        if streak_out >= settings.relax_after_ticks:
            new, streak_out = _move(experts, current, relaxed, settings.max_step_experts), 0
            reason = f"relax: headroom, toward rung {rungs[relaxed].name}"
        else:
            reason = f"relax pending ({streak_out}/{settings.relax_after_ticks})"
    elif current == 0:
        reason = (f"below adaptive.min_batch={settings.min_batch}: not pruned" if protected
                  else "meets the SLO unpruned")
    else:
        reason = "holds (between margin and headroom)"
    rung = rungs[new]
    out = bucket if (new == current and exact) else rung_bucket(
        rung, bucket.max_batch, bucket.max_batch, ladder.model.num_experts)
    bound, kappa = min(targets, key=lambda t: t[0] / t[1])
    table = table_for(rung, bucket.max_batch)
    why = BucketPlan(
        max_batch=bucket.max_batch, batch=batch, union=round(union, 3),
        budget=round(experts[new]) if new else ladder.model.num_experts,
        predicted_ms=round(kappa * model.predict(batch, experts[new]), 3),
        unpruned_ms=round(kappa * model.predict(batch, union), 3),
        target_ms=round(bound * (1 - settings.margin), 3),
        mass_kept=table.mass_kept if new else 1.0, reason=reason, rung=rung.name,
        quality_cost=table.cost(PPL_RISE) or 0.0)
    return out, why, streak_out


def plan_ladder(model: FleetModel, ladder: Ladder, table: PolicySpec,
                targets: list[tuple[float, float]], streaks: tuple[int, ...],
                settings: AdaptiveConfig, floor: QualityFloor) -> TablePlan:
    """Plan every bucket of a budget table over the ladder's rungs (as `plan_table`)."""
    usable = usable_rungs(ladder, floor)
    return plan_buckets(table, model.largest_batch, streaks, lambda bucket, batch, streak:
                        plan_rung_bucket(model, ladder, usable, bucket, batch, targets, streak,
                                         settings))


def expected_quality_cost(ladder: Ladder, policy: PolicySpec,
                          mix: tuple[tuple[float, int], ...], kind: str = PPL_RISE
                          ) -> float | None:
    """Step-weighted expected cost (``kind``, e.g. the held-out perplexity rise as a fraction)
    of ``policy`` over the batch mix ((mean rows, steps) pairs). 0 for ``off``; None when a
    step's bucket applies a table that is no rung's, or there is no mix."""
    if policy.name == "off":
        return 0.0
    if policy.name != "budget":
        return None
    total, weighted = 0, 0.0
    for batch, steps in mix:
        bucket = bucket_for(policy, max(1, math.ceil(batch)))
        index = None if bucket is None else rung_of_bucket(ladder, bucket)
        if bucket is None or index is None:
            return None
        rung = ladder.rungs[index]
        cost = table_for(rung, bucket.max_batch).cost(kind) if index else 0.0
        weighted += (cost or 0.0) * steps
        total += steps
    return weighted / total if total else None
