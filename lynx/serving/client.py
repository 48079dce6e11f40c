"""Minimal client for SGLang's native ``/generate`` endpoint (greedy, batched)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import httpx


@dataclass(frozen=True)
class Completion:
    text: str
    completion_tokens: int
    e2e_latency_s: float


def generate_greedy(
    base_url: str, prompts: list[str], max_new_tokens: int, timeout_s: float = 300.0,
    stop: list[str] | None = None,
) -> tuple[list[Completion], float]:
    """Send all prompts in one ``/generate`` call (SGLang batches them); returns wall seconds."""
    payload = {
        "text": prompts,
        "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0.0,
                            **({"stop": stop} if stop else {})},
    }
    start = time.perf_counter()
    response = httpx.post(f"{base_url}/generate", json=payload, timeout=timeout_s)
    wall = time.perf_counter() - start
    response.raise_for_status()
    items = response.json()
    if isinstance(items, dict):
        items = [items]
    return [
        Completion(
            text=item["text"],
            completion_tokens=int(item["meta_info"]["completion_tokens"]),
            e2e_latency_s=float(item["meta_info"]["e2e_latency"]),
        )
        for item in items
    ], wall
