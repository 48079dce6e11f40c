"""Building a ladder's rungs from measured per-layer curves: the exact per-layer allocation and
the rung assembly shared by the runtime's calibration (``lynx-serve calibrate --ladder``,
``lynx-serve shadow-ladder``) and the controller (``lynx-policy ladder --from-shadow``, the
admin API's shadow proposal). Torch-free, pure Python.

Shape legend: L layers, C candidate budgets (the same for every layer).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from lynx_protocol.ladder import DroppedRung, Rung, RungTable, pareto_filter
from lynx_protocol.policy import BudgetBucket, PolicySpec

STOCK_RUNG = "none"
"""The rung that prunes nothing (every table at E experts, cost 0)."""


def default_means(num_experts: int, top_k: int) -> list[float]:
    """Mean budgets tried: 3/4, 5/8, 1/2, 3/8, 5/16, 1/4, 3/16 and 1/8 of E, those >= 1.5 K
    (a step computes at least K experts), descending."""
    fractions = (0.75, 0.625, 0.5, 0.375, 0.3125, 0.25, 0.1875, 0.125)
    means = sorted({round(num_experts * f, 2) for f in fractions}, reverse=True)
    return [m for m in means if m >= 1.5 * top_k]


def allocate(sensitivity: Sequence[dict[int, float]], target_mean: float,
             cost: Sequence[dict[int, float]] | None = None) -> list[int]:
    """Per-layer budgets [L] minimising the summed loss rise subject to a mean cost per layer
    <= ``target_mean`` [experts]; among equally good tables the cheapest. Exact: dynamic
    programming over layers on whole experts (costs rounded up), O(L x C x L*target_mean).

    ``sensitivity``: per layer, {budget: loss rise}, the same C candidates for every layer;
    ``cost``: per layer, {budget: experts computed per step} (default: the budget itself).
    Raises ValueError if even the cheapest table exceeds the target."""
    candidates = sorted(sensitivity[0])
    per_layer = cost or [{m: float(m) for m in candidates}] * len(sensitivity)
    costs = [[math.ceil(table[m] - 1e-6) for m in candidates] for table in per_layer]
    cheapest, dearest = sum(min(c) for c in costs), sum(max(c) for c in costs)
    # no table costs more than ``dearest``: a larger limit changes nothing but the work
    limit = min(math.floor(target_mean * len(sensitivity) + 1e-9), dearest)
    if cheapest > limit:
        raise ValueError(f"target mean {target_mean} is below the cheapest table (every layer "
                         f"at the smallest candidate {candidates[0]}: mean "
                         f"{cheapest / len(costs):.1f})")
    inf = math.inf
    best = [0.0] * (limit + 1)  # best[t]: least summed loss of the layers so far at cost <= t
    choices: list[list[int]] = []
    for layer, table in enumerate(sensitivity):
        new = [inf] * (limit + 1)
        pick = [0] * (limit + 1)
        for index, m in enumerate(candidates):
            c, rise = costs[layer][index], table[m]
            if c > limit:
                continue
            for t in range(c, limit + 1):  # strictly better only: ties keep the earlier pick
                value = best[t - c] + rise
                if value < new[t] - 1e-12:
                    new[t], pick[t] = value, index
        best = new
        choices.append(pick)
    least = best[limit]
    t = next(i for i, value in enumerate(best) if value <= least + 1e-12)  # cheapest as good
    budgets = [0] * len(sensitivity)
    for layer in reversed(range(len(sensitivity))):
        index = choices[layer][t]
        budgets[layer] = candidates[index]
        t -= costs[layer][index]
    return budgets


def assemble_rungs(tables: dict[str, list[RungTable]], batches: int,
                   unreachable: dict[str, str], kind: str, floor: float
                   ) -> tuple[list[Rung], list[DroppedRung]]:
    """The rungs with a table at every one of ``batches`` calibration batches, Pareto-filtered
    by cost ``kind`` and cut at ``floor`` (the largest cost kept); the dropped ones, each with
    its reason (``unreachable``: rung -> why its allocation failed)."""
    complete = [Rung(name=name, tables=t) for name, t in tables.items()
                if len(t) == batches and name not in unreachable]
    kept, dropped = pareto_filter(complete, kind)
    dropped += [DroppedRung(name=n, reason=f"unreachable: {why}"[:500])
                for n, why in unreachable.items()]
    within = [r for r in kept if r.cost(kind) <= floor]
    dropped += [DroppedRung(name=r.name, reason=f"{kind} {r.cost(kind):.5f} beyond the "
                            f"floor {floor:g}") for r in kept if r not in within]
    return within, dropped


def single_layer_policy(layer: int, budget: int, num_layers: int, num_experts: int
                        ) -> PolicySpec:
    """``budget`` experts in ``layer`` only, every other layer unpruned."""
    table = [num_experts] * num_layers
    table[layer] = budget
    return PolicySpec(name="budget", budgets=[BudgetBucket(max_batch=1_000_000,
                                                           per_layer=table)])
