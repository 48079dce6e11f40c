"""Shared pieces of the stock-vs-Lynx benchmarks: paths, machine description, policy grids,
interleaved timing and JSON output.

Timing discipline (the machine is shared and noisy): every comparison is measured in the same
process, variants interleaved round-robin in a fresh random order on every repetition, and
reported as medians; ratios are ratios of medians.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from lynx_protocol.policy import BudgetBucket, PolicySpec  # noqa: E402

RESULTS_DIR = REPO_ROOT / "benchmark" / "results"
CACHE_DIR = REPO_ROOT / ".cache" / "bench"
ALL_BATCHES = 1_000_000  # a budget bucket that covers every batch size

# Published Lynx headline figures (arXiv 2411.08982, v1 and v3; see docs in RESULTS.md).
PUBLISHED = {"latency_v1": 1.55, "throughput_v3": 1.30, "max_loss_points": 1.0,
             # OEA (arXiv 2511.02237): MoE-layer decode latency -39% / -15% at batch 16
             "oea_layer_qwen3_30b": 1 / (1 - 0.39), "oea_layer_qwen3_235b": 1 / (1 - 0.15)}


def models_dir() -> Path:
    """Where the reference checkpoints live (``LYNX_MODELS_DIR`` or ``models/``)."""
    return Path(os.environ.get("LYNX_MODELS_DIR") or REPO_ROOT / "models")


@dataclass(frozen=True)
class Variant:
    """One Lynx policy at one knob value."""

    policy: str  # off | budget | affinity | piggyback | coverage
    knob: int | float | str
    spec: PolicySpec

    @property
    def label(self) -> str:
        return f"{self.policy}:{self.knob}"

    def policy_json(self) -> str:
        import msgspec

        return msgspec.json.encode(self.spec).decode()


def budget_variant(m: int) -> Variant:
    spec = PolicySpec(name="budget", budgets=[BudgetBucket(max_batch=ALL_BATCHES, all_layers=m)])
    return Variant("budget", m, spec)


def affinity_variant(alpha: float, beta: int) -> Variant:
    knob = f"a{alpha:g}b{beta}"
    return Variant("affinity", knob, PolicySpec(name="affinity", alpha=alpha, beta=beta))


def coverage_variant(coverage: float) -> Variant:
    return Variant("coverage", coverage, PolicySpec(name="coverage", coverage=coverage))


COVERAGE_KNOBS: tuple[float, ...] = (0.8, 0.9, 0.95)


def piggyback_variant(k0: int) -> Variant:
    return Variant("piggyback", k0, PolicySpec(name="piggyback", k0=k0))


OFF = Variant("off", "-", PolicySpec(name="off"))


def default_budget(num_experts: int, top_k: int) -> int:
    """The plugin's default operating point (``lynx.sglang_plugin.config.default_policy``):
    its budget for batches of 4 rows or more."""
    from lynx.sglang_plugin.config import default_policy

    budget = default_policy(num_experts, top_k).budgets[-1].all_layers
    assert budget is not None
    return budget


def budget_knobs(num_experts: int, top_k: int, quick: bool) -> list[int]:
    if quick:
        values = {top_k, default_budget(num_experts, top_k)}
    else:
        values = {top_k, 2 * top_k, 3 * top_k, num_experts // 4, num_experts // 2,
                  default_budget(num_experts, top_k)}
    return sorted(v for v in values if top_k <= v < num_experts)


# (alpha, beta) pairs shipped by the published reference plugin (registry and kernels).
AFFINITY_KNOBS: tuple[tuple[float, int], ...] = ((0.7, 1), (1.0, 1), (1.0, 2), (3.0, 2), (3.0, 4))


def policy_grid(num_experts: int, top_k: int, quick: bool) -> list[Variant]:
    """Every policy and knob value the benchmarks sweep for one model shape."""
    default = default_variant(num_experts, top_k)
    grid = [default if m == default.knob else budget_variant(m)
            for m in budget_knobs(num_experts, top_k, quick)]
    affinity = ((3.0, 2),) if quick else AFFINITY_KNOBS
    grid += [affinity_variant(a, b) for a, b in affinity]
    k0s = [1] if quick else sorted({1, max(1, top_k // 2)})
    grid += [piggyback_variant(k0) for k0 in k0s if k0 < top_k]
    grid += [coverage_variant(c) for c in ((0.9,) if quick else COVERAGE_KNOBS)]
    return grid


def default_variant(num_experts: int, top_k: int) -> Variant:
    """The plugin's default policy (``budget`` m = max(2k + 1, E/2), no pruning below 4 rows)."""
    from lynx.sglang_plugin.config import default_policy

    return Variant("budget", default_budget(num_experts, top_k),
                   default_policy(num_experts, top_k))


def selection_knobs(variant: Variant, batch: int, layer: int, num_experts: int) -> Any:
    """``lynx.selection.SelectionKnobs`` for ``variant`` at a pure-decode step of ``batch`` rows
    (`lynx.calibrate.policy_knobs`: ``enabled`` False where the plugin would not prune)."""
    from lynx.calibrate import policy_knobs

    return policy_knobs(variant.spec, batch, layer, num_experts)


# --- timing ---------------------------------------------------------------------------------

def interleaved_medians(runs: dict[str, Callable[[], Any]], reps: int, seed: int = 0,
                        warmup: int = 1) -> dict[str, float]:
    """Median wall seconds of each callable, run round-robin in a shuffled order per rep."""
    rng = random.Random(seed)
    names = list(runs)
    for _ in range(warmup):
        for name in names:
            runs[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(reps):
        rng.shuffle(names)
        for name in names:
            start = time.perf_counter()
            runs[name]()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]); NaN for an empty sequence."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


# --- machine and output ---------------------------------------------------------------------

def machine_description() -> str:
    cpu = "unknown CPU"
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "unknown CPU":
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    mem_gib = 0.0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gib = int(line.split()[1]) / 2**20
    except OSError:
        pass
    isa = ",".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags)
    return (f"{cpu} ({isa or 'no AVX2'}), {os.cpu_count()} CPUs (nproc), {mem_gib:.1f} GiB RAM, "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}, "
            f"{library_versions()}, no GPU")


def library_versions() -> str:
    parts = []
    for name in ("torch", "sglang", "transformers"):
        try:
            module = __import__(name)
            parts.append(f"{name} {getattr(module, '__version__', '?')}")
        except ImportError:
            continue
    return ", ".join(parts)


def write_json(path: Path, payload: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return path


def rounded(value: float, digits: int = 4) -> float:
    return float(round(value, digits))


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


T_975 = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57, 7: 2.45, 8: 2.36, 9: 2.31, 10: 2.26}
"""Student t, two-sided 95%, by sample size (2.0 beyond 10)."""


def mean_ci(values: Sequence[float | None]) -> dict[str, float | None]:
    """Mean and 95% Student-t interval (interval None with one value, all None with none)."""
    kept = [v for v in values if v is not None and not math.isnan(v)]
    if not kept:
        return {"mean": None, "ci_low": None, "ci_high": None}
    mean = statistics.fmean(kept)
    if len(kept) < 2:
        return {"mean": rounded(mean, 4), "ci_low": None, "ci_high": None}
    half = T_975.get(len(kept), 2.0) * statistics.stdev(kept) / len(kept) ** 0.5
    return {"mean": rounded(mean, 4), "ci_low": rounded(mean - half, 4),
            "ci_high": rounded(mean + half, 4)}
