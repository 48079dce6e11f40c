"""decide() with a ready latency model: properties of the model planner (pure, no sockets).

The plant in the closed-loop tests: a replica whose mean decode step takes
t(B, m) = 5 + 1.0 B + 2.0 m ms, clients that see ``kappa_true`` times the step latency of the
batch mix under the applied table, with multiplicative noise.
"""

from __future__ import annotations

import itertools
import math
import random

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from lynx_policy.config import AdaptiveConfig, QualityFloor, SloTarget
from lynx_policy.decide import LatencyReading, Memory, Observation, decide
from lynx_policy.model import FleetModel, LatencyFit, MassPoint, expected_union
from lynx_policy.plan import effective_experts
from lynx_protocol.policy import BudgetBucket, PolicySpec, validate_policy

EXPERTS, TOP_K = 32, 4
FIT = LatencyFit(a_ms=5.0, b_ms_per_row=1.0, c_ms_per_expert=2.0, samples=40, steps=800,
                 rmse_ms=0.5, mean_ms=60.0, expert_spread=8.0, ready=True, reason="ok")
FLEET = FleetModel(fits=(FIT,), num_experts=EXPERTS, top_k=TOP_K, largest_batch=64,
                   mass_points=tuple(MassPoint(b, m, expected_union(EXPERTS, TOP_K, b),
                                               0.6 + 0.4 * m / expected_union(EXPERTS, TOP_K, b),
                                               50)
                                     for b in (8, 16, 32, 64) for m in (2, 4, 8, 16)))
SETTINGS = AdaptiveConfig(buckets=[4, 8, 16, 32, 48, 64, 4096], margin=0.1, headroom=0.2,
                          relax_after_ticks=3, max_step_experts=8)
TARGET = SloTarget(metric="itl", quantile=0.99, target_ms=100.0)
FLOOR = QualityFloor(min_budget=4)
OFF = PolicySpec()


def observation(latency_ms: float | None, mix: tuple[tuple[float, int], ...]) -> Observation:
    return Observation(latencies=(LatencyReading(TARGET, None if latency_ms is None
                                                 else latency_ms / 1000.0),),
                       batch_steps=None, num_experts=EXPERTS, model=FLEET, batch_mix=mix)


def effective(policy: PolicySpec, batch: float) -> float:
    return effective_experts(policy, batch, FLEET.union(batch))


def table(policy: PolicySpec) -> list[int]:
    return [b.all_layers or EXPERTS for b in policy.budgets] if policy.name == "budget" else \
        [EXPERTS] * len(SETTINGS.buckets)


def plant(policy: PolicySpec, mix: tuple[tuple[float, int], ...], kappa: float) -> float:
    """Client P99 ITL [ms]: kappa x the slowest step of the mix under ``policy``."""
    return kappa * max(FIT.predict(b, effective(policy, b)) for b, _ in mix)


def closed_loop(mix: tuple[tuple[float, int], ...], kappa: float, ticks: int, noise: float,
                seed: int = 0, floor: QualityFloor = FLOOR, policy: PolicySpec = OFF,
                memory: Memory | None = None) -> tuple[list[PolicySpec], Memory]:
    rng = random.Random(seed)
    memory = memory or Memory()
    history = []
    for _ in range(ticks):
        observed = plant(policy, mix, kappa) * math.exp(rng.gauss(0, noise))
        decision = decide(observation(observed, mix), policy, memory, mode="adaptive",
                          settings=SETTINGS, floor=floor)
        assert decision.planner == "model"
        policy, memory = decision.policy, decision.memory
        validate_policy(policy, num_layers=4, num_experts=EXPERTS, top_k=TOP_K)
        history.append(policy)
    return history, memory


def test_plans_each_bucket_from_the_model() -> None:
    mix = ((48.0, 100),)
    history, memory = closed_loop(mix, kappa=1.0, ticks=12, noise=0.0)
    budgets = table(history[-1])
    # t(B, union) <= 80 ms (headroom) unpruned for B <= 16 -> not pruned; above -> pruned
    assert budgets[:3] == [EXPERTS] * 3
    for bucket, budget in zip(history[-1].budgets[3:6], budgets[3:6], strict=True):
        batch = bucket.max_batch
        assert budget < FLEET.union(batch)
        assert 5 + batch + 2 * max(budget, FLOOR.min_budget) <= 90.0 or budget == 4
    # the 48-row bucket is planned at the largest budget that meets 90 ms: 5+48+2m <= 90
    assert budgets[4] == 18
    # the 64-row bucket (never seen at that load) is ready before the load arrives
    assert budgets[5] == 10
    assert [k for _, _, k in memory.corrections] == [1.0]


@settings(max_examples=60, deadline=None)
@given(low=st.floats(20, 400), factor=st.floats(1.0, 3.0), batch=st.sampled_from([16, 32, 48]))
def test_monotone_in_load(low: float, factor: float, batch: int) -> None:
    mix = ((float(batch), 100),)
    lighter = decide(observation(low, mix), OFF, Memory(), mode="adaptive", settings=SETTINGS,
                     floor=FLOOR)
    heavier = decide(observation(low * factor, mix), OFF, Memory(), mode="adaptive",
                     settings=SETTINGS, floor=FLOOR)
    for light, heavy in zip(table(lighter.policy), table(heavier.policy), strict=True):
        assert heavy <= light


@settings(max_examples=40, deadline=None)
@given(latency=st.floats(1, 5000), floor=st.integers(1, 16), ticks=st.integers(1, 8),
       mass_floor=st.sampled_from([0.0, 0.8, 0.95]))
def test_never_below_the_floor(latency: float, floor: int, ticks: int, mass_floor: float
                               ) -> None:
    quality = QualityFloor(min_budget=floor, min_mass_kept=mass_floor)
    policy, memory = OFF, Memory()
    mix = ((64.0, 100),)
    for _ in range(ticks):
        decision = decide(observation(latency, mix), policy, memory, mode="adaptive",
                          settings=SETTINGS, floor=quality)
        policy, memory = decision.policy, decision.memory
    if policy.name == "off":  # nothing pruned (the latency meets the SLO unpruned)
        assert latency * (1 - SETTINGS.margin) < plant(OFF, mix, 1.0)
        return
    for bucket, budget in zip(policy.budgets, table(policy), strict=True):
        assert budget >= floor
        mass = FLEET.mass_kept(min(bucket.max_batch, 65), budget)
        if mass_floor and budget < FLEET.union(min(bucket.max_batch, 65)):
            assert mass is not None and mass >= mass_floor


@settings(max_examples=40, deadline=None)
@given(kappa=st.floats(0.3, 3.0), seed=st.integers(0, 1000))
def test_bounded_change_per_tick(kappa: float, seed: int) -> None:
    history, _ = closed_loop(((48.0, 50), (8.0, 50)), kappa, ticks=15, noise=0.1, seed=seed)
    previous = OFF
    for policy in history:
        for bucket in policy.budgets:
            b = min(bucket.max_batch, 65)
            assert abs(effective(policy, b) - effective(previous, b)) <= \
                SETTINGS.max_step_experts + 1  # +1: ceil(union) vs union
        previous = policy


@settings(max_examples=30, deadline=None)
@given(kappa=st.floats(0.5, 2.5), seed=st.integers(0, 1000), batch=st.sampled_from([24, 48, 64]))
def test_no_oscillation_under_steady_noisy_load(kappa: float, seed: int, batch: int) -> None:
    history, _ = closed_loop(((float(batch), 100),), kappa, ticks=80, noise=0.03, seed=seed)
    settled = [table(p) for p in history[20:]]
    for column in zip(*settled, strict=True):
        moves = [b - a for a, b in itertools.pairwise(column) if b != a]
        assert all(m > 0 for m in moves) or all(m < 0 for m in moves), column


def test_unprunes_where_the_model_says_the_slo_holds() -> None:
    mix = ((48.0, 100),)
    history, memory = closed_loop(mix, kappa=1.0, ticks=6, noise=0.0)
    assert table(history[-1])[4] < EXPERTS
    # load drops to 8 rows: the client latency falls; every bucket the model clears relaxes
    history, _ = closed_loop(((8.0, 100),), kappa=1.0, ticks=40, noise=0.0,
                             policy=history[-1], memory=memory)
    final = history[-1]
    for bucket, budget in zip(final.budgets, table(final), strict=True):
        batch = min(bucket.max_batch, 65)
        unpruned = FIT.predict(batch, FLEET.union(batch))
        if unpruned <= 80.0:  # meets target x (1 - headroom) unpruned
            assert budget == EXPERTS, (bucket, budget)
        elif unpruned > 90.0:  # misses target x (1 - margin): stays pruned
            assert budget < EXPERTS


def test_falls_back_to_reactive_until_the_model_is_ready() -> None:
    not_ready = FleetModel(fits=(LatencyFit(ready=False, reason="x"),), num_experts=EXPERTS,
                           top_k=TOP_K)
    obs = Observation(latencies=(LatencyReading(TARGET, 0.3),), batch_steps=None,
                      num_experts=EXPERTS, model=not_ready)
    decision = decide(obs, OFF, Memory(), mode="adaptive", settings=SETTINGS, floor=FLOOR)
    assert decision.planner == "reactive"
    off = decide(observation(300, ((48.0, 1),)), OFF, Memory(), mode="adaptive",
                 settings=AdaptiveConfig(use_model=False), floor=FLOOR)
    assert off.planner == "reactive"


def test_buckets_below_min_batch_are_never_pruned_by_the_model() -> None:
    """``adaptive.min_batch`` binds the model planner as it binds the reactive rules: a
    violated SLO prunes buckets at or above it only, and a small bucket that prunes (a table
    set by hand) is relaxed after the relax streak."""
    settings_ = AdaptiveConfig(buckets=[2, 4, 8, 16, 4096], min_batch=8, margin=0.1,
                               headroom=0.2, relax_after_ticks=2, max_step_experts=64)
    policy, memory = OFF, Memory()
    for _ in range(6):  # far above target: every bucket the planner may prune is pruned
        decision = decide(observation(1000.0, ((16.0, 100),)), policy, memory,
                          mode="adaptive", settings=settings_, floor=FLOOR)
        policy, memory = decision.policy, decision.memory
    budgets = {b.max_batch: b.all_layers for b in policy.budgets}
    assert budgets[2] == budgets[4] == EXPERTS, budgets
    assert budgets[8] is not None and budgets[8] < FLEET.union(8)
    assert budgets[16] is not None and budgets[16] < FLEET.union(16)
    reasons = {w.max_batch: w.reason for w in decision.plans}
    assert "min_batch" in reasons[2] and "min_batch" in reasons[4], reasons

    hand = PolicySpec(name="budget", budgets=[
        msgspec.structs.replace(b, all_layers=FLOOR.min_budget) if b.max_batch == 2 else b
        for b in policy.budgets])
    policy, memory = hand, Memory()
    for _ in range(2):
        decision = decide(observation(1000.0, ((16.0, 100),)), policy, memory,
                          mode="adaptive", settings=settings_, floor=FLOOR)
        policy, memory = decision.policy, decision.memory
    assert {b.max_batch: b.all_layers for b in policy.budgets}[2] == EXPERTS


def test_a_partly_vetoed_plan_reports_the_direction_of_what_it_applies() -> None:
    """An unconfirmed miss (lower bound far below the target) holds the tighten of the loaded
    16-row bucket; the protected 2-row bucket still returns to no pruning, and the decision
    is a relax of that bucket alone (it was reported as a tighten)."""
    settings_ = AdaptiveConfig(buckets=[2, 16], min_batch=8, margin=0.1, headroom=0.2,
                               relax_after_ticks=1, max_step_experts=64)
    table = PolicySpec(name="budget", budgets=[
        BudgetBucket(max_batch=b, all_layers=FLOOR.min_budget if b == 2 else EXPERTS)
        for b in settings_.buckets])
    unconfirmed = Observation(latencies=(LatencyReading(TARGET, 1.0, 100.0, 0.01, 2.0, 4.0),),
                              batch_steps=None, num_experts=EXPERTS, model=FLEET,
                              batch_mix=((16.0, 100),))
    decision = decide(unconfirmed, table, Memory(), mode="adaptive", settings=settings_,
                      floor=FLOOR)
    budgets = {b.max_batch: b.all_layers for b in decision.policy.budgets}
    assert budgets[2] == EXPERTS and budgets[16] == EXPERTS, budgets
    assert decision.direction == "relax" and decision.changed_buckets == (0,), decision.reason
    assert "miss not confirmed" in {w.max_batch: w.reason for w in decision.plans}[16]
