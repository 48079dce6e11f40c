"""Planning over a ladder's rungs at the observed batch mix. Pure (no I/O, no clock);
`lynx_policy.decide` calls it instead of `lynx_policy.plan.plan_table` when the controller
holds a ladder that fits the connected replicas.

Legend: mix = ((B_j, n_j), ...), recent pure decode steps (B_j mean decode rows of one
runtime bucket window, n_j its steps); a point's *tokens* are B_j * n_j (every row of a decode
step emits one). A table assigns one usable rung to each budget bucket; t(B, m) is the latency
model (`lynx_policy.model`), e_P(B) the experts a step of B rows computes under table P (the
rung's table for the bucket's ``max_batch``, capped by the stock union at B).

Method:
1. Prediction at the mix. S(P) is the statistic of t(B_j, e_P(B_j)) over the mix that matches
   the SLO: the token-weighted mean for a ``tpot`` target (a request's TPOT is its mean gap),
   the token-weighted q-quantile for an ``itl`` target (each token's gap is its step). The
   correction kappa = observed quantile / S of the tables the latency window saw (the applied
   one once the window is past the last change; `lynx_policy.evidence.window_tables`;
   smoothed, clamped) and a table P is
   predicted to give kappa * S(P): the ratio of step times between tables at the mix the
   clients saw. (Applying a kappa fitted at the mix to one step at a bucket's upper bound made
   every rung infeasible on the SLO Pareto testbed: kappa 3.0-3.6 x a 32-row step.)
   Open arrivals (``adaptive.arrivals``, the default): requests keep arriving at the same rate,
   so by Little's law the running batch scales with TPOT. Under P every batch is s * B_j, s the
   fixed point of s = S_P(s) / S(applied) (token-weighted means): with t = a + b B + c m that
   is s = (a + c m_P) / (a + c m_applied), so pruning also shrinks the b B term.
   ``closed`` (fixed clients): s = 1. On the SLO Pareto testbed (t = 17.9 + 2.43 B + 0.42 m
   ms, ~24 rows) rung m32 against no pruning measured 0.71-0.77 in P90 TPOT (two clean runs);
   open predicts 0.52, closed 0.74. Open is the default all the same: its optimism is undone
   within a few ticks (kappa is refitted against the applied table every tick, so a table
   that missed is predicted to miss), while closed, with the margin, predicts the lowest rung
   misses a target that rung measurably meets, and then holds for good.
2. The chain. From no pruning, each link moves one loaded bucket (mix tokens in it, and
   ``max_batch`` >= ``adaptive.min_batch``) to a later usable rung: the move that saves the
   most predicted time per token-weighted quality cost added (ties: the most time); a move
   that skips rungs stops at the nearest one that already meets (a free rung followed by two
   of near-equal efficiency jumped past the cheaper one that sufficed: found by the property
   test in CI's Python 3.12 stage). goal(x) is
   the first table of the chain with kappa * S <= target * (1 - x) for every target. The chain
   only ever prunes more, so goal is monotone in load. When its end (every loaded bucket on
   the lowest usable rung) misses target * (1 - margin), the first table that meets the
   target itself is taken: the margin is a cushion for choosing, not a reason to leave a
   reachable target missed (in a step load to 48 streams on the testbed the controller held
   a confirmed 20% miss of a 142 ms median-ITL target for the whole 20 s stage, while the
   lowest rung, measured alone at that load, gave 118 ms: `benchmark/slo_step.py`). When the
   end misses the target itself, pruning cannot close the gap: the table holds.
3. Hysteresis (as `lynx_policy.plan`): tighten at once toward goal(margin) when the applied
   table is predicted to miss target * (1 - margin); relax toward goal(headroom) only after
   ``relax_after_ticks`` ticks that all allow it; hold in between. A bucket moves at most to
   the furthest rung within ``max_step_experts`` experts of its own (and at least one rung).
4. Buckets the mix does not load (at or above ``min_batch``) follow the nearest loaded bucket
   below them, or the lowest loaded one when none is below: a jump in load finds its bucket as
   pruned as the largest one loaded, and batches that pruning shrinks (open arrivals) find the
   smaller buckets pruned as well, instead of falling back to no pruning and growing again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import msgspec

from lynx_policy.config import AdaptiveConfig, QualityFloor
from lynx_policy.model import FleetModel
from lynx_policy.plan import (
    BucketPlan,
    TablePlan,
    planning_batch,
    quantile_of,
)
from lynx_policy.rungs import (
    SortedBudgets,
    current_position,
    move_toward,
    rung_experts,
    usable_rungs,
)
from lynx_protocol.ladder import Ladder, rung_bucket, table_for
from lynx_protocol.policy import PolicySpec

CANNOT_CLOSE = "cannot close the gap"
"""How a bucket's reason starts when even the lowest usable rung misses (docstring, 2)."""

SCALE_MIN, SCALE_MAX = 0.05, 20.0
"""Bounds of the open-arrivals batch scale."""


@dataclass(frozen=True)
class MixTarget:
    """One step target as the mix planner sees it."""

    metric: str
    """``tpot`` (token-weighted mean) or ``itl`` (token-weighted quantile)."""
    quantile: float
    bound_ms: float
    """Target before margins [ms]."""
    kappa: float


def mix_statistic(points: list[tuple[float, float]], metric: str, quantile: float) -> float:
    """S over (step latency [ms], tokens) pairs: the token-weighted mean for ``tpot``, the
    token-weighted ``quantile`` otherwise. Raises ValueError on no tokens."""
    total = sum(w for _, w in points)
    if total <= 0:
        raise ValueError("mix_statistic: no tokens in the mix")
    if metric == "tpot":
        return sum(t * w for t, w in points) / total
    return quantile_of(points, quantile)


class _Mix:
    """The mix split by bucket; predicts any table's statistic, batches scaled by Little's law
    under open arrivals (module docstring, 1)."""

    def __init__(self, model: FleetModel, ladder: Ladder, usable: list[int], table: PolicySpec,
                 mix: tuple[tuple[float, int], ...], open_loop: bool) -> None:
        self.model, self.open_loop = model, open_loop
        self.edges = [b.max_batch for b in table.budgets]
        self.rungs = [ladder.rungs[i] for i in usable]
        self.tokens = [0.0] * len(self.edges)
        self.steps = [0.0] * len(self.edges)
        self.by_bucket: list[list[tuple[float, float]]] = [[] for _ in self.edges]
        for batch, steps in mix:
            if steps <= 0 or batch <= 0:
                continue
            i = next((k for k, e in enumerate(self.edges) if math.ceil(batch) <= e),
                     len(self.edges) - 1)
            self.by_bucket[i].append((batch, batch * steps))
            self.tokens[i] += batch * steps
            self.steps[i] += steps
        self.costs = [[(table_for(r, edge).cost(ladder.kind) or 0.0) if j else 0.0
                       for j, r in enumerate(self.rungs)] for edge in self.edges]
        self._budgets = [[SortedBudgets(table_for(r, edge).per_layer, ladder.model.num_experts)
                          for r in self.rungs]
                         for edge in self.edges]  # [bucket][position]
        self.total = sum(self.tokens)
        self._unions: dict[float, float] = {}
        self._scales: dict[tuple[int, ...], float] = {}
        self._points: dict[tuple[int, ...], list[tuple[float, float]]] = {}
        self.base_mean = 0.0  # S of the applied table at the observed batches (`set_applied`)

    def _union(self, batch: float) -> float:
        key = round(batch * 8) / 8  # 1/8 row: far below what a batch mix resolves
        if key not in self._unions:
            self._unions[key] = self.model.union(key)
        return self._unions[key]

    def points(self, positions: list[int], scale: float = 1.0) -> list[tuple[float, float]]:
        """(predicted step latency [ms], tokens) of every mix point under the table, its
        batch scaled by ``scale`` (the rung stays its observed bucket's)."""
        out = []
        for i, j in enumerate(positions):
            for batch, tokens in self.by_bucket[i]:
                rows = max(1.0, batch * scale)
                union = self._union(rows)
                experts = self._budgets[i][j].mean_capped(union) if j else union
                out.append((self.model.predict(rows, experts), tokens))
        return out

    def set_applied(self, positions: list[int]) -> None:
        self.base_mean = mix_statistic(self.points(positions), "tpot", 0.5)

    def scale(self, positions: list[int], start: float = 1.0) -> float:
        """Batch scale s under the table: 1 for closed arrivals; open: the fixed point of
        s = g(s) = S_P(s) / S_applied (mean step time; Little's law at a constant arrival
        rate), found by the secant method on g(s) - s from ``start`` (g is a contraction: a
        step grows slower than its batch)."""
        key = tuple(positions)
        if key not in self._scales:
            s = 1.0
            if self.open_loop and self.base_mean > 0:
                def f(x: float) -> float:
                    return mix_statistic(self.points(positions, x), "tpot", 0.5) / \
                        self.base_mean - x
                x0, f0 = start, f(start)
                x1 = min(SCALE_MAX, max(SCALE_MIN, x0 + f0))
                for _ in range(12):
                    f1 = f(x1)
                    if abs(f1) < 1e-4 or f1 == f0:
                        break
                    x0, x1, f0 = x1, min(SCALE_MAX, max(SCALE_MIN,
                                                       x1 - f1 * (x1 - x0) / (f1 - f0))), f1
                s = x1
            self._scales[key] = s
        return self._scales[key]

    def predict(self, positions: list[int], target: MixTarget) -> float:
        """kappa * S of the table with these rung positions [ms]."""
        key = tuple(positions)
        if key not in self._points:
            self._points[key] = self.points(positions, self.scale(positions))
        return target.kappa * mix_statistic(self._points[key], target.metric, target.quantile)

    def cost(self, positions: list[int]) -> float:
        """Token-weighted quality cost of the table [fraction]."""
        return sum(self.tokens[i] * self.costs[i][j] for i, j in enumerate(positions)
                   ) / max(self.total, 1e-12)


def _meets(mix: _Mix, positions: list[int], targets: list[MixTarget], slack: float) -> bool:
    return all(mix.predict(positions, t) <= t.bound_ms * (1 - slack) for t in targets)


def chain_goal(mix: _Mix, loaded: list[int], top: int, targets: list[MixTarget],
               slack: float) -> list[int] | None:
    """The first table of the chain (module docstring, 2) that meets every target after
    ``slack``; None when its end misses. A link whose move skips rungs stops at the nearest
    one that already meets (the best time-per-cost move can jump past a cheaper rung that
    suffices). ``loaded``: bucket indices it may move; ``top``: the last usable rung
    position."""
    positions = [0] * len(mix.tokens)
    while not _meets(mix, positions, targets, slack):
        now = [mix.predict(positions, t) for t in targets]
        here = mix.scale(positions)
        best: tuple[tuple[float, float, int, int], int, int] | None = None
        for i in loaded:
            for j in range(positions[i] + 1, top + 1):
                moved = [*positions[:i], j, *positions[i + 1:]]
                mix.scale(moved, start=here)  # the neighbour's scale: a near start
                saved = sum(a - mix.predict(moved, t) for a, t in zip(now, targets,
                                                                      strict=True))
                if saved <= 1e-12:
                    continue
                added = mix.cost(moved) - mix.cost(positions)
                ratio = math.inf if added <= 1e-12 else saved / added
                key = (ratio, saved, -i, -j)  # ties: the lower bucket, the nearer rung
                if best is None or key > best[0]:
                    best = (key, i, j)
        if best is None:
            return None
        i, k = best[1], best[2]
        for j in range(positions[i] + 1, k):  # a nearer rung of this move may already meet
            if _meets(mix, [*positions[:i], j, *positions[i + 1:]], targets, slack):
                k = j
                break
        positions[i] = k
    return positions


def plan_ladder(model: FleetModel, ladder: Ladder, table: PolicySpec,
                mix: tuple[tuple[float, int], ...], targets: list[MixTarget],
                streaks: tuple[int, ...], settings: AdaptiveConfig, floor: QualityFloor
                ) -> TablePlan:
    """Plan every bucket of a budget table over the ladder's rungs at the mix (module
    docstring). Returns (policy, why per bucket, new relax streaks, changed bucket indices)."""
    usable = usable_rungs(ladder, floor)
    rungs = [ladder.rungs[i] for i in usable]
    buckets = table.budgets
    mixed = _Mix(model, ladder, usable, table, mix, settings.arrivals == "open")
    loaded = [i for i, b in enumerate(buckets)
              if mixed.tokens[i] > 0 and b.max_batch >= settings.min_batch]
    rows = [mixed.tokens[i] / mixed.steps[i] if mixed.steps[i]
            else planning_batch(buckets, i, model.largest_batch) for i in range(len(buckets))]
    experts = [[rung_experts(r, b.max_batch, model.union(rows[i]), ladder.model.num_experts)
                for r in rungs] for i, b in enumerate(buckets)]
    current = [current_position(ladder, b, usable, experts[i], model.union(rows[i]))
               for i, b in enumerate(buckets)]
    positions = [p for p, _ in current]
    mixed.set_applied(positions)
    streak = streaks[0] if streaks else 0
    new, streak_out = list(positions), 0
    top = len(usable) - 1
    if not loaded:
        reason = "no loaded bucket at or above adaptive.min_batch: not pruned"
        new = [0] * len(buckets)
    elif not _meets(mixed, positions, targets, settings.margin):
        goal = chain_goal(mixed, loaded, top, targets, settings.margin)
        cushioned = goal is not None
        if goal is None:  # the margin is a cushion (module docstring, 2)
            goal = chain_goal(mixed, loaded, top, targets, 0.0)
        if goal is None:
            lowest = [top if i in loaded else 0 for i in range(len(buckets))]
            worst = max(mixed.predict(lowest, t) for t in targets)
            reason = (f"{CANNOT_CLOSE}: the lowest usable rung {rungs[-1].name} predicts "
                      f"{worst:.1f} ms at the mix, above the target; holds")
        else:
            for i in loaded:
                if goal[i] > positions[i]:
                    new[i] = move_toward(experts[i], positions[i], goal[i],
                                         settings.max_step_experts)
            reason = ("tighten: the table is predicted above the target at the mix" if cushioned
                      else "tighten to the target itself: no rung meets it with "
                      "adaptive.margin at the mix")
    else:
        goal = chain_goal(mixed, loaded, top, targets, settings.headroom)
        lower = goal is not None and any(goal[i] < positions[i] for i in loaded)
        if goal is not None and lower:
            streak_out = streak + 1
            if streak_out >= settings.relax_after_ticks:
                for i in loaded:
                    if goal[i] < positions[i]:
                        new[i] = move_toward(experts[i], positions[i], goal[i],
                                             settings.max_step_experts)
                streak_out, reason = 0, "relax: headroom at the mix"
            else:
                reason = f"relax pending ({streak_out}/{settings.relax_after_ticks})"
        elif all(positions[i] == 0 for i in loaded):
            reason = "meets the SLO unpruned"
        else:
            reason = "holds (between margin and headroom)"
    follow = new[loaded[0]] if loaded else 0
    for i, bucket in enumerate(buckets):  # protected and unloaded buckets (docstring, 4)
        if bucket.max_batch < settings.min_batch:
            new[i] = 0
        elif i in loaded:
            follow = new[i]
        else:
            new[i] = follow
    out, plans, changed = [], [], []
    tightest = max(targets, key=lambda t: mixed.predict(new, t) / t.bound_ms)
    predicted = round(mixed.predict(new, tightest), 3)
    unpruned = round(mixed.predict([0] * len(buckets), tightest), 3)
    for i, bucket in enumerate(buckets):
        j, exact = new[i], current[i][1]
        rung = rungs[j]
        written = bucket if (j == positions[i] and exact) else rung_bucket(
            rung, bucket.max_batch, bucket.max_batch, ladder.model.num_experts)
        if written != bucket:
            changed.append(i)
        out.append(written)
        why = reason if i in loaded else (
            f"below adaptive.min_batch={settings.min_batch}: not pruned"
            if bucket.max_batch < settings.min_batch
            else f"no recent steps: follows the nearest loaded bucket (rung {rung.name})")
        rung_table = table_for(rung, bucket.max_batch)
        plans.append(BucketPlan(
            max_batch=bucket.max_batch, batch=round(rows[i], 3),
            union=round(model.union(rows[i]), 3),
            budget=round(experts[i][j]) if j else ladder.model.num_experts,
            predicted_ms=predicted, unpruned_ms=unpruned,
            target_ms=round(tightest.bound_ms * (1 - settings.margin), 3),
            mass_kept=rung_table.mass_kept if j else 1.0, reason=why, rung=rung.name,
            quality_cost=(rung_table.cost(ladder.kind) or 0.0) if j else 0.0))
    policy = msgspec.structs.replace(table, budgets=out) if changed else table
    return policy, tuple(plans), (streak_out,) * len(buckets), tuple(changed)
