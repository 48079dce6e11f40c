"""A small closed-loop load generator for SGLang's native ``/generate`` endpoint (streaming).

Each of ``concurrency`` workers sends one request after the other (greedy, ``ignore_eos``, a
fixed number of output tokens) until ``num_requests`` are done; the arrival time of every
streamed chunk gives TTFT, inter-token latencies (ITL) and per-request TPOT, as in
``sglang.benchmark.serving``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx
from tqdm import tqdm

from benchmark.common import percentile


@dataclass
class RequestTiming:
    ok: bool
    start_s: float  # perf_counter at send
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    tokens: int = 0
    itl_s: list[float] = field(default_factory=list)
    itl_at_s: list[float] = field(default_factory=list)  # perf_counter at each gap's end
    chunk_times_s: list[float] = field(default_factory=list)  # absolute perf_counter
    error: str = ""

    @property
    def tpot_s(self) -> float | None:
        if self.tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.tokens - 1)


async def stream_generate(client: httpx.AsyncClient, url: str, prompt: str,
                          max_new_tokens: int) -> RequestTiming:
    payload = {"text": prompt, "stream": True,
               "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0.0,
                                   "ignore_eos": True}}
    start = time.perf_counter()
    timing = RequestTiming(ok=False, start_s=start)
    last = start
    seen = 0
    try:
        async with client.stream("POST", f"{url}/generate", json=payload) as response:
            if response.status_code != 200:
                timing.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return timing
            async for line in response.aiter_lines():
                line = line.strip()
                if not line.startswith("data:"):
                    continue
                body = line[5:].strip()
                if body == "[DONE]":
                    break
                now = time.perf_counter()
                tokens = int(json.loads(body).get("meta_info", {}).get("completion_tokens", 0))
                if tokens <= seen:
                    continue
                if seen == 0:
                    timing.ttft_s = now - start
                else:  # a chunk of n tokens counts as n equal gaps
                    gap = (now - last) / (tokens - seen)
                    timing.itl_s.extend([gap] * (tokens - seen))
                    timing.itl_at_s.extend([now] * (tokens - seen))
                timing.chunk_times_s.append(now)
                seen, last = tokens, now
        timing.tokens = seen
        timing.e2e_s = last - start
        timing.ok = seen > 0
    except (httpx.HTTPError, json.JSONDecodeError, ValueError) as exc:
        timing.error = f"{exc.__class__.__name__}: {exc}"
    return timing


async def _closed_loop(url: str, prompts: Sequence[str], concurrency: int, num_requests: int,
                       max_new_tokens: int, label: str, progress: bool
                       ) -> tuple[list[RequestTiming], float]:
    queue: asyncio.Queue[str] = asyncio.Queue()
    for i in range(num_requests):
        queue.put_nowait(prompts[i % len(prompts)])
    results: list[RequestTiming] = []
    bar = tqdm(total=num_requests, desc=label, leave=False, disable=not progress)
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        async def worker() -> None:
            while True:
                try:
                    prompt = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                results.append(await stream_generate(client, url, prompt, max_new_tokens))
                bar.update(1)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    bar.close()
    return results, wall


def run_load(url: str, prompts: Sequence[str], concurrency: int, num_requests: int,
             max_new_tokens: int, label: str = "", progress: bool = False
             ) -> tuple[list[RequestTiming], float]:
    """(per-request timings, wall seconds) of one closed-loop run."""
    return asyncio.run(_closed_loop(url, prompts, concurrency, num_requests, max_new_tokens,
                                    label, progress))


def summarize(timings: Sequence[RequestTiming], wall_s: float) -> dict[str, float]:
    ok = [t for t in timings if t.ok]
    tpots = [t.tpot_s for t in ok if t.tpot_s is not None]
    itls = [gap for t in ok for gap in t.itl_s]
    tokens = sum(t.tokens for t in ok)
    return {
        "requests": len(timings), "failed": len(timings) - len(ok),
        "tpot_median_ms": percentile(tpots, 50) * 1e3,
        "tpot_p99_ms": percentile(tpots, 99) * 1e3,
        "itl_median_ms": percentile(itls, 50) * 1e3,
        "itl_p99_ms": percentile(itls, 99) * 1e3,
        "ttft_median_ms": percentile([t.ttft_s for t in ok], 50) * 1e3,
        "output_tokens": tokens,
        "output_throughput_tok_s": tokens / wall_s if wall_s > 0 else 0.0,
        "wall_s": wall_s,
    }
