"""End-to-end decode on SGLang's CPU server: stock vs Lynx (same install, plugin off vs on).

    python benchmark/e2e_decode.py [--quick] [--models qwen3-moe-mini,mixtral-mini]

Per reference model:
1. Latency on the *widened* model (every expert FFN x``--widen``, function-preserving, written
   in float32 under ``.cache/bench/models/``): a stock server and a Lynx server run side by side
   (``benchmark.serving_pair``), the Lynx policy switched live through the real controller.
   Load: SGLang's own serving benchmark (``python -m sglang.benchmark.serving``, random token
   ids, ``--input-len`` / ``--output-len`` tokens, ``--max-concurrency C``, at least
   ``MIN_REQUESTS`` prompts). Per concurrency, three arms run in a shuffled order per
   repetition (``--reps``): stock, Lynx with the variant, Lynx with policy off; each metric is
   the median over repetitions of the tool's per-run value. The Lynx server runs with
   ``LYNX_TIME_MOE=1``, so the same runs give the MoE share f of a decode step and the
   in-server MoE speedup S, hence the Amdahl bound of every TPOT ratio (`latency_row`).
   The default policy is swept over every concurrency; every other policy/knob of the
   frontier at ``--frontier-c``.
2. Accuracy: arithmetic exact match through the same servers (held-out additions, batches of B
   prompts per call = real batched greedy decoding, B in ``--em-batches``); held-out code
   perplexity and next-token agreement with transformers on the float32 checkpoint, the same
   selection applied to the router logits by a forward hook (``benchmark.accuracy``); the
   top-1-kept rate from the plugin's counters (``lynx_top1_kept_rows_total`` /
   ``lynx_pruned_rows_total``) over all of the variant's requests.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmark.accuracy import code_scores, compare_code, exact_match_server
from benchmark.common import (
    CACHE_DIR,
    OFF,
    RESULTS_DIR,
    Variant,
    default_variant,
    machine_description,
    models_dir,
    policy_grid,
    rounded,
    write_json,
)
from benchmark.serving_bench import serving_benchmark
from benchmark.serving_pair import ServingPair, counter_delta, process_group_cpu_s
from lynx.serving.metrics_reader import samples

MODELS = ("qwen3-moe-mini", "mixtral-mini")
MIN_REQUESTS = 8  # per server and repetition: small concurrencies run several waves


def widened(model: str, factor: int) -> Path:
    """The float32 widened copy of a reference checkpoint (built once, cached)."""
    from lynx.reference.widen import widen_checkpoint

    src = models_dir() / model
    dst = CACHE_DIR / "models" / f"{model}-wide{factor}-f32"
    stamp = dst / "widen.json"
    src_mtime = max(p.stat().st_mtime for p in src.glob("*.safetensors"))
    if not stamp.is_file() or stamp.stat().st_mtime < src_mtime:
        widen_checkpoint(src, factor, dst, dtype="float32")
    return dst


ARMS = ("stock", "lynx", "off")  # off: the Lynx server with policy off (the MoE share f)


def decode_counters(url: str) -> dict[str, float]:
    """The Lynx server's cumulative decode-step timers (``LYNX_TIME_MOE=1``)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    decode = {"mode": "decode"}
    return {name: sum(v for lab, v in samples(text, metric)
                      if all(lab.get(k) == val for k, val in decode.items()))
            for name, metric in (("moe_s", "lynx_moe_seconds_total"),
                                 ("forward_s", "lynx_step_duration_seconds_sum"),
                                 ("steps", "lynx_step_duration_seconds_count"))}


def measure_latency(pair: ServingPair, variant: Variant, concurrency: int,
                    args: argparse.Namespace, work: Path, tokenizer: Path,
                    arms: tuple[str, ...] = ARMS) -> dict[str, dict[str, float]]:
    """SGLang's serving benchmark at fixed concurrency (rate inf, ``--max-concurrency``)
    against the stock server, the Lynx server with ``variant`` and the Lynx server with
    policy off, in a shuffled order per repetition. Per arm: medians over repetitions of the
    tool's per-run metrics, server CPU per token, and (Lynx server) MoE / forward seconds per
    decode step."""
    prompts = concurrency * max(args.waves, -(-MIN_REQUESTS // concurrency))
    runs: dict[str, list[dict[str, float]]] = {arm: [] for arm in arms}
    rng = random.Random(concurrency)
    for rep in range(args.reps):
        order = list(arms)
        rng.shuffle(order)
        for arm in order:
            server = pair.stock if arm == "stock" else pair.lynx
            assert server is not None
            if arm != "stock":
                pair.set_policy(OFF if arm == "off" else variant)
            timers = decode_counters(pair.lynx.url)
            cpu_before = process_group_cpu_s(server)
            result = serving_benchmark(
                server.url, tokenizer, work / f"{arm}-{variant.label}-{concurrency}-{rep}.jsonl",
                prompts=prompts, input_len=args.input_len, output_len=args.output_len,
                max_concurrency=concurrency, seed=rep)
            cpu_s = process_group_cpu_s(server) - cpu_before
            after = decode_counters(pair.lynx.url)
            steps = after["steps"] - timers["steps"]
            run = {key: float(result[key]) for key in (
                "median_tpot_ms", "p99_tpot_ms", "median_itl_ms", "p99_itl_ms",
                "output_throughput", "completed")}
            run["failed"] = float(prompts - result["completed"])
            run["cpu_ms_per_token"] = cpu_s * 1e3 / max(1.0, result["total_output_tokens"])
            if arm != "stock" and steps > 0:
                run["moe_ms_per_step"] = (after["moe_s"] - timers["moe_s"]) * 1e3 / steps
                run["forward_ms_per_step"] = (after["forward_s"] - timers["forward_s"]
                                              ) * 1e3 / steps
            runs[arm].append(run)
            if args.progress:
                print(f"[e2e] {arm} C={concurrency} rep {rep}: TPOT "
                      f"{run['median_tpot_ms']:.1f} ms", flush=True)
    return {arm: {key: statistics.median(r[key] for r in rs) for key in rs[0]}
            for arm, rs in runs.items()}


def amdahl(f: float, speedup: float) -> float:
    """1 / ((1 - f) + f / S): the whole-step speedup when a share f of it runs S x faster."""
    return 1.0 / ((1.0 - f) + f / speedup)


def latency_row(model: str, variant: Variant, concurrency: int,
                lat: dict[str, dict[str, float]], kept_over_union: float) -> dict[str, Any]:
    """One e2e row: client-side TPOT / ITL / throughput of stock vs Lynx, and the ceiling.

    f (``moe_share``) = MoE ms per decode step / median TPOT, both of the policy-off run;
    S (``moe_speedup``) = MoE ms per decode step, off / Lynx; ``amdahl_bound`` =
    1/((1-f)+f/S); ``weights_bound`` = the same with S = stock union / kept experts (the MoE
    layers at their weights-read bound); ``forward_ratio`` = forward ms per decode step,
    off / Lynx (in-server; TPOT adds scheduling, sampling and streaming)."""
    stock, lynx = lat["stock"], lat["lynx"]
    off = lat.get("off") or {}
    row: dict[str, Any] = {
        "model": model, "concurrency": concurrency, "policy": variant.policy,
        "knob": variant.knob,
        "tpot_stock_ms": rounded(stock["median_tpot_ms"], 2),
        "tpot_lynx_ms": rounded(lynx["median_tpot_ms"], 2),
        "tpot_off_ms": rounded(off["median_tpot_ms"], 2) if off else None,
        "tpot_ratio": rounded(stock["median_tpot_ms"] / lynx["median_tpot_ms"]),
        "tpot_p99_stock_ms": rounded(stock["p99_tpot_ms"], 2),
        "tpot_p99_lynx_ms": rounded(lynx["p99_tpot_ms"], 2),
        "itl_median_stock_ms": rounded(stock["median_itl_ms"], 2),
        "itl_median_lynx_ms": rounded(lynx["median_itl_ms"], 2),
        "itl_p99_stock_ms": rounded(stock["p99_itl_ms"], 2),
        "itl_p99_lynx_ms": rounded(lynx["p99_itl_ms"], 2),
        "throughput_stock_tok_s": rounded(stock["output_throughput"], 2),
        "throughput_lynx_tok_s": rounded(lynx["output_throughput"], 2),
        "throughput_ratio": rounded(lynx["output_throughput"] / stock["output_throughput"]),
        "cpu_ms_per_token_stock": rounded(stock["cpu_ms_per_token"], 3),
        "cpu_ms_per_token_lynx": rounded(lynx["cpu_ms_per_token"], 3),
        "cpu_ratio": rounded(stock["cpu_ms_per_token"] / lynx["cpu_ms_per_token"]),
        "requests": int(stock["completed"] + lynx["completed"]),
        "failed": int(stock["failed"] + lynx["failed"]),
        "default": False,
    }
    if "moe_ms_per_step" in off and "moe_ms_per_step" in lynx:
        f = min(1.0, off["moe_ms_per_step"] / off["median_tpot_ms"])
        speedup = off["moe_ms_per_step"] / lynx["moe_ms_per_step"]
        bound = amdahl(f, speedup)
        row.update({
            "moe_ms_per_step_off": rounded(off["moe_ms_per_step"], 3),
            "moe_ms_per_step_lynx": rounded(lynx["moe_ms_per_step"], 3),
            "moe_share": rounded(f), "moe_speedup": rounded(speedup),
            "amdahl_bound": rounded(bound),
            "weights_bound": rounded(amdahl(f, 1.0 / kept_over_union)),
            "fraction_of_amdahl": rounded(row["tpot_ratio"] / bound),
            "forward_ratio": rounded(off["forward_ms_per_step"] / lynx["forward_ms_per_step"]),
            "plugin_off_ratio": rounded(stock["median_tpot_ms"] / off["median_tpot_ms"]),
        })
    return row


def run_model(model: str, args: argparse.Namespace, pair: ServingPair | None = None
              ) -> dict[str, Any]:
    """Latency and accuracy of one reference model (on ``pair`` if given, else on a freshly
    launched stock + Lynx pair of its widened copy)."""
    if pair is not None:
        return _run_on_pair(model, args, pair, startup_s=0.0)
    t0 = time.time()
    with ServingPair.launch(widened(model, args.widen),
                            extra_lynx_env={"LYNX_TIME_MOE": "1"}) as own:
        return _run_on_pair(model, args, own, startup_s=time.time() - t0)


def _run_on_pair(model: str, args: argparse.Namespace, pair: ServingPair, startup_s: float
                 ) -> dict[str, Any]:
    from lynx.reference.loading import load_reference
    from lynx.serving.models import moe_shape, read_config

    base = models_dir() / model
    layers, experts, top_k = moe_shape(read_config(base))
    default = default_variant(experts, top_k)
    # The default first: its sweep also runs the policy-off arm (the plugin's fixed cost and
    # the MoE share f), which the other variants' rows at the frontier concurrency reuse.
    variants = [default] if args.quick else [
        default, *(v for v in policy_grid(experts, top_k, False) if v != default)]
    off_at: dict[int, dict[str, float]] = {}
    log = print
    log(f"[e2e] {model}: E={experts} k={top_k}, serving {pair.model_path.name}", flush=True)
    out: dict[str, Any] = {"model": model, "served": pair.model_path.name, "widen": args.widen,
                           "E": experts, "k": top_k, "layers": layers,
                           "default": default.label, "latency": [], "accuracy": [],
                           "startup_s": round(startup_s, 1)}
    work = pair.workdir / "serving-bench"
    work.mkdir(parents=True, exist_ok=True)
    for server in (pair.stock, pair.lynx):  # warm-up (first requests pay one-off costs)
        assert server is not None
        serving_benchmark(server.url, base, work / "warmup.jsonl", prompts=4,
                          input_len=args.input_len, output_len=4, max_concurrency=4)
    em_stock = {b: exact_match_server(pair.stock.url, args.problems_for(b), b)
                for b in args.em_batches}
    log(f"[e2e] {model}: stock exact match {em_stock}", flush=True)
    for variant in variants:
        pair.set_policy(variant)
        before = pair.lynx_counters()
        sweep = args.concurrency if variant == default else [args.frontier_c]
        for concurrency in sweep:
            start = pair.lynx_counters()
            if variant == default:
                lat = measure_latency(pair, variant, concurrency, args, work, base)
                off_at[concurrency] = lat["off"]
            else:
                lat = measure_latency(pair, variant, concurrency, args, work, base,
                                      arms=("stock", "lynx"))
                lat["off"] = off_at.get(concurrency, {})
            pruned = counter_delta(start, pair.lynx_counters())
            row = latency_row(model, variant, concurrency, lat, pruned["kept_over_union"])
            row["default"] = variant == default
            out["latency"].append(row)
            log(f"[e2e] {model} {variant.label} C={concurrency}: TPOT stock "
                f"{row['tpot_stock_ms']:.1f} ms, Lynx {row['tpot_lynx_ms']:.1f} ms "
                f"(x{row['tpot_ratio']:.2f}; Amdahl bound x{row.get('amdahl_bound')}, MoE "
                f"share {row.get('moe_share')}, MoE x{row.get('moe_speedup')})", flush=True)
        pair.set_policy(variant)  # the accuracy runs below
        batches = args.em_batches if variant == default else [args.frontier_c]
        for batch in batches:
            em = exact_match_server(pair.lynx.url, args.problems_for(batch), batch)
            out["accuracy"].append({"variant": variant.label, "batch": batch,
                                    "exact_match_stock": em_stock.get(batch),
                                    "exact_match_lynx": em})
        stats = counter_delta(before, pair.lynx_counters())
        out.setdefault("plugin_stats", {})[variant.label] = stats
        log(f"[e2e] {model} {variant.label}: exact match "
            f"{[a for a in out['accuracy'] if a['variant'] == variant.label]}, top-1 kept "
            f"{stats['top1_kept_rate']:.4f}, kept/union {stats['kept_over_union']:.3f}",
            flush=True)
    import torch

    torch.set_num_threads(args.threads)
    model_obj, tok = load_reference(base, dtype=torch.float32)
    out["code"] = []
    for batch in args.ppl_batches:
        stock = code_scores(model_obj, tok, OFF, batch, args.windows, args.window_len)
        for variant in variants:
            if variant != default and batch != args.frontier_c:
                continue
            scores = compare_code(stock, code_scores(model_obj, tok, variant, batch,
                                                     args.windows, args.window_len))
            out["code"].append({"variant": variant.label, "batch": batch,
                                **{k: rounded(v, 5) for k, v in scores.items()}})
    return out


def summary_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``e2e`` rows of summary.json: one per latency measurement, with the accuracy of the
    same variant at the batch size closest to the concurrency."""
    def nearest(items: list[dict[str, Any]], variant: str, batch: int) -> dict[str, Any] | None:
        mine = [i for i in items if i["variant"] == variant]
        return min(mine, key=lambda i: abs(i["batch"] - batch)) if mine else None

    rows = []
    for model in result["models"]:
        for lat in model["latency"]:
            label = f"{lat['policy']}:{lat['knob']}"
            em = nearest(model["accuracy"], label, lat["concurrency"])
            code = nearest(model["code"], label, lat["concurrency"])
            stats = model["plugin_stats"].get(label, {})
            rows.append({
                **{k: lat[k] for k in ("model", "concurrency", "policy", "knob",
                                       "tpot_stock_ms", "tpot_lynx_ms", "tpot_ratio")},
                "exact_match_stock": em["exact_match_stock"] if em else None,
                "exact_match_lynx": em["exact_match_lynx"] if em else None,
                "ppl_stock": code["ppl_stock"] if code else None,
                "ppl_lynx": code["ppl_lynx"] if code else None,
                "top1_kept_rate": rounded(stats.get("top1_kept_rate", 1.0)),
                "accuracy_batch": em["batch"] if em else None,
                "ppl_batch": code["batch"] if code else None,
                "next_token_agreement": code["next_token_agreement"] if code else None,
                **{k: lat[k] for k in lat
                   if k.startswith(("itl_", "tpot_p99", "tpot_off", "throughput", "cpu_"))},
                **{k: lat.get(k) for k in ("moe_share", "moe_speedup", "amdahl_bound",
                                           "weights_bound", "fraction_of_amdahl",
                                           "forward_ratio", "plugin_off_ratio")},
                "served": model["served"], "default": lat["default"],
            })
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", default="")
    parser.add_argument("--widen", type=int, default=16)
    parser.add_argument("--concurrency", default="")
    parser.add_argument("--frontier-c", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=None)
    parser.add_argument("--input-len", type=int, default=None)
    parser.add_argument("--waves", type=int, default=None)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--em-batches", default="")
    parser.add_argument("--problems", type=int, default=None)
    parser.add_argument("--ppl-batches", default="")
    parser.add_argument("--windows", type=int, default=None)
    parser.add_argument("--window-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "e2e.json")
    args = parser.parse_args(argv)
    q = args.quick
    ints = lambda text, default: [int(x) for x in text.split(",") if x] or default  # noqa: E731
    args.models = [m for m in args.models.split(",") if m] or (
        [MODELS[0]] if q else list(MODELS))
    args.concurrency = ints(args.concurrency, [1, 32] if q else [1, 4, 8, 16, 32, 64])
    args.output_len = args.output_len or (16 if q else 32)
    args.input_len = args.input_len or 32
    args.waves = args.waves or 1
    args.reps = args.reps or (1 if q else 3)
    args.em_batches = ints(args.em_batches, [32] if q else [1, 8, 32, 64])
    args.problems = args.problems or (64 if q else 256)
    args.ppl_batches = ints(args.ppl_batches, [32] if q else [8, 32])
    args.windows = args.windows or (32 if q else 64)
    args.em_batches = sorted({*args.em_batches, args.frontier_c})
    args.ppl_batches = sorted({*args.ppl_batches, args.frontier_c})
    problems = args.problems
    args.problems_for = lambda b: min(problems, 32 * b)
    return args


def finish(args: argparse.Namespace, models: list[dict[str, Any]]) -> dict[str, Any]:
    """Assemble, write and return the e2e result of the measured models."""
    result: dict[str, Any] = {"machine": machine_description(),
                              "loadavg_end": Path("/proc/loadavg").read_text().split()[:3],
                              "config": {k: v for k, v in vars(args).items()
                                         if k not in ("problems_for", "out")},
                              "models": models}
    result["config"]["out"] = str(args.out)
    result["rows"] = summary_rows(result)
    write_json(args.out, result)
    print(f"[e2e] wrote {args.out}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = [m for m in args.models if not (models_dir() / m / "config.json").is_file()]
    if missing:
        print(f"e2e_decode: no checkpoint for {missing} under {models_dir()} "
              "(run `make models` or set LYNX_MODELS_DIR)", file=sys.stderr)
        return 2
    result = finish(args, [run_model(m, args) for m in args.models])
    print(json.dumps(result["rows"], indent=1)[:2000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
