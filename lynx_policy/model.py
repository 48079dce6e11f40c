"""Latency model: a replica's decode-step latency as a function of batch size and experts kept.

    t(B, m) = a + b * B + c * m          [ms]

B: decode rows of the step; m: mean experts computed per MoE layer and step (the stock
routing's expert union when the step is not pruned). ``a`` is the fixed per-step cost
(launches, sampling, scheduling), ``b`` the per-row cost (attention over the KV cache, dense
layers, the rows' own expert matmuls) and ``c`` the cost of loading and running one more expert
in every MoE layer. Why linear: on the CPU reference run the step time of the widened
qwen3-moe-mini is linear in both (README, "Latency model"; the fit error is reported on every
fit and by ``GET /v1/model``); on a GPU the MoE layers of a decode step are weight-read bound,
which is linear in m by construction.

Data: the runtime's `DecodeBucket` statistics (pure decode steps, per batch-size bucket, over
one StepStats window) become one `Sample` each. The model is fitted by weighted least squares
(weights = steps) with Huber re-weighting (robust to a window that caught a GC pause or another
tenant) and ``b, c >= 0``. It is *ready* only when the samples spread over m (otherwise ``c``
cannot be told apart from ``a``): a profile sweep (``lynx-policy profile``) or a few reactive
tighten steps provide that spread. Pure functions and plain data; persisted by
`lynx_policy.modelstore`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import msgspec

from lynx_protocol.messages import DecodeBucket, StepStats

MAX_SAMPLES = 512
"""Samples kept per replica (the newest); older ones are dropped."""
MIN_STEPS = 40
"""Decode steps a fit needs in total before it can be ready."""
MIN_EXPERT_SPREAD = 0.75
"""Weighted std of m [experts] below which ``c`` is not identifiable (model not ready)."""
HUBER_K = 1.5
"""Huber threshold in units of the residuals' scale (1.4826 x median |residual|)."""


class Sample(msgspec.Struct, frozen=True, array_like=True):
    """Mean decode step of one runtime batch-size bucket over one StepStats window."""

    batch: float
    """Mean decode rows per step."""
    experts: float
    """Mean experts computed per MoE layer and step."""
    latency_ms: float
    """Mean step wall time [ms]."""
    steps: int
    """Decode steps behind the means (the weight)."""


class MassPoint(msgspec.Struct, frozen=True, array_like=True):
    """Routing mass kept at a level of pruning, from the pruned steps of one bucket window."""

    batch: float
    experts: float
    """Mean experts kept per pruned layer-step."""
    union: float
    """Mean stock expert union per pruned layer-step (what ``off`` would have computed)."""
    mass_kept: float
    """Stock top-k gate mass of pruned rows that landed on kept experts [fraction]."""
    steps: int


class LatencyFit(msgspec.Struct, frozen=True):
    """Coefficients and quality of one fit (``ready`` false: do not plan from it)."""

    a_ms: float = 0.0
    b_ms_per_row: float = 0.0
    c_ms_per_expert: float = 0.0
    samples: int = 0
    steps: int = 0
    rmse_ms: float = 0.0
    """Step-weighted root mean square error of the fit over its samples [ms]."""
    mean_ms: float = 0.0
    """Step-weighted mean latency of the samples [ms] (rmse / mean: relative error)."""
    expert_spread: float = 0.0
    """Step-weighted std of m over the samples [experts]."""
    ready: bool = False
    reason: str = "no samples"

    def predict(self, batch: float, experts: float) -> float:
        """Predicted mean decode-step latency [ms] at ``batch`` rows and ``experts`` per layer."""
        return self.a_ms + self.b_ms_per_row * batch + self.c_ms_per_expert * experts


def expected_union(num_experts: int, top_k: int, batch: float) -> float:
    """Expected distinct experts of ``batch`` tokens routed top-``k`` uniformly over ``E``:
    E * (1 - (1 - k/E)^B). An upper estimate for real (skewed) routers; used only where the
    runtime has not measured the union at that batch size."""
    if batch <= 0:
        return 0.0
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** batch)


def representative_batch(max_batch: int, edges: Sequence[int]) -> float:
    """Geometric middle of a runtime bucket (``max_batch`` 0: above the last edge), for
    statistics from runtimes that do not report ``decode_rows_sum``."""
    if max_batch == 0:
        return float(edges[-1] * 1.5) if edges else 1.0
    lower = max([e for e in edges if e < max_batch], default=0)
    return math.sqrt((lower + 1) * max_batch)


def mean_batch(bucket: DecodeBucket, edges: Sequence[int]) -> float:
    """Mean decode rows per step of a bucket with steps (`representative_batch` when the
    runtime did not report ``decode_rows_sum``)."""
    if bucket.decode_rows_sum:
        return bucket.decode_rows_sum / bucket.steps
    return representative_batch(bucket.max_batch, edges)


def samples_from_stats(stats: StepStats, num_experts: int, top_k: int
                       ) -> tuple[list[Sample], list[MassPoint]]:
    """One `Sample` per decode bucket with steps, one `MassPoint` per bucket with pruned steps.

    m of unpruned steps is the stock union: measured (``stock_union_mean`` of the same
    bucket's pruned steps) when some were pruned, else `expected_union`.
    """
    samples: list[Sample] = []
    points: list[MassPoint] = []
    for bucket in stats.decode_buckets:
        if bucket.steps == 0:
            continue
        batch = mean_batch(bucket, stats.batch_size_edges)
        pruned = min(bucket.pruned_steps, bucket.steps)
        union = (bucket.stock_union_mean if pruned and bucket.stock_union_mean > 0
                 else expected_union(num_experts, top_k, batch))
        kept = bucket.experts_kept_mean if pruned else union
        experts = (pruned * kept + (bucket.steps - pruned) * union) / bucket.steps
        samples.append(Sample(batch, experts, bucket.latency_sum_ms / bucket.steps,
                              bucket.steps))
        if pruned:
            points.append(MassPoint(batch, bucket.experts_kept_mean, union,
                                    bucket.routing_mass_kept, pruned))
    return samples, points


def batch_mix(stats: Iterable[StepStats]) -> tuple[tuple[float, int], ...]:
    """(mean decode rows, steps) of every decode bucket with steps in ``stats``."""
    return tuple((mean_batch(bucket, message.batch_size_edges), bucket.steps)
                 for message in stats for bucket in message.decode_buckets if bucket.steps)


def _solve(m: list[list[float]], v: list[float]) -> list[float] | None:
    """Gaussian elimination with partial pivoting (n <= 3); None when singular."""
    a = [[*row[:], rhs] for row, rhs in zip(m, v, strict=True)]
    n = len(a)
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        if abs(a[pivot][col]) < 1e-12:
            return None
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(n):
            if r != col:
                f = a[r][col] / a[col][col]
                a[r] = [x - f * y for x, y in zip(a[r], a[col], strict=True)]
    return [a[i][n] / a[i][i] for i in range(n)]


def _wls(rows: list[tuple[list[float], float, float]]) -> list[float] | None:
    """Weighted least squares over (features, target, weight) rows."""
    n = len(rows[0][0])
    xtx = [[sum(w * x[i] * x[j] for x, _, w in rows) for j in range(n)] for i in range(n)]
    xty = [sum(w * x[i] * y for x, y, w in rows) for i in range(n)]
    return _solve(xtx, xty)


def _fit_constrained(data: list[tuple[float, float, float, float]]) -> tuple[float, float, float]:
    """min sum w (t - a - bB - cm)^2 subject to b, c >= 0 (active set over the 4 cases)."""
    best: tuple[float, tuple[float, float, float]] | None = None
    for use_b, use_c in ((True, True), (True, False), (False, True), (False, False)):
        rows = [([1.0, *([b] if use_b else []), *([m] if use_c else [])], t, w)
                for b, m, t, w in data]
        coef = _wls(rows)
        if coef is None:
            continue
        it = iter(coef[1:])
        b_coef = next(it) if use_b else 0.0
        c_coef = next(it) if use_c else 0.0
        if b_coef < 0 or c_coef < 0:
            continue
        sse = sum(w * (t - coef[0] - b_coef * b - c_coef * m) ** 2 for b, m, t, w in data)
        if best is None or sse < best[0] - 1e-12:
            best = (sse, (coef[0], b_coef, c_coef))
    if best is None:
        mean = sum(t * w for _, _, t, w in data) / sum(w for *_, w in data)
        return mean, 0.0, 0.0
    return best[1]


def fit_latency(samples: Iterable[Sample], iterations: int = 6) -> LatencyFit:
    """Robust (Huber IRLS) weighted fit of t = a + b*B + c*m with b, c >= 0.

    Returns a `LatencyFit`; ``ready`` is false (with the reason) when there are fewer than
    `MIN_STEPS` decode steps or m does not vary enough (`MIN_EXPERT_SPREAD`).
    """
    data = [(s.batch, s.experts, s.latency_ms, float(s.steps)) for s in samples
            if s.steps > 0 and math.isfinite(s.latency_ms)]
    if not data:
        return LatencyFit()
    total = sum(w for *_, w in data)
    mean_t = sum(t * w for _, _, t, w in data) / total
    mean_m = sum(m * w for _, m, _, w in data) / total
    spread = math.sqrt(sum(w * (m - mean_m) ** 2 for _, m, _, w in data) / total)
    robust = [1.0] * len(data)
    coef = (mean_t, 0.0, 0.0)
    for _ in range(iterations):
        weighted = [(b, m, t, w * r) for (b, m, t, w), r in zip(data, robust, strict=True)]
        coef = _fit_constrained(weighted)
        residuals = [t - coef[0] - coef[1] * b - coef[2] * m for b, m, t, _ in data]
        scale = 1.4826 * sorted(abs(x) for x in residuals)[len(residuals) // 2]
        if scale <= 1e-9:
            break
        robust = [min(1.0, HUBER_K * scale / max(abs(x), 1e-12)) for x in residuals]
    a, b_coef, c_coef = coef
    rmse = math.sqrt(sum(w * (t - a - b_coef * b - c_coef * m) ** 2
                         for b, m, t, w in data) / total)
    steps = int(total)
    if steps < MIN_STEPS:
        ready, reason = False, f"{steps} decode steps seen, {MIN_STEPS} needed"
    elif spread < MIN_EXPERT_SPREAD:
        ready, reason = False, (f"experts kept vary by {spread:.2f} (< {MIN_EXPERT_SPREAD}): "
                                "run `lynx-policy profile` or let the reactive loop prune")
    elif c_coef <= 0:
        ready, reason = False, "fitted cost per expert is 0: pruning would not help"
    else:
        ready, reason = True, "ok"
    return LatencyFit(a_ms=a, b_ms_per_row=b_coef, c_ms_per_expert=c_coef, samples=len(data),
                      steps=steps, rmse_ms=rmse, mean_ms=mean_t, expert_spread=spread,
                      ready=ready, reason=reason)


@dataclass(frozen=True)
class FleetModel:
    """What `decide` plans from: the ready fits of the connected replicas (a table is shared
    by all, so the slowest replica's prediction counts), their measured unions and mass kept."""

    fits: tuple[LatencyFit, ...]
    num_experts: int
    top_k: int
    mass_points: tuple[MassPoint, ...] = ()
    largest_batch: float = 1.0
    """Largest mean batch among the samples [decode rows]."""

    @property
    def ready(self) -> bool:
        return any(f.ready for f in self.fits)

    def predict(self, batch: float, experts: float) -> float:
        """Slowest ready replica's predicted step latency [ms]."""
        return max(f.predict(batch, experts) for f in self.fits if f.ready)

    def cost_per_expert(self) -> float:
        """The slowest replica's ``c`` [ms per expert and layer]."""
        return max(f.c_ms_per_expert for f in self.fits if f.ready)

    def union(self, batch: float) -> float:
        """Stock expert union at ``batch`` rows: the nearest measured point when one lies
        within a factor 1.5 of ``batch``, else `expected_union`."""
        near = [p for p in self.mass_points if batch / 1.5 <= p.batch <= batch * 1.5]
        if near:
            weight = sum(p.steps for p in near)
            return sum(p.union * p.steps for p in near) / weight
        return expected_union(self.num_experts, self.top_k, batch)

    def mass_kept(self, batch: float, experts: float) -> float | None:
        """Expected routing mass kept when ``batch`` rows keep ``experts`` per layer, linearly
        interpolated (in experts / union) between measured points; 1.0 at the stock union;
        None below every measured point (unknown)."""
        union = self.union(batch)
        if experts >= union:
            return 1.0
        ratio = experts / union
        curve = sorted([(p.experts / p.union, p.mass_kept) for p in self.mass_points
                        if p.union > 0 and batch / 2 <= p.batch <= batch * 2] + [(1.0, 1.0)])
        for (x0, y0), (x1, y1) in itertools.pairwise(curve):
            if x0 <= ratio <= x1:
                return y0 if x1 == x0 else y0 + (y1 - y0) * (ratio - x0) / (x1 - x0)
        return None
