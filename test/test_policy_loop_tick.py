"""One control-loop tick over a real Hub fed StepStats through its message handler: what the
loop hands `decide` (the batch mix and the prefill steps behind a latency window,
`Observation.mix_history` and ``stall_history``) and what
it does with a hold pruning cannot fix (counted by cause, reported in the tick)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from lynx_policy.config import (
    ControllerConfig,
    LinkConfig,
    LoopConfig,
    SloTarget,
    StateConfig,
)
from lynx_policy.decide import Decision, LatencyReading, Memory, Observation
from lynx_policy.hub import Hub
from lynx_policy.loop import ControlLoop
from lynx_policy.metrics import ControllerMetrics
from lynx_policy.state import StateKeeper
from lynx_protocol.messages import (
    LATENCY_EDGES_MS,
    DecodeBucket,
    PolicyUpdate,
    Register,
    StepStats,
    encode,
)

TPOT = SloTarget(metric="tpot", quantile=0.9, target_ms=50.0)


def stats(replica: str, seq: int, rows: int) -> bytes:
    """One window of 2 decode steps of ``rows`` rows each in the bucket above 8, and ``seq``
    prefill steps of 100 ms each."""
    return encode(StepStats(
        replica_id=replica, seq=seq, window_s=1.0, batch_size_edges=[8],
        batch_size_counts=[0, 2], decode_steps=2, prefill_steps=seq, mixed_steps=0,
        prefill_latency_sum_ms=100.0 * seq,
        experts_kept_mean=[8.0], stock_union_mean=[8.0], routing_mass_kept=1.0,
        step_latency_p50_ms=1.0, step_latency_p99_ms=2.0, applied_policy_version=0,
        decode_buckets=[DecodeBucket(
            max_batch=0, steps=2, latency_sum_ms=4.0,
            latency_counts=[2] + [0] * len(LATENCY_EDGES_MS), pruned_steps=0,
            experts_kept_mean=0.0, stock_union_mean=0.0, routing_mass_kept=1.0,
            decode_rows_sum=2 * rows)]))


class Readings:
    async def observe(self, targets: list[SloTarget]) -> tuple[LatencyReading, ...]:
        return tuple(LatencyReading(t, 0.080, samples=100.0, window_s=8.0) for t in targets)


def test_a_tick_hands_decide_each_messages_mix_by_age_and_counts_unfixable_holds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    seen: list[Observation] = []

    def held(observation: Observation, policy: Any, memory: Memory, **_: Any) -> Decision:
        seen.append(observation)
        return Decision(policy, memory, "violated", "hold", "cannot close the gap: test",
                        planner="model", unfixable="cannot_close_gap")

    monkeypatch.setattr("lynx_policy.loop.decide", held)
    loop_ = asyncio.new_event_loop()  # the hub's asyncio socket sends through it
    asyncio.set_event_loop(loop_)
    metrics = ControllerMetrics()
    config = ControllerConfig(state=StateConfig(dir=str(tmp_path)), mode="adaptive", slo=[TPOT],
                              loop=LoopConfig(stats_window_s=5.0))
    keeper = StateKeeper(config)
    update = PolicyUpdate(version=keeper.state.version, policy=keeper.state.policy)
    hub = Hub(LinkConfig(bind=f"ipc://{tmp_path}/hub.sock"), metrics, lambda: update,
              clock=lambda: now[0])
    try:
        for name in ("a", "b"):
            hub.handle([name.encode(), encode(Register(
                replica_id=name, model="m", num_layers=1, num_experts=8, top_k=2,
                policies=["off", "budget"]))])
        arrivals = []  # (replica, clock, rows): a at 1000, 1010, 1020; b at 1005, 1015
        for seq, (name, at, rows) in enumerate([("a", 1000.0, 12), ("b", 1005.0, 20),
                                                 ("a", 1010.0, 16), ("b", 1015.0, 24),
                                                 ("a", 1020.0, 32)]):
            now[0] = at
            hub.handle([name.encode(), stats(name, seq // 2 + 1, rows)])
            arrivals.append((name, at, rows))
        now[0] = 1021.0
        loop = ControlLoop(config, keeper, hub, metrics, Readings(), lambda: None)
        decision = loop_.run_until_complete(loop.tick())
    finally:
        hub.close()
        asyncio.set_event_loop(None)
        loop_.close()
    assert decision.unfixable == "cannot_close_gap"
    (observation,) = seen
    # every StepStats message of every connected replica, aged by the hub's clock: the
    # window of a reading finds the steps that ran in it (evidence.window_mix)
    assert sorted(observation.mix_history) == sorted(
        (1021.0 - at, ((float(rows), 2),)) for _, at, rows in arrivals)
    # loop.stats_window_s (5 s) only: a's message at 1020
    assert observation.batch_mix == ((32.0, 2),)
    # the prefill steps likewise, message by message (a's seq 1-3 at 1000/1010/1020, b's 1-2)
    seqs = [1, 1, 2, 2, 3]
    assert sorted(observation.stall_history) == sorted(
        (1021.0 - at, (2 + seq, seq, 100.0 * seq))
        for (_, at, _), seq in zip(arrivals, seqs, strict=True))
    assert observation.stalls is not None and observation.stalls.share == 3 / 5
    text = metrics_text(metrics)
    assert 'lynx_controller_unfixable_holds_total{cause="cannot_close_gap"} 1.0' in text
    assert 'lynx_controller_unfixable_holds_total{cause="prefill_stalls"} 0.0' in text
    assert loop.last_report is not None and loop.last_report.unfixable == "cannot_close_gap"


def metrics_text(metrics: ControllerMetrics) -> str:
    from prometheus_client import generate_latest

    return generate_latest(metrics.registry).decode()
