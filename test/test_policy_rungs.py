"""decide() over a ladder (`lynx_policy.rungs`): properties of planning over rungs (pure).

The plant: a replica whose mean decode step takes t(B, m) = 5 + 1.0 B + 2.0 m ms, clients that
see ``kappa`` times the token-weighted P99 step latency of the batch mix under the applied
table (the statistic `lynx_policy.ladder_plan` predicts an ITL target with).
"""

from __future__ import annotations

import math

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st
from ladders import EXPERTS, LAYERS, TOP_K, ladders, mini_ladder, rung

from lynx_policy.config import AdaptiveConfig, QualityFloor, SloTarget
from lynx_policy.decide import LatencyReading, Memory, Observation, decide
from lynx_policy.ladder_plan import mix_statistic
from lynx_policy.model import FleetModel, LatencyFit, expected_union
from lynx_policy.plan import predicted_steps
from lynx_policy.rungs import (
    SortedBudgets,
    expected_quality_cost,
    rung_experts,
    usable_rungs,
)
from lynx_protocol.ladder import (
    LADDER_FORMAT,
    Ladder,
    LadderModel,
    rung_of_bucket,
    rung_policy,
)
from lynx_protocol.policy import PolicySpec, validate_policy

FIT = LatencyFit(a_ms=5.0, b_ms_per_row=1.0, c_ms_per_expert=2.0, samples=40, steps=800,
                 rmse_ms=0.5, mean_ms=60.0, expert_spread=8.0, ready=True, reason="ok")
FLEET = FleetModel(fits=(FIT,), num_experts=EXPERTS, top_k=TOP_K, largest_batch=64)
SETTINGS = AdaptiveConfig(buckets=[4, 8, 16, 32, 48, 64, 4096], margin=0.1, headroom=0.2,
                          relax_after_ticks=3, max_step_experts=6, arrivals="closed")
TARGET = SloTarget(metric="itl", quantile=0.99, target_ms=100.0)
NO_FLOOR = QualityFloor(min_budget=1)
OFF = PolicySpec()


def step(ladder: Ladder, policy: PolicySpec, observed_ms: float, mix, memory: Memory,
         floor: QualityFloor = NO_FLOOR):
    obs = Observation(latencies=(LatencyReading(TARGET, observed_ms / 1000.0),),
                      batch_steps=None, num_experts=EXPERTS, model=FLEET, batch_mix=mix)
    decision = decide(obs, policy, memory, mode="adaptive", settings=SETTINGS, floor=floor,
                      ladder=ladder)
    assert decision.planner == "model"
    validate_policy(decision.policy, num_layers=ladder.model.num_layers,
                    num_experts=EXPERTS, top_k=TOP_K)
    return decision


def rungs_of(ladder: Ladder, policy: PolicySpec) -> list[int]:
    if policy.name != "budget":
        return [0] * len(SETTINGS.buckets)
    found = [rung_of_bucket(ladder, b) for b in policy.budgets]
    assert None not in found  # the planner writes rungs, nothing else
    return [f or 0 for f in found]


def plant(ladder: Ladder, policy: PolicySpec, mix, kappa: float, metric: str = "itl") -> float:
    """Client latency [ms]: kappa x the mix statistic of the model's steps under ``policy``."""
    points = predicted_steps(FLEET, policy, mix, by_tokens=True)
    return kappa * mix_statistic(points, metric, TARGET.quantile)


mixes = st.lists(st.tuples(st.floats(8.0, 80.0), st.integers(1, 200)), min_size=1, max_size=4)


def loaded(plans) -> list[int]:
    return [i for i, p in enumerate(plans) if not p.reason.startswith(("no recent", "below"))]


@settings(max_examples=80, deadline=None)
@given(ladders(), st.floats(0.5, 3.0), st.floats(1.0, 2.0), st.integers(0, 3), mixes)
def test_planning_is_monotone_in_load_and_keeps_the_floor(ladder, kappa, more, floor_budget,
                                                         mix) -> None:
    floor = QualityFloor(min_budget=1 + 4 * floor_budget)
    base = plant(ladder, OFF, mix, kappa)
    light = step(ladder, OFF, base, mix, Memory(), floor)
    heavy = step(ladder, OFF, base * more, mix, Memory(), floor)
    usable = usable_rungs(ladder, floor)
    if any("cannot close the gap" in p.reason for p in heavy.plans):
        assert heavy.policy == OFF  # a load no rung can serve: held where it was
        return
    for a, b in zip(rungs_of(ladder, light.policy), rungs_of(ladder, heavy.policy),
                    strict=True):
        assert a in usable and b in usable  # never below the quality floor
        assert a <= b  # more load (that pruning can serve) never prunes less, in any bucket


@settings(max_examples=60, deadline=None)
@given(ladders(), st.floats(0.3, 4.0), st.floats(8.0, 80.0))
def test_never_a_costlier_rung_when_a_cheaper_one_meets_the_prediction(ladder, kappa, batch
                                                                       ) -> None:
    mix = ((batch, 100),)
    decision = step(ladder, OFF, plant(ladder, OFF, mix, kappa), mix, Memory())
    (_, _, raw), = decision.memory.corrections
    chosen = rungs_of(ladder, decision.policy)
    for i in loaded(decision.plans):
        plan = decision.plans[i]
        union = FLEET.union(batch)
        for cheaper in range(chosen[i]):  # every less-pruning rung misses the planning bound
            experts = rung_experts(ladder.rungs[cheaper], plan.max_batch, union, EXPERTS) \
                if cheaper else union
            assert raw * FIT.predict(batch, experts) > TARGET.target_ms * (1 - 0.1) - 1e-9


def test_a_move_past_a_rung_that_suffices_stops_there() -> None:
    # CI's counterexample (Python 3.12 stage): after the free r1, r4 saves marginally more
    # time per cost than r3, and the chain jumped to r4 although r3 already met the bound.
    ladder = Ladder(format=LADDER_FORMAT, model=LadderModel(num_layers=4, num_experts=EXPERTS,
                                                            top_k=TOP_K),
                    rungs=[rung("none", [EXPERTS] * 4, 0.0), rung("r1", [30, 30, 24, 30], 0.0),
                           rung("r3", [28, 28, 22, 28], 0.015625),
                           rung("r4", [27, 27, 21, 27], 0.0234375)])
    mix = ((11.0, 100),)
    decision = step(ladder, OFF, plant(ladder, OFF, mix, 1.40625), mix, Memory())
    assert decision.direction == "tighten"
    (busy,) = [p for p in decision.plans if p.max_batch == 16]
    assert busy.rung == "r3", busy
    assert busy.predicted_ms <= TARGET.target_ms * (1 - 0.1)


@settings(max_examples=60, deadline=None)
@given(ladders(), st.lists(st.floats(0.2, 5.0), min_size=2, max_size=12), mixes)
def test_change_per_tick_is_bounded(ladder, kappas, mix) -> None:
    policy, memory = OFF, Memory()
    usable = usable_rungs(ladder, NO_FLOOR)
    for kappa in kappas:
        decision = step(ladder, policy, plant(ladder, policy, mix, kappa), mix, memory)
        pairs = zip(rungs_of(ladder, policy), rungs_of(ladder, decision.policy), strict=True)
        for index, (before, after) in enumerate(pairs):
            plan = decision.plans[index]
            if before == after or index not in loaded(decision.plans):
                continue  # buckets no step used follow the loaded ones
            union = FLEET.union(plan.batch)
            e = [rung_experts(ladder.rungs[i], plan.max_batch, union, EXPERTS) for i in usable]
            i, j = usable.index(before), usable.index(after)
            assert abs(i - j) == 1 or abs(e[i] - e[j]) <= SETTINGS.max_step_experts + 1e-9
        policy, memory = decision.policy, decision.memory


def test_kappa_fitted_at_the_mix_is_applied_at_the_mix() -> None:
    """The SLO Pareto testbed's regime (its fit: t = 17.8 + 2.46 B + 0.41 m ms): clients see
    3x the model's step time, the steps run at 12 rows (bucket 9-16). The lowest rung meets
    the target at the mix, so the planner tightens; one 16-row step (the bucket's bound) times
    kappa would call every rung infeasible, as the planner did before."""
    fit = msgspec.structs.replace(FIT, a_ms=17.8, b_ms_per_row=2.46, c_ms_per_expert=0.41)
    fleet = FleetModel(fits=(fit,), num_experts=EXPERTS, top_k=TOP_K, largest_batch=64)
    ladder, mix = mini_ladder(), ((12.0, 100),)
    lowest = rung_policy(ladder, "m8", SETTINGS.buckets, SETTINGS.min_batch)
    observed, best = (3.0 * mix_statistic(predicted_steps(fleet, p, mix, by_tokens=True),
                                          "tpot", 0.9) for p in (OFF, lowest))
    target_ms = (observed + best) / 2 / 0.9
    at_bound = fit.predict(16, rung_experts(ladder.rungs[-1], 16, fleet.union(16), EXPERTS))
    assert 3.0 * at_bound > target_ms * 0.9  # infeasible at the bucket's bound
    tpot = SloTarget(metric="tpot", quantile=0.9, target_ms=target_ms)
    obs = Observation(latencies=(LatencyReading(tpot, observed / 1000.0),), batch_steps=None,
                      num_experts=EXPERTS, model=fleet, batch_mix=mix)
    decision = decide(obs, OFF, Memory(), mode="adaptive", settings=SETTINGS, floor=NO_FLOOR,
                      ladder=ladder)
    assert decision.direction == "tighten", [p.reason for p in decision.plans]
    (_, _, kappa), = decision.memory.corrections
    assert math.isclose(kappa, 3.0)
    assert all(p.predicted_ms < p.unpruned_ms for p in decision.plans)
    rungs = rungs_of(ladder, decision.policy)
    assert rungs[2] > 0 and rungs[1:] == [rungs[2]] * 6  # idle buckets follow bucket 16
    assert rungs[0] == 0  # below adaptive.min_batch


def test_no_tightening_for_a_miss_the_lowest_rung_cannot_fix() -> None:
    ladder, mix = mini_ladder(), ((48.0, 100),)
    decision = step(ladder, OFF, 10 * plant(ladder, OFF, mix, 1.0), mix, Memory())
    assert decision.direction == "hold" and decision.policy == OFF
    assert all("cannot close the gap" in decision.plans[i].reason
               for i in loaded(decision.plans))
    assert decision.unfixable == "cannot_close_gap"  # counted: lynx_controller_unfixable_holds
    # a plain hold (the target met unpruned) is not one
    met = step(ladder, OFF, 0.5 * plant(ladder, OFF, mix, 1.0), mix, Memory())
    assert met.direction == "hold" and met.unfixable == ""
    # nor is a met tick on which the smoothed kappa still predicts that no rung closes the
    # gap: no miss was left alone
    after = step(ladder, OFF, 0.9 * TARGET.target_ms, mix, decision.memory)
    assert after.signal != "violated"
    assert any(p.reason.startswith("cannot close the gap") for p in after.plans)
    assert after.unfixable == ""


def test_a_target_the_lowest_rung_meets_only_without_the_margin_is_still_met() -> None:
    """The margin is a cushion for choosing a rung, not a reason to hold a miss the lowest
    rung fixes (benchmark/slo_step.py at 48 streams: a confirmed 20% miss of a 142 ms target
    held for 20 s while the lowest rung, measured alone, gave 118 ms)."""
    ladder, mix = mini_ladder(), ((48.0, 100),)
    name = ladder.rungs[usable_rungs(ladder, NO_FLOOR)[-1]].name
    lowest = rung_policy(ladder, name, SETTINGS.buckets, SETTINGS.min_batch)
    # kappa puts the lowest rung at 95 ms: under the 100 ms target, above its 90 ms line
    kappa = 95.0 / plant(ladder, lowest, mix, 1.0)
    decision = step(ladder, OFF, plant(ladder, OFF, mix, kappa), mix, Memory())
    assert decision.direction == "tighten", [p.reason for p in decision.plans]
    busy = loaded(decision.plans)
    assert all("target itself" in decision.plans[i].reason for i in busy)
    policy, memory = decision.policy, decision.memory
    for _ in range(10):  # each tick moves at most adaptive.max_step_experts
        decision = step(ladder, policy, plant(ladder, policy, mix, kappa), mix, memory)
        if decision.direction == "hold":
            break
        assert decision.direction == "tighten"
        policy, memory = decision.policy, decision.memory
    assert decision.direction == "hold" and decision.policy == policy  # settled, no relax
    assert plant(ladder, policy, mix, kappa) <= TARGET.target_ms + 1e-6
    far = 1.05 * 100.0 / plant(ladder, lowest, mix, 1.0)
    held = step(ladder, OFF, plant(ladder, OFF, mix, far), mix, Memory())
    assert held.direction == "hold" and held.policy == OFF
    assert all("cannot close the gap" in held.plans[i].reason for i in busy)


def test_a_load_step_moves_the_rung_up_and_back_and_reports_its_cost() -> None:
    ladder = mini_ladder()
    low, high = ((10.0, 100),), ((48.0, 100), (60.0, 50))
    policy, memory, seen = OFF, Memory(), []
    for mix in (low,) * 6 + (high,) * 10 + (low,) * 30:
        decision = step(ladder, policy, plant(ladder, policy, mix, 1.0), mix, memory)
        policy, memory = decision.policy, decision.memory
        served = next(i for i, b in enumerate(SETTINGS.buckets) if b >= max(x for x, _ in mix))
        seen.append((rungs_of(ladder, policy)[served],  # the rung the mix's largest batch gets
                     expected_quality_cost(ladder, policy, mix)))
    assert seen[5] == (0, 0.0)  # light load: no pruning, no cost
    peak = max(r for r, _ in seen[6:16])
    assert peak >= 2 and seen[15][1] > 0.0  # the jump tightens, at a stated cost
    assert seen[-1] == (0, 0.0)  # and it relaxes all the way back after the drop
    assert all(p.rung is not None and p.quality_cost is not None for p in decision.plans)


def test_a_pinned_rung_is_a_static_budget_policy() -> None:
    ladder = mini_ladder()
    policy = rung_policy(ladder, "m12", SETTINGS.buckets, SETTINGS.min_batch)
    validate_policy(policy, num_layers=LAYERS, num_experts=EXPERTS, top_k=TOP_K)
    assert [rung_of_bucket(ladder, b) for b in policy.budgets] == [0, 3, 3, 3, 3, 3, 3]
    assert math.isclose(expected_quality_cost(ladder, policy, ((32.0, 1), (64.0, 1))) or 0,
                        0.010)
    assert expected_quality_cost(ladder, OFF, ((32.0, 1),)) == 0.0
    assert expected_union(EXPERTS, TOP_K, 48) > 16


def test_misses_that_prefill_steps_own_do_not_tighten_nor_inflate_the_correction() -> None:
    """p99 ITL above target because 5% of steps are 150 ms prefills: pruning the decode steps
    cannot fix it, so nothing tightens and kappa keeps the decode steps' own ratio."""
    from lynx_policy.decide import StallSteps

    ladder, mix = mini_ladder(), ((48.0, 100),)
    calm = step(ladder, OFF, plant(ladder, OFF, mix, 0.6), mix, Memory())
    (_, _, kappa), = calm.memory.corrections
    stalls = StallSteps(share=0.05, mean_ms=150.0)
    obs = Observation(latencies=(LatencyReading(TARGET, 0.150),), batch_steps=None,
                      num_experts=EXPERTS, model=FLEET, batch_mix=mix, stalls=stalls)
    held = decide(obs, calm.policy, calm.memory, mode="adaptive", settings=SETTINGS,
                  floor=NO_FLOOR, ladder=ladder)
    assert held.direction == "hold" and held.policy == calm.policy
    assert "prefill/mixed steps" in held.reason and held.memory.corrections[0][2] == kappa
    assert held.unfixable == "prefill_stalls" and calm.unfixable == ""
    # GET /v1/model still says why each bucket has its rung: the last plan, with the hold
    assert [(p.max_batch, p.rung) for p in held.plans] == [
        (p.max_batch, p.rung) for p in calm.plans] and calm.plans
    assert all(p.reason == held.reason for p in held.plans)
    # ... but never a plan of a table no longer in force (the operator replaced it)
    pinned = rung_policy(ladder, "m12", SETTINGS.buckets, SETTINGS.min_batch)
    assert calm.policy == OFF
    other_table = decide(obs, pinned, calm.memory, mode="adaptive", settings=SETTINGS,
                         floor=NO_FLOOR, ladder=ladder)
    assert other_table.direction == "hold" and other_table.plans == ()
    # the same miss with rare or short prefills is the decode steps': it tightens
    for other in (StallSteps(share=0.001, mean_ms=150.0), StallSteps(share=0.05, mean_ms=40.0)):
        moved = decide(Observation(latencies=(LatencyReading(TARGET, 0.150),),
                                   batch_steps=None, num_experts=EXPERTS, model=FLEET,
                                   batch_mix=mix, stalls=other),
                       calm.policy, calm.memory, mode="adaptive", settings=SETTINGS,
                       floor=NO_FLOOR, ladder=ladder)
        assert moved.direction == "tighten", (other, moved.reason)
        assert moved.unfixable == ""


def test_stall_steps_are_summed_over_the_replicas_statistics() -> None:
    from lynx_policy.loop import stall_steps
    from lynx_protocol.messages import StepStats

    def stats(decode: int, prefill: int, mixed: int, prefill_ms: float, mixed_ms: float):
        return StepStats(replica_id="r", seq=1, window_s=1.0, batch_size_edges=[8],
                         batch_size_counts=[0, 0], decode_steps=decode, prefill_steps=prefill,
                         mixed_steps=mixed, experts_kept_mean=[], stock_union_mean=[],
                         routing_mass_kept=1.0, step_latency_p50_ms=1.0,
                         step_latency_p99_ms=1.0, applied_policy_version=1,
                         prefill_latency_sum_ms=prefill_ms, mixed_latency_sum_ms=mixed_ms)

    got = stall_steps([stats(90, 4, 1, 400.0, 100.0), stats(95, 0, 0, 0.0, 0.0)])
    assert got is not None and math.isclose(got.share, 5 / 190)
    assert math.isclose(got.mean_ms, 100.0)
    assert stall_steps([]) is None


def test_open_arrivals_shrink_the_batches_and_the_planner_counts_on_it() -> None:
    """A replica under open arrivals (Little's law: B = k x TPOT), the testbed's fit: pruning to
    the lowest rung meets a target the fixed-batch model calls out of reach. With
    ``arrivals="open"`` the planner tightens and the plant then meets the target; with
    ``closed`` it says it cannot close the gap and holds."""
    fit = msgspec.structs.replace(FIT, a_ms=17.0, b_ms_per_row=2.42, c_ms_per_expert=0.437)
    fleet = FleetModel(fits=(fit,), num_experts=EXPERTS, top_k=TOP_K, largest_batch=64)
    ladder, k = mini_ladder(), 0.25  # rows per ms of TPOT (arrival rate x output length)

    def tpot_and_batch(policy: PolicySpec) -> tuple[float, float]:
        tpot = 50.0
        for _ in range(200):  # the plant's own fixed point
            batch = k * tpot
            experts = fleet.union(batch)
            if policy.name == "budget":
                bucket = next(b for b in policy.budgets if math.ceil(batch) <= b.max_batch)
                index = rung_of_bucket(ladder, bucket) or 0
                if index:
                    experts = rung_experts(ladder.rungs[index], bucket.max_batch, experts, EXPERTS)
            tpot = fit.predict(batch, experts)
        return tpot, batch

    off_ms, off_rows = tpot_and_batch(OFF)
    lowest_ms, _ = tpot_and_batch(rung_policy(ladder, "m8", SETTINGS.buckets, SETTINGS.min_batch))
    lowest = rung_experts(ladder.rungs[-1], 32, fleet.union(off_rows), EXPERTS)
    fixed_batch_ms = fit.predict(off_rows, lowest)
    target_ms = (lowest_ms + fixed_batch_ms) / 2 / 0.9  # reachable open, not with fixed batches
    assert lowest_ms < target_ms * 0.9 < fixed_batch_ms and off_ms > target_ms
    target = SloTarget(metric="tpot", quantile=0.9, target_ms=target_ms)
    for arrivals in ("open", "closed"):
        settings_ = msgspec.structs.replace(SETTINGS, arrivals=arrivals)
        policy, memory = OFF, Memory()
        for _ in range(6):
            observed, rows = tpot_and_batch(policy)
            obs = Observation(latencies=(LatencyReading(target, observed / 1000.0),),
                              batch_steps=None, num_experts=EXPERTS, model=fleet,
                              batch_mix=((rows, 100),))
            decision = decide(obs, policy, memory, mode="adaptive", settings=settings_,
                              floor=NO_FLOOR, ladder=ladder)
            policy, memory = decision.policy, decision.memory
        if arrivals == "open":
            assert tpot_and_batch(policy)[0] <= target_ms, decision.plans
        else:
            assert policy == OFF and any("cannot close the gap" in p.reason
                                         for p in decision.plans)


def test_a_layer_at_e_counts_in_no_mean_as_in_the_runtime_statistics() -> None:
    """The runtime's ``experts_kept_mean`` averages the layer-steps that ran selection (budget
    < E): a dense layer, or one a table leaves at E, is in no mean, so the planner's experts
    per step for a rung leave it out too (it averaged it in at the stock union before)."""
    dense_first = rung("m12", [EXPERTS, 8, 16], 0.01)
    assert rung_experts(dense_first, 16, 20.0, EXPERTS) == 12.0
    assert rung_experts(dense_first, 16, 10.0, EXPERTS) == 9.0  # capped by the union
    assert SortedBudgets([EXPERTS, 8, 16], EXPERTS).mean_capped(10.0) == 9.0
    unpruned = rung("none", [EXPERTS] * 3, 0.0)
    assert rung_experts(unpruned, 16, 20.0, EXPERTS) == 20.0
    assert SortedBudgets([EXPERTS] * 3, EXPERTS).mean_capped(20.0) == 20.0


def test_whether_prefill_steps_own_a_miss_is_judged_on_the_readings_own_window() -> None:
    """A p99 ITL read over 8 s: a burst of 150 ms prefills 3 s ago (inside the window) owns
    its miss even when the loop's last seconds held none, and one 20 s ago (before the
    window) does not, whatever the last seconds held."""
    from lynx_policy.evidence import StallSteps

    ladder, mix = mini_ladder(), ((48.0, 100),)
    calm = step(ladder, OFF, plant(ladder, OFF, mix, 0.6), mix, Memory())
    burst = (100, 5, 750.0)  # 100 steps, 5 of them prefills of 150 ms
    quiet = (100, 0, 0.0)

    def decided(history, current: StallSteps | None, settle: bool = True):
        reading = LatencyReading(TARGET, 0.150, window_s=8.0)
        obs = Observation(latencies=(reading,), batch_steps=None, num_experts=EXPERTS,
                          model=FLEET, batch_mix=mix, stalls=current, stall_history=history)
        settings = msgspec.structs.replace(SETTINGS, settle=settle)
        return decide(obs, calm.policy, calm.memory, mode="adaptive", settings=settings,
                      floor=NO_FLOOR, ladder=ladder)

    recent_burst = ((3.0, burst), (1.0, quiet), (6.0, quiet))
    held = decided(recent_burst, StallSteps(share=0.0, mean_ms=0.0))
    assert held.direction == "hold" and held.unfixable == "prefill_stalls"
    assert "itl p99: 1.7% of steps, mean 150.0 ms" in held.reason  # 5 of the window's 300
    old_burst = ((20.0, burst), (1.0, quiet), (6.0, quiet))
    moved = decided(old_burst, StallSteps(share=0.05, mean_ms=150.0))
    assert moved.direction == "tighten" and moved.unfixable == ""
    # adaptive.settle = false: the loop's last seconds decide, as before
    assert decided(old_burst, StallSteps(share=0.05, mean_ms=150.0), settle=False
                   ).unfixable == "prefill_stalls"


def test_kappa_leaves_out_an_itl_reading_whose_own_window_prefill_steps_own() -> None:
    """A missed tpot reading (the decode steps') moves the planner; a missed p99 ITL whose
    8 s window held 150 ms prefills in 1.7% of steps is the stalls': its kappa keeps its
    previous value even though the loop's last seconds held no prefill at all."""
    from lynx_policy.evidence import StallSteps

    ladder, mix = mini_ladder(), ((48.0, 100),)
    tpot = SloTarget(metric="tpot", quantile=0.9, target_ms=100.0)
    history = ((3.0, (100, 5, 750.0)), (1.0, (100, 0, 0.0)), (6.0, (100, 0, 0.0)))

    def decided(itl_ms: float, tpot_ms: float, memory: Memory):
        obs = Observation(latencies=(LatencyReading(TARGET, itl_ms / 1000.0, window_s=8.0),
                                     LatencyReading(tpot, tpot_ms / 1000.0, window_s=8.0)),
                          batch_steps=None, num_experts=EXPERTS, model=FLEET, batch_mix=mix,
                          stalls=StallSteps(share=0.0, mean_ms=0.0), stall_history=history)
        return decide(obs, OFF, memory, mode="adaptive", settings=SETTINGS, floor=NO_FLOOR,
                      ladder=ladder)

    calm = decided(60.0, 60.0, Memory())
    before = {m: k for m, _, k in calm.memory.corrections}
    later = decided(150.0, 130.0, calm.memory)
    after = {m: k for m, _, k in later.memory.corrections}
    assert later.unfixable == ""  # the tpot miss is the decode steps': not all misses stall
    assert after["itl"] == before["itl"]
    assert after["tpot"] > before["tpot"]
