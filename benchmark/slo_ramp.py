"""SLO experiments: stock (``off``) vs the best fixed budget tables vs the ``adaptive``
controller, under a load ramp and a load step, on one SGLang + Lynx server.

    python benchmark/slo_ramp.py [--quick] [--model qwen3-moe-mini] [--slo-ms auto] [--reps 3]

1. Quality sweep (`benchmark.slo_quality`): the static budget tables within the quality budget
   (<= 2% perplexity rise, <= 1 pt exact-match loss at the ramp's peak batch); the smallest
   of them is the adaptive controller's quality floor, the ``--statics`` smallest are ramped.
2. ``lynx-policy profile`` seeds the controller's latency model (budgets x concurrencies).
3. ``--slo-ms auto``: 0.85 x the P99 ITL of stock serving at the ramp's peak.
4. ``--reps`` repetitions, the modes rotated within each: a ramp of ``--stages`` x
   ``--stage-s`` seconds; then (adaptive) a step load 4 -> 48 -> 4 streams.
Per ramp and window of ``--window-s``: P99 ITL of the client-side inter-token gaps, output
tokens; ``throughput_within_slo`` = tokens of windows meeting the SLO / ramp time,
``slo_attainment`` = share of windows meeting it; routing mass kept and experts kept from the
plugin's counters. Means over repetitions with 95% confidence intervals (Student t), ratios
paired per repetition.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmark import slo_load, slo_quality
from benchmark.common import (
    OFF,
    RESULTS_DIR,
    budget_variant,
    machine_description,
    mean_ci,
    models_dir,
    percentile,
    rounded,
    write_json,
)
from benchmark.serving_pair import ServingPair


def prompts_for_load(count: int = 64) -> list[str]:
    """The SLO runs' prompts: held-out 3-digit additions (decode cost does not depend on them)."""
    from lynx.reference.tasks import arithmetic_prompt, heldout_problems

    return [arithmetic_prompt(a, b) for a, b in heldout_problems(count)]


def controller_overrides(top_k: int, num_experts: int) -> dict[str, Any]:
    """Controller settings for runs of seconds, not minutes (1 s loop, 4 s windows)."""
    return {"observe": {"rate_window_s": 4.0},
            "loop": {"interval_s": 1.0, "backoff_s": [1.0, 2.0], "stats_window_s": 5.0},
            "adaptive": {"max_step_experts": max(1, num_experts // 2), "relax_after_ticks": 3,
                         "margin": 0.1, "headroom": 0.2, "min_batch": 4,
                         "step_experts": max(1, num_experts // 8), "tighten_after_ticks": 2},
            "floor": {"min_budget": top_k}}


def make_sampler(pair: ServingPair, target: dict[str, int]) -> Any:
    """Per poll: experts kept per pruned layer-step since the last poll, the pruned decode
    step counter, and the controller's budget for the current concurrency."""
    import msgspec

    from lynx_protocol.policy import PolicySpec, bucket_for

    last: dict[str, float] = {}

    def sample() -> dict[str, Any]:
        c = slo_load.counters(pair.lynx.url)
        kept, steps = c["lynx_experts_kept_total"], c["lynx_layer_pruned_steps_total"]
        d_kept, d_steps = kept - last.get("kept", kept), steps - last.get("steps", steps)
        last.update(kept=kept, steps=steps)
        budget = None
        try:
            view = pair.controller.admin.get("/v1/policy").json()["effective_policy"]
            spec = msgspec.convert(view, PolicySpec)
            bucket = bucket_for(spec, max(1, target.get("value", 1))) \
                if spec.name == "budget" else None
            budget = bucket.budget_for_layer(0) if bucket is not None else None
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        return {"experts_kept": d_kept / d_steps if d_steps > 0 and d_kept > 0 else None,
                "budget": budget, "pruned_steps": c["pruned_decode_steps"]}

    return sample


def apply_mode(pair: ServingPair, mode: str) -> None:
    if mode.startswith("static:"):
        pair.set_policy(budget_variant(int(mode.split(":")[1])))
    else:
        pair.set_policy(OFF)
        if mode == "adaptive":
            pair.set_mode("adaptive")


def run_ramp(pair: ServingPair, mode: str, args: Any, slo_ms: float, layers: int
             ) -> dict[str, Any]:
    apply_mode(pair, mode)
    stages = [(c, args.stage_s) for c in args.stages]
    target: dict[str, int] = {}
    before = slo_load.counters(pair.lynx.url)
    start, timings, timeline = slo_load.run_schedule(
        pair.lynx.url, prompts_for_load(), stages, args.output_len, make_sampler(pair, target))
    quality = slo_load.quality_of_run(before, slo_load.counters(pair.lynx.url), layers)
    end = start + sum(s for _, s in stages)
    wins = slo_load.windows(timings, timeline, start, end, args.window_s, slo_ms)
    duration = end - start
    pair.set_mode("static")
    return {"mode": mode,
            "throughput_within_slo": rounded(sum(w["tokens"] for w in wins if w["meets_slo"])
                                             / duration, 3),
            "slo_attainment": rounded(sum(w["meets_slo"] for w in wins) / len(wins), 4),
            "throughput": rounded(sum(w["tokens"] for w in wins) / duration, 3),
            "requests_completed": sum(1 for t in timings if t.ok),
            "requests_failed": sum(1 for t in timings if not t.ok), **quality,
            "windows": wins}


def run_step(pair: ServingPair, args: Any, slo_ms: float) -> dict[str, Any]:
    apply_mode(pair, "adaptive")
    stages = [(args.step_low, 8.0), (args.step_high, args.step_high_s), (args.step_low, 15.0)]
    target: dict[str, int] = {}
    start, timings, timeline = slo_load.run_schedule(
        pair.lynx.url, prompts_for_load(), stages, args.output_len, make_sampler(pair, target),
        poll_s=0.5)
    pair.set_mode("static")
    return slo_load.step_response(timings, timeline, start, stages, slo_ms)


def profile(pair: ServingPair, top_k: int, floor: int, quick: bool) -> dict[str, Any]:
    """``lynx-policy profile`` (the operator's command) against this server and controller.
    Quick mode profiles 4 s per budget (2 s left the fitted cost per expert at 0, "NOT
    ready", in 3 of 5 quick runs on a slow 2026-12-07 machine)."""
    budgets = ["off", str(floor)] if quick else ["off", str(2 * floor), str(floor)]
    concurrency = "4,32" if quick else "1,8,24,48"
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "lynx_policy.cli", "profile", "--admin-url",
         pair.controller.admin_url, "--server-url", pair.lynx.url, "--budgets",
         ",".join(budgets), "--concurrency", concurrency, "--seconds", "4" if quick else "5",
         "--reset"], env={**os.environ, "LYNX_ADMIN_TOKEN": pair.controller.token},
        capture_output=True, text=True, timeout=900)
    print(proc.stdout + proc.stderr, end="", flush=True)
    view = pair.controller.admin.get("/v1/model").json()
    return {"seconds": round(time.time() - t0, 1), "rc": proc.returncode,
            "budgets": budgets, "concurrency": concurrency,
            "replicas": {r: v["fit"] for r, v in view["replicas"].items()}}


def calibrate_slo(pair: ServingPair, peak: int, output_len: int, seconds: float) -> float:
    pair.set_policy(OFF)
    _, timings, _ = slo_load.run_schedule(pair.lynx.url, prompts_for_load(), [(peak, seconds)],
                                          output_len, dict)
    return round(0.85 * percentile([g for t in timings for g in t.itl_s], 99) * 1e3, 1)


def summarize(runs: list[dict[str, Any]], modes: list[str]) -> dict[str, Any]:
    by_mode = {m: [r for r in runs if r["mode"] == m] for m in modes}
    table = {m: {k: mean_ci([r[k] for r in rs if r.get(k) is not None])
                 for k in ("throughput_within_slo", "slo_attainment", "throughput",
                           "routing_mass_kept", "experts_kept_mean")}
             for m, rs in by_mode.items()}
    statics = [m for m in modes if m.startswith("static:")]
    best = max(statics, key=lambda m: table[m]["throughput_within_slo"]["mean"] or 0.0,
               default=None)
    ratios = {}
    for name, base in (("adaptive_vs_off", "off"), ("adaptive_vs_best_static", best)):
        if base is None or "adaptive" not in by_mode:
            continue
        pairs = [a["throughput_within_slo"] / b["throughput_within_slo"]
                 for a, b in zip(by_mode["adaptive"], by_mode[base], strict=False)
                 if b["throughput_within_slo"]]
        ratios[name] = {"base": base, **mean_ci(pairs)}
    return {"modes": table, "best_static": best, "ratios": ratios}


def run(pair: ServingPair, model: str, num_experts: int, top_k: int, args: Any
        ) -> dict[str, Any]:
    from lynx.serving.models import moe_shape, read_config

    layers = moe_shape(read_config(models_dir() / model))[0]
    peak = max(args.stages)
    if args.quick:
        quality: list[dict[str, Any]] = []
        statics = [2 * top_k]
    elif args.quality_from:  # an earlier run's sweep of the same model (deterministic)
        import json

        earlier = json.loads(args.quality_from.read_text())
        if earlier["model"] != model or not earlier.get("quality"):
            raise SystemExit(f"{args.quality_from}: no quality sweep of {model}")
        quality = earlier["quality"]
    else:
        quality = slo_quality.sweep(pair, model, slo_quality.static_candidates(num_experts,
                                                                               top_k),
                                    batch=min(peak, 32), problems=128, windows=64,
                                    window_len=128)
    if not args.quick:
        statics = sorted(q["budget"] for q in quality if q["within_budget"]) or [num_experts // 2]
    floor = statics[0]
    pair.put("/v1/floor", {"min_budget": floor})
    prof = profile(pair, top_k, floor, args.quick)
    slo_ms = (calibrate_slo(pair, peak, args.output_len, args.stage_s)
              if args.slo_ms == "auto" else float(args.slo_ms))
    pair.put("/v1/slo", {"targets": [{"metric": "itl", "quantile": 0.99, "target_ms": slo_ms}]})
    modes = ["off", "adaptive", *(f"static:{m}" for m in statics[:args.statics])]
    print(f"[slo] {model}: SLO P99 ITL <= {slo_ms} ms, floor {floor}, modes {modes}",
          flush=True)
    runs, steps = [], []
    for rep in range(args.reps):
        shift = rep % len(modes)
        for mode in modes[shift:] + modes[:shift]:
            result = run_ramp(pair, mode, args, slo_ms, layers)
            runs.append({"rep": rep, **result})
            print(f"[slo] rep {rep} {mode}: attainment {result['slo_attainment']:.2f}, "
                  f"within-SLO {result['throughput_within_slo']:.1f} tok/s, mass kept "
                  f"{result['routing_mass_kept']}", flush=True)
        if args.step_load:
            steps.append(run_step(pair, args, slo_ms))
            print(f"[slo] rep {rep} step load: SLO met {steps[-1]['time_to_slo_s']} s after "
                  f"the jump, pruning stopped {steps[-1]['time_to_unprune_s']} s after the "
                  "drop", flush=True)
    step_load = None
    if steps:
        met = [s["time_to_slo_s"] for s in steps if s["time_to_slo_s"] is not None]
        step_load = {"interval_s": 1.0, "low": args.step_low, "high": args.step_high,
                     "time_to_slo_s": max(met) if len(met) == len(steps) else None,
                     "time_to_unprune_s": max(s["time_to_unprune_s"] for s in steps),
                     "reps": steps}
    return {"model": model, "served": pair.model_path.name, "slo_ms": slo_ms,
            "stages": args.stages, "stage_s": args.stage_s, "window_s": args.window_s,
            "reps": args.reps, "quality": quality, "floor_budget": floor, "profile": prof,
            "runs": runs, **summarize(runs, modes), "step_load": step_load}


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
    parser.add_argument("--reps", type=int, default=None, help="default: quick 1, full 3")
    parser.add_argument("--statics", type=int, default=2,
                        help="ramp the N smallest static budgets within the quality budget")
    parser.add_argument("--step-low", type=int, default=4)
    parser.add_argument("--step-high", type=int, default=48)
    parser.add_argument("--step-high-s", type=float, default=20.0)
    parser.add_argument("--no-step-load", dest="step_load", action="store_false")
    parser.add_argument("--quality-from", type=Path, default=None,
                        help="reuse the quality sweep of an earlier slo_ramp.json")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "slo_ramp.json")
    args = parser.parse_args(argv)
    args.stages = [int(s) for s in args.stages.split(",") if s] or (
        [4, 32, 4] if args.quick else [1, 4, 8, 16, 32, 48, 64, 48, 32, 16, 8, 4, 1])
    args.stage_s = args.stage_s or (6.0 if args.quick else 5.0)
    args.reps = args.reps or (1 if args.quick else 3)
    args.window_s = args.window_s or (3.0 if args.quick else 5.0)
    args.output_len = args.output_len or (16 if args.quick else 32)
    args.step_load = args.step_load and not args.quick
    return args


def main(argv: list[str] | None = None) -> int:
    from benchmark.e2e_decode import widened
    from benchmark.slo_plot import plot
    from lynx.serving.models import moe_shape, read_config

    args = parse_args(argv)
    if not (models_dir() / args.model / "config.json").is_file():
        print(f"slo_ramp: no checkpoint {args.model} under {models_dir()}", file=sys.stderr)
        return 2
    _, experts, top_k = moe_shape(read_config(models_dir() / args.model))
    with ServingPair.launch(widened(args.model, args.widen), with_stock=False,
                            controller_overrides=controller_overrides(top_k, experts)) as pair:
        result = run(pair, args.model, experts, top_k, args)
    result["machine"] = machine_description()
    write_json(args.out, result)
    png = plot(result, args.out.with_suffix(".png"))
    print(f"[slo] wrote {args.out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
