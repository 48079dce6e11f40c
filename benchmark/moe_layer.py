"""MoE-layer microbenchmark: SGLang's own CPU MoE path, stock routing vs Lynx, per decode batch.

    python benchmark/moe_layer.py [--quick] [--tiny] [--out benchmark/results/moe_layer.json]

What one "layer" is, exactly as SGLang's CPU engine runs it on a machine without AMX:
- stock: ``select_experts`` (torch-native softmax top-k) then ``moe_forward_native`` (loops over
  experts, skips experts no token routes to: fewer distinct experts = fewer weights read);
- Lynx: the per-layer selection step the plugin runs in SGLang's TopK hook
  (``lynx.selection.select_layer_step``: keep set, routing, statistics; compiled by AOTInductor as
  the plugin runs it once warm, `lynx.selection.compiled`; compiled untimed before the reps),
  its routing merged into ``select_experts``' output, then the same ``moe_forward_native``.
Expert weights are random bf16 (values do not matter for time); router logits are real routing
of the trained reference models where E and k match, else the skewed synthetic distribution of
``benchmark.routing_data`` (the ``logits`` field says which).

Per shape and batch, ``--draws`` decode batches are timed as one pass; stock, every policy/knob
and every selection-only pass run round-robin in a shuffled order for ``--reps`` repetitions
(one process, ``--threads`` torch threads); times are medians per pass / draws.
- ``speedup`` = stock_ms / lynx_ms; ``experts_*`` = mean distinct experts the layer computes;
- ``bound`` = sum of stock unions / sum of kept unions over the draws (expert weights read);
- ``fraction_of_bound`` = speedup / bound (1.0 = every saved expert turned into saved time);
  ``gain_fraction`` = (speedup - 1) / (bound - 1), the stricter share of the possible gain
  (null where bound < 1.02);
- ``overhead_share`` = time of the (compiled) selection step alone / Lynx layer time;
  ``select_eager_ms``: the eager specification's time, for the default operating point.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmark.common import (
    RESULTS_DIR,
    Variant,
    default_variant,
    interleaved_medians,
    machine_description,
    policy_grid,
    rounded,
    selection_knobs,
    write_json,
)
from benchmark.moe_shapes import (
    BF16_SHAPES,
    QUICK_SHAPES,
    SHAPES,
    MoeLayerBench,
    Shape,
    knobs_policy,
)
from benchmark.routing_data import SyntheticSkew, draw_batches, reference_logits

BATCHES = (1, 4, 8, 16, 32, 64)


def _distinct(topk_output: Any) -> int:
    return int(torch.unique(topk_output.topk_ids).numel())


def _top1_kept(stock: Any, routed: Any) -> int:
    """Rows whose stock top-1 expert (largest stock weight) is still among their routed ids."""
    top1 = stock.topk_ids.long().gather(1, stock.topk_weights.argmax(-1, keepdim=True))
    return int((routed.topk_ids.long() == top1).any(-1).sum())


def bench_shape_batch(bench: MoeLayerBench, variants: list[Variant], draws: list[Any],
                      batch: int, reps: int, seed: int) -> list[dict[str, Any]]:
    """Rows for every variant at one (shape, batch)."""
    gen = torch.Generator().manual_seed(seed)
    inputs = [(layer, torch.randn(batch, bench.shape.hidden, generator=gen).to(bench.dtype), z)
              for layer, z in draws]
    stock_union = [_distinct(bench.route(x, z)) for _, x, z in inputs]
    runs: dict[str, Callable[[], None]] = {}

    def stock_pass() -> None:
        for _, x, z in inputs:
            bench.experts(x, bench.route(x, z))

    runs["stock"] = stock_pass
    own_ids = [bench.route(x, z).topk_ids for _, x, z in inputs]  # SGLang's, for select_pass
    meta: dict[str, tuple[Variant, list[int], list[int]]] = {}
    for variant in variants:
        by_layer = {layer: bench.knobs(variant, batch, layer) for layer, _, _ in inputs}

        def routed(layer: int, x: torch.Tensor, z: torch.Tensor,
                   by_layer: dict[int, tuple[Any, bool]] = by_layer) -> Any:
            knobs, prune = by_layer[layer]
            return bench.route_lynx(knobs, x, z) if prune else bench.route(x, z)

        outputs = [routed(*item) for item in inputs]
        kept = [_distinct(r) for r in outputs]
        top1 = [_top1_kept(bench.route(x, z), r) for (_, x, z), r in zip(inputs, outputs,
                                                                          strict=True)]
        meta[variant.label] = (variant, kept, top1)

        def lynx_pass(routed: Callable[..., Any] = routed) -> None:
            for item in inputs:
                bench.experts(item[1], routed(*item))

        def select_pass(by_layer: dict[int, tuple[Any, bool]] = by_layer,
                        eager: bool = False) -> None:
            for (layer, _, z), ids in zip(inputs, own_ids, strict=True):
                knobs, prune = by_layer[layer]
                if prune:
                    bench.select(knobs, z, ids, eager=eager)

        runs[f"lynx|{variant.label}"] = lynx_pass
        runs[f"select|{variant.label}"] = select_pass
        if variant == default_variant(bench.shape.num_experts, bench.shape.top_k):
            runs[f"eager|{variant.label}"] = partial(select_pass, eager=True)
    medians = interleaved_medians(runs, reps, seed=seed)
    n = len(inputs)
    stock_ms = medians["stock"] / n * 1e3
    rows = []
    for label, (variant, kept, top1) in meta.items():
        lynx_ms = medians[f"lynx|{label}"] / n * 1e3
        select_ms = medians[f"select|{label}"] / n * 1e3
        speedup = stock_ms / lynx_ms
        bound = sum(stock_union) / sum(kept)
        rows.append({
            "shape": bench.shape.name, "E": bench.shape.num_experts, "k": bench.shape.top_k,
            "batch": batch, "policy": variant.policy, "knob": variant.knob,
            "stock_ms": rounded(stock_ms), "lynx_ms": rounded(lynx_ms),
            "speedup": rounded(speedup), "experts_stock": rounded(sum(stock_union) / n, 3),
            "experts_kept": rounded(sum(kept) / n, 3), "bound": rounded(bound),
            "fraction_of_bound": rounded(speedup / bound),
            "gain_fraction": rounded((speedup - 1) / (bound - 1)) if bound >= 1.02 else None,
            "overhead_share": rounded(select_ms / lynx_ms),
            "select_ms": rounded(select_ms, 5),
            "select_eager_ms": rounded(medians[f"eager|{label}"] / n * 1e3, 5)
            if f"eager|{label}" in medians else None,
            "top1_kept_rate": rounded(sum(top1) / (n * batch)),
            "default": variant == default_variant(bench.shape.num_experts, bench.shape.top_k),
        })
    return rows


def logits_for(shape: Shape, synthetic_only: bool, skew: SyntheticSkew
               ) -> tuple[torch.Tensor, str]:
    if shape.logits_from and not synthetic_only:
        real = reference_logits(shape.logits_from)
        if real is not None and real.shape[-1] == shape.num_experts:
            return real, f"real routing of {shape.logits_from} (held-out code + arithmetic)"
    return skew.logits(4, 4096, shape.num_experts), skew.describe()


DTYPE_TAGS = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def warm_up_packages(configs: list[tuple[Shape, torch.dtype]], quick: bool) -> None:
    """Compile the selection packages every configuration will use, two at a time (untimed;
    a cached package is not compiled again)."""
    import os

    from lynx.selection import RouterSpec
    from lynx.selection.compile_worker import compile_packages
    from lynx.selection.compiled import GraphKey, default_cache_dir

    keys = [GraphKey(knobs_policy(selection_knobs(variant, 64, 0, shape.num_experts)),
                     RouterSpec(top_k=shape.top_k, renormalize=True), shape.num_experts,
                     torch.float32, False, False, True)  # fp32 logits in every config
            for shape, _ in configs
            for variant in policy_grid(shape.num_experts, shape.top_k, quick)]
    for error in compile_packages(keys, default_cache_dir(), jobs=min(2, os.cpu_count() or 1)):
        print(f"[moe_layer] selection package not compiled: {error}", flush=True)


def run(configs: list[tuple[Shape, torch.dtype]], batches: list[int], quick: bool, draws: int,
        reps: int, threads: int, synthetic_only: bool = False,
        progress: bool = True) -> dict[str, Any]:
    """Rows for every (shape, dtype) configuration, batch, policy and knob."""
    torch.set_num_threads(threads)
    warm_up_packages(configs, quick)
    skew = SyntheticSkew()
    rows: list[dict[str, Any]] = []
    shape_info = []
    for shape, dtype in configs:
        tag = DTYPE_TAGS[dtype]
        label = f"{shape.name} {tag}"
        logits, source = logits_for(shape, synthetic_only, skew)
        bench = MoeLayerBench(shape, dtype)
        variants = policy_grid(shape.num_experts, shape.top_k, quick)
        weights_mb = (bench.layer.w13_weight.nbytes + bench.layer.w2_weight.nbytes) / 2**20
        shape_info.append({"shape": label, "E": shape.num_experts, "k": shape.top_k,
                           "hidden": shape.hidden, "intermediate": shape.intermediate,
                           "dtype": tag, "expert_weights_mib": round(weights_mb, 1),
                           "logits": source, "note": shape.note,
                           "fine_grained": shape.fine_grained})
        for batch in batches:
            batch_draws = draw_batches(logits, batch, draws, seed=1)
            new = bench_shape_batch(bench, variants, batch_draws, batch, reps, seed=batch)
            for row in new:
                row["shape"] = label
                row["dtype"] = tag
                row["fine_grained"] = shape.fine_grained
                row["logits"] = "real" if source.startswith("real") else "synthetic"
            rows.extend(new)
            if progress:
                best = max(new, key=lambda r: r["speedup"])
                print(f"[moe_layer] {label:27s} B={batch:3d} stock {new[0]['stock_ms']:8.3f} ms"
                      f"  best {best['policy']}:{best['knob']} x{best['speedup']:.2f}"
                      f" (bound {best['bound']:.2f})", flush=True)
        del bench
    return {"machine": machine_description(), "threads": threads, "draws": draws,
            "reps": reps, "batches": batches, "shapes": shape_info, "rows": rows}


def plot(result: dict[str, Any], path: Path) -> Path:
    """Per shape: the default policy, the best knob of each policy per batch, the bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = [s["shape"] for s in result["shapes"]]
    cols = min(3, len(shapes))
    nrows = (len(shapes) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.4 * nrows), squeeze=False)
    colors = {"budget": "C0", "affinity": "C2", "piggyback": "C1", "coverage": "C3"}
    for ax, name in zip(axes.flat, shapes, strict=False):
        rows = [r for r in result["rows"] if r["shape"] == name]
        batches = sorted({r["batch"] for r in rows})
        default = sorted((r for r in rows if r["default"]), key=lambda r: r["batch"])
        ax.plot([r["batch"] for r in default], [r["bound"] for r in default], "k--", lw=1,
                label="bound (default)")
        ax.plot([r["batch"] for r in default], [r["speedup"] for r in default], "r-o", lw=2.5,
                label=f"default {default[0]['policy']}:{default[0]['knob']}" if default else "")
        for policy, color in colors.items():
            best = [max((r["speedup"] for r in rows if r["policy"] == policy
                         and r["batch"] == b), default=None) for b in batches]
            if any(v is not None for v in best):
                ax.plot(batches, best, "-", marker=".", color=color, lw=1,
                        label=f"best {policy} knob")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("decode batch")
        ax.set_ylabel("layer speedup vs stock")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(shapes):]:
        ax.axis("off")
    fig.suptitle("SGLang moe_forward_native on the CPU: Lynx speedup per layer (medians)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer shapes, batches and knobs")
    parser.add_argument("--tiny", action="store_true",
                        help="hidden sizes /8 on top (smoke test: seconds, not minutes)")
    parser.add_argument("--shapes", default="", help="comma-separated shape names (default: all)")
    parser.add_argument("--batches", default="", help="comma-separated decode batch sizes")
    parser.add_argument("--draws", type=int, default=None)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtypes", default="",
                        help="float32,bfloat16 (default: float32 for every shape, bfloat16 for "
                             "BF16_SHAPES; quick: float32 only)")
    parser.add_argument("--synthetic-only", action="store_true",
                        help="never load a reference checkpoint (synthetic logits everywhere)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "moe_layer.json")
    args = parser.parse_args(argv)
    names = [s for s in args.shapes.split(",") if s] or (
        list(QUICK_SHAPES) if args.quick else [s.name for s in SHAPES])
    by_name = {s.name: s for s in SHAPES}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        parser.error(f"unknown shape(s) {unknown}; known: {list(by_name)}")
    shapes = [by_name[n].scaled(8) if args.tiny else by_name[n] for n in names]
    if args.dtypes:
        dtypes = [getattr(torch, d) for d in args.dtypes.split(",") if d]
        args.configs = [(shape, dtype) for dtype in dtypes for shape in shapes]
    else:
        args.configs = [(shape, torch.float32) for shape in shapes]
        if not args.quick:
            args.configs += [(s, torch.bfloat16) for s in shapes if s.name in BF16_SHAPES]
    args.batches = [int(b) for b in args.batches.split(",") if b] or (
        [1, 16, 64] if args.quick else list(BATCHES))
    args.draws = args.draws or (6 if args.quick else 8)
    args.reps = args.reps or (3 if args.quick else 5)
    return args


def run_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Run, write the JSON and the PNG, return the result."""
    result = run(args.configs, args.batches, args.quick, args.draws, args.reps, args.threads,
                 args.synthetic_only)
    write_json(args.out, result)
    png = plot(result, args.out.with_suffix(".png"))
    print(f"[moe_layer] wrote {args.out} and {png}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    run_from_args(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
