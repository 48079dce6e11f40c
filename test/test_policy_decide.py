"""decide(): pure, so tested tick by tick without sockets, HTTP or Prometheus."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lynx_policy.config import AdaptiveConfig, QualityFloor, SloTarget
from lynx_policy.decide import LatencyReading, Memory, Observation, classify, decide
from lynx_policy.tables import bucket_shares, enforce_floor
from lynx_protocol.policy import BudgetBucket, PolicySpec, validate_policy

SETTINGS = AdaptiveConfig(buckets=[4, 16, 64, 4096], min_batch=8, step_experts=2,
                          headroom=0.2, tighten_after_ticks=2, relax_after_ticks=3)
FLOOR = QualityFloor(min_budget=4)
TARGET = SloTarget(metric="itl", quantile=0.99, target_ms=100.0)
EXPERTS = 16


def observe(latency_ms: float | None, batch_steps: dict[int, int] | None = None
            ) -> Observation:
    seconds = None if latency_ms is None else latency_ms / 1000.0
    return Observation(latencies=(LatencyReading(TARGET, seconds),), batch_steps=batch_steps,
                       num_experts=EXPERTS)


def run(latencies: list[float | None], policy: PolicySpec, *, floor: QualityFloor = FLOOR,
        batch_steps: dict[int, int] | None = None, settings: AdaptiveConfig = SETTINGS,
        ) -> tuple[PolicySpec, list[str]]:
    memory = Memory()
    directions = []
    for latency in latencies:
        decision = decide(observe(latency, batch_steps), policy, memory, mode="adaptive",
                          settings=settings, floor=floor)
        policy, memory = decision.policy, decision.memory
        directions.append(decision.direction)
    return policy, directions


def budgets(policy: PolicySpec) -> list[int | None]:
    return [b.all_layers for b in policy.budgets]


def test_classify_bands() -> None:
    assert classify(observe(120).latencies, 0.2) == "violated"
    assert classify(observe(90).latencies, 0.2) == "within"
    assert classify(observe(79).latencies, 0.2) == "headroom"
    assert classify(observe(None).latencies, 0.2) == "no_data"
    mixed = (LatencyReading(TARGET, 0.05),
             LatencyReading(SloTarget(metric="ttft", target_ms=500), 0.6))
    assert classify(mixed, 0.2) == "violated"


def test_violation_tightens_within_bounded_ticks_from_off() -> None:
    policy, directions = run([150.0] * 2, PolicySpec(name="off"))
    assert directions == ["hold", "tighten"]
    assert policy.name == "budget"
    # Buckets below min_batch (max_batch 4) are never pruned; the others lose one step.
    assert budgets(policy) == [16, 14, 14, 14]
    validate_policy(policy, num_layers=4, num_experts=EXPERTS)


def test_sustained_violation_descends_to_the_floor_and_stops() -> None:
    policy, directions = run([500.0] * 40, PolicySpec(name="off"))
    assert budgets(policy) == [16, 4, 4, 4]
    assert directions.count("tighten") == (16 - 4) // 2
    assert directions[-10:] == ["hold"] * 10


def test_floor_is_never_crossed_per_layer() -> None:
    start = PolicySpec(name="budget", budgets=[
        BudgetBucket(max_batch=64, per_layer=[16, 9, 7, 5])])
    floor = QualityFloor(min_budget=3, per_layer=[6, 3, 6, 3])
    policy, _ = run([900.0] * 30, start, floor=floor)
    assert policy.budgets[0].per_layer == [6, 3, 6, 3]


def test_headroom_relaxes_back_to_no_pruning_and_stops() -> None:
    start = PolicySpec(name="budget", budgets=[BudgetBucket(max_batch=64, all_layers=6),
                                               BudgetBucket(max_batch=4096, all_layers=4)])
    policy, directions = run([10.0] * 3, start)
    assert directions == ["hold", "hold", "relax"]
    assert budgets(policy) == [8, 6]
    policy, directions = run([10.0] * 60, start)
    assert budgets(policy) == [16, 16]
    assert directions[-6:] == ["hold"] * 6


@pytest.mark.parametrize("latency_ms", [81.0, 90.0, 99.9, 100.0, None])
def test_steady_latency_inside_the_band_never_changes_the_policy(latency_ms: float | None
                                                                  ) -> None:
    start = PolicySpec(name="budget", budgets=[BudgetBucket(max_batch=64, all_layers=8)])
    policy, directions = run([latency_ms] * 50, start)
    assert policy == start
    assert set(directions) == {"hold"}


@settings(max_examples=200, deadline=None)
@given(st.floats(min_value=0.0, max_value=1000.0), st.integers(min_value=4, max_value=16))
def test_any_steady_latency_moves_monotonically(latency_ms: float, start_budget: int) -> None:
    start = PolicySpec(name="budget", budgets=[BudgetBucket(max_batch=64,
                                                            all_layers=start_budget)])
    _, directions = run([latency_ms] * 40, start)
    moves = {d for d in directions if d != "hold"}
    assert len(moves) <= 1, f"oscillated: {directions}"


def test_hysteresis_needs_consecutive_ticks() -> None:
    start = PolicySpec(name="budget", budgets=[BudgetBucket(max_batch=64, all_layers=8)])
    # Alternating violation and in-band latency never reaches 2 consecutive violated ticks.
    policy, directions = run([150.0, 90.0] * 10, start)
    assert policy == start and set(directions) == {"hold"}
    # Relax needs 3 consecutive headroom ticks; a violation in between resets the streak.
    policy, directions = run([10.0, 10.0, 150.0, 10.0, 10.0], start)
    assert policy == start


def test_only_active_buckets_are_tightened() -> None:
    start = PolicySpec(name="budget", budgets=[
        BudgetBucket(max_batch=4, all_layers=16), BudgetBucket(max_batch=16, all_layers=16),
        BudgetBucket(max_batch=64, all_layers=16), BudgetBucket(max_batch=4096, all_layers=16)])
    # Nearly all recent decode steps ran with 17..64 rows; batch 128 is below 5 %.
    steps = {8: 0, 32: 950, 64: 30, 128: 20}
    shares = bucket_shares(start, steps)
    assert shares == pytest.approx([0.0, 0.0, 0.98, 0.02])
    policy, _ = run([150.0] * 2, start, batch_steps=steps)
    assert budgets(policy) == [16, 16, 14, 16]


def test_tiny_batches_alone_are_never_pruned() -> None:
    start = PolicySpec(name="budget", budgets=[BudgetBucket(max_batch=4, all_layers=16),
                                               BudgetBucket(max_batch=4096, all_layers=16)])
    policy, directions = run([150.0] * 10, start, batch_steps={1: 500, 4: 100})
    assert policy == start and "tighten" not in directions


def test_non_adaptive_modes_never_change_the_policy() -> None:
    start = PolicySpec(name="budget", budgets=[BudgetBucket(max_batch=64, all_layers=8)])
    for mode in ("off", "static"):
        decision = decide(observe(500.0), start, Memory(violated_ticks=99), mode=mode,
                          settings=SETTINGS, floor=FLOOR)
        assert decision.policy is start and decision.direction == "hold"
        assert decision.signal == "violated" and decision.memory == Memory()


def test_enforce_floor_raises_low_budgets_only() -> None:
    start = PolicySpec(name="budget", budgets=[
        BudgetBucket(max_batch=8, all_layers=2), BudgetBucket(max_batch=64, per_layer=[1, 9])])
    raised = enforce_floor(start, QualityFloor(min_budget=3), EXPERTS)
    assert raised.budgets[0].all_layers == 3 and raised.budgets[1].per_layer == [3, 9]
    assert enforce_floor(PolicySpec(name="off"), QualityFloor(min_budget=3), 8).name == "off"
