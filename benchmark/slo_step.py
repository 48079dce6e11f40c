"""Step load of the SLO Pareto experiment (`benchmark/slo_pareto.py`, step 5): 4 -> 48 -> 4
closed-loop streams under the adaptive controller, scored in windows of 1 s.

The step has its own SLO, chosen so that the question it asks has an answer:
- **Metric: the median inter-token gap.** The decode step sets it, so pruning moves it. A P90
  of 1 s windows is owned by the prefills of the requests that start in them (48 streams of 32
  tokens start ~1.5 requests per decode step); the controller leaves such misses alone by
  design (`lynx_policy.decide`), so a P90 target measured whether prefills stopped, not
  whether the controller acted.
- **Target: half-way between what `off` and the lowest usable rung measure at the high load**
  (statically, before the step). `off` misses it and pruning can meet it. The replay's medium
  target (P90 TPOT at ~1.7-1.9 requests/s) is no such target: at 48 streams even the lowest rung
  could not meet it (stop 33's run: P90 ITL 137-325 ms against 83 ms), so "met again within
  5 s" could not be reached by any controller.
"""

from __future__ import annotations

import argparse
from typing import Any

import httpx

from benchmark import slo_load
from benchmark.common import OFF, percentile, rounded
from benchmark.serving_pair import ServingPair
from benchmark.slo_pareto_runs import apply_mode
from benchmark.slo_ramp import prompts_for_load

LOW, HIGH = 4, 48
QUANTILE = 50  # the median inter-token gap (module doc)


def choose_target(off_ms: float, floor_ms: float, share: float = 0.5) -> float | None:
    """The SLO [ms] ``share`` of the way from ``off_ms`` down to ``floor_ms`` (median ITLs at
    the high load, unpruned and at the lowest usable rung); None when the rung measured no
    faster than ``off``, so that no target separates them."""
    if not off_ms > floor_ms > 0:
        return None
    return off_ms - share * (off_ms - floor_ms)


def target_basis(off_ms: float | None, floor_rung: str,
                 floor_ms: float | None) -> dict[str, Any]:
    """The step's SLO and what it was chosen from, as the JSON records it: median ITLs [ms]
    at the high load (None where a probe measured no gap) and ``target_ms`` by
    `choose_target`, rounded to 0.01 ms; ``target_ms`` None where either probe measured
    nothing or the rung was no faster (a quick run's short probes can give either)."""
    target = choose_target(off_ms, floor_ms) if off_ms and floor_ms else None
    return {"interval_s": 1.0, "metric": f"itl p{QUANTILE}", "high_streams": HIGH,
            "off_ms": _round_or_none(off_ms), "floor_rung": floor_rung,
            "floor_ms": _round_or_none(floor_ms), "target_ms": _round_or_none(target)}


def _round_or_none(value: float | None) -> float | None:
    return None if value is None else rounded(value, 2)


def static_median_itl_ms(pair: ServingPair, streams: int, seconds: float, settle_s: float,
                         output_len: int) -> float | None:
    """Median inter-token gap [ms] of ``streams`` closed-loop clients over ``seconds``, the
    first ``settle_s`` left out (the first prefills); the policy is whatever is applied."""
    start, timings, _ = slo_load.run_schedule(pair.lynx.url, prompts_for_load(),
                                              [(streams, seconds)], output_len, dict)
    gaps = [g for r in timings for g, at in zip(r.itl_s, r.itl_at_s, strict=True)
            if at >= start + settle_s]
    return percentile(gaps, QUANTILE) * 1e3 if gaps else None


def with_experts_kept(timeline: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each sampled point gets ``experts_kept``: experts kept per pruned layer-step since the
    point before (None where no layer-step was pruned in between)."""
    out, last = [], None
    for point in timeline:
        kept = None
        if last is not None:
            steps = point["layer_pruned_steps"] - last["layer_pruned_steps"]
            if steps > 0:
                kept = (point["experts_kept_total"] - last["experts_kept_total"]) / steps
        out.append({**point, "experts_kept": kept})
        last = point
    return out


def controller_tick(pair: ServingPair) -> dict[str, Any] | None:
    """The controller's last tick (``GET /v1/state``): number, direction, reason, its latency
    readings, and the high load's bucket plan (``GET /v1/model``'s ``why``: rung, predicted
    and target ms, reason), compact; None if the admin API did not answer."""
    try:
        tick = pair.controller.admin.get("/v1/state").json()["loop"]["last_tick"]
        why = pair.controller.admin.get("/v1/model").json().get("why") or []
    except (httpx.HTTPError, ValueError, KeyError):
        return None
    if tick is None:
        return None
    busy = next((w for w in why if w.get("max_batch", 0) >= HIGH), None)
    return {"tick": tick["tick"], "direction": tick["direction"], "signal": tick["signal"],
            "reason": tick["reason"],
            "high_bucket": None if busy is None else {
                k: busy.get(k) for k in ("max_batch", "rung", "budget", "predicted_ms",
                                         "unpruned_ms", "target_ms", "reason")},
            "readings": [{k: r.get(k) for k in ("metric", "quantile", "observed_ms",
                                                 "bounds_ms", "samples", "window_s")}
                         for r in tick["latencies"]]}


def step_load(pair: ServingPair, floor_rung: str, args: argparse.Namespace) -> dict[str, Any]:
    """Measure ``off`` and ``floor_rung`` at the high load, set the adaptive controller's SLO
    between them (module doc), run 4 -> 48 -> 4 streams and score every 1 s window by its
    median inter-token gap. Returns `slo_load.step_response`'s keys with the target's basis and
    the controller's ticks (`controller_tick`) as sampled;
    ``time_to_slo_s`` None with ``target_ms`` None where the rung measured no faster."""
    probe_s, settle_s = (6.0, 2.0) if args.quick else (12.0, 4.0)
    measured = {}
    for name in ("off", floor_rung):
        apply_mode(pair, "off" if name == "off" else f"static:{name}", None)
        measured[name] = static_median_itl_ms(pair, HIGH, probe_s, settle_s,
                                              args.step_output_len)
    basis = target_basis(measured["off"], floor_rung, measured[floor_rung])
    target = basis["target_ms"]
    print(f"[slo_pareto] step load at {HIGH} streams: median ITL off {basis['off_ms']} ms, "
          f"{floor_rung} {basis['floor_ms']} ms -> target {basis['target_ms']} ms", flush=True)
    if target is None:
        pair.set_policy(OFF)
        return {**basis, "time_to_slo_s": None, "time_to_unprune_s": None}
    apply_mode(pair, "adaptive", target, metric="itl", quantile=QUANTILE / 100)
    stages = [(LOW, 4.0 if args.quick else 8.0), (HIGH, args.step_high_s),
              (LOW, 6.0 if args.quick else 15.0)]

    def sample() -> dict[str, Any]:
        c = slo_load.counters(pair.lynx.url)
        return {"pruned_steps": c["pruned_decode_steps"],
                "layer_pruned_steps": c["lynx_layer_pruned_steps_total"],
                "experts_kept_total": c["lynx_experts_kept_total"],
                "controller": controller_tick(pair)}

    start, timings, timeline = slo_load.run_schedule(
        pair.lynx.url, prompts_for_load(), stages, args.step_output_len, sample, poll_s=0.5)
    pair.set_policy(OFF)
    out = slo_load.step_response(timings, with_experts_kept(timeline), start, stages, target,
                                 quantile=QUANTILE)
    ticks = {p["controller"]["tick"]: {"t_s": rounded(p["t"] - start, 2), **p["controller"]}
             for p in timeline if p.get("controller")}
    return {**basis, **out, "controller_ticks": list(ticks.values())}
