"""Every benchmark in one command: ``make bench`` (full) or ``make bench-quick`` (< 5 minutes).

    python benchmark/run_all.py [--quick]

1. MoE-layer microbenchmark (``benchmark/moe_layer.py``);
2. end-to-end decode + accuracy on the SGLang CPU server (``benchmark/e2e_decode.py``);
3. the SLO ramp (``benchmark/slo_ramp.py``) on the fine-grained model's server pair;
   full runs also: speculative verify steps (``benchmark/verify_steps.py``), goodput
   (``benchmark/goodput.py``) and the speed/perplexity frontier of every policy, calibrated
   per-layer tables included, on the production-ratio model (``benchmark/frontier.py``);
4. ``benchmark/results/summary.json`` (the issue's schema), the PNGs under
   ``benchmark/results/`` and ``benchmark/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmark import (
    e2e_decode,
    frontier,
    goodput,
    moe_layer,
    plugin_overhead,
    report,
    slo_plot,
    slo_ramp,
    slo_report,
    verify_steps,
)
from benchmark.common import REPO_ROOT, RESULTS_DIR, machine_description, models_dir, write_json
from benchmark.serving_pair import ServingPair

SLO_MODEL = "qwen3-moe-mini"


def run(quick: bool, out_dir: Path) -> dict[str, Any]:
    started = time.time()
    mode = ["--quick"] if quick else []
    # 0. the plugin's fixed host cost per step (seconds)
    plugin_overhead.main(["--steps", "2000" if quick else "20000",
                          "--out", str(out_dir / "plugin_overhead.json")])
    # 1. MoE layer
    margs = moe_layer.parse_args([*mode, "--out", str(out_dir / "moe_layer.json")])
    moe_layer.run_from_args(margs)
    # 2 + 3. end to end and SLO (the SLO model's server pair serves both)
    eargs = e2e_decode.parse_args([*mode, "--no-progress", "--out", str(out_dir / "e2e.json")])
    sargs = slo_ramp.parse_args([*mode, "--out", str(out_dir / "slo_ramp.json")])
    from lynx.serving.models import moe_shape, read_config

    models, slo = [], None
    for model in eargs.models:
        if model != SLO_MODEL:
            models.append(e2e_decode.run_model(model, eargs))
            continue
        _, experts, top_k = moe_shape(read_config(models_dir() / model))
        t0 = time.time()
        with ServingPair.launch(e2e_decode.widened(model, eargs.widen),
                                controller_overrides=slo_ramp.controller_overrides(
                                    top_k, experts),
                                extra_lynx_env=e2e_decode.LYNX_ENV) as pair:
            startup = time.time() - t0
            models.append(e2e_decode._run_on_pair(model, eargs, pair, startup))
            slo = slo_ramp.run(pair, model, experts, top_k, sargs)
    e2e_decode.finish(eargs, models)
    assert slo is not None, f"{SLO_MODEL} must be among the e2e models"
    if not quick:
        verify_steps.main(["--out", str(out_dir / "verify_steps.json")])
        best = slo.get("best_static") or "static:0"
        goodput.main(["--out", str(out_dir / "goodput.json"),
                      "--static-budget", best.split(":")[1]])
        frontier.main(["--out", str(out_dir / "frontier.json")])
    slo["machine"] = machine_description()
    write_json(sargs.out, slo)
    info = {"quick": quick, "elapsed_s": round(time.time() - started, 1),
            "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "loadavg_end": Path("/proc/loadavg").read_text().split()[:3],
            "frontier_c": eargs.frontier_c}
    write_json(out_dir / "run_info.json", info)
    summary = render(out_dir)
    print(f"[run_all] {'quick' if quick else 'full'} run done in {info['elapsed_s'] / 60:.1f} "
          f"min: {out_dir / 'summary.json'}")
    return summary


def render(out_dir: Path) -> dict[str, Any]:
    """Plots, summary.json and RESULTS.md from the JSON files of a finished run."""
    def load(name: str) -> dict[str, Any]:
        return dict(json.loads((out_dir / name).read_text()))

    moe, e2e, slo, info = (load("moe_layer.json"), load("e2e.json"), load("slo_ramp.json"),
                           load("run_info.json"))
    e2e["rows"] = e2e_decode.summary_rows(e2e)  # derived data: today's definitions
    hook_cost = (load("plugin_overhead.json") if (out_dir / "plugin_overhead.json").exists()
                 else None)
    moe_layer.plot(moe, out_dir / "moe_layer.png")
    slo_plot.plot(slo, out_dir / "slo_ramp.png")
    report.plot_frontier(e2e, info["frontier_c"], out_dir / "frontier.png")
    summary = report.summary(moe["machine"], moe, e2e, slo)
    write_json(out_dir / "summary.json", summary)
    md_path = (REPO_ROOT / "benchmark" / "RESULTS.md" if out_dir.resolve() == RESULTS_DIR.resolve()
               else out_dir / "RESULTS.md")
    images = os.path.relpath(out_dir, md_path.parent)
    verify = out_dir / "verify_steps.json"
    good = out_dir / "goodput.json"
    front = out_dir / "frontier.json"
    layer_frontier = json.loads(front.read_text()) if front.exists() else None
    md_path.write_text(results_markdown(moe, e2e, slo, info, images, hook_cost,
                                        layer_frontier) + (
        verify_steps.markdown(json.loads(verify.read_text())) if verify.exists() else "") + (
        "\n## Goodput (SGLang's serving benchmark)\n" + goodput.markdown(
            json.loads(good.read_text())) if good.exists() else "") + (
        frontier.markdown(layer_frontier) if layer_frontier else ""))
    print(f"[run_all] wrote {out_dir}/{{summary.json,*.png}} and {md_path}", flush=True)
    return summary


def machine_block(machine: str, info: dict[str, Any]) -> str:
    load = " ".join(info.get("loadavg_end", []))
    return f"- {machine}\n- load average at the end of the run: {load} (shared machine)"


def _span(values: list[float], unit: str = "x") -> str:
    if not values:
        return "n/a"
    return (f"{min(values):.2f}-{max(values):.2f}{unit} "
            f"(median {statistics.median(values):.2f}{unit})")


def reading(moe: dict[str, Any], e2e: dict[str, Any], slo: dict[str, Any], c: int,
            hook_cost: dict[str, Any] | None = None) -> str:
    """The one-paragraph reading, computed from the numbers of this run."""
    rows = moe["rows"]
    big = [r for r in rows if r["dtype"] == "fp32" and r["fine_grained"] and r["batch"] >= 16
           and ("/" in r["shape"] or "wide" in r["shape"])]
    dflt = [r for r in big if r["default"]]
    over_big = [r["overhead_share"] for r in rows if r["default"] and r["batch"] >= 4
                and "/" in r["shape"] and r["dtype"] == "fp32"]
    over_all = [r["overhead_share"] for r in rows if r["default"] and r["batch"] >= 4]
    bf16 = [r["speedup"] for r in rows if r["dtype"] == "bf16" and r["batch"] >= 16
            and r["default"]]
    batch1 = [r["speedup"] for r in rows if r["batch"] == 1]
    best_frac = [max(x["fraction_of_bound"] for x in big
                     if x["shape"] == r["shape"] and x["batch"] == r["batch"]) for r in dflt]
    text = [
        "Where Lynx cannot help: at batch 1 the stock union is already k experts (bound 1.00), "
        f"so a policy that still runs its selection is pure cost ({_span(batch1)}"
        " of stock over all policies and shapes); the default policy skips selection below 4 "
        "rows for that reason.",
        f"On the widened and production-scale fine-grained shapes in float32 at B=16..64 the "
        f"default policy's MoE-layer "
        f"speedup is {_span([r['speedup'] for r in dflt])}, against a weights-read bound of "
        f"{_span([r['bound'] for r in dflt])}; the best knob per shape and batch reaches "
        f"{_span(best_frac, '')} of its bound. The expert loop on this AVX2 CPU is only partly "
        "bound by reading weights: the tokens of a dropped expert are remapped onto kept "
        "ones, so the per-token matmul work stays and only the per-expert cost goes.",
    ]
    if bf16:
        text.append(f"In bf16 (the checkpoints' dtype; no native bf16 matmul here) the layer is "
                    f"compute-bound and the default policy gives {_span(bf16)}: nothing to win.")
    eager = [(r["select_eager_ms"], r["select_ms"]) for r in rows
             if r["default"] and r.get("select_eager_ms") and r["batch"] >= 16
             and "/" in r["shape"] and r["dtype"] == "fp32"]
    text.append(
        f"The selection step, compiled by AOTInductor as the plugin runs it on the CPU "
        f"(`lynx.selection.compiled`), costs {100 * min(over_big, default=0):.1f}-"
        f"{100 * max(over_big, default=0):.1f}% of a layer at the default point on the "
        f"production-scale shapes (B >= 4) and up to {100 * max(over_all, default=0):.0f}% on "
        "the tiny as-trained ones"
        + (f"; the eager specification takes {_span([e / c for e, c in eager])} as long at "
           "B >= 16" if eager else "") + ".")
    for model in e2e["models"]:
        mine = [r for r in e2e["rows"] if r["model"] == model["model"]]
        at_c = [r for r in mine if r["concurrency"] == c and r["default"]]
        lynx = [r for r in mine if r["concurrency"] == c and r["policy"] != "off"]
        if not at_c:
            continue
        r = at_c[0]
        best = max(lynx, key=lambda x: x["tpot_ratio"])
        em = [100 * (x["exact_match_lynx"] - x["exact_match_stock"]) for x in lynx]
        sweep = [x for x in mine if x["default"]]
        worst = min(sweep, key=lambda x: x["tpot_ratio"])
        part = (f"End to end ({model['model']}, widened, concurrency {c}) the default policy "
                f"gives {r['tpot_ratio']:.2f}x TPOT ({r['cpu_ratio']:.2f}x server CPU time per "
                f"token; {worst['tpot_ratio']:.2f}x at its worst concurrency, "
                f"{worst['concurrency']}), the best policy {best['policy']}:{best['knob']} "
                f"{best['tpot_ratio']:.2f}x; exact match moves by {min(em):+.1f} to "
                f"{max(em):+.1f} points and the default's perplexity by "
                f"{100 * (r['ppl_lynx'] / r['ppl_stock'] - 1):+.1f}%")
        if r.get("amdahl_bound"):
            part += (f". The MoE blocks take a share f = {r['moe_share']:.2f} of a decode step "
                     f"there and run {r['moe_speedup']:.2f}x faster under the default, so the "
                     f"Amdahl bound is {r['amdahl_bound']:.2f}x (weights-read bound "
                     f"{r['weights_bound']:.2f}x); on the same server Lynx vs policy off gives "
                     f"{r['tpot_ratio_off']:.2f}x TPOT, {r['fraction_of_amdahl']:.2f} of the "
                     f"bound, and {r['forward_ratio']:.2f}x forward time per decode step")
        if r.get("plugin_off_ratio"):
            part += f"; the plugin with policy off runs at {r['plugin_off_ratio']:.2f}x"
            if hook_cost is not None:
                share = hook_cost["per_step_us"] / (10 * r["tpot_stock_ms"])
                part += (f", while its hooks cost {hook_cost['per_step_us']:.0f} us per step "
                         f"({share:.2f}% of the stock step, `benchmark/plugin_overhead.py`)")
        text.append(part + ".")
    if slo_report.reading(slo):
        text.append(slo_report.reading(slo))
    text.append(
        "All comparisons are interleaved and reported as medians, and server CPU time per "
        "token is listed next to wall time, but on this shared machine single ratios still "
        "move by 10-20% between runs.")
    return " ".join(text)


def _reruns(info: dict[str, Any]) -> str:
    """Parts measured again after the run (``run_info.json`` ``reruns``), one line each."""
    lines = [f"\n- re-measured {r['finished']}: {r['what']} (`{r['command']}`)"
             for r in info.get("reruns", [])]
    return ("\n\nSince then:" + "".join(lines)) if lines else ""


def results_markdown(moe: dict[str, Any], e2e: dict[str, Any], slo: dict[str, Any],
                     info: dict[str, Any], images: str,
                     hook_cost: dict[str, Any] | None = None,
                     layer_frontier: dict[str, Any] | None = None) -> str:
    quick, c = info["quick"], info["frontier_c"]
    mode = "quick (`make bench-quick`)" if quick else "full (`make bench`)"
    return f"""# Lynx benchmarks: stock SGLang vs Lynx on this machine

Generated by `python benchmark/run_all.py{' --quick' if quick else ''}` -- {mode}, finished \
{info['finished']}, {info['elapsed_s'] / 60:.1f} min. No GPU was lent to this run: every \
number is from the CPU below.{_reruns(info)}

## Machine
{machine_block(moe['machine'], info)}

## Commands
```bash
make bench          # python benchmark/run_all.py          (full)
make bench-quick    # python benchmark/run_all.py --quick  (< 5 minutes, CI smoke)
python benchmark/moe_layer.py [--quick] [--shapes ...] [--batches ...] [--dtypes ...]
python benchmark/e2e_decode.py [--quick] [--models ...] [--concurrency ...]
python benchmark/slo_ramp.py [--quick] [--slo-ms auto|MS]
python benchmark/plugin_overhead.py         # the hooks' host cost per step, policy off
python benchmark/run_all.py --render-only   # plots, summary.json, RESULTS.md from the JSONs
```
Raw results: `benchmark/results/{{moe_layer,e2e,slo_ramp,plugin_overhead,summary}}.json`.

## How to read the numbers
- Every stock-vs-Lynx comparison is measured in the same run, interleaved (shuffled order per
  repetition); times are medians, ratios are ratios of medians (>1 = Lynx faster).
- MoE layer: SGLang's own CPU path (`select_experts` + `moe_forward_native`), one torch thread;
  Lynx adds the plugin's selection step (`lynx.selection.select_layer_step`, compiled by
  AOTInductor as the plugin runs it on the CPU) and merges its routing into SGLang's output.
  `bound` = stock distinct experts / kept distinct experts (expert weights read);
  `speedup/bound` = fraction of the bound (1.0 = every expert removed turned into time saved);
  `gain frac.` = (speedup - 1) / (bound - 1); `overhead` = selection step alone / Lynx layer.
  Router logits: real routing of the trained reference models where E and k match (`mixtral-*`
  shapes use mixtral-mini's, `qwen3-moe-mini*` its own), else the synthetic distribution of
  `benchmark/routing_data.py` (Dirichlet(1) popularity + N(0, 1.5^2) noise, fitted to
  qwen3-moe-mini's real routing).
- End to end: SGLang servers (`--device cpu`, torch-native attention, `--dtype float32`,
  `OMP_NUM_THREADS=1`) of the widened reference models (every expert FFN x16, function-preserving,
  float32); stock (`LYNX_ENABLED=0`) and Lynx side by side, Lynx policies switched live by the
  real controller. Load: SGLang's own serving benchmark (`sglang.benchmark.serving`, random
  token ids, `--max-concurrency C`); TPOT, ITL and throughput are its numbers (median over
  repetitions). CPU ms/token = CPU time of the server's processes per output token.
  Ceiling: the Lynx server runs with `LYNX_TIME_MOE=1`; f = MoE ms per decode step / TPOT of the
  policy-off run, S = MoE ms per decode step off / Lynx, Amdahl bound = 1/((1-f)+f/S),
  weights bound = the same with S = stock union / kept experts; `ratio/bound` = TPOT ratio /
  Amdahl bound (1.0 = every MoE millisecond saved reached the user).
  Exact match: held-out 3-digit additions through the servers, B prompts per request batch.
  Perplexity / next-token agreement: transformers on the float32 checkpoint, the same selection
  applied to the router by a forward hook, B windows decoded together (every position of the B
  windows is one decode batch).
- `*` marks the default operating point (`budget`, m = max(2k, E/2), no pruning below 4 rows).

## Targets
{report.markdown_table(["target", "measured"], report.targets(moe, e2e, slo, c) + (
    [frontier.target_row(layer_frontier)] if layer_frontier else []))}

## Reading
{reading(moe, e2e, slo, c, hook_cost)}

## Not measured here
- No GPU was lent: SGLang's fused-MoE Triton kernel and Lynx's Triton selection kernels (the
  production path) are not timed; on a GPU, decode MoE is bound by reading expert weights, so
  the bound column is the relevant ceiling there, and the selection step runs as a few
  microsecond-scale kernels (CUDA graph captured) instead of CPU torch ops.
- The production shapes are scaled down (hidden sizes 1/4 to 1/8, E and k kept) to fit this
  machine; DeepSeek-V2-Lite's two shared experts (dense, never pruned) are left out of its
  layer time, which overstates its speedup slightly.
- Exact match is from 256 held-out problems per point (32 at batch 1; one problem = 0.4
  points); the arithmetic task is easy for qwen3-moe-mini, so code perplexity is the more
  sensitive accuracy signal there.

## MoE layer
![MoE layer]({images}/moe_layer.png)

{report._moe_tables(moe)}

## End-to-end decode and accuracy
s/L = stock/Lynx.
{report._e2e_tables(e2e)}

## Frontier
![frontier]({images}/frontier.png)

## SLO ramp and step load
{slo_report.markdown(slo)}

![SLO ramp]({images}/slo_ramp.png)
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the < 5 minute smoke run")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--render-only", action="store_true",
                        help="only rebuild plots, summary.json and RESULTS.md from the JSONs")
    args = parser.parse_args(argv)
    if args.render_only:
        render(args.out_dir)
        return 0
    missing = [m for m in e2e_decode.MODELS if not (models_dir() / m / "config.json").is_file()]
    if missing:
        print(f"run_all: reference models {missing} missing under {models_dir()}: run "
              "`make models` (or set LYNX_MODELS_DIR)", file=sys.stderr)
        return 2
    run(args.quick, args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
