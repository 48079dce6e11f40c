"""The SLO experiments' figure: the first repetition's ramp per mode and the step load."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _mid(wins: list[dict[str, Any]]) -> list[float]:
    return [(w["t0_s"] + w["t1_s"]) / 2 for w in wins]


def plot(result: dict[str, Any], path: Path) -> Path:
    """P99 ITL, experts kept and throughput per window for each mode (first repetition), and
    the step load's P99 ITL and experts kept (first repetition)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    step = result.get("step_load")
    rows = 4 if step else 3
    fig, axes = plt.subplots(rows, 1, figsize=(9, 3 * rows))
    first = {}
    for run in result["runs"]:
        first.setdefault(run["mode"], run)
    for mode, run in first.items():
        wins = run["windows"]
        axes[0].plot(_mid(wins), [w["itl_p99_ms"] for w in wins], marker="o", label=mode)
        axes[1].plot(_mid(wins), [w["experts_kept"] for w in wins], marker="o", label=mode)
        axes[2].plot(_mid(wins), [w["tokens"] / (w["t1_s"] - w["t0_s"]) for w in wins],
                     marker="o", label=mode)
    axes[0].axhline(result["slo_ms"], color="red", ls="--", label="SLO")
    axes[0].set_ylabel("P99 ITL [ms]")
    axes[1].set_ylabel("experts kept /\npruned layer-step")
    axes[2].set_ylabel("output tok/s")
    axes[2].set_xlabel("time into the ramp [s]")
    wins = next(iter(first.values()))["windows"]
    ramp = axes[2].twinx()
    ramp.step([w["t0_s"] for w in wins], [w["target_concurrency"] for w in wins], "k:",
              where="post")
    ramp.set_ylabel("concurrency (dotted)")
    if step:
        wins = step["reps"][0]["windows"]
        axes[3].plot(_mid(wins), [w["itl_p99_ms"] for w in wins], marker=".",
                     label="adaptive P99 ITL")
        axes[3].axhline(result["slo_ms"], color="red", ls="--", label="SLO")
        axes[3].set_ylabel("P99 ITL [ms]")
        axes[3].set_xlabel(f"time into the step load {step['low']} -> {step['high']} -> "
                           f"{step['low']} streams [s]")
        kept = axes[3].twinx()
        kept.plot(_mid(wins), [w["experts_kept"] for w in wins], "g.-", label="experts kept")
        kept.set_ylabel("experts kept (green)")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.suptitle(f"SLO experiments on {result['served']} (first repetition of each)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
