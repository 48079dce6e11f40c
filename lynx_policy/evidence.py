"""Evidence: may the model planner act on this tick's latency readings? Pure (no I/O, no clock).

Acting on every reading failed on the SLO Pareto replay (`benchmark/slo_pareto.py`, P90 TPOT at
~2.4 requests/s; the controller's reasoning polled every 5 s): the correction factor kappa
ranged 0.66-2.11 within single 60 s replays, the planner tightened at once on a reading above
target x (1 - margin) and relaxed only after ``relax_after_ticks`` calm ones, and the table
ratcheted towards the lowest rungs (quality cost 6.6x the oracle static's at the loose target).
Two causes, two rules:

- **Sampling noise.** A P90 of 20 per-request TPOTs is the 18th-19th order statistic: above
  a bound the true P90 meets in a third of windows. Each reading carries one-sided bounds at
  ``observe.confidence`` (`lynx_policy.quantiles.confidence_levels`). A tighten needs some
  target's *lower* bound above the planning line target x (1 - margin) (a confirmed miss); a
  relax needs every read target's *upper* bound below the target itself (confirmed met; how
  far to relax is the planner's headroom rule). The upper bound of a P90 from 20 samples is
  near their maximum, ~1.2x the estimate for a lognormal sigma of 0.3: below target x
  (1 - margin) it would almost never confirm, and a table once pruned would stay so.
- **Stale windows** (``adaptive.settle``). After a change, a window that reaches back before it
  holds the old table's steps (a ``tpot`` window twice over: a request's TPOT is recorded when
  it ends, after decoding through the window before). Fitting kappa = observed / S(new table)
  then comes out high after a tighten (those steps were slower), so the planner tightens
  again, and low after a relax. kappa is fitted against the tables the window actually saw
  instead: S is the mean of S(table) over the window, each table weighted by its share of it
  (`window_tables`). A first version froze kappa and blocked same-direction moves until a
  window was fresh; at ~1.7 requests/s the observer's window is 32 s (64 s for ``tpot``),
  longer than the SLO Pareto replay, so the controller ran open-loop on an unfitted kappa.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from lynx_protocol.policy import PolicySpec, bucket_for

if TYPE_CHECKING:
    from lynx_policy.config import AdaptiveConfig
    from lynx_policy.decide import LatencyReading
    from lynx_protocol.messages import StepStats

T = TypeVar("T")
StallCounts = tuple[int, int, float]
"""One StepStats window's forward steps: (all, prefill and mixed, their latency sum [ms])."""


@dataclass(frozen=True)
class StallSteps:
    """Forward steps that pruning does not shorten (prefill and mixed steps: their time is
    the prompt's), over all replicas' StepStats of some period."""

    share: float
    """Their share of all forward steps [0, 1]."""
    mean_ms: float
    """Their mean forward latency [ms]."""


def stall_owned(reading: LatencyReading, stalls: StallSteps | None) -> bool:
    """Does this reading miss its target because of steps pruning does not shorten? True for
    an ``itl`` quantile q above its target when the prefill/mixed steps alone can fill its tail
    (share >= 1 - q) and take longer than the target on average: every such step is a gap
    above the target however few experts the decode steps compute."""
    target = reading.target
    return (target.metric == "itl" and stalls is not None and reading.observed_s is not None
            and reading.observed_s * 1000.0 > target.target_ms
            and stalls.share >= 1.0 - target.quantile and stalls.mean_ms > target.target_ms)


def stall_counts(stats: StepStats) -> StallCounts:
    """The forward steps of one StepStats message (`StallCounts`)."""
    stalled = stats.prefill_steps + stats.mixed_steps
    return (stats.decode_steps + stalled, stalled,
            stats.prefill_latency_sum_ms + stats.mixed_latency_sum_ms)


def stalls_over(counts: list[StallCounts]) -> StallSteps | None:
    """Share and mean latency of the prefill/mixed steps in these counts (None: no steps)."""
    steps, stalled = sum(c[0] for c in counts), sum(c[1] for c in counts)
    if steps == 0:
        return None
    return StallSteps(share=stalled / steps,
                      mean_ms=sum(c[2] for c in counts) / stalled if stalled else 0.0)


def observed_buckets(table: PolicySpec, mix: tuple[tuple[float, int], ...], min_batch: int
                     ) -> set[int]:
    """Indices of the budget ``table``'s buckets (``max_batch`` >= ``min_batch``) that the recent
    decode steps of ``mix`` ((mean rows, steps) pairs) ran in: the buckets a latency reading
    is evidence about. A veto holds these; a planned move of any other bucket (one made ready
    before its load arrives, or one below ``min_batch`` returned to no pruning) goes ahead."""
    out = set()
    for rows, steps in mix:
        chosen = bucket_for(table, math.ceil(rows)) if steps > 0 and rows > 0 else None
        if chosen is not None and chosen.max_batch >= min_batch:
            out.add(table.budgets.index(chosen))
    return out


def window_lag_s(reading: LatencyReading) -> float | None:
    """How far back the steps behind this reading reach [s]: its window, twice for ``tpot``
    (None: the window is not known)."""
    if reading.window_s is None:
        return None
    return reading.window_s * (2.0 if reading.target.metric == "tpot" else 1.0)


def window_tables(reading: LatencyReading, history: tuple[tuple[float, PolicySpec], ...],
                  current: PolicySpec, settings: AdaptiveConfig
                  ) -> list[tuple[float, PolicySpec]]:
    """(share of the reading's window [0, 1], table) for the tables applied during it.
    ``history``: (seconds since it took effect, table), newest first, the newest being
    ``current``; the oldest known table covers the rest of the window. [(1, current)] when
    settling is off, the window is unknown or no history is."""
    lag = window_lag_s(reading)
    if not settings.settle or lag is None or lag <= 0 or not history:
        return [(1.0, current)]
    out, start = [], 0.0
    for age, table in history:
        end = min(max(age, start), lag)
        if end > start:
            out.append(((end - start) / lag, table))
        start = end
        if start >= lag:
            break
    if start < lag:  # before the oldest known change: its table
        out.append(((lag - start) / lag, history[-1][1]))
    return out


def in_window(reading: LatencyReading, history: tuple[tuple[float, T], ...],
                 settings: AdaptiveConfig) -> list[T] | None:
    """The entries of ``history`` ((seconds since their statistics arrived, entry)) within
    ``reading``'s `window_lag_s`; None when settling is off or the window is unknown."""
    lag = window_lag_s(reading)
    if not settings.settle or lag is None:
        return None
    return [entry for age, entry in history if age <= lag]


def window_mix(reading: LatencyReading,
               mix_history: tuple[tuple[float, tuple[tuple[float, int], ...]], ...],
               current: tuple[tuple[float, int], ...], settings: AdaptiveConfig
               ) -> tuple[tuple[float, int], ...]:
    """The (mean decode rows, steps) pairs of the decode steps behind ``reading``: those of
    ``mix_history`` ((seconds since the statistics arrived, pairs), any order) within its
    `window_lag_s`; ``current`` (the loop's statistics window) when settling is off, the
    window is unknown or no history falls inside it.

    kappa = observed / S compares a latency window with a batch mix; fitted against the last
    few seconds' mix while the window reached back 16-64 s, a load that changed inside the
    window (the SLO Pareto replay's shape changes every 6 s; any replay's start) biased
    kappa by the ratio of the two loads' step times: 2.4x at a replay's start, so the planner
    predicted that even the lowest rung missed and held unpruned."""
    seen = in_window(reading, mix_history, settings)
    return tuple(point for points in seen or () for point in points) or current


def window_stalls(reading: LatencyReading,
                  stall_history: tuple[tuple[float, StallCounts], ...],
                  current: StallSteps | None, settings: AdaptiveConfig) -> StallSteps | None:
    """The prefill/mixed steps behind ``reading``: those of ``stall_history`` ((seconds since
    the statistics arrived, `StallCounts`), any order) within its `window_lag_s`; ``current``
    (the loop's statistics window) when settling is off, the window is unknown or no history
    falls inside it. Whether a miss is the stalls' (`stall_owned`) is a question about
    the steps of the reading's window, as kappa's batch mix is (`window_mix`): judged on the
    loop's last seconds, a burst of prompts that had ended (or had not yet reached the
    window) decided it."""
    seen = in_window(reading, stall_history, settings)
    return (stalls_over(seen) if seen else None) or current


def evidence_veto(direction: str, readings: tuple[LatencyReading, ...],
                  settings: AdaptiveConfig) -> str | None:
    """Why the planner's ``direction`` (``tighten``/``relax``/``hold``) must not be taken this
    tick (module docstring), or None when the readings support it. Readings without data
    neither support nor block a move."""
    if direction not in ("tighten", "relax"):
        return None
    read = [r for r in readings if r.observed_s is not None]
    bound = 1.0 - settings.margin
    if direction == "tighten":
        misses = [r for r in read if (b := r.bounds_s()) is not None
                  and b[0] * 1000.0 > r.target.target_ms * bound]
        if read and not misses:
            worst = max(read, key=lambda r: (r.bounds_s() or (0.0, 0.0))[0]
                        / r.target.target_ms)
            low = (worst.bounds_s() or (0.0, 0.0))[0] * 1000.0
            return (f"miss not confirmed: the {worst.target.metric} p"
                    f"{worst.target.quantile * 100:g} lower bound {low:.1f} ms is within "
                    f"{worst.target.target_ms * bound:.1f} ms; holds")
        return None
    unconfirmed = [r for r in read if (b := r.bounds_s()) is not None
                   and b[1] * 1000.0 >= r.target.target_ms]
    if unconfirmed:
        r = unconfirmed[0]
        high = (r.bounds_s() or (0.0, 0.0))[1] * 1000.0
        return (f"room not confirmed: the {r.target.metric} p{r.target.quantile * 100:g} "
                f"upper bound {high:.1f} ms reaches the target {r.target.target_ms:.1f} ms; "
                "holds")
    return None
