"""Shared set-up of the controller end-to-end tests (test_e2e_model_control.py,
test_e2e_ladder_control.py): a real SGLang CPU server with the plugin on the widened
qwen3-moe-mini, a real Prometheus scraping it, the real controller, and the operator's
``lynx-policy profile`` making its latency model ready; closed-loop streaming load that is
always stopped, also when an assertion fails while it runs.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from test_policy_control_loop import running_prometheus

from lynx.serving.metrics_reader import samples
from lynx.serving.server import SglangServer, free_port
from lynx_policy.config import ObserveConfig, SloTarget
from lynx_policy.observe import promql_for
from lynx_policy.testing import ControllerProcess, wait_until

LOW, HIGH = 1, 32
QUANTILE = 0.9


class Streams(threading.Thread):
    """``n`` closed-loop streaming clients, greedy, 16 tokens each, until stopped. A failed
    request is counted and retried after 0.2 s, never in a hot loop."""

    def __init__(self, url: str, n: int) -> None:
        super().__init__(daemon=True)
        self.url, self.n = url, n
        self.stop_event = threading.Event()
        self.failed = 0

    def _client(self, i: int) -> None:
        while not self.stop_event.is_set():
            body = {"text": f"{100 + i}+{200 + i}=", "stream": True, "sampling_params": {
                "max_new_tokens": 16, "temperature": 0, "ignore_eos": True}}
            try:  # streamed: SGLang records inter-token latency for streamed requests only
                with httpx.stream("POST", f"{self.url}/generate", json=body,
                                  timeout=120) as reply:
                    reply.raise_for_status()
                    for _ in reply.iter_lines():
                        pass
            except httpx.HTTPError:
                self.failed += 1
                self.stop_event.wait(0.2)

    def run(self) -> None:
        threads = [threading.Thread(target=self._client, args=(i,), daemon=True)
                   for i in range(self.n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


@contextmanager
def under_load(url: str, n: int, seconds: float) -> Iterator[Streams]:
    """``n`` streams for ``seconds`` before the body runs; stopped (joined) when it exits."""
    load = Streams(url, n)
    load.start()
    try:
        time.sleep(seconds)
        yield load
    finally:
        load.stop_event.set()
        load.join(150)
        assert not load.is_alive(), "load generator still running after 150 s"


def decode_steps(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {p: sum(v for lab, v in samples(text, "lynx_steps_total")
                   if lab.get("mode") == "decode" and lab.get("pruned") == p)
            for p in ("true", "false")}


def itl_quantile_s(prometheus: str, window_s: int = 6) -> float:
    """The controller's own query (both spellings of the histogram's name) over ``window_s``,
    polled until Prometheus has scraped enough of the load to answer with a number."""
    query = promql_for(SloTarget(metric="itl", quantile=QUANTILE),
                       ObserveConfig(rate_window_s=window_s))
    value = [math.nan]

    def answered() -> bool:
        body = httpx.get(f"{prometheus}/api/v1/query", params={"query": query},
                         timeout=10).json()
        result = body["data"]["result"]
        value[0] = float(result[0]["value"][1]) if result else math.nan
        return math.isfinite(value[0])

    wait_until("a finite ITL quantile from Prometheus", answered, timeout_s=30)
    return value[0]


@dataclass
class ProfiledTestbed:
    folder: Path
    server: SglangServer
    ctl: ControllerProcess
    prometheus: str
    fit: dict


@contextmanager
def profiled_testbed(tmp_path: Path, before_profile: str | None = None
                     ) -> Iterator[ProfiledTestbed]:
    """Prometheus, controller (static, policy off) and the plugin-on server on
    qwen3-moe-mini widened x16; ``lynx-policy profile`` run; the fit asserted ready. With
    ``before_profile="ladder"`` the folder's ladder is PUT before profiling. Everything is
    stopped on exit, whatever happened."""
    from benchmark.e2e_decode import widened

    folder = widened("qwen3-moe-mini", 16)
    port = free_port()
    with running_prometheus(tmp_path / "prometheus", port) as prometheus:
        ctl = ControllerProcess.launch(tmp_path / "ctl", overrides={
            "mode": "static", "policy": {"name": "off"}, "floor": {"min_budget": 4},
            "loop": {"interval_s": 0.5, "backoff_s": [0.5], "stats_window_s": 5.0},
            "observe": {"prometheus_url": prometheus, "rate_window_s": 4},
            "adaptive": {"relax_after_ticks": 2, "max_step_experts": 16}})
        server = SglangServer(folder, port, env={
            "OMP_NUM_THREADS": "1", "LYNX_ENABLED": "1", **ctl.runtime_env(),
            "LYNX_POLICY": '{"name":"off"}', "LYNX_STATS_INTERVAL_S": "0.5",
            "LYNX_SAFE_POLICY": "keep"}, extra_args=("--dtype", "float32"),
            log_path=tmp_path / "sglang.log", ready_timeout_s=600)
        try:
            server.start()
            wait_until("replica registered",
                       lambda: len(ctl.admin.get("/v1/replicas").json()["replicas"]) == 1)
            if before_profile == "ladder":
                ctl.admin.put("/v1/ladder", content=(folder / "lynx_ladder.json").read_bytes()
                              ).raise_for_status()
            profile = subprocess.run(
                [sys.executable, "-m", "lynx_policy.cli", "profile", "--admin-url",
                 ctl.admin_url, "--server-url", server.url, "--budgets", "off,8,4",
                 "--concurrency", "2,24", "--seconds", "5", "--slice-s", "1",
                 "--output-len", "16"],
                env={**os.environ, "LYNX_ADMIN_TOKEN": ctl.token}, capture_output=True,
                text=True, timeout=600)
            assert profile.returncode == 0, profile.stdout + profile.stderr
            (fit,) = [r["fit"] for r in ctl.admin.get("/v1/model").json()["replicas"].values()]
            assert fit["ready"] and fit["c_ms_per_expert"] > 0, fit
            yield ProfiledTestbed(folder, server, ctl, prometheus, fit)
        finally:
            server.stop()
            ctl.stop()
