"""One streamed request to SGLang's native ``/generate`` endpoint, timed chunk by chunk.

Only the SLO ramp and the step load use it (`benchmark.slo_load`): they change the number of
concurrent streams every few seconds and need every token's arrival time on one clock, which
SGLang's serving benchmark (`benchmark.serving_bench`, used for every fixed-load run) does not
do. The arrival time of every streamed chunk gives TTFT, inter-token latencies (ITL) and
per-request TPOT, as in ``sglang.benchmark.serving``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx


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
                          max_new_tokens: int, input_ids: list[int] | None = None
                          ) -> RequestTiming:
    """One streamed request: ``prompt`` as text, or ``input_ids`` (token ids) when given."""
    source: dict[str, object] = {"text": prompt} if input_ids is None else {
        "input_ids": input_ids}
    payload = {**source, "stream": True,
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
