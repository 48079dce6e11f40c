"""RESULTS.md section of issue 25's benchmarks, from whichever of their JSONs exist:
``calibrate_paths.json`` (`benchmark/calibrate_paths.py`), ``shadow_ladder.json``,
``shadow_overhead.json`` and ``eval_gate.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmark.common import markdown_table


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.2f}%"


def paths_section(d: dict[str, Any]) -> str:
    cmp, rows = d["comparison"], d["rungs"]
    by = {(r["path"], r["rung"]): r for r in rows}
    table = []
    for rung in cmp["rungs"]["transformers"]:
        t, s = by[("transformers", rung)], by.get(("server", rung))
        table.append([rung, str(t["per_layer"]), f"{t['experts_computed']:.2f}",
                      _pct(t["ladder_ppl_rise"]), _pct(s["ladder_ppl_rise"]) if s else "-",
                      _pct(t["unseen_ppl_rise"]),
                      "yes" if cmp["same_table"].get(rung) else "no"])
    wall = d["wall_s"]
    return f"""
### Calibration through a server against transformers (`benchmark/calibrate_paths.py`)
{d['model']}, batch {d['batch']}, {d['calibration']}; {d['machine']}. Both paths calibrate
the same mean
budgets. Wall time: transformers {wall['transformers']:.0f} s, server {wall['server']:.0f} s
(+{d['server_startup_s']:.0f} s server start-up; HTTP, a policy switch through the controller
per measurement, eager per-position selection). Largest single-layer sensitivity difference
per layer: {cmp['max_sensitivity_diff_nats']} nats (largest sensitivity
{cmp['largest_sensitivity_nats']} nats). Held-out = the ladder's own cost on each path; unseen =
{d['unseen']}, code neither path calibrated on, measured in transformers at the same batch.

{markdown_table(["rung", "per-layer budgets", "experts/step", "held-out (transformers)",
                 "held-out (server)", "unseen code", "same table"], table)}
"""


def shadow_section(lad: dict[str, Any] | None, over: dict[str, Any] | None) -> str:
    out = ""
    if lad:
        rows = [r for r in lad["shadow"] if r["rung"] != "none"]
        table = [[r["rung"], str(r["per_layer"]), f"{r['experts_computed']:.2f}",
                  f"{r['mass_kept']:.3f}", _pct(r["ppl_rise"]),
                  _pct(r.get("calibrated_ppl_rise_at_same_experts")),
                  _pct(r.get("uniform_ppl_rise_at_same_mean"))] for r in lad["shadow"]]
        compared = [r for r in rows if r.get("calibrated_ppl_rise_at_same_experts") is not None]
        worse = sum(r["ppl_rise"] > r["calibrated_ppl_rise_at_same_experts"] for r in compared)
        uniform = [r for r in rows if r.get("uniform_ppl_rise_at_same_mean") is not None]
        better = sum(r["ppl_rise"] < r["uniform_ppl_rise_at_same_mean"] - 1e-5 for r in uniform)
        same = sum(r["per_layer"] == [r["per_layer"][0]] * len(r["per_layer"]) for r in rows)
        out += f"""
### The shadow-built ladder against the calibrated one (`benchmark/shadow_ladder.py`)
{lad['model']}: {lad['requests']} greedy requests of {lad['tokens']} tokens served in shadow
mode at batch {lad['batch']} ({lad['shadow_steps_by_bucket']} measured steps by bucket); every
rung measured on held-out code ({lad['heldout']}) at batch {lad['batch']}; {lad['machine']}.
The routing-mass proxy costs more perplexity than the calibrated ladder at the same experts
computed at {worse} of the {len(compared)} rungs inside the calibrated range; it beats a
uniform budget at the same mean at {better} of {len(uniform)} rungs, and {same} of its
{len(rows)} pruning rungs are a uniform table (equal budgets in every layer).

{markdown_table(["shadow rung", "per-layer budgets", "experts/step", "mass kept",
                 "held-out ppl", "calibrated at same experts", "uniform at same mean"], table)}
"""
    if over:
        table = [[str(r["batch"]), f"{r['off_step_ms']:.2f}", f"{r['shadow_step_ms']:.2f}",
                  f"{r['ratio']:.3f}", f"{r['recorder_us_per_layer_step']:.0f}",
                  f"{100 * r['recorder_share_of_off_step']:.2f}%"] for r in over["rows"]]
        out += f"""
### Shadow mode's cost per decode step (`benchmark/shadow_overhead.py`)
{over['model']}, {over['machine']}; one step in {over['every']} measured, {over['reps']}
interleaved repetitions,
medians (target: <= 2% of a decode step at B >= 16; served ratios move by several % on this
shared machine, the recorder's own share is the stable number).

{markdown_table(["batch", "off ms/step", "shadow ms/step", "shadow/off",
                 "recorder us per layer-step", "recorder share of a step"], table)}
"""
    return out


def informative(row: dict[str, Any]) -> str:
    """Why a gate row cannot show a drop ("" when it can): nothing pruned, or stock at the
    floor (0) or the ceiling (100) of the score."""
    if row["lynx_server"]["kept_over_stock_union"] >= 0.999:
        return "nothing pruned"
    if row["stock"] <= 0.0:
        return "stock at 0"
    if row["stock"] >= 100.0 and row["lynx"] >= 100.0:
        return "both at 100"
    return ""


def gate_section(d: dict[str, Any]) -> str:
    table = []
    for r in d["rows"]:
        pruned = r["lynx_server"]
        table.append([r["model"], r["policy"], r["task"], f"{r['stock']:.1f}",
                      f"{r['lynx']:.1f}", f"{r['delta']:+.1f} ± {r['stderr']:.1f}",
                      f"{pruned['kept_over_stock_union']:.3f}",
                      "pass" if r["passed"] else "FAIL", informative(r) or "yes"])
    shown = sum(not informative(r) for r in d["rows"])
    return f"""
### The lm-eval gate on every reference model (`benchmark/eval_gate.py`)
`lynx-serve evaluate` against one stock server per model: the default policy, and the
ladder's fastest rung within {100 * d['max_ppl_rise']:.0f}% held-out perplexity. lm-eval
through SGLang's completions endpoint, {d['limit']} documents per task, {d['concurrency']}
requests in flight; the `_choice` tasks are log-likelihood twins scored in evaluation mode.
Delta = Lynx - stock [points] with its paired standard error; threshold
{d['threshold_points']:g} point; kept/union = experts kept over the stock union in the Lynx
server's pruned steps (1.000: nothing was pruned, the gate measured stock); {d['machine']}.
Only {shown} of the {len(d['rows'])} rows can show a drop ("informative"): the others pruned
nothing or sit at the score's floor or ceiling, so their pass says little.{
    chr(10) + d['note'] + '.' if d.get('note') else ''}

{markdown_table(["model", "policy", "task", "stock", "lynx", "delta", "kept/union",
                 "verdict", "informative"], table)}
"""


def markdown(out_dir: Path) -> str:
    """The section, or "" when none of the JSONs exists."""
    def load(name: str) -> dict[str, Any] | None:
        path = out_dir / name
        return dict(json.loads(path.read_text())) if path.exists() else None

    paths, lad, over, gate = (load("calibrate_paths.json"), load("shadow_ladder.json"),
                              load("shadow_overhead.json"), load("eval_gate.json"))
    body = ((paths_section(paths) if paths else "") + shadow_section(lad, over)
            + (gate_section(gate) if gate else ""))
    return ("\n## Calibration, shadow mode and the accuracy gate (issue 25)\n" + body
            if body else "")
