"""Expert-parallel keep sets (`lynx.selection.ep`, the ``budget`` policy with
``RouterSpec.ep_ranks``): an independent brute-force oracle on tiny layers, and properties of
the whole selection step (hypothesis).

Shape legend: E experts, R EP ranks, T rows, K top_k."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lynx.selection import RouterSpec, make_knobs, select_layer_step, stock_routing
from lynx.selection.ep import keep_per_rank, rank_level, rank_loads

FAST = settings(max_examples=60, deadline=None)


@st.composite
def layers(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """(importance [E] > 0 on the union, union [E], forced [E] inside it, R, budget m)."""
    ranks = draw(st.sampled_from([2, 4]))
    experts = ranks * draw(st.sampled_from([1, 2, 3]))
    union = torch.tensor(draw(st.lists(st.booleans(), min_size=experts, max_size=experts)))
    forced = union & torch.tensor(draw(st.lists(st.booleans(), min_size=experts,
                                                max_size=experts)))
    weights = draw(st.lists(st.integers(1, 50), min_size=experts, max_size=experts))
    importance = torch.where(union, torch.tensor(weights, dtype=torch.float32) / 7.0, 0.0)
    return importance, union, forced, ranks, draw(st.integers(1, experts))


def _ep_keep(importance: torch.Tensor, union: torch.Tensor, forced: torch.Tensor, ranks: int,
             budget: int) -> tuple[torch.Tensor, int]:
    level = rank_level(forced, torch.tensor(budget), ranks)
    score = forced.to(torch.float32) * 1e9 + importance
    return keep_per_rank(score, union, level, ranks), int(level)


@FAST
@given(layers())
def test_the_level_keeps_the_most_mass_any_set_under_it_can(layer: tuple) -> None:
    """Brute force over every set S with forced <= S <= union: at most L experts per rank,
    none keeps more importance; fewer experts on the busiest rank, none keeps as much."""
    importance, union, forced, ranks, budget = layer
    keep, level = _ep_keep(importance, union, forced, ranks, budget)
    mass = float(importance[keep].sum())
    busiest = int(rank_loads(keep, ranks).max())
    assert bool((keep >= forced).all() and (keep <= union).all()) and busiest <= level
    free = [e for e in range(union.numel()) if bool(union[e]) and not bool(forced[e])]
    for n in range(len(free) + 1):
        for extra in itertools.combinations(free, n):
            s = forced.clone()
            s[list(extra)] = True
            load, s_mass = int(rank_loads(s, ranks).max()), float(importance[s].sum())
            if load <= level:
                assert s_mass <= mass + 1e-6, (s.tolist(), keep.tolist())
            if load < busiest:
                assert s_mass < mass - 1e-6, (s.tolist(), keep.tolist())


def test_rank_level_and_its_errors() -> None:
    forced = torch.tensor([True, True, True, False, False, False, True, False])
    assert int(rank_level(forced, torch.tensor(3), 2)) == 3  # rank 0 holds 3 forced
    assert int(rank_level(forced, torch.tensor(7), 2)) == 4  # ceil(7 / 2)
    # K = 4 experts to route to: rank 1 holds one of the union, so rank 0 must hold three
    union = torch.tensor([True, True, True, False, False, True, False, False])
    one = torch.tensor([True] + [False] * 7)
    assert int(rank_level(one, torch.tensor(1), 2, union, top_k=4)) == 3
    assert int(rank_level(one, torch.tensor(1), 2, union, top_k=2)) == 1  # one per rank
    assert int(rank_level(one, torch.tensor(1), 2, union, top_k=9)) == 3  # all of the union
    with pytest.raises(ValueError, match="do not split"):
        rank_level(forced, torch.tensor(3), 3)
    with pytest.raises(ValueError, match="EP ranks"):
        RouterSpec(top_k=2, ep_ranks=3).check(8)


@st.composite
def ep_steps(draw: st.DrawFn) -> tuple[torch.Tensor, RouterSpec, RouterSpec, int]:
    ranks = draw(st.sampled_from([2, 4, 8]))
    experts = ranks * draw(st.sampled_from([2, 4, 8]))
    top_k = draw(st.integers(1, min(8, experts)))
    rows = draw(st.integers(1, 48))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    skew = torch.randn(experts, generator=gen) * draw(st.sampled_from([0.0, 1.5, 3.0]))
    logits = skew[None, :] + torch.randn(rows, experts, generator=gen) * 1.5
    router = RouterSpec(top_k=top_k)
    return logits, router, RouterSpec(top_k=top_k, ep_ranks=ranks), draw(st.integers(1, experts))


@FAST
@given(ep_steps())
def test_the_ep_step_never_loads_a_rank_more_than_stock_or_the_global_budget(
        step: tuple) -> None:
    logits, global_router, ep_router, budget = step
    ranks = ep_router.ep_ranks
    rows = torch.ones(logits.shape[0], dtype=torch.bool)
    knobs = make_knobs(budget=budget)
    ep = select_layer_step("budget", logits, ep_router, knobs, rows, rows)
    flat = select_layer_step("budget", logits, global_router, knobs, rows, rows)
    stock = stock_routing(logits, global_router)
    union = torch.zeros(logits.shape[1], dtype=torch.bool)
    union[stock.ids.flatten()] = True
    assert bool(ep.keep[stock.ids[:, 0]].all()), "a row lost its top-1"
    assert bool((ep.keep <= union).all())
    loads = rank_loads(ep.keep, ranks)
    assert bool((loads <= rank_loads(union, ranks)).all())  # never above stock, per rank
    assert int(loads.max()) <= int(rank_loads(flat.keep, ranks).max())  # K floor included
    assert bool(ep.keep[ep.topk_ids[ep.rerouted]].all())  # rerouted rows: kept experts only
    # rows with nothing dropped keep their stock top-K
    untouched = ~ep.rerouted
    assert torch.equal(ep.topk_ids[untouched], stock.ids[untouched])


def test_ep_aware_budget_spreads_a_skewed_keep_set_over_the_ranks() -> None:
    """Every row's top-1 anywhere, its weaker choices all on rank 0: the global budget puts
    most of its keep set on rank 0, the EP level keeps max(ceil(m/R), forced) per rank."""
    gen = torch.Generator().manual_seed(0)
    experts, ranks, rows = 64, 8, 8
    logits = torch.randn(rows, experts, generator=gen)
    logits[:, :8] += 4.0  # rank 0's block: everyone's 2nd..4th choices
    logits[torch.arange(rows), torch.randperm(experts, generator=gen)[:rows]] = 10.0  # top-1s
    router, ep_router = RouterSpec(top_k=4), RouterSpec(top_k=4, ep_ranks=ranks)
    everyone = torch.ones(rows, dtype=torch.bool)
    knobs = make_knobs(budget=16)
    flat = select_layer_step("budget", logits, router, knobs, everyone, everyone)
    ep = select_layer_step("budget", logits, ep_router, knobs, everyone, everyone)
    forced = torch.zeros(experts, dtype=torch.bool)
    forced[logits.argmax(-1)] = True
    level = int(rank_level(forced, torch.tensor(16), ranks))
    assert int(rank_loads(flat.keep, ranks).max()) == 8  # all of rank 0
    assert int(rank_loads(ep.keep, ranks).max()) == level <= 3
