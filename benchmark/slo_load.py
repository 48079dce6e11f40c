"""Load shapes of the SLO experiments and what is measured under them (no CLI: see
``benchmark/slo_ramp.py``).

- `run_schedule`: closed-loop streaming clients whose number follows a schedule of
  (concurrency, seconds) stages; a sampler polls the Lynx server every ``poll_s``.
- `windows`: per window of the run, the P99 of the inter-token gaps that ended in it, the
  output tokens streamed in it and whether it met the SLO.
- `quality_of_run`: routing mass kept and experts kept over a whole run, from the plugin's
  counters (unpruned rows count as mass 1).
- `step_response`: time to meet the SLO again after a step up, time to stop pruning after the
  step down.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from typing import Any

import httpx

from benchmark.common import percentile, rounded
from benchmark.loadgen import RequestTiming, stream_generate
from lynx.serving.metrics_reader import samples

Stage = tuple[int, float]  # (concurrent streams, seconds)
QUALITY_COUNTERS = ("lynx_experts_kept_total", "lynx_experts_stock_union_total",
                    "lynx_layer_pruned_steps_total", "lynx_routing_mass_kept_total",
                    "lynx_routing_mass_total", "lynx_pruned_rows_total",
                    "sglang:generation_tokens_total", "sglang_generation_tokens_total")


async def _schedule_run(url: str, prompts: list[str], stages: list[Stage], output_len: int,
                        sample: Callable[[], dict[str, Any]], poll_s: float,
                        target: dict[str, int]) -> tuple[list[RequestTiming], list[dict]]:
    peak = max(c for c, _ in stages)
    target["value"] = stages[0][0]
    timings: list[RequestTiming] = []
    timeline: list[dict[str, Any]] = []
    done = asyncio.Event()
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0),
                                 limits=httpx.Limits(max_connections=peak + 4)) as client:
        async def worker(index: int) -> None:
            n = index
            while not done.is_set():
                if index >= target["value"]:
                    await asyncio.sleep(0.02)
                    continue
                timings.append(await stream_generate(client, url, prompts[n % len(prompts)],
                                                     output_len))
                n += peak

        async def schedule() -> None:
            for value, seconds in stages:
                target["value"] = value
                await asyncio.sleep(seconds)
            done.set()

        async def poll() -> None:
            while not done.is_set():
                timeline.append({"t": time.perf_counter(), "target": target["value"],
                                 **await asyncio.to_thread(sample)})
                await asyncio.sleep(poll_s)

        await asyncio.gather(schedule(), poll(), *(worker(i) for i in range(peak)))
    return timings, timeline


def run_schedule(url: str, prompts: list[str], stages: list[Stage], output_len: int,
                 sample: Callable[[], dict[str, Any]], poll_s: float = 1.0
                 ) -> tuple[float, list[RequestTiming], list[dict[str, Any]]]:
    """Run the schedule; returns (start perf_counter, request timings, sampler timeline)."""
    start = time.perf_counter()
    timings, timeline = asyncio.run(_schedule_run(url, prompts, stages, output_len, sample,
                                                  poll_s, {}))
    return start, timings, timeline


def counters(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out = {name: sum(v for _, v in samples(text, name)) for name in QUALITY_COUNTERS}
    out["pruned_decode_steps"] = sum(v for lab, v in samples(text, "lynx_steps_total")
                                     if lab.get("pruned") == "true")
    return out


def windows(timings: list[RequestTiming], timeline: list[dict[str, Any]], start: float,
            end: float, window_s: float, slo_ms: float, quantile: float = 99
            ) -> list[dict[str, Any]]:
    """Per window: target concurrency, the ``quantile`` (default P99) of its inter-token gaps
    [ms], tokens, meets_slo, budget and experts kept (from the timeline)."""
    out = []
    t = start
    while t < end - 1e-9:
        hi = min(t + window_s, end)
        gaps = [g for r in timings for g, at in zip(r.itl_s, r.itl_at_s, strict=True)
                if t <= at < hi]
        tokens = sum(1 for r in timings for at in r.chunk_times_s if t <= at < hi)
        points = [p for p in timeline if t <= p["t"] < hi]
        kept = [p["experts_kept"] for p in points if p.get("experts_kept") is not None]
        tail_ms = percentile(gaps, quantile) * 1e3 if gaps else None
        out.append({"t0_s": rounded(t - start, 2), "t1_s": rounded(hi - start, 2),
                    "target_concurrency": points[-1]["target"] if points else None,
                    f"itl_p{quantile:g}_ms": rounded(tail_ms, 2) if tail_ms is not None else None,
                    "tokens": tokens, "meets_slo": tail_ms is not None and tail_ms <= slo_ms,
                    "experts_kept": rounded(sum(kept) / len(kept), 3) if kept else None,
                    "budget": points[-1].get("budget") if points else None})
        t = hi
    return out


def quality_of_run(before: dict[str, float], after: dict[str, float], layers: int
                   ) -> dict[str, float | None]:
    """Routing mass kept over every decode row and layer of the run (a row that was not
    pruned keeps all of its mass), experts kept per pruned layer-step and the share of the
    stock union that was read."""
    d = {k: after[k] - before.get(k, 0.0) for k in after}
    tokens = d["sglang:generation_tokens_total"] + d["sglang_generation_tokens_total"]
    row_layers = tokens * layers
    mass_rate = (d["lynx_routing_mass_kept_total"] / d["lynx_routing_mass_total"]
                 if d["lynx_routing_mass_total"] else 1.0)
    pruned_share = min(1.0, d["lynx_pruned_rows_total"] / row_layers) if row_layers else 0.0
    steps = d["lynx_layer_pruned_steps_total"]
    return {
        "routing_mass_kept": rounded(1.0 - (1.0 - mass_rate) * pruned_share, 5),
        "pruned_row_share": rounded(pruned_share, 4),
        "experts_kept_mean": rounded(d["lynx_experts_kept_total"] / steps, 3) if steps else None,
        "kept_over_union": rounded(d["lynx_experts_kept_total"]
                                   / d["lynx_experts_stock_union_total"], 4)
        if d["lynx_experts_stock_union_total"] else None,
    }


def step_response(timings: list[RequestTiming], timeline: list[dict[str, Any]], start: float,
                  stages: list[Stage], slo_ms: float, window_s: float = 1.0,
                  quantile: float = 99) -> dict[str, Any]:
    """For a low → high → low schedule: seconds from the jump until every later window of the
    high stage meets the SLO (``None``: the last window did not), and seconds from the drop
    until the last sampled increase of the pruned-step counter (0: none after the drop)."""
    jump = start + stages[0][1]
    drop = jump + stages[1][1]
    end = drop + stages[2][1]
    high = windows(timings, timeline, jump, drop, window_s, slo_ms, quantile)
    time_to_slo: float | None = None
    for i, w in enumerate(high):
        if all(x["meets_slo"] for x in high[i:]):
            time_to_slo = w["t0_s"]
            break
    pruned = [(p["t"], p["pruned_steps"]) for p in timeline if p.get("pruned_steps") is not None]
    last_increase = drop
    for (_, a), (t1, b) in itertools.pairwise(pruned):
        if t1 > drop and b > a:
            last_increase = t1
    return {"time_to_slo_s": rounded(time_to_slo, 2) if time_to_slo is not None else None,
            "time_to_unprune_s": rounded(last_increase - drop, 2),
            "high_windows_meeting_slo": sum(w["meets_slo"] for w in high),
            "high_windows": len(high),
            "windows": windows(timings, timeline, start, end, window_s, slo_ms, quantile)}
