"""Goodput in SGLang's own terms: ``python -m sglang.benchmark.serving --goodput tpot:<ms>``
(requests per second that met the SLO) at a sweep of request rates, stock vs the adaptive
controller vs the best static table, on one SGLang + Lynx server.

    python benchmark/goodput.py [--rates 4,8,12,16,24] [--tpot-ms auto] [--static-budget N]

Random token-id prompts (``--dataset-name random-ids``, no download), Poisson arrivals at
each ``--request-rate``; the modes are rotated at every rate. Reported per mode: goodput and
SLO attainment per rate, and the highest rate at which >= 90% of requests met the SLO (the
published anchors' "throughput under SLO"). ``--tpot-ms auto``: stock's median TPOT at the
highest rate (so stock misses the SLO there). ``--static-budget``: the static uniform budget
(default 2k, which is also the controller's floor here; the ladder's rungs as statics are
``benchmark/slo_pareto.py``'s). The adaptive controller's SLO is the same TPOT as its P90
(``tpot`` histogram).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmark.common import RESULTS_DIR, machine_description, models_dir, rounded, write_json
from benchmark.serving_bench import serving_benchmark
from benchmark.serving_pair import ServingPair
from benchmark.slo_ramp import apply_mode, controller_overrides, profile

ATTAINMENT = 0.9


def run(pair: ServingPair, args: argparse.Namespace, top_k: int) -> dict[str, Any]:
    static = args.static_budget or 2 * top_k
    pair.put("/v1/floor", {"min_budget": static})
    prof = profile(pair, top_k, static, quick=False)
    modes = ["off", "adaptive", f"static:{static}"]
    tokenizer = models_dir() / args.model
    work = Path(tempfile.mkdtemp(prefix="lynx-goodput-"))
    tpot_ms = args.tpot_ms
    if tpot_ms == "auto":
        apply_mode(pair, "off")
        probe = serving_benchmark(pair.lynx.url, tokenizer, work / "probe.jsonl",
                                  prompts=args.prompts, input_len=args.input_len,
                                  output_len=args.output_len, request_rate=max(args.rates))
        tpot_ms = rounded(probe["median_tpot_ms"], 1)
    tpot_ms = float(tpot_ms)
    pair.put("/v1/slo", {"targets": [{"metric": "tpot", "quantile": 0.9,
                                      "target_ms": tpot_ms}]})
    rows = []
    for i, rate in enumerate(args.rates):
        for mode in modes[i % 3:] + modes[:i % 3]:
            apply_mode(pair, mode)
            result = serving_benchmark(pair.lynx.url, tokenizer, work / f"{mode}-{rate}.jsonl",
                                       prompts=args.prompts, input_len=args.input_len,
                                       output_len=args.output_len, request_rate=rate,
                                       goodput_tpot_ms=tpot_ms)
            pair.set_mode("static")
            rows.append({"mode": mode, "request_rate": rate,
                         "goodput": rounded(result["request_goodput"], 3),
                         "slo_attainment": rounded(result["slo_attainment"], 4),
                         "request_throughput": rounded(result["request_throughput"], 3),
                         "median_tpot_ms": rounded(result["median_tpot_ms"], 2),
                         "p99_tpot_ms": rounded(result["p99_tpot_ms"], 2)})
            print(f"[goodput] rate {rate} {mode}: goodput {rows[-1]['goodput']} req/s, "
                  f"attainment {rows[-1]['slo_attainment']:.2f}, median TPOT "
                  f"{rows[-1]['median_tpot_ms']} ms", flush=True)
    best_rate = {m: max((r["request_rate"] for r in rows if r["mode"] == m
                         and r["slo_attainment"] >= ATTAINMENT), default=None) for m in modes}
    return {"model": args.model, "served": pair.model_path.name, "tpot_ms": tpot_ms,
            "prompts": args.prompts, "input_len": args.input_len, "output_len": args.output_len,
            "static": f"static:{static}", "profile": prof, "rows": rows,
            "max_rate_at_90pct": best_rate,
            "goodput_mean": {m: rounded(statistics.fmean(r["goodput"] for r in rows
                                                         if r["mode"] == m), 3) for m in modes}}


def markdown(result: dict[str, Any]) -> str:
    from benchmark.common import markdown_table

    rates = sorted({r["request_rate"] for r in result["rows"]})
    modes = list(result["max_rate_at_90pct"])
    cell = {(r["mode"], r["request_rate"]): r for r in result["rows"]}
    table = markdown_table(["mode", *[f"{r:g} req/s" for r in rates], "max rate >= 90% SLO"], [
        [m, *[f"{cell[m, r]['goodput']} ({100 * cell[m, r]['slo_attainment']:.0f}%)"
              for r in rates], result["max_rate_at_90pct"][m]] for m in modes])
    return (f"`sglang.benchmark.serving`, random-ids {result['input_len']} in / "
            f"{result['output_len']} out, {result['prompts']} prompts per point, SLO TPOT <= "
            f"{result['tpot_ms']} ms; cells: goodput req/s (SLO attainment).\n\n{table}\n")


def main(argv: list[str] | None = None) -> int:
    from benchmark.e2e_decode import widened
    from lynx.serving.models import moe_shape, read_config

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen3-moe-mini")
    parser.add_argument("--widen", type=int, default=16)
    parser.add_argument("--rates", default="4,8,12,16,24")
    parser.add_argument("--prompts", type=int, default=120)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--tpot-ms", default="auto")
    parser.add_argument("--static-budget", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "goodput.json")
    args = parser.parse_args(argv)
    args.rates = [float(r) for r in args.rates.split(",") if r]
    _, experts, top_k = moe_shape(read_config(models_dir() / args.model))
    with ServingPair.launch(widened(args.model, args.widen), with_stock=False,
                            controller_overrides=controller_overrides(top_k, experts)) as pair:
        result = run(pair, args, top_k)
    result["machine"] = machine_description()
    write_json(args.out, result)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
