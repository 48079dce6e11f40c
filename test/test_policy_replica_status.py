"""Per-replica delivery status against a real controller: acknowledged-but-idle is fine, not
acknowledging the current version within ``link.ack_timeout_s`` makes ``/healthz`` degraded;
leftovers of an interrupted state write are removed at start."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from lynx_policy.testing import ControllerProcess
from lynx_protocol.link import LinkSettings, RuntimeLink
from lynx_protocol.messages import Register

# serial: a 1 s acknowledgement timeout decides the health it asserts
pytestmark = pytest.mark.serial

POLICY = {"name": "budget", "budgets": [{"max_batch": 64, "all_layers": 4}]}


def _link(ctl: ControllerProcess, name: str) -> RuntimeLink:
    return RuntimeLink(Register(replica_id=name, model="m", num_layers=2, num_experts=8,
                                top_k=2, policies=["off", "budget"]),
                       LinkSettings(endpoint=ctl.endpoint, heartbeat_s=0.1, staleness_s=3.0))


def _pump(links: dict[RuntimeLink, bool], until: Callable[[], bool], timeout_s: float) -> None:
    """Poll every link; those mapped to True acknowledge what they receive (not apply)."""
    deadline = time.monotonic() + timeout_s
    while not until():
        assert time.monotonic() < deadline, "condition not reached"
        for link, acknowledges in links.items():
            update = link.poll_update()
            if update is not None and acknowledges:
                link.mark_acknowledged(update.version)
        time.sleep(0.02)


def _status(ctl: ControllerProcess) -> dict[str, str]:
    return {r["replica_id"]: r["status"] for r in ctl.admin.get("/v1/replicas").json()[
        "replicas"]}


def test_idle_replica_is_fine_and_a_silent_one_degrades_health(tmp_path: Path) -> None:
    state = tmp_path / "ctl" / "state"
    state.mkdir(parents=True)
    (state / ".state.json.4242.tmp").write_bytes(b"half a write")
    with ControllerProcess.launch(tmp_path / "ctl", {"mode": "static", "link": {
            "ack_timeout_s": 1.0}}) as ctl:
        assert not list(state.glob("*.tmp"))  # cleaned up on start
        idle, silent = _link(ctl, "idle"), _link(ctl, "silent")
        links = {idle: True, silent: False}
        try:
            _pump(links, lambda: len(_status(ctl)) == 2, 10.0)
            assert ctl.admin.put("/v1/policy", json=POLICY).status_code == 200
            _pump(links, lambda: _status(ctl) == {"idle": "acknowledged",
                                                  "silent": "behind"}, 10.0)
            health = ctl.admin.get("/healthz").json()
            assert health["status"] == "degraded" and health["replicas_behind"] == ["silent"]
            assert ctl.metric("lynx_controller_replicas_behind") == 1
            silent.close()  # gone: no longer connected, no longer counted
            _pump({idle: True}, lambda: ctl.admin.get("/healthz").json()["status"] == "ok",
                  15.0)
        finally:
            idle.close()
            silent.close()


def test_a_replicas_statistics_are_bounded_in_bytes(tmp_path: Path) -> None:
    """1024-layer StepStats (~19 KB encoded, ~68 KB decoded each) from one replica: the hub
    keeps at most STATS_BYTES_PER_REPLICA decoded bytes of them, newest first."""
    from lynx_policy.config import LinkConfig
    from lynx_policy.hub import Hub
    from lynx_policy.metrics import ControllerMetrics
    from lynx_policy.replica import STATS_BYTES_PER_REPLICA, decoded_size
    from lynx_protocol.messages import (
        LATENCY_EDGES_MS,
        DecodeBucket,
        PolicyUpdate,
        StepStats,
        encode,
    )
    from lynx_protocol.policy import PolicySpec

    update = PolicyUpdate(version=1, policy=PolicySpec())
    loop = asyncio.new_event_loop()  # the hub's asyncio socket sends through it (an earlier
    asyncio.set_event_loop(loop)  # asyncio.run in this thread leaves no implicit loop)
    hub = Hub(LinkConfig(bind=f"ipc://{tmp_path}/hub.sock"), ControllerMetrics(),
              lambda: update)
    try:
        register = Register(replica_id="big", model="m", num_layers=1024, num_experts=64,
                            top_k=8, policies=["off"])
        hub.handle([b"id", encode(register)])
        sizes = []
        for seq in range(1, 41):
            stats = StepStats(replica_id="big", seq=seq, window_s=1.0, batch_size_edges=[8],
                              batch_size_counts=[1, 0], decode_steps=1, prefill_steps=0,
                              mixed_steps=0, experts_kept_mean=[12.5 + seq] * 1024,
                              stock_union_mean=[33.25 + seq] * 1024, routing_mass_kept=0.9,
                              step_latency_p50_ms=1.0, step_latency_p99_ms=2.0,
                              applied_policy_version=1, decode_buckets=[DecodeBucket(
                                  max_batch=0, steps=2, latency_sum_ms=4.0,
                                  latency_counts=[2] + [0] * len(LATENCY_EDGES_MS),
                                  pruned_steps=0, experts_kept_mean=0.0, stock_union_mean=0.0,
                                  routing_mass_kept=1.0, decode_rows_sum=8 + seq)])
            payload = encode(stats)
            sizes.append(decoded_size(stats))
            hub.handle([b"id", payload])
        kept = hub.replicas["big"].recent_stats
        assert sum(sizes[-len(kept):]) <= STATS_BYTES_PER_REPLICA < sum(sizes)
        assert kept[-1][1].seq == 40 and len(kept) < 40
        # the batch mix behind a latency window outlives the byte cap: all 40, each the
        # message's own (seq s: 8 + s rows over 2 steps in the bucket above 8)
        mixes = hub.replicas["big"].recent_mix
        assert [m for _, m in mixes] == [((4.0 + s / 2, 2),) for s in range(1, 41)]
    finally:
        hub.close()
        asyncio.set_event_loop(None)
        loop.close()


def test_the_decoded_size_estimate_is_an_upper_bound_of_what_decoding_holds() -> None:
    import tracemalloc

    from lynx_policy.replica import decoded_size
    from lynx_protocol.messages import TO_CONTROLLER, DecodeBucket, StepStats, decode, encode

    for layers, buckets in ((1024, 0), (1024, 17), (4, 17), (4, 0), (0, 0)):
        stats = StepStats(
            replica_id="r" * 64, seq=1, window_s=1.0, batch_size_edges=list(range(1, 17)),
            batch_size_counts=[1] * 17, decode_steps=1, prefill_steps=0, mixed_steps=0,
            experts_kept_mean=[12.5 + i for i in range(layers)],
            stock_union_mean=[33.25 + i for i in range(layers)], routing_mass_kept=0.9,
            step_latency_p50_ms=1.0, step_latency_p99_ms=2.0, applied_policy_version=1,
            decode_buckets=[DecodeBucket(
                max_batch=i + 1, steps=15 * 1000 + 105, latency_sum_ms=1.5 * i,
                latency_counts=[1000 + j for j in range(15)], pruned_steps=3,
                experts_kept_mean=1.5, stock_union_mean=2.5, routing_mass_kept=0.9)
                for i in range(buckets)])
        payload = encode(stats)
        tracemalloc.start()
        held = decode(payload, accept=TO_CONTROLLER, max_bytes=1 << 20)
        measured, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert held == stats
        assert measured <= decoded_size(stats) <= 1.3 * measured + 2048, (layers, buckets)
        assert decoded_size(stats) > len(payload)  # the encoded size undercounts
