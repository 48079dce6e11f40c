"""The measured pieces of the SLO Pareto experiment (`benchmark/slo_pareto.py`, its module doc
says what each step does): a mode applied through the controller's admin API, one replay with
its quality cost sampled, its scored rows and the non-stationary replay (the step load is
`benchmark/slo_step.py`).
"""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
import threading
import time
from typing import Any

import httpx

from benchmark import slo_load, slo_pareto_score, trace_replay
from benchmark.common import OFF, rounded
from benchmark.serving_pair import ServingPair
from lynx.serving.metrics_reader import samples
from lynx_policy.decide import UNFIXABLE


class Sampler(threading.Thread):
    """Every second: the controller's expected quality cost and the tokens generated."""

    def __init__(self, pair: ServingPair) -> None:
        super().__init__(daemon=True)
        self.pair, self.stop_event, self.points = pair, threading.Event(), []

    def run(self) -> None:
        last = None
        while not self.stop_event.wait(1.0):
            try:
                tokens = sum(slo_load.counters(self.pair.lynx.url)[k] for k in (
                    "sglang:generation_tokens_total", "sglang_generation_tokens_total"))
                cost = self.pair.controller.metric("lynx_controller_expected_quality_cost",
                                                   {"kind": "ppl_rise"})
            except Exception:  # a missed sample is a missed sample
                continue
            if last is not None:
                self.points.append((tokens - last, cost))
            last = tokens

    def cost(self) -> tuple[float | None, float]:
        """(token-weighted cost, share of the tokens whose sample had a cost)."""
        known = [(w, c) for w, c in self.points if w > 0 and not math.isnan(c)]
        total = sum(w for w, _ in self.points if w > 0)
        weight = sum(w for w, _ in known)
        return (sum(w * c for w, c in known) / weight if weight else None,
                weight / total if total else 0.0)


def apply_mode(pair: ServingPair, mode: str, target_ms: float | None,
               metric: str = "tpot", quantile: float = 0.9) -> None:
    """``off``, ``static:<rung>`` or ``adaptive`` with the SLO ``metric`` at ``quantile`` <=
    ``target_ms``; every mode starts from no pruning, in static mode."""
    pair.set_policy(OFF)
    if mode.startswith("static:"):
        pair.pin_rung(mode.split(":", 1)[1])
    elif mode == "adaptive":
        assert target_ms is not None
        pair.put("/v1/slo", {"targets": [{"metric": metric, "quantile": quantile,
                                          "target_ms": target_ms}]})
        pair.set_mode("adaptive")


def unfixable_holds(pair: ServingPair) -> dict[str, float]:
    """The controller's ``lynx_controller_unfixable_holds_total`` per cause ({} if the scrape
    fails: a diagnostic count never ends an hour-long run)."""
    try:
        text = pair.controller.admin.get("/metrics", timeout=5.0).text
    except httpx.HTTPError:
        return {}
    found = {labels.get("cause"): value
             for labels, value in samples(text, "lynx_controller_unfixable_holds_total")}
    return {cause: found[cause] for cause in UNFIXABLE if cause in found}


def replay(pair: ServingPair, schedule: list[trace_replay.ReplayRequest], vocab: int,
           layers: int, during: Any = None) -> dict[str, Any]:
    """One replay; ``during(start_perf)`` runs in a thread alongside it (non-stationary).
    ``unfixable_ticks``: the controller's ticks in it that held a miss pruning cannot fix."""
    before = slo_load.counters(pair.lynx.url)
    held_before = unfixable_holds(pair)
    sampler = Sampler(pair)
    sampler.start()
    start = time.perf_counter()
    side = threading.Thread(target=during, args=(start,), daemon=True) if during else None
    if side:
        side.start()
    try:
        timed = asyncio.run(trace_replay.replay(pair.lynx.url, schedule, vocab))
    finally:
        sampler.stop_event.set()
        sampler.join(10)
        if side:
            side.join(120)
    duration = time.perf_counter() - start
    quality = slo_load.quality_of_run(before, slo_load.counters(pair.lynx.url), layers)
    held = {cause: int(n - held_before[cause]) for cause, n in unfixable_holds(pair).items()
            if cause in held_before}
    cost, known = sampler.cost()
    timings = [t for _, t in timed]
    return {"timings": timings, "start": start, "duration_s": duration,
            "quality_cost_ppl": None if cost is None else rounded(cost, 6),
            "cost_known_share": rounded(known, 3),
            "mass_kept": quality["routing_mass_kept"],
            "failed": sum(1 for t in timings if not t.ok), "unfixable_ticks": held}


def scored(mode: str, rep: int, run: dict[str, Any], targets: dict[str, float],
           only: str | None = None) -> list[dict[str, Any]]:
    """The run's rows of ``summary.json``'s ``slo_pareto.runs``: one per target scored."""
    return [{"mode": mode, "target": name, "rep": rep, "target_ms": ms,
             **slo_pareto_score.score(run["timings"], ms, run["duration_s"]),
             "quality_cost_ppl": run["quality_cost_ppl"], "mass_kept": run["mass_kept"],
             "cost_known_share": run["cost_known_share"],
             "p90_tpot_ms": rounded(slo_pareto_score.p90_tpot_ms(run["timings"]), 2),
             "failed": run["failed"], "unfixable_ticks": run.get("unfixable_ticks", {})}
            for name, ms in targets.items() if only in (None, name)]


def cpu_hog(seconds: float) -> None:
    """One busy process for ``seconds`` (killed afterwards, whatever happens)."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(seconds)
    finally:
        hog.kill()
        hog.wait(10)


def nonstationary(pair: ServingPair, schedule: list[trace_replay.ReplayRequest], vocab: int,
                  layers: int, targets: dict[str, float], statics: list[str], reps: int,
                  ) -> dict[str, Any]:
    """Module doc, step 4: adaptive and ``statics``, each ``reps`` times, rotated."""
    span = schedule[-1].at_s if schedule else 0.0
    switch_s, hog_from, hog_to = 0.5 * span, 0.25 * span, 0.6 * span
    runs = []
    modes = ["adaptive", *dict.fromkeys(statics)]
    for rep in range(reps):
        for mode in modes[rep % len(modes):] + modes[:rep % len(modes)]:
            apply_mode(pair, mode, targets["medium"])

            def during(start: float, adaptive: bool = mode == "adaptive") -> None:
                time.sleep(hog_from)
                hog = threading.Thread(target=cpu_hog, args=(hog_to - hog_from,))
                hog.start()
                time.sleep(max(0.0, switch_s - hog_from))
                if adaptive:  # the operator tightens the SLO mid-run
                    pair.put("/v1/slo", {"targets": [{"metric": "tpot", "quantile": 0.9,
                                                      "target_ms": targets["tight"]}]})
                hog.join()

            run = replay(pair, schedule, vocab, layers, during)
            switch_at = run["start"] + switch_s

            def target_at(sent: float, switch_at: float = switch_at) -> float:
                return targets["medium"] if sent < switch_at else targets["tight"]

            runs.append({"mode": mode, "target": "medium->tight", "rep": rep,
                         **slo_pareto_score.score(run["timings"], target_at, run["duration_s"]),
                         "quality_cost_ppl": run["quality_cost_ppl"],
                         "mass_kept": run["mass_kept"], "failed": run["failed"],
                         "unfixable_ticks": run["unfixable_ticks"]})
            print(f"[slo_pareto] non-stationary rep {rep} {mode}: attainment "
                  f"{runs[-1]['attainment']}, cost {run['quality_cost_ppl']}", flush=True)
    pair.set_policy(OFF)
    return {"switch_s": rounded(switch_s, 2), "hog_s": [rounded(hog_from, 2), rounded(hog_to, 2)],
            "runs": runs}
