"""Model-based planning: the budget table a latency model says meets the SLO, pruning no more
than it must. Pure (no I/O, no clock); `lynx_policy.decide.decide` calls it once the model of
the connected replicas is ready, and falls back to reactive steps before that.

Method (after NVIDIA Dynamo's SLA planner, applied to the pruning knob instead of replicas):
1. Correction: kappa = observed client quantile / the same quantile of the predicted step
   latencies over the recent batch mix under the tables the latency window saw
   (`lynx_policy.decide.decide_from_model`, `lynx_policy.evidence.window_tables`;
   `predicted_steps` weighted by steps). It folds in what the step
   model does not see (prefill stalls, quantile vs mean, client-side overheads); smoothed
   geometrically (``adaptive.correction_alpha``) and clamped to [`KAPPA_MIN`, `KAPPA_MAX`].
2. Per batch-size bucket (representative batch B = the bucket's upper bound, capped just above
   the largest batch seen): the largest budget m with kappa * t(B, m) <= target * (1 - margin).
   A bucket that meets target * (1 - headroom) unpruned is not pruned at all, nor is one
   whose max_batch is below ``adaptive.min_batch`` (as in the reactive rules).
3. Guards: never below the quality floor (experts, and routing mass kept when
   ``floor.min_mass_kept`` is set); tighten at once, relax only after ``relax_after_ticks``
   ticks that all allow it (the band between margin and headroom holds: no oscillation); no
   bucket moves by more than ``max_step_experts`` per tick.
The planner writes one budget for all layers per bucket (``all_layers``); a per-layer bucket
of the current table is planned from its mean and written back as ``all_layers``.
Only ``itl`` and ``tpot`` targets are step latencies; ``ttft``/``e2e`` targets are reported
but not planned for (the reactive rules still see them when the model is not ready).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from lynx_policy.config import AdaptiveConfig, QualityFloor
from lynx_policy.model import FleetModel
from lynx_protocol.policy import BudgetBucket, PolicySpec, bucket_for

KAPPA_MIN, KAPPA_MAX = 0.2, 10.0
STEP_METRICS = ("itl", "tpot")


@dataclass(frozen=True)
class BucketPlan:
    """Why a bucket has its budget (``GET /v1/model``, metrics)."""

    max_batch: int
    batch: float
    """Representative decode rows the prediction is made at."""
    union: float
    """Stock expert union at that batch [experts per layer]."""
    budget: int
    """Chosen budget (``num_experts``: no pruning)."""
    predicted_ms: float
    """kappa x t(batch, min(budget, union)) for the tightest target [ms]."""
    unpruned_ms: float
    target_ms: float
    """Tightest step target times (1 - margin) [ms]."""
    mass_kept: float | None
    """Expected routing mass kept at this budget (None: not measured yet)."""
    reason: str
    rung: str | None = None
    """Ladder planning: the rung applied (``budget`` is then its experts computed)."""
    quality_cost: float | None = None
    """Ladder planning: the rung's measured held-out perplexity rise [fraction]."""


def quantile_of(values: list[tuple[float, float]], q: float) -> float:
    """Weighted ``q`` quantile of (value, weight) pairs (the smallest value reaching q)."""
    total = sum(w for _, w in values)
    running = 0.0
    for value, weight in sorted(values):
        running += weight
        if running >= q * total:
            return value
    return max(v for v, _ in values)


def effective_experts(policy: PolicySpec, batch: float, union: float) -> float:
    """Experts per layer a step of ``batch`` rows computes under ``policy`` (budget tables
    only; other policies are counted as unpruned)."""
    if policy.name != "budget":
        return union
    bucket = bucket_for(policy, max(1, math.ceil(batch)))
    if bucket is None:
        return union
    values = bucket.per_layer if bucket.per_layer is not None else [bucket.all_layers or 0]
    return min(union, sum(values) / len(values))


def predicted_steps(model: FleetModel, policy: PolicySpec, mix: tuple[tuple[float, int], ...],
                    by_tokens: bool) -> list[tuple[float, float]]:
    """(predicted step latency [ms], weight) per point of the batch mix ((mean rows, steps)
    pairs) under the applied ``policy`` (any table, `effective_experts`); the weight is the
    point's steps, or its tokens (rows x steps) when ``by_tokens``."""
    return [(model.predict(b, effective_experts(policy, b, model.union(b))),
             b * n if by_tokens else float(n)) for b, n in mix if n > 0 and b > 0]


def smooth(previous: float | None, raw: float, alpha: float) -> float:
    """Geometric EMA of kappa, clamped."""
    value = raw if previous is None else math.exp(
        (1 - alpha) * math.log(previous) + alpha * math.log(raw))
    return min(KAPPA_MAX, max(KAPPA_MIN, value))


def _largest_budget(model: FleetModel, batch: float, union: float, bound_ms: float,
                    kappa: float) -> int | None:
    """Largest integer m in [1, ceil(union)] with kappa * t(batch, m) <= bound; None when the
    unpruned step already meets it; 0 when even m = 1 does not."""
    if kappa * model.predict(batch, union) <= bound_ms:
        return None
    low, high = 0, max(1, math.ceil(union))  # invariant: low meets (0 = sentinel), high fails
    while high - low > 1:
        mid = (low + high) // 2
        if kappa * model.predict(batch, mid) <= bound_ms:
            low = mid
        else:
            high = mid
    return low


def _mass_floor(model: FleetModel, batch: float, union: float, floor: QualityFloor) -> int:
    """Smallest budget whose expected routing mass kept reaches ``floor.min_mass_kept``."""
    if floor.min_mass_kept <= 0:
        return 1
    for m in range(1, math.ceil(union) + 1):
        mass = model.mass_kept(batch, m)
        if mass is not None and mass >= floor.min_mass_kept:
            return m
    return math.ceil(union)


def planning_batch(buckets: list[BudgetBucket], index: int, largest_seen: float
                         ) -> float:
    """Upper bound of bucket ``index``, capped just above the largest batch seen."""
    lower = buckets[index - 1].max_batch if index else 0
    return float(min(buckets[index].max_batch, max(lower + 1, math.ceil(largest_seen))))


def plan_bucket(model: FleetModel, bucket: BudgetBucket, batch: float,
                targets: list[tuple[float, float]], streak: int, settings: AdaptiveConfig,
                floor: QualityFloor) -> tuple[BudgetBucket, BucketPlan, int]:
    """New budget for one bucket; ``targets``: (bound [ms] before margins, kappa) per step
    target. Returns (bucket, why, new relax streak)."""
    experts = model.num_experts
    union = model.union(batch)
    current = bucket.all_layers if bucket.all_layers is not None else (
        round(sum(bucket.per_layer or [experts]) / len(bucket.per_layer or [experts])))
    current_eff = min(current, math.ceil(union))
    low = max(min(floor.highest(), experts), _mass_floor(model, batch, union, floor))

    def goal(margin: float) -> int:
        wanted = [_largest_budget(model, batch, union, bound * (1 - margin), kappa)
                  for bound, kappa in targets]
        needed = [m for m in wanted if m is not None]
        return experts if not needed else max(low, min(needed))

    cap = max(1, math.ceil(union))  # a budget >= the union prunes nothing
    protected = bucket.max_batch < settings.min_batch  # never tightened; relaxes if pruned
    tight = cap if protected else min(goal(settings.margin), cap)
    relaxed = cap if protected else min(goal(settings.headroom), cap)
    step = settings.max_step_experts
    new_eff, reason, streak_out = current_eff, "holds (between margin and headroom)", 0
    if tight < current_eff:
        new_eff = max(tight, current_eff - step)
        reason = "tighten: predicted above target" + (" (at the floor)" if new_eff == low
                                                      else "")
    elif relaxed > current_eff:
        streak_out = streak + 1
        if streak_out >= settings.relax_after_ticks:
            new_eff, streak_out = min(relaxed, current_eff + step), 0
            reason = "relax: headroom"
        else:
            reason = f"relax pending ({streak_out}/{settings.relax_after_ticks})"
    elif current_eff >= cap:
        reason = (f"below adaptive.min_batch={settings.min_batch}: not pruned" if protected
                  else "meets the SLO unpruned")
    if new_eff == current_eff and current_eff >= cap and tight >= cap:
        new = experts  # a budget above today's union prunes nothing: say so (no pruning)
    else:
        new = current if new_eff == current_eff else (experts if new_eff >= cap else new_eff)
    bound, kappa = min(targets, key=lambda t: t[0] / t[1])
    kept = min(new_eff, union)
    why = BucketPlan(
        max_batch=bucket.max_batch, batch=batch, union=round(union, 3), budget=new,
        predicted_ms=round(kappa * model.predict(batch, kept), 3),
        unpruned_ms=round(kappa * model.predict(batch, union), 3),
        target_ms=round(bound * (1 - settings.margin), 3),
        mass_kept=model.mass_kept(batch, kept), reason=reason)
    out = bucket if new == current else msgspec.structs.replace(bucket, all_layers=new,
                                                                per_layer=None)
    return out, why, streak_out


BucketPlanner = Callable[[BudgetBucket, float, int], tuple[BudgetBucket, BucketPlan, int]]
TablePlan = tuple[PolicySpec, tuple[BucketPlan, ...], tuple[int, ...], tuple[int, ...]]


def plan_buckets(table: PolicySpec, largest_batch: float, streaks: tuple[int, ...],
                 plan_one: BucketPlanner) -> TablePlan:
    """Plan every bucket of a budget table with ``plan_one(bucket, planning batch, relax
    streak) -> (bucket, why, new streak)``. Returns (policy, why per bucket, new relax
    streaks, indices of changed buckets)."""
    if len(streaks) != len(table.budgets):
        streaks = (0,) * len(table.budgets)
    buckets, plans, new_streaks, changed = [], [], [], []
    for i, bucket in enumerate(table.budgets):
        new, why, streak = plan_one(bucket, planning_batch(table.budgets, i, largest_batch),
                                    streaks[i])
        buckets.append(new)
        plans.append(why)
        new_streaks.append(streak)
        if new != bucket:
            changed.append(i)
    policy = msgspec.structs.replace(table, budgets=buckets) if changed else table
    return policy, tuple(plans), tuple(new_streaks), tuple(changed)


def plan_table(model: FleetModel, table: PolicySpec, targets: list[tuple[float, float]],
               streaks: tuple[int, ...], settings: AdaptiveConfig, floor: QualityFloor
               ) -> TablePlan:
    """Plan every bucket of a budget table with uniform budgets (`plan_bucket`)."""
    return plan_buckets(table, model.largest_batch, streaks, lambda bucket, batch, streak:
                        plan_bucket(model, bucket, batch, targets, streak, settings, floor))


def expected_mass_kept(model: FleetModel, policy: PolicySpec,
                       mix: tuple[tuple[float, int], ...]) -> float | None:
    """Step-weighted expected routing mass kept of ``policy`` over the batch mix (None when
    a pruned bucket's mass is unknown or there is no mix)."""
    total, weighted = 0, 0.0
    for batch, steps in mix:
        union = model.union(batch)
        mass = model.mass_kept(batch, effective_experts(policy, batch, union))
        if mass is None:
            return None
        total += steps
        weighted += mass * steps
    return weighted / total if total else None
