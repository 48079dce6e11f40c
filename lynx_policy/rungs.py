"""A ladder's rungs as the controller uses them (`lynx_protocol.ladder`): experts a rung computes
at a batch, the rungs within the quality floor, where a bucket's table sits among them, bounded
moves between rungs, and the expected quality cost of a table over the batch mix. Pure. The
planner over rungs is `lynx_policy.ladder_plan`.
"""

from __future__ import annotations

import bisect
import itertools
import math

from lynx_policy.config import QualityFloor
from lynx_policy.plan import effective_experts
from lynx_protocol.ladder import (
    Ladder,
    Rung,
    rung_of_bucket,
    table_for,
)
from lynx_protocol.policy import BudgetBucket, PolicySpec, bucket_for


class SortedBudgets:
    """A table's per-layer budgets below E, sorted with prefix sums: the mean over those layers
    of min(budget, union) in O(log L). Layers at E (dense layers, or routed ones the table
    leaves alone) count in no mean, as in the runtime's ``experts_kept_mean``, which averages
    the layer-steps that ran selection and is what the latency model was fitted on."""

    def __init__(self, per_layer: list[int], num_experts: int) -> None:
        self.values = sorted(b for b in per_layer if b < num_experts)
        self.prefix = [0, *itertools.accumulate(self.values)]

    def mean_capped(self, union: float) -> float:
        if not self.values:  # prunes no layer: every step computes its union
            return union
        below = bisect.bisect_left(self.values, union)
        capped = self.prefix[below] + union * (len(self.values) - below)
        return capped / len(self.values)


def rung_experts(rung: Rung, batch: float, union: float, num_experts: int) -> float:
    """Experts per layer a step of ``batch`` rows computes under ``rung``: the mean of
    min(budget, ``union``) over the layers it prunes (budget < E), as the runtime's
    ``experts_kept_mean`` averages the layer-steps that ran selection; ``union`` when it
    prunes no layer. A layer at E (dense, or left alone) counts in no mean."""
    return SortedBudgets(table_for(rung, batch).per_layer, num_experts).mean_capped(union)


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


def current_position(ladder: Ladder, bucket: BudgetBucket, usable: list[int], experts: list[float],
             union: float) -> tuple[int, bool]:
    """(position in ``usable`` of the bucket's rung, whether the bucket is exactly it); a
    table that is no usable rung's maps to the usable rung nearest in experts computed."""
    index = rung_of_bucket(ladder, bucket)
    if index is not None and index in usable:
        return usable.index(index), True
    eff = effective_experts(PolicySpec(name="budget", budgets=[bucket]), bucket.max_batch,
                            union)
    return min(range(len(usable)), key=lambda j: (abs(experts[j] - eff), j)), False


def move_toward(experts: list[float], current: int, goal: int, max_step: float) -> int:
    """The furthest position from ``current`` toward ``goal`` within ``max_step`` experts,
    and at least one position."""
    direction = 1 if goal > current else -1
    new = current + direction
    while new != goal and abs(experts[new + direction] - experts[current]) <= max_step:
        new += direction
    return new


def expected_quality_cost(ladder: Ladder, policy: PolicySpec,
                          mix: tuple[tuple[float, int], ...], kind: str | None = None
                          ) -> float | None:
    """Token-weighted expected cost (``kind``, default the ladder's `Ladder.kind`: e.g. the
    held-out perplexity rise as a fraction)
    of ``policy`` over the batch mix ((mean rows, steps) pairs: a point's tokens are rows x
    steps). 0 for ``off``; None when a step's bucket applies a table that is no rung's, or
    there is no mix."""
    if policy.name == "off":
        return 0.0
    if policy.name != "budget":
        return None
    total, weighted = 0.0, 0.0
    for batch, steps in mix:
        bucket = bucket_for(policy, max(1, math.ceil(batch)))
        index = None if bucket is None else rung_of_bucket(ladder, bucket)
        if bucket is None or index is None:
            return None
        rung = ladder.rungs[index]
        cost = table_for(rung, bucket.max_batch).cost(kind or ladder.kind) if index else 0.0
        weighted += (cost or 0.0) * batch * steps
        total += batch * steps
    return weighted / total if total else None
