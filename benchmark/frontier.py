"""Speed vs quality of every policy on the production-ratio reference model, at one batch.

    python benchmark/frontier.py [--model qwen3-moe-128] [--batch 32] [--means 24,32,...]
                                 [--quick] [--out benchmark/results/frontier.json]

For each policy and knob of the benchmark grid (budget, affinity, piggyback, coverage), the same
budget in every layer at each of ``--means``, and per-layer tables calibrated by
`lynx.calibrate` (training-split code) for each of ``--means`` (mean experts computed per
layer and step):
- ``speedup``: MoE-layer time, stock / Lynx, on the model's widened shape in fp32
  (`benchmark.moe_layer`: SGLang's CPU MoE path, the model's real routing, draws taken from
  every layer in turn, each layer's knobs as the plugin sets them), interleaved in one process;
- ``ppl_rise``: held-out code perplexity under the policy / stock - 1, the model itself (fp32,
  `benchmark.accuracy.code_scores`: every row of B windows' position is one decode step).
Prints a table, writes JSON and a plot (speedup against perplexity rise, one line per policy,
the quality budget, the speed target and OEA's published MoE-layer speedups drawn in).
``frontier`` marks the points no other point beats on both axes; ``above_published`` says,
for each budget/affinity/piggyback point within the calibrated curve's perplexity range,
whether that curve (linear between its points) is at least as fast at the same perplexity
rise.
"""

from __future__ import annotations

import argparse
import sys
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmark.common import (
    OFF,
    PUBLISHED,
    RESULTS_DIR,
    Variant,
    budget_variant,
    markdown_table,
    models_dir,
    policy_grid,
    rounded,
    write_json,
)

PPL_BUDGET = 0.01  # <= 1% perplexity rise (issue 12)
SPEED_TARGET = 1.5  # >= 1.5x MoE-layer speedup at B=32


def calibrated_variants(model: str, batch: int, means: list[float]) -> tuple[list[Variant],
                                                                               dict[str, Any]]:
    """One `budget` table per target mean of experts computed per layer and step, from one
    sensitivity measurement at ``batch``."""
    from lynx.calibrate import calibrate, calibrated_policy
    from lynx.calibrate.tables import allocate_routed

    fitted = calibrate(models_dir() / model, means[0], [batch])
    sensitivity = fitted["per_batch"][0]["sensitivity_nats"]
    kept = fitted["per_batch"][0]["kept"]
    experts = max(fitted["candidates"])
    variants, tables = [], {}
    for mean in means:
        budgets = allocate_routed(sensitivity, mean, kept, experts)
        tables[f"{mean:g}"] = budgets
        variants.append(Variant("calibrated", f"{mean:g}",
                                calibrated_policy([(batch, budgets)], experts)))
    return variants, {"sensitivity_nats": sensitivity, "kept": kept, "tables": tables,
                      "candidates": fitted["candidates"]}


def measure_speed(model: str, variants: list[Variant], batch: int, draws: int, reps: int
                  ) -> dict[str, dict[str, Any]]:
    """moe_layer rows (by variant label) on ``model``'s widened shape, fp32."""
    import torch

    from benchmark.moe_layer import bench_shape_batch
    from benchmark.moe_shapes import SHAPES, MoeLayerBench
    from benchmark.routing_data import draw_batches, reference_logits

    (shape,) = [s for s in SHAPES if s.name == f"{model}-wide16"]
    logits = reference_logits(model)
    assert logits is not None, f"{model} checkpoint missing"
    bench = MoeLayerBench(shape, torch.float32)
    draws = max(draws, logits.shape[0]) // logits.shape[0] * logits.shape[0]
    batches = draw_batches(logits, batch, draws, seed=1, every_layer=True)
    rows = bench_shape_batch(bench, variants, batches, batch, reps, seed=batch)
    return {f"{r['policy']}:{r['knob']}": r for r in rows}


def measure_quality(model: str, variants: list[Variant], batch: int, windows: int
                    ) -> dict[str, float]:
    """Held-out code perplexity rise per variant label."""
    import torch

    from benchmark.accuracy import code_scores, compare_code
    from lynx.reference.loading import load_reference

    net, tok = load_reference(models_dir() / model, dtype=torch.float32)
    stock = code_scores(net, tok, OFF, batch, windows, 128)
    return {v.label: compare_code(stock, code_scores(net, tok, v, batch, windows, 128))["ppl_rise"]
            for v in variants}


def mark_frontier(points: list[dict[str, Any]]) -> None:
    """``frontier`` = no other point is at least as fast with at most the perplexity rise and
    strictly better in one of the two."""
    for p in points:
        p["frontier"] = not any(
            q is not p and q["speedup"] >= p["speedup"] and q["ppl_rise"] <= p["ppl_rise"]
            and (q["speedup"] > p["speedup"] or q["ppl_rise"] < p["ppl_rise"]) for q in points)


PUBLISHED_POLICIES = ("budget", "affinity", "piggyback")


def curve_at(curve: list[dict[str, Any]], ppl_rise: float) -> float | None:
    """Speedup of a curve (points sorted by perplexity rise) at ``ppl_rise``, linear between
    its points; None outside its range."""
    for lo, hi in pairwise(curve):
        if lo["ppl_rise"] <= ppl_rise <= hi["ppl_rise"]:
            span = hi["ppl_rise"] - lo["ppl_rise"]
            w = 0.0 if span <= 0 else (ppl_rise - lo["ppl_rise"]) / span
            return float(lo["speedup"] + w * (hi["speedup"] - lo["speedup"]))
    return None


def mark_above_published(points: list[dict[str, Any]]) -> None:
    """``above_published`` on each published point in the calibrated curve's range (its
    envelope: the calibrated points no less-damaging calibrated point outruns)."""
    cal = sorted((p for p in points if p["policy"] == "calibrated"), key=lambda p: p["ppl_rise"])
    envelope = [p for i, p in enumerate(cal) if all(q["speedup"] < p["speedup"]
                                                    for q in cal[:i])]
    for p in points:
        if p["policy"] in PUBLISHED_POLICIES:
            at = curve_at(envelope, p["ppl_rise"])
            p["above_published"] = None if at is None else bool(at >= p["speedup"])


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    started = time.time()
    from lynx.serving.models import moe_shape, read_config

    _, experts, top_k = moe_shape(read_config(models_dir() / args.model))
    variants = policy_grid(experts, top_k, args.quick)
    uniform = {int(m) for m in args.means} - {v.knob for v in variants if v.policy == "budget"}
    variants += [budget_variant(m) for m in sorted(uniform) if top_k <= m < experts]
    calibrated, calibration = calibrated_variants(args.model, args.batch, args.means)
    variants += calibrated
    quality = measure_quality(args.model, variants, args.batch, args.windows)
    speed = measure_speed(args.model, variants, args.batch, args.draws, args.reps)
    points = [{"policy": v.policy, "knob": v.knob, "speedup": speed[v.label]["speedup"],
               "bound": speed[v.label]["bound"], "experts_kept": speed[v.label]["experts_kept"],
               "experts_stock": speed[v.label]["experts_stock"],
               "ppl_rise": rounded(quality[v.label], 5),
               "default": speed[v.label]["default"]} for v in variants]
    mark_frontier(points)
    mark_above_published(points)
    return {"model": args.model, "shape": f"{args.model}-wide16 fp32", "batch": args.batch,
            "windows": args.windows, "draws": args.draws, "reps": args.reps,
            "ppl_budget": PPL_BUDGET, "speed_target": SPEED_TARGET, "calibration": calibration,
            "points": points, "elapsed_s": round(time.time() - started, 1)}


def best_within_budget(result: dict[str, Any]) -> dict[str, Any] | None:
    ok = [p for p in result["points"] if p["ppl_rise"] <= result["ppl_budget"]]
    return max(ok, key=lambda p: p["speedup"]) if ok else None


def markdown(result: dict[str, Any]) -> str:
    """The RESULTS.md section of a finished run."""
    best = best_within_budget(result)
    verdict = ("no policy stays within the perplexity budget" if best is None else
               f"best within <= {100 * result['ppl_budget']:g}% perplexity: "
               f"{best['policy']}:{best['knob']} at {best['speedup']:.2f}x "
               f"({100 * best['ppl_rise']:+.2f}%; target >= {result['speed_target']:g}x)")
    on_frontier = sorted({p["policy"] for p in result["points"] if p["frontier"]})
    judged = [p for p in result["points"] if p.get("above_published") is not None]
    below = [f"{p['policy']}:{p['knob']}" for p in judged if not p["above_published"]]
    dominance = (f"The calibrated curve is at least as fast as {len(judged) - len(below)} of the "
                 f"{len(judged)} budget/affinity/piggyback points within its perplexity range"
                 + (f" (not: {', '.join(below)})" if below else "") + ".")
    rows = sorted(result["points"], key=lambda p: (p["policy"], -p["speedup"]))
    return (f"\n## Frontier (MoE-layer speedup vs perplexity, B={result['batch']})\n\n"
            f"{result['model']}: speed on {result['shape']}, held-out code perplexity on the "
            f"model itself (`python benchmark/frontier.py`). {verdict}. Policies with a point "
            f"on the frontier: {', '.join(on_frontier)}. {dominance}\n\n"
            "![frontier](results/frontier_layer.png)\n\n" + markdown_table(
                ["policy:knob", "speedup", "bound", "experts kept / stock", "ppl rise",
                 "frontier"],
                [[f"{p['policy']}:{p['knob']}", f"{p['speedup']:.2f}x", f"{p['bound']:.2f}x",
                  f"{p['experts_kept']:.1f} / {p['experts_stock']:.1f}",
                  f"{100 * p['ppl_rise']:+.2f}%", "yes" if p["frontier"] else ""]
                 for p in rows]) + "\n")


def plot(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {"budget": "C0", "affinity": "C2", "piggyback": "C1", "coverage": "C3",
              "calibrated": "C4"}
    for policy, color in colors.items():
        pts = sorted((p for p in result["points"] if p["policy"] == policy),
                     key=lambda p: p["ppl_rise"])
        if pts:
            ax.plot([100 * p["ppl_rise"] for p in pts], [p["speedup"] for p in pts], "o-",
                    color=color, label=policy)
    ax.axvline(100 * result["ppl_budget"], color="grey", ls=":", label="quality budget")
    ax.axhline(result["speed_target"], color="grey", ls="--", label="speed target")
    for key, label in (("oea_layer_qwen3_30b", "OEA paper: Qwen3-30B, B=16, GPU"),
                       ("oea_layer_qwen3_235b", "OEA paper: Qwen3-235B, B=16, GPU")):
        ax.axhline(PUBLISHED[key], color="C1", ls=":", lw=1,
                   label=f"{label} ({PUBLISHED[key]:.2f}x)")
    ax.set_xscale("symlog", linthresh=1.0)
    ticks = [0, 0.25, 0.5, 1, 2, 5, 10]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.set_xlabel("held-out code perplexity rise [%]")
    ax.set_ylabel("MoE-layer speedup (stock / Lynx)")
    ax.set_title(f"{result['model']}, B={result['batch']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def target_row(result: dict[str, Any]) -> list[str]:
    """The issue's frontier target next to the measured value (RESULTS.md's target table)."""
    best = best_within_budget(result)
    judged = [p for p in result["points"] if p.get("above_published") is not None]
    above = sum(1 for p in judged if p["above_published"])
    return [f">= {result['speed_target']:g}x MoE-layer speedup at <= "
            f"{100 * result['ppl_budget']:g}% ppl, B={result['batch']}, {result['model']} "
            "(fp32); frontier above budget/affinity/piggyback",
            ("none within the budget" if best is None else
             f"{best['speedup']:.2f}x ({best['policy']}:{best['knob']}, "
             f"{100 * best['ppl_rise']:+.2f}%)") +
            f"; calibrated curve at least as fast as {above} of {len(judged)} published points "
            "in its range"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen3-moe-128")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--means", default="24,32,40,48,56,64,72,80",
                        help="mean experts per layer: calibrated tables and uniform budgets")
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--draws", type=int, default=16)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--quick", action="store_true", help="fewer knobs")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "frontier.json")
    args = parser.parse_args(argv)
    args.means = [float(m) for m in args.means.split(",") if m]
    result = run(args)
    print(markdown(result))
    write_json(args.out, result)
    png = plot(result, args.out.with_name("frontier_layer.png"))
    print(f"[frontier] wrote {args.out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

