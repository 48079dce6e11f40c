"""Minimal client for SGLang's native ``/generate`` endpoint (greedy, batched)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx


@dataclass(frozen=True)
class Completion:
    text: str
    completion_tokens: int
    e2e_latency_s: float


def generate_greedy(
    base_url: str, prompts: list[str], max_new_tokens: int, timeout_s: float = 300.0,
    stop: list[str] | None = None, ignore_eos: bool = False,
) -> tuple[list[Completion], float]:
    """Send all prompts in one ``/generate`` call (SGLang batches them); returns wall seconds.
    ``ignore_eos``: every prompt decodes exactly ``max_new_tokens`` tokens."""
    payload = {
        "text": prompts,
        "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0.0,
                            **({"stop": stop} if stop else {}),
                            **({"ignore_eos": True} if ignore_eos else {})},
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


class StreamedTraffic(threading.Thread):
    """Streamed greedy additions against ``url`` (a server or a router), ``workers`` at a time,
    until `finish`; counts ``ok`` / ``failed`` requests and keeps ``errors`` (seconds since the
    start, then the error). Streamed because SGLang records inter-token latency for streamed
    requests only; a reply with fewer than two stream chunks counts as failed."""

    def __init__(self, url: str, max_new_tokens: int = 16, workers: int = 6) -> None:
        super().__init__(daemon=True)
        self.url, self.max_new_tokens, self.workers = url, max_new_tokens, workers
        self.stop_event = threading.Event()
        self.ok = self.failed = 0
        self.errors: list[str] = []
        self._clock_start = time.monotonic()

    def _one(self, i: int) -> None:
        body = {"text": f"{i % 90 + 10}+{i % 7 + 11}=", "stream": True,
                "sampling_params": {"max_new_tokens": self.max_new_tokens, "temperature": 0}}
        try:
            with httpx.stream("POST", f"{self.url}/generate", json=body, timeout=60) as reply:
                reply.raise_for_status()
                chunks = sum(1 for line in reply.iter_lines() if line.startswith("data:"))
            if chunks < 2:
                raise ValueError(f"{chunks} stream chunks")
            self.ok += 1
        except (httpx.HTTPError, ValueError) as error:
            self.failed += 1
            self.errors.append(f"{time.monotonic() - self._clock_start:.0f}s {error!r}")

    def run(self) -> None:
        i = 0
        with ThreadPoolExecutor(self.workers) as pool:
            while not self.stop_event.is_set():
                list(pool.map(self._one, range(i, i + self.workers)))
                i += self.workers

    def finish(self, timeout_s: float = 120.0) -> None:
        """Stop sending and wait for the requests in flight."""
        self.stop_event.set()
        if self.is_alive():
            self.join(timeout=timeout_s)
