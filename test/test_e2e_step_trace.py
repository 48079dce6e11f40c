"""The step trace (``LYNX_STEP_TRACE``) on a real SGLang server with mixed chunks
(``--enable-mixed-chunk``): every prompt token is read as a prefill row and every decode token
as a decode row, exactly once, in the steps SGLang ran. This checks the plugin's reading of a
mixed batch's rows (`lynx.sglang_plugin.step_state.layout_from_forward_batch`: the running
decode requests last, one row each), which decides which rows Lynx may prune, and the
instrument `benchmark/prefill_share.py` attributes latency misses with."""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path

import httpx
import pytest

from benchmark.miss_attribution import load_steps

pytestmark = pytest.mark.slow

CHUNK = 16
RUNNERS, RUNNER_PROMPT, RUNNER_OUTPUT = 4, 8, 48
LATE, LATE_PROMPT, LATE_OUTPUT = 3, 40, 6


def _generate(url: str, ids: list[int], tokens: int, out: list[dict]) -> None:
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": tokens, "temperature": 0,
                                                  "ignore_eos": True}}
    sent = time.perf_counter()
    reply = httpx.post(f"{url}/generate", json=body, timeout=600).json()
    out.append({**reply, "sent": sent, "received": time.perf_counter()})


def test_mixed_steps_split_into_prefill_and_decode_rows_as_sglang_ran_them(
        server_factory, tmp_path: Path) -> None:
    trace = tmp_path / "steps.jsonl"
    budget = {"name": "budget", "budgets": [{"max_batch": 100000, "all_layers": 6}]}
    server = server_factory("qwen3-moe-mini", {
        "LYNX_ENABLED": "1", "LYNX_POLICY": json.dumps(budget), "LYNX_STEP_TRACE": str(trace)},
        ("--enable-mixed-chunk", "--chunked-prefill-size", str(CHUNK), "--disable-radix-cache"))
    warm_up = len(load_steps(trace)) if trace.exists() else 0  # the server's own warm-up
    rng = random.Random(0)
    results: list[dict] = []
    threads = [threading.Thread(target=_generate, args=(
        server.url, [rng.randrange(3, 1000) for _ in range(RUNNER_PROMPT)], RUNNER_OUTPUT,
        results)) for _ in range(RUNNERS)]
    for t in threads:
        t.start()
    time.sleep(0.5)  # the runners decode; the late prompts' chunks join their steps
    late = [threading.Thread(target=_generate, args=(
        server.url, [rng.randrange(3, 1000) for _ in range(LATE_PROMPT)], LATE_OUTPUT,
        results)) for _ in range(LATE)]
    for t in late:
        t.start()
    for t in threads + late:
        t.join()
    time.sleep(0.3)
    steps = load_steps(trace)[warm_up:]
    completions = [r["meta_info"]["completion_tokens"] for r in results]
    assert sorted(completions) == [LATE_OUTPUT] * LATE + [RUNNER_OUTPUT] * RUNNERS
    mixed = [s for s in steps if s.mode == "mixed"]
    assert mixed and all(s.decode_rows >= 1 and 1 <= s.prefill_tokens <= CHUNK for s in mixed)
    prefill_rows = sum(s.prefill_tokens for s in steps if s.mode in ("prefill", "mixed"))
    assert prefill_rows == RUNNERS * RUNNER_PROMPT + LATE * LATE_PROMPT
    decode_rows = sum(s.decode_rows for s in steps if s.mode in ("decode", "mixed"))
    assert decode_rows == sum(c - 1 for c in completions)  # the first token ends a prefill
    # the server's step clock is the client's (CLOCK_MONOTONIC): every step of these requests
    # ended while one of them was in flight, and each saw its own steps
    first, last = min(r["sent"] for r in results), max(r["received"] for r in results)
    assert all(first < s.end_s < last for s in steps)
    for r in results:
        during = [s for s in steps if r["sent"] < s.end_s < r["received"]]
        assert sum(s.mode in ("decode", "mixed") for s in during) >= \
            r["meta_info"]["completion_tokens"] - 1
