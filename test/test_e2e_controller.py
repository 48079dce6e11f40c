"""End to end: SGLang + Lynx plugin + the real controller, under load, on 127.0.0.1."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from lynx.reference.tasks import arithmetic_prompt, heldout_problems
from lynx.serving.client import generate_greedy
from lynx.serving.metrics_reader import metric_sum, samples
from lynx_policy.testing import ControllerProcess, wait_until

# serial: waits of 20-30 s for the runtime's fallback after the controller is killed
pytestmark = [pytest.mark.slow, pytest.mark.serial]
BUDGET_POLICY = {"name": "budget", "budgets": [{"max_batch": 100000, "all_layers": 2}]}


class Load(threading.Thread):
    """Batched greedy requests in a loop (bounded in time), counting failures."""

    def __init__(self, url: str, max_s: float = 240.0) -> None:
        super().__init__(daemon=True)
        self.url, self.max_s = url, max_s
        self.stop_event = threading.Event()
        self.ok = self.failed = 0
        self.prompts = [arithmetic_prompt(a, b) for a, b in heldout_problems(24)]

    def run(self) -> None:
        deadline = time.monotonic() + self.max_s
        while not self.stop_event.is_set() and time.monotonic() < deadline:
            try:
                completions, _ = generate_greedy(self.url, self.prompts, 6, timeout_s=60)
                self.ok += len(completions)
            except httpx.HTTPError:
                self.failed += 1


def _runtime_metric(url: str, name: str, labels: dict[str, str] | None = None) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(v for lab, v in samples(text, name)
               if all(lab.get(k) == val for k, val in (labels or {}).items()))


def test_admin_policy_change_reaches_runtime_and_survives_controller_kill(
    tmp_path, server_factory
) -> None:
    ctl = ControllerProcess.launch(tmp_path / "controller",
                                   overrides={"mode": "static", "policy": {"name": "off"}},
                                   curve=True)
    try:
        server = server_factory("mixtral-mini", env={
            "LYNX_ENABLED": "1", **ctl.runtime_env(), "LYNX_POLICY": '{"name":"off"}',
            "LYNX_STATS_INTERVAL_S": "0.2", "LYNX_STALE_AFTER_S": "3",
        })
        wait_until("replica registered",
                  lambda: len(ctl.admin.get("/v1/replicas").json()["replicas"]) >= 1)
        load = Load(server.url)
        load.start()

        reply = ctl.admin.put("/v1/policy", json=BUDGET_POLICY)
        assert reply.status_code == 200, reply.text
        version = ctl.admin.get("/v1/policy").json()["version"]
        wait_until("runtime applies the new policy version", lambda: _runtime_metric(
            server.url, "lynx_policy_version") == version)
        before = _runtime_metric(server.url, "lynx_experts_kept_total")
        wait_until("pruned steps recorded", lambda: _runtime_metric(
            server.url, "lynx_experts_kept_total") > before)
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
        assert metric_sum(text, "lynx_experts_kept_total") < metric_sum(
            text, "lynx_experts_stock_union_total")

        ctl.kill()  # SIGKILL during load
        wait_until("runtime falls back to the safe policy", lambda: _runtime_metric(
            server.url, "lynx_policy_active", {"policy": "off"}) == 1, timeout_s=20)
        assert _runtime_metric(server.url, "lynx_controller_connected") == 0

        ctl.start()
        restored = ctl.admin.get("/v1/policy").json()
        assert restored["policy"]["name"] == "budget"
        assert restored["policy"]["budgets"][0]["all_layers"] == 2
        assert restored["version"] > version  # versions keep increasing across restarts
        wait_until("runtime re-applies the restored policy", lambda: _runtime_metric(
            server.url, "lynx_policy_active", {"policy": "budget"}) == 1, timeout_s=30)
        assert _runtime_metric(server.url, "lynx_controller_connected") == 1
        load.stop_event.set()
        load.join(timeout=90)
        assert load.failed == 0 and load.ok > 0
    finally:
        ctl.stop()
