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
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmark.accuracy import code_scores, compare_code, exact_match_server
from benchmark.common import (
    OFF,
    RESULTS_DIR,
    default_variant,
    machine_description,
    models_dir,
    policy_grid,
    rounded,
    write_json,
)
from benchmark.e2e_latency import latency_row, measure_latency
from benchmark.serving_bench import serving_benchmark
from benchmark.serving_pair import ServingPair, counter_delta

MODELS = ("qwen3-moe-mini", "mixtral-mini")
LYNX_ENV = {"LYNX_TIME_MOE": "1"}  # the Lynx server times its MoE blocks (the ceiling)


def widened(model: str, factor: int) -> Path:
    """The float32 widened copy of a reference checkpoint (built once, cached)."""
    from benchmark.testbed import build

    return build(model, factor)


def run_model(model: str, args: argparse.Namespace, pair: ServingPair | None = None
              ) -> dict[str, Any]:
    """Latency and accuracy of one reference model (on ``pair`` if given, else on a freshly
    launched stock + Lynx pair of its widened copy)."""
    if pair is not None:
        return _run_on_pair(model, args, pair, startup_s=0.0)
    t0 = time.time()
    with ServingPair.launch(widened(model, args.widen), extra_lynx_env=LYNX_ENV) as own:
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


def ceiling_fraction(lat: dict[str, Any]) -> dict[str, Any]:
    """``tpot_ratio_off`` and ``fraction_of_amdahl`` of a latency entry, derived from its
    stored TPOTs and bound (`benchmark.e2e_latency.latency_row` gives the definitions)."""
    if not (lat.get("tpot_off_ms") and lat.get("amdahl_bound")):
        return {}
    ratio = lat["tpot_off_ms"] / lat["tpot_lynx_ms"]
    return {"tpot_ratio_off": rounded(ratio),
            "fraction_of_amdahl": rounded(ratio / lat["amdahl_bound"])}


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
                **ceiling_fraction(lat),
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
