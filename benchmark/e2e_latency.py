"""The latency half of the end-to-end benchmark: SGLang's serving benchmark against the stock
and the Lynx server, and each run's ceiling from the MoE time measured inside the Lynx server
(``LYNX_TIME_MOE=1``). Used by `benchmark.e2e_decode`."""

from __future__ import annotations

import argparse
import random
import statistics
from pathlib import Path
from typing import Any

import httpx

from benchmark.common import OFF, Variant, rounded
from benchmark.serving_bench import serving_benchmark
from benchmark.serving_pair import ServingPair, process_group_cpu_s
from lynx.serving.metrics_reader import samples

MIN_REQUESTS = 8  # per server and repetition: small concurrencies run several waves
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
            if arm != "stock" and steps > 0 and after["moe_s"] > timers["moe_s"]:
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
    layers at their weights-read bound); ``fraction_of_amdahl`` = (off TPOT / Lynx TPOT) /
    Amdahl bound; ``forward_ratio`` = forward ms per decode step, off / Lynx (in-server; TPOT
    adds scheduling, sampling and streaming)."""
    stock, lynx = lat["stock"], lat["lynx"]
    off = lat.get("off") or {}
    # f and S come from the Lynx server's off and Lynx arms, so the TPOT ratio held against
    # their bound is the same server's, off / Lynx (``tpot_ratio_off``); ``tpot_ratio`` is
    # against the stock server, a separate process.
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
    if off.get("moe_ms_per_step", 0) > 0 and lynx.get("moe_ms_per_step", 0) > 0:
        f = min(1.0, off["moe_ms_per_step"] / off["median_tpot_ms"])
        speedup = off["moe_ms_per_step"] / lynx["moe_ms_per_step"]
        bound = amdahl(f, speedup)
        row.update({
            "moe_ms_per_step_off": rounded(off["moe_ms_per_step"], 3),
            "moe_ms_per_step_lynx": rounded(lynx["moe_ms_per_step"], 3),
            "moe_share": rounded(f), "moe_speedup": rounded(speedup),
            "amdahl_bound": rounded(bound),
            "weights_bound": rounded(amdahl(f, 1.0 / kept_over_union)),
            "tpot_ratio_off": rounded(off["median_tpot_ms"] / lynx["median_tpot_ms"]),
            "fraction_of_amdahl": rounded(off["median_tpot_ms"] / lynx["median_tpot_ms"]
                                          / bound),
            "forward_ratio": rounded(off["forward_ms_per_step"] / lynx["forward_ms_per_step"]),
            "plugin_off_ratio": rounded(stock["median_tpot_ms"] / off["median_tpot_ms"]),
        })
    return row
