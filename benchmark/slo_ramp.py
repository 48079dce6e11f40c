"""SLO experiment: a load ramp against SGLang + Lynx with the controller in ``off``, a fixed
aggressive ``static`` policy and ``adaptive`` mode.

    python benchmark/slo_ramp.py [--quick] [--model qwen3-moe-mini] [--slo-ms auto]

The widened float32 reference model is served with the Lynx plugin, steered by the real
controller (``lynx-policy``, SLO on P99 inter-token latency read from the runtime's own
``/metrics``). Closed-loop streaming clients ramp up and back down (``--stages``, each
``--stage-s`` seconds). Over windows of ``--window-s`` seconds: P99 ITL of the tokens streamed
in the window, output tokens, and the mean experts kept per pruned layer-step (plugin counters).
- ``slo_attainment`` = share of windows whose P99 ITL <= SLO;
- ``throughput_within_slo`` = output tokens streamed in windows that met the SLO / ramp time.
Every mode runs ``--reps`` ramps, modes rotated between repetitions; the numbers are means.
``--slo-ms auto``: 0.85 x the P99 ITL of plugin-off serving at the ramp's peak concurrency
(measured first), so unreduced serving misses the SLO at the peak and meets it at low load.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmark.common import (
    OFF,
    RESULTS_DIR,
    budget_variant,
    machine_description,
    models_dir,
    percentile,
    rounded,
    write_json,
)
from benchmark.loadgen import RequestTiming, stream_generate
from benchmark.serving_pair import ServingPair, metric_value

MODES = ("off", "static", "adaptive")


def controller_overrides(top_k: int, num_experts: int) -> dict[str, Any]:
    """Controller settings for a ramp of seconds, not minutes (fast loop, short windows)."""
    return {"observe": {"rate_window_s": 4.0},
            "loop": {"interval_s": 1.0, "backoff_s": [1.0, 2.0], "stats_window_s": 5.0},
            "adaptive": {"min_batch": 4, "step_experts": max(1, num_experts // 8),
                         "tighten_after_ticks": 2, "relax_after_ticks": 3,
                         "buckets": [3, 8, 16, 32, 64, 4096]},
            "floor": {"min_budget": top_k}}


async def _ramp(url: str, prompts: list[str], stages: list[int], stage_s: float,
                output_len: int, sample: Any, target: dict[str, int]
                ) -> tuple[list[RequestTiming], list[dict]]:
    target["value"] = stages[0]
    timings: list[RequestTiming] = []
    timeline: list[dict[str, Any]] = []
    done = asyncio.Event()
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0),
                                 limits=httpx.Limits(max_connections=max(stages) + 4)) as client:
        async def worker(index: int) -> None:
            n = index
            while not done.is_set():
                if index >= target["value"]:
                    await asyncio.sleep(0.05)
                    continue
                timings.append(await stream_generate(client, url, prompts[n % len(prompts)],
                                                     output_len))
                n += max(stages)

        async def schedule() -> None:
            for value in stages:
                target["value"] = value
                await asyncio.sleep(stage_s)
            done.set()

        async def poll() -> None:
            while not done.is_set():
                timeline.append({"t": time.perf_counter(), "target": target["value"],
                                 **await asyncio.to_thread(sample)})
                await asyncio.sleep(1.0)

        await asyncio.gather(schedule(), poll(), *(worker(i) for i in range(max(stages))))
    return timings, timeline


def windows(timings: list[RequestTiming], timeline: list[dict[str, Any]], start: float,
            end: float, window_s: float, slo_ms: float) -> list[dict[str, Any]]:
    out = []
    t = start
    while t < end - 1e-9:
        hi = min(t + window_s, end)
        gaps = [g for r in timings for g, at in zip(r.itl_s, r.itl_at_s, strict=True)
                if t <= at < hi]
        tokens = sum(1 for r in timings for at in r.chunk_times_s if t <= at < hi)
        points = [p for p in timeline if t <= p["t"] < hi]
        kept = [p["experts_kept"] for p in points if p.get("experts_kept") is not None]
        p99 = percentile(gaps, 99) * 1e3 if gaps else None
        out.append({"t0_s": rounded(t - start, 2), "t1_s": rounded(hi - start, 2),
                    "target_concurrency": points[-1]["target"] if points else None,
                    "itl_p99_ms": rounded(p99, 2) if p99 is not None else None,
                    "tokens": tokens, "meets_slo": p99 is not None and p99 <= slo_ms,
                    "experts_kept": rounded(sum(kept) / len(kept), 3) if kept else None,
                    "budget": points[-1].get("budget") if points else None})
        t = hi
    return out


def make_sampler(pair: ServingPair, target: dict[str, int]) -> Any:
    """Per second: mean experts kept per pruned layer-step since the last sample (plugin
    counters) and the controller's budget for the current concurrency."""
    from lynx_protocol.policy import PolicySpec, bucket_for

    last: dict[str, float] = {}

    def sample() -> dict[str, Any]:
        kept = metric_value(pair.lynx.url, "lynx_experts_kept_total")
        steps = metric_value(pair.lynx.url, "lynx_layer_pruned_steps_total")
        d_kept, d_steps = kept - last.get("kept", kept), steps - last.get("steps", steps)
        last.update(kept=kept, steps=steps)
        budget = None
        try:
            import msgspec

            view = pair.controller.admin.get("/v1/policy").json()["effective_policy"]
            spec = msgspec.convert(view, PolicySpec)
            bucket = bucket_for(spec, max(1, target["value"])) if spec.name == "budget" else None
            budget = bucket.budget_for_layer(0) if bucket is not None else None
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        kept_mean = d_kept / d_steps if d_steps > 0 and d_kept > 0 else None  # torn reads: skip
        return {"experts_kept": kept_mean, "budget": budget}

    return sample


def run_mode(pair: ServingPair, mode: str, num_experts: int, top_k: int, args: Any,
             slo_ms: float) -> dict[str, Any]:
    pair.set_policy(budget_variant(top_k) if mode == "static" else OFF)
    if mode != "static":
        pair.set_mode(mode)
    from benchmark.e2e_decode import prompts_for_load

    target: dict[str, int] = {}
    start = time.perf_counter()
    timings, timeline = asyncio.run(_ramp(pair.lynx.url, prompts_for_load(), args.stages,
                                          args.stage_s, args.output_len,
                                          make_sampler(pair, target), target))
    end = start + len(args.stages) * args.stage_s
    wins = windows(timings, timeline, start, end, args.window_s, slo_ms)
    good_tokens = sum(w["tokens"] for w in wins if w["meets_slo"])
    all_tokens = sum(w["tokens"] for w in wins)
    duration = end - start
    pair.set_mode("static")
    return {"mode": mode, "throughput_within_slo": rounded(good_tokens / duration, 3),
            "slo_attainment": rounded(sum(w["meets_slo"] for w in wins) / len(wins), 4),
            "throughput": rounded(all_tokens / duration, 3),
            "requests_completed": sum(1 for t in timings if t.ok),
            "requests_failed": sum(1 for t in timings if not t.ok), "windows": wins}


def aggregate(mode: str, results: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over repetitions; the first repetition's windows are kept for the plot."""
    def mean(key: str) -> float:
        return rounded(sum(r[key] for r in results) / len(results), 4)

    return {"mode": mode, "throughput_within_slo": mean("throughput_within_slo"),
            "slo_attainment": mean("slo_attainment"), "throughput": mean("throughput"),
            "requests_completed": sum(r["requests_completed"] for r in results),
            "requests_failed": sum(r["requests_failed"] for r in results),
            "per_rep": [{k: r[k] for k in ("throughput_within_slo", "slo_attainment",
                                           "throughput")} for r in results],
            "windows": results[0]["windows"],
            "rep_windows": [r["windows"] for r in results[1:]]}


def calibrate_slo(pair: ServingPair, peak: int, output_len: int, seconds: float) -> float:
    from benchmark.e2e_decode import prompts_for_load

    pair.set_policy(OFF)
    timings, _ = asyncio.run(_ramp(pair.lynx.url, prompts_for_load(), [peak], seconds,
                                   output_len, dict, {}))
    gaps = [g for t in timings for g in t.itl_s]
    return round(0.85 * percentile(gaps, 99) * 1e3, 1)


def run(pair: ServingPair, model: str, num_experts: int, top_k: int, args: Any
        ) -> dict[str, Any]:
    peak = max(args.stages)
    slo_ms = (calibrate_slo(pair, peak, args.output_len, args.stage_s)
              if args.slo_ms == "auto" else float(args.slo_ms))
    pair.put("/v1/slo", {"targets": [{"metric": "itl", "quantile": 0.99, "target_ms": slo_ms}]})
    print(f"[slo] {model}: SLO P99 ITL <= {slo_ms} ms, ramp {args.stages} x {args.stage_s}s",
          flush=True)
    per_mode: dict[str, list[dict[str, Any]]] = {mode: [] for mode in args.modes}
    for rep in range(args.reps):  # modes in a rotated order per repetition
        shift = rep % len(args.modes)
        for mode in args.modes[shift:] + args.modes[:shift]:
            result = run_mode(pair, mode, num_experts, top_k, args, slo_ms)
            per_mode[mode].append(result)
            print(f"[slo] rep {rep} {mode}: attainment {result['slo_attainment']:.2f}, "
                  f"within-SLO {result['throughput_within_slo']:.1f} tok/s of "
                  f"{result['throughput']:.1f}", flush=True)
    runs = [aggregate(mode, results) for mode, results in per_mode.items()]
    return {"model": model, "served": pair.model_path.name, "slo_ms": slo_ms,
            "stages": args.stages, "stage_s": args.stage_s, "window_s": args.window_s,
            "reps": args.reps,
            "static_policy": budget_variant(top_k).label, "runs": runs}


def plot(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    for run in result["runs"]:
        wins = run["windows"]
        mid = [(w["t0_s"] + w["t1_s"]) / 2 for w in wins]
        axes[0].plot(mid, [w["itl_p99_ms"] for w in wins], marker="o", label=run["mode"])
        axes[1].plot(mid, [w["experts_kept"] for w in wins], marker="o", label=run["mode"])
        axes[2].plot(mid, [w["tokens"] / (w["t1_s"] - w["t0_s"]) for w in wins], marker="o",
                     label=run["mode"])
    axes[0].axhline(result["slo_ms"], color="red", ls="--", label="SLO")
    axes[0].set_ylabel("P99 ITL [ms]")
    axes[1].set_ylabel("experts kept / pruned layer-step\n(off: none pruned)")
    axes[2].set_ylabel("output tok/s")
    axes[2].set_xlabel("time [s]")
    ramp = axes[2].twinx()
    wins = result["runs"][0]["windows"]
    ramp.step([w["t0_s"] for w in wins] + [wins[-1]["t1_s"]],
              [w["target_concurrency"] for w in wins] + [wins[-1]["target_concurrency"]], "k:",
              where="post", label="concurrency")
    ramp.set_ylabel("concurrency (dotted)")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.suptitle(f"SLO ramp on {result['served']}: off vs static vs adaptive controller "
                 "(first repetition)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default="qwen3-moe-mini")
    parser.add_argument("--widen", type=int, default=16)
    parser.add_argument("--slo-ms", default="auto")
    parser.add_argument("--stages", default="")
    parser.add_argument("--stage-s", type=float, default=None)
    parser.add_argument("--window-s", type=float, default=None)
    parser.add_argument("--output-len", type=int, default=None)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--reps", type=int, default=None,
                        help="ramps per mode, modes rotated (default: quick 1, full 2)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "slo_ramp.json")
    args = parser.parse_args(argv)
    args.stages = [int(s) for s in args.stages.split(",") if s] or (
        [4, 32, 4] if args.quick else [1, 4, 8, 16, 32, 48, 64, 48, 32, 16, 8, 4, 1])
    args.stage_s = args.stage_s or (6.0 if args.quick else 8.0)
    args.reps = args.reps or (1 if args.quick else 2)
    args.window_s = args.window_s or (3.0 if args.quick else 5.0)
    args.output_len = args.output_len or (16 if args.quick else 32)
    args.modes = [m for m in args.modes.split(",") if m]
    return args


def main(argv: list[str] | None = None) -> int:
    from benchmark.e2e_decode import widened
    from lynx.serving.models import moe_shape, read_config

    args = parse_args(argv)
    if not (models_dir() / args.model / "config.json").is_file():
        print(f"slo_ramp: no checkpoint {args.model} under {models_dir()}", file=sys.stderr)
        return 2
    _, experts, top_k = moe_shape(read_config(models_dir() / args.model))
    with ServingPair.launch(widened(args.model, args.widen),
                            controller_overrides=controller_overrides(top_k, experts)) as pair:
        result = run(pair, args.model, experts, top_k, args)
    result["machine"] = machine_description()
    write_json(args.out, result)
    png = plot(result, args.out.with_suffix(".png"))
    print(f"[slo] wrote {args.out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
