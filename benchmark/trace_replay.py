"""The Azure LLM inference trace 2023 (conversation), scaled to a served model, and its replay.

Trace: ``../shared/traces/azure_llm_inference_2023_conv.csv`` — Azure Public Dataset, CC-BY 4.0
(Patel et al., "Splitwise: Efficient generative LLM inference using phase splitting", ISCA
2024); `ATTRIBUTION` travels with every derived file. 19,366 requests over 58.4 minutes,
per-minute counts swinging ~2.5x.

Recipe (`scale_trace`, one function): take the excerpt [``start_s``, ``start_s + duration_s``)
of the trace; compress its clock by ``time_scale`` (a 10-minute excerpt at 4x replays in 2.5
minutes, every per-minute swing kept in the compressed minutes); thin or repeat arrivals
*systematically* to the offered rate (request i gets floor((i+1) p) - floor(i p) copies,
p = wanted / available), so every stretch of the excerpt keeps its share of the requests to
within one; scale token lengths linearly to the model (``prompt_scale``, ``output_scale``),
prompts capped at ``max_prompt`` so that decode dominates, outputs at ``max_output``, and
prompt + output within ``max_context``.

Replay (`replay`): our own open-loop replay over SGLang's native ``/generate`` (streamed,
`benchmark.loadgen.stream_generate`), not SGLang's Mooncake replay: that one builds prompts
from ``hash_ids`` in ~130-token blocks and ignores ``input_length``, and the Azure trace has
no hash ids. Prompts are seeded random token ids of the scaled length; outputs are forced to
the scaled length (``ignore_eos``).
"""

from __future__ import annotations

import asyncio
import csv
import math
import random
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx

from benchmark.loadgen import RequestTiming, stream_generate

TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / \
    "azure_llm_inference_2023_conv.csv"
ATTRIBUTION = ("Derived from the Azure LLM inference trace 2023 (conversation), Azure Public "
               "Dataset, CC-BY 4.0; Patel et al., Splitwise, ISCA 2024.")


@dataclass(frozen=True)
class TraceRequest:
    at_s: float  # seconds since the trace's first request
    context_tokens: int
    generated_tokens: int


@dataclass(frozen=True)
class ReplayRequest:
    at_s: float  # seconds since the replay's start
    prompt_tokens: int
    output_tokens: int


def load_trace(path: Path = TRACE) -> list[TraceRequest]:
    """The trace's requests in arrival order. Raises ValueError (naming the file and row) on
    a malformed row."""
    rows: list[TraceRequest] = []
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        first: datetime | None = None
        for line, row in enumerate(reader, start=2):
            try:
                stamp = datetime.fromisoformat(row["TIMESTAMP"][:26])
                context, generated = int(row["ContextTokens"]), int(row["GeneratedTokens"])
            except (KeyError, ValueError, TypeError) as exc:
                raise ValueError(f"{path}:{line}: not a trace row ({exc})") from None
            first = first or stamp
            rows.append(TraceRequest((stamp - first).total_seconds(), context, generated))
    rows.sort(key=lambda r: r.at_s)
    return rows


def scale_trace(trace: list[TraceRequest], *, start_s: float, duration_s: float,
                time_scale: float, offered_rps: float, max_context: int, max_prompt: int,
                max_output: int, prompt_scale: float = 1.0, output_scale: float = 1.0
                ) -> list[ReplayRequest]:
    """The replay schedule (see the module doc). ``offered_rps``: requests per second of
    replay time; ``time_scale`` >= 1 compresses the clock. Raises ValueError on an empty
    excerpt or bad bounds."""
    if not (duration_s > 0 and time_scale > 0 and offered_rps > 0):
        raise ValueError("duration_s, time_scale and offered_rps must be > 0")
    if not (max_prompt >= 1 and max_output >= 1 and max_prompt + 1 <= max_context):
        raise ValueError(f"bad token bounds: max_prompt={max_prompt}, max_output={max_output}, "
                         f"max_context={max_context}")
    excerpt = [r for r in trace if start_s <= r.at_s < start_s + duration_s]
    if not excerpt:
        raise ValueError(f"no trace requests in [{start_s}, {start_s + duration_s}) s")
    wanted = offered_rps * duration_s / time_scale
    p = wanted / len(excerpt)
    out: list[ReplayRequest] = []
    for i, request in enumerate(excerpt):
        copies = math.floor((i + 1) * p + 1e-9) - math.floor(i * p + 1e-9)
        prompt = min(max_prompt, max(1, round(request.context_tokens * prompt_scale)))
        output = min(max_output, max_context - prompt,
                     max(1, round(request.generated_tokens * output_scale)))
        at = (request.at_s - start_s) / time_scale
        out += [ReplayRequest(at + 1e-3 * c, prompt, output) for c in range(copies)]
    return sorted(out, key=lambda r: r.at_s)


def rate_shape(times_s: list[float], bin_s: float, duration_s: float) -> list[float]:
    """Share of the requests arriving in each ``bin_s`` bin of [0, duration_s)."""
    bins = [0] * max(1, math.ceil(duration_s / bin_s - 1e-9))
    for t in times_s:
        bins[min(len(bins) - 1, int(t // bin_s))] += 1
    total = sum(bins) or 1
    return [b / total for b in bins]


async def replay(url: str, schedule: list[ReplayRequest], vocab: int, seed: int = 0,
                 timeout_s: float = 600.0) -> list[tuple[ReplayRequest, RequestTiming]]:
    """Send every request of ``schedule`` at its time (open loop: late responses never delay
    later arrivals) and return the timings in schedule order."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, vocab) for _ in range(r.prompt_tokens)] for r in schedule]
    limits = httpx.Limits(max_connections=4096, max_keepalive_connections=256)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        start = time.perf_counter()

        async def one(index: int) -> RequestTiming:
            request = schedule[index]
            await asyncio.sleep(max(0.0, start + request.at_s - time.perf_counter()))
            return await stream_generate(client, url, "", request.output_tokens,
                                         input_ids=prompts[index])

        timings = await asyncio.gather(*(one(i) for i in range(len(schedule))))
    return list(zip(schedule, timings, strict=True))


async def closed_loop_rps(url: str, requests: list[ReplayRequest], vocab: int,
                          concurrency: int, seconds: float, seed: int = 1) -> float:
    """Capacity of a server for this request mix: ``concurrency`` closed-loop clients send
    ``requests`` (their lengths, not their times) back to back for ``seconds``; returns
    completed requests per second. Raises ValueError without requests."""
    if not requests:
        raise ValueError("no requests to measure the capacity with")
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=concurrency + 4)
    done: list[float] = []
    async with httpx.AsyncClient(timeout=600.0, limits=limits) as client:
        start = time.perf_counter()
        end = start + seconds

        async def worker(index: int) -> None:
            n = index
            while time.perf_counter() < end:
                request = requests[n % len(requests)]
                n += concurrency
                ids = [rng.randrange(3, vocab) for _ in range(request.prompt_tokens)]
                timing = await stream_generate(client, url, "", request.output_tokens,
                                               input_ids=ids)
                if timing.ok and time.perf_counter() <= end:
                    done.append(time.perf_counter())

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return len(done) / seconds
