"""Budget tables: the arithmetic both planners and the admin API share. Pure.

A table is a ``budget`` `PolicySpec`: one `BudgetBucket` per batch-size bucket (``max_batch``:
the most decode rows it serves), each with one budget for all layers or one per layer
(experts kept per layer-step). The reactive rules step every eligible bucket by
``adaptive.step_experts`` (`step_policy`); the floor and the metrics read tables here too.
"""

from __future__ import annotations

import msgspec

from lynx_policy.config import AdaptiveConfig, QualityFloor
from lynx_protocol.policy import BudgetBucket, PolicySpec, bucket_for


def adaptive_table(policy: PolicySpec, settings: AdaptiveConfig, num_experts: int) -> PolicySpec:
    """The policy as a ``budget`` table; a fresh table (no pruning anywhere) if it is not one."""
    if policy.name == "budget" and policy.budgets:
        return policy
    budgets = [BudgetBucket(max_batch=b, all_layers=num_experts) for b in settings.buckets]
    return msgspec.structs.replace(policy, name="budget", budgets=budgets)


def bucket_shares(policy: PolicySpec, batch_steps: dict[int, int] | None) -> list[float] | None:
    """Share of recent decode steps that each bucket of ``policy`` served (None: unknown)."""
    if batch_steps is None:
        return None
    total = sum(batch_steps.values())
    if total <= 0:
        return None
    shares = [0.0] * len(policy.budgets)
    for batch_size, steps in batch_steps.items():
        chosen = bucket_for(policy, batch_size)
        if chosen is not None:
            shares[policy.budgets.index(chosen)] += steps / total
    return shares


def _shift(values: list[int], delta: int, floors: list[int], num_experts: int) -> list[int]:
    shifted = []
    for value, low in zip(values, floors, strict=True):
        current = min(value, num_experts)
        if delta < 0:
            new = min(current, max(low, current + delta))
        else:
            new = max(current, min(num_experts, current + delta))
        shifted.append(value if new == current else new)
    return shifted


def _shift_bucket(bucket: BudgetBucket, delta: int, floor: QualityFloor, num_experts: int
                  ) -> BudgetBucket:
    if bucket.per_layer is not None:
        floors = [floor.for_layer(i) for i in range(len(bucket.per_layer))]
        return msgspec.structs.replace(
            bucket, per_layer=_shift(bucket.per_layer, delta, floors, num_experts))
    assert bucket.all_layers is not None
    (value,) = _shift([bucket.all_layers], delta, [floor.highest()], num_experts)
    return msgspec.structs.replace(bucket, all_layers=value)


def step_policy(
    policy: PolicySpec, direction: str, shares: list[float] | None,
    settings: AdaptiveConfig, floor: QualityFloor, num_experts: int,
) -> tuple[PolicySpec, tuple[int, ...]]:
    """Apply one tighten/relax step to a budget table; returns (policy, changed bucket indices)."""
    if direction == "hold":
        return policy, ()
    delta = -settings.step_experts if direction == "tighten" else settings.step_experts
    new_buckets: list[BudgetBucket] = []
    changed: list[int] = []
    for i, bucket in enumerate(policy.budgets):
        eligible = True
        if direction == "tighten":
            active = shares is None or shares[i] >= settings.min_active_fraction
            eligible = active and bucket.max_batch >= settings.min_batch
        new_bucket = _shift_bucket(bucket, delta, floor, num_experts) if eligible else bucket
        if new_bucket != bucket:
            changed.append(i)
        new_buckets.append(new_bucket)
    if not changed:
        return policy, ()
    return msgspec.structs.replace(policy, budgets=new_buckets), tuple(changed)


def enforce_floor(policy: PolicySpec, floor: QualityFloor, num_experts: int) -> PolicySpec:
    """Raise any budget below the floor up to it (used when the floor itself is raised)."""
    if policy.name != "budget":
        return policy
    buckets = []
    for bucket in policy.budgets:
        if bucket.per_layer is not None:
            values = [max(v, floor.for_layer(i)) for i, v in enumerate(bucket.per_layer)]
            buckets.append(msgspec.structs.replace(bucket, per_layer=values))
        else:
            assert bucket.all_layers is not None
            buckets.append(msgspec.structs.replace(
                bucket, all_layers=max(bucket.all_layers, min(floor.highest(), num_experts))))
    return msgspec.structs.replace(policy, budgets=buckets)


def mean_budgets(policy: PolicySpec, num_experts: int) -> list[tuple[int, float]]:
    """(max_batch, mean budget over layers, capped at num_experts) per bucket, for metrics."""
    rows = []
    for bucket in policy.budgets:
        values = bucket.per_layer if bucket.per_layer is not None else [bucket.all_layers or 0]
        mean = sum(min(v, num_experts) for v in values) / max(1, len(values))
        rows.append((bucket.max_batch, mean))
    return rows
