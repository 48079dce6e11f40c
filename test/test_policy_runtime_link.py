"""RuntimeLink against a real controller process: register, update, SIGKILL, stale, recover."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from lynx_policy.testing import ControllerProcess
from lynx_protocol.link import LinkSettings, LinkTransition, RuntimeLink
from lynx_protocol.messages import PolicyUpdate, Register, StepStats

# serial: reconnects pumped against wall-clock deadlines (it failed beside a benchmark)
pytestmark = pytest.mark.serial

REGISTER = Register(replica_id="e2e-0", model="m", num_layers=3, num_experts=8, top_k=2,
                    policies=["off", "budget"])
POLICY = {"name": "budget", "budgets": [{"max_batch": 4096, "all_layers": 5}]}


def pump(link: RuntimeLink, until: Callable[[], bool], timeout_s: float,
         updates: list[PolicyUpdate]) -> float:
    """Poll like a scheduler loop (every 5 ms) until ``until()``; returns the seconds it took."""
    started = time.monotonic()
    while not until():
        assert time.monotonic() - started < timeout_s, "condition not reached"
        update = link.poll_update()
        if update is not None:
            updates.append(update)
            link.mark_acknowledged(update.version)
            link.mark_applied(update.version)
        time.sleep(0.005)
    return time.monotonic() - started


def test_runtime_link_through_controller_crash_and_restart(tmp_path: Path) -> None:
    transitions: list[LinkTransition] = []
    updates: list[PolicyUpdate] = []
    with ControllerProcess.launch(tmp_path / "ctl", {"mode": "static"}) as ctl:
        link = RuntimeLink(REGISTER, LinkSettings(endpoint=ctl.endpoint, heartbeat_s=0.2,
                                                  staleness_s=1.5),
                           on_transition=transitions.append)
        with link:
            pump(link, lambda: link.registered and bool(updates), 10, updates)
            assert link.state == "connected" and updates[-1].policy.name == "off"
            replicas = ctl.admin.get("/v1/replicas").json()["replicas"]
            assert replicas[0]["replica_id"] == "e2e-0" and replicas[0]["connected"]

            put = ctl.admin.put("/v1/policy", json=POLICY).json()
            pump(link, lambda: updates[-1].version == put["version"], 5, updates)
            assert updates[-1].policy.budgets[0].all_layers == 5
            pump(link, lambda: ctl.admin.get("/v1/replicas").json()["replicas"][0][
                "applied_policy_version"] == put["version"], 5, updates)
            assert ctl.admin.get("/v1/replicas").json()["replicas"][0][
                "acknowledged_policy_version"] == put["version"]

            stats = StepStats(replica_id="e2e-0", seq=1, window_s=1.0, batch_size_edges=[8, 64],
                              batch_size_counts=[0, 12, 0], decode_steps=12, prefill_steps=1,
                              mixed_steps=0, experts_kept_mean=[5.0] * 3,
                              stock_union_mean=[7.5] * 3, routing_mass_kept=0.9,
                              step_latency_p50_ms=10.0, step_latency_p99_ms=30.0,
                              applied_policy_version=put["version"])
            assert link.send(stats)
            pump(link, lambda: ctl.admin.get("/v1/replicas").json()["replicas"][0][
                "last_stats"] is not None, 5, updates)

            link.take_transitions()
            killing = time.monotonic()
            ctl.kill()  # SIGKILL: no goodbye on the socket
            killed = time.monotonic()
            pump(link, lambda: link.state == "stale", 10, updates)
            (stale,) = link.take_transitions()
            assert (stale.old, stale.new) == ("connected", "stale")
            # Staleness (1.5 s) counts from the first unanswered message: sent at the earliest
            # just before the kill, at the latest at the first poll after it (+ heartbeat_s).
            assert stale.at - killing > 1.0 and stale.at - killed < 4.0, (
                f"stale {stale.at - killing:.2f}s after the kill began, "
                f"{stale.at - killed:.2f}s after it ended")

            applied_before_crash = updates[-1].version
            ctl.start()
            pump(link, lambda: link.state == "connected" and link.registered
                 and updates[-1].version > applied_before_crash, 15, updates)
            assert [(t.old, t.new) for t in link.take_transitions()] == [("stale", "connected")]
            assert updates[-1].policy == updates[-2].policy  # same policy, resumed
            state = ctl.admin.get("/v1/state").json()
            assert state["version"] == updates[-1].version and state["resumed"]
            assert link.counters.rejected == {}
