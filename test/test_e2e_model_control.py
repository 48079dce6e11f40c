"""Controller v2 end to end: a real SGLang CPU server with the plugin, a real Prometheus
scraping it, the real controller, the operator's ``lynx-policy profile`` seeding the latency
model, then a load step (1 -> 32 -> 1 streams) under the model planner.

Asserted (no timings): the profile makes the model ready with a positive cost per expert;
under the high load the runtime prunes decode steps and ``GET /v1/model`` explains the pruned
bucket (predicted above target); after the drop new decode steps run unpruned, the one-stream
bucket being below ``adaptive.min_batch``.

The SLO is a P90 ITL: one stream makes ~100 tokens in the 4 s window, too few for a P99 (its
maximum: one scheduling outlier on this 2-core machine; `observe.min_tail_samples`).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from test_policy_control_loop import running_prometheus

from lynx.serving.metrics_reader import samples
from lynx.serving.server import SglangServer, free_port
from lynx_policy.config import ObserveConfig, SloTarget
from lynx_policy.observe import promql_for
from lynx_policy.testing import ControllerProcess, wait_until

pytestmark = pytest.mark.slow
LOW, HIGH = 1, 32
QUANTILE = 0.9


class Streams(threading.Thread):
    """``n`` closed-loop streaming clients, greedy, 16 tokens each, until stopped."""

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

    def run(self) -> None:
        threads = [threading.Thread(target=self._client, args=(i,), daemon=True)
                   for i in range(self.n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


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


def under_load(url: str, n: int, seconds: float) -> Streams:
    load = Streams(url, n)
    load.start()
    time.sleep(seconds)
    return load


def test_profile_then_load_step_prunes_only_while_needed(tmp_path: Path) -> None:
    from benchmark.e2e_decode import widened

    port = free_port()
    with running_prometheus(tmp_path / "prometheus", port) as prometheus:
        ctl = ControllerProcess.launch(tmp_path / "ctl", overrides={
            "mode": "static", "policy": {"name": "off"}, "floor": {"min_budget": 4},
            "loop": {"interval_s": 0.5, "backoff_s": [0.5], "stats_window_s": 5.0},
            "observe": {"prometheus_url": prometheus, "rate_window_s": 4},
            "adaptive": {"relax_after_ticks": 2, "max_step_experts": 16}})
        server = SglangServer(widened("qwen3-moe-mini", 16), port, env={
            "OMP_NUM_THREADS": "1", "LYNX_ENABLED": "1", **ctl.runtime_env(),
            "LYNX_POLICY": '{"name":"off"}', "LYNX_STATS_INTERVAL_S": "0.5",
            "LYNX_SAFE_POLICY": "keep"}, extra_args=("--dtype", "float32"),
            log_path=tmp_path / "sglang.log", ready_timeout_s=600)
        try:
            server.start()
            wait_until("replica registered",
                       lambda: len(ctl.admin.get("/v1/replicas").json()["replicas"]) == 1)
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
            assert ctl.admin.get("/v1/mode").json()["mode"] == "static"  # profile restored it

            # Stock P90 ITL at both loads, then an SLO between them.
            itl = {}
            for n in (LOW, HIGH):
                load = under_load(server.url, n, 8)
                itl[n] = itl_quantile_s(prometheus)
                load.stop_event.set()
                load.join(60)
            assert itl[HIGH] > 1.3 * itl[LOW], itl
            target_ms = 1000 * (itl[LOW] * itl[HIGH]) ** 0.5
            slo = {"metric": "itl", "quantile": QUANTILE, "target_ms": target_ms}
            ctl.admin.put("/v1/slo", json={"targets": [slo]}).raise_for_status()
            ctl.admin.put("/v1/mode", json={"mode": "adaptive"}).raise_for_status()

            load = under_load(server.url, HIGH, 2)
            before = decode_steps(server.url)
            wait_until("decode steps pruned under the high load",
                       lambda: decode_steps(server.url)["true"] > before["true"] + 20,
                       timeout_s=60)
            view = ctl.admin.get("/v1/model").json()
            assert view["planner"] == "model", view["reason"]
            (high,) = [w for w in view["why"] if w["max_batch"] == HIGH]
            assert high["budget"] < high["union"], view["why"]  # the high load's bucket prunes
            # ... because the model predicts its unpruned step above the relax band
            assert high["unpruned_ms"] > high["target_ms"] * (1 - 0.2) / (1 - 0.1), high
            for why in view["why"]:  # every bucket has a budget and a reason
                assert why["reason"] and why["budget"] >= 4, why
            load.stop_event.set()
            load.join(60)

            load = under_load(server.url, LOW, 8)  # the drop; then new steps stay unpruned
            settled = decode_steps(server.url)
            time.sleep(6)  # several control ticks under the low load...
            wait_until("unpruned decode steps under the low load",  # ... and >20 new steps
                       lambda: decode_steps(server.url)["false"] > settled["false"] + 20,
                       timeout_s=60)
            after = decode_steps(server.url)
            load.stop_event.set()
            load.join(60)
            assert after["true"] == settled["true"], (settled, after)
            (low,) = [w for w in ctl.admin.get("/v1/model").json()["why"] if w["max_batch"] == 2]
            assert low["budget"] >= low["union"] and "min_batch" in low["reason"], low
            assert load.failed == 0
        finally:
            server.stop()
            ctl.stop()
