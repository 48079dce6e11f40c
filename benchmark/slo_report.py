"""The SLO experiments in summary.json and RESULTS.md (computed statements only)."""

from __future__ import annotations

from typing import Any

from benchmark.common import markdown_table

RUN_KEYS = ("mode", "rep", "throughput_within_slo", "slo_attainment", "routing_mass_kept",
            "experts_kept_mean")


def summary_block(slo: dict[str, Any]) -> dict[str, Any]:
    """``summary.json``'s ``slo``: one entry per repetition and mode, and the step load."""
    step = slo.get("step_load")
    return {"slo_ms": slo["slo_ms"], "best_static": slo.get("best_static"),
            "runs": [{k: run.get(k) for k in RUN_KEYS} for run in slo["runs"]],
            "ratios": slo.get("ratios", {}),
            "step_load": None if step is None else {
                k: step[k] for k in ("interval_s", "time_to_slo_s", "time_to_unprune_s")}}


def _ci(cell: dict[str, Any], digits: int = 1) -> str:
    mean = cell.get("mean")
    if mean is None or mean != mean:
        return "n/a"
    if cell.get("ci_low") is None:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{cell['ci_low']:.{digits}f}, {cell['ci_high']:.{digits}f}]"


def markdown(slo: dict[str, Any]) -> str:
    """The RESULTS.md section: setup, quality sweep, modes, ratios, step load."""
    parts = [f"Ramp {slo['stages']} concurrent streams x {slo['stage_s']} s, windows of "
             f"{slo['window_s']} s, SLO P99 ITL <= {slo['slo_ms']} ms, {slo['reps']} "
             "repetitions with the modes rotated; means with 95% confidence intervals.\n\n"]
    if slo.get("quality"):
        parts.append("Static budget tables and the quality budget (<= 2% ppl rise, <= 1 pt "
                     "exact-match loss):\n\n" + markdown_table(
                         ["budget", "batch", "ppl rise", "EM stock", "EM", "within"],
                         [[q["budget"], q["batch"], f"{100 * q['ppl_rise']:+.2f}%",
                           q["exact_match_stock"], q["exact_match"], q["within_budget"]]
                          for q in slo["quality"]]) + "\n\n")
    prof = slo.get("profile") or {}
    for replica, fit in (prof.get("replicas") or {}).items():
        parts.append(f"Latency model of {replica} after `lynx-policy profile` "
                     f"({prof['seconds']} s): t = {fit['a_ms']:.1f} + "
                     f"{fit['b_ms_per_row']:.2f} B + {fit['c_ms_per_expert']:.2f} m ms, "
                     f"RMSE {fit['rmse_ms']:.1f} ms of a mean {fit['mean_ms']:.1f} ms.\n\n")
    parts.append(markdown_table(
        ["mode", "within-SLO tok/s", "SLO attainment", "all tok/s", "routing mass kept",
         "experts kept / pruned layer-step"],
        [[mode, _ci(t["throughput_within_slo"]), _ci(t["slo_attainment"], 3),
          _ci(t["throughput"]), _ci(t["routing_mass_kept"], 4), _ci(t["experts_kept_mean"], 2)]
         for mode, t in slo["modes"].items()]) + "\n\n")
    for name, ratio in slo.get("ratios", {}).items():
        parts.append(f"- {name.replace('_', ' ')} (`{ratio['base']}`): "
                     f"{_ci(ratio, 2)}x within-SLO throughput\n")
    step = slo.get("step_load")
    if step:
        parts.append(f"- step load {step['low']} -> {step['high']} -> {step['low']} streams "
                     f"(adaptive, loop interval {step['interval_s']} s): SLO met again "
                     f"{step['time_to_slo_s']} s after the jump (worst repetition; None: not "
                     f"within the high stage), pruning stopped {step['time_to_unprune_s']} s "
                     "after the drop\n")
    return "".join(parts)


def reading(slo: dict[str, Any]) -> str:
    ratios = slo.get("ratios", {})
    off, best = ratios.get("adaptive_vs_off"), ratios.get("adaptive_vs_best_static")
    if not off or not best:
        return ""
    modes = slo["modes"]
    mass = {m: modes[m]["routing_mass_kept"]["mean"] or float("nan")
            for m in ("adaptive", best["base"])}
    return (f"Under the load ramp (SLO P99 ITL <= {slo['slo_ms']} ms, {slo['reps']} "
            f"repetitions) the adaptive controller delivers {_ci(off, 2)}x the within-SLO "
            f"throughput of stock serving and {_ci(best, 2)}x that of the best static table "
            f"within the quality budget (`{best['base']}`), keeping {mass['adaptive']:.4f} of "
            f"the routing mass against {mass[best['base']]:.4f}.")


def targets(slo: dict[str, Any]) -> list[list[str]]:
    ratios = slo.get("ratios", {})
    rows = []
    for name, goal in (("adaptive_vs_best_static", 1.0), ("adaptive_vs_off", 1.5)):
        if name in ratios:
            rows.append([f"Adaptive within-SLO throughput >= {goal}x {ratios[name]['base']}",
                         f"{_ci(ratios[name], 2)}x"])
    step = slo.get("step_load")
    if step:
        rows.append(["Step load: SLO met <= 5 s after the jump, no pruning <= 10 s after the "
                     "drop", f"{step['time_to_slo_s']} s / {step['time_to_unprune_s']} s"])
    return rows
