"""benchmark/RESULTS.md's text: tables, plots and statements computed from a run's JSON files
(``run_all.render`` writes it; nothing in it is hand-written about the machine)."""

from __future__ import annotations

import statistics
from typing import Any

from benchmark import frontier, report, slo_pareto_report


def machine_block(machine: str, info: dict[str, Any]) -> str:
    load = " ".join(info.get("loadavg_end", []))
    return f"- {machine}\n- load average at the end of the run: {load} (shared machine)"


def _span(values: list[float], unit: str = "x") -> str:
    if not values:
        return "n/a"
    return (f"{min(values):.2f}-{max(values):.2f}{unit} "
            f"(median {statistics.median(values):.2f}{unit})")


def reading(moe: dict[str, Any], e2e: dict[str, Any], pareto: dict[str, Any], c: int,
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
    if pareto and slo_pareto_report.reading(pareto):
        text.append(slo_pareto_report.reading(pareto))
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


def results_markdown(moe: dict[str, Any], e2e: dict[str, Any], pareto: dict[str, Any],
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
python benchmark/slo_pareto.py [--quick] [--reps 5] [--load 0.9]
python benchmark/prefill_share.py           # SLO misses from prefill, two schedules
python benchmark/plugin_overhead.py         # the hooks' host cost per step, policy off
python benchmark/calibrate_paths.py         # calibration through a server vs transformers
python benchmark/eval_gate.py               # the lm-eval gate on every reference model
python benchmark/run_all.py --render-only   # plots, summary.json, RESULTS.md from the JSONs
```
Raw results: `benchmark/results/{{moe_layer,e2e,slo_pareto,plugin_overhead,summary}}.json`, and
`{{calibrate_paths,eval_gate,shadow_ladder,shadow_overhead}}.json` (issue 25), `prefill_share.json`.

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
- `*` marks the default operating point of the run (`budget`, m = max(2k, E/2), no pruning below
  4 rows; since 2026-12-07 max(2k + 1, E/2), which differs only where E <= 4k + 1: mixtral's
  shapes, 4 -> 5 of 8).

## Targets
{report.markdown_table(["target", "measured"], report.targets(moe, e2e, c)
    + slo_pareto_report.targets(pareto) + (
    [frontier.target_row(layer_frontier)] if layer_frontier else []))}

## Reading
{reading(moe, e2e, pareto, c, hook_cost)}

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

{slo_pareto_report.markdown(pareto, f"{images}/slo_pareto.png")}"""
