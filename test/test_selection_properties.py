"""Properties of every selection policy on every router kind (hypothesis), checked through the
reference routing the engine performs on the masked inputs.

Shape legend: T rows, E experts, K top_k."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lynx.selection import (
    POLICY_NAMES,
    LayerSelection,
    RouterSpec,
    SelectionKnobs,
    make_knobs,
    routed_weights,
    select_layer_step,
    stock_gate_mass,
    stock_routing,
)

EXAMPLES = int(os.environ.get("LYNX_HYPOTHESIS_EXAMPLES", "40"))  # raise it for a long run
FAST = settings(max_examples=EXAMPLES, deadline=None)
POLICIES = ("off", "budget", "affinity", "piggyback", "coverage")
ROUTER_KINDS = ("softmax", "softmax-raw", "sigmoid", "grouped-softmax", "biased", "biased-grouped")


@dataclass
class Step:
    logits: torch.Tensor  # [T,E] (fp32 or bf16)
    router: RouterSpec
    correction_bias: torch.Tensor | None  # [E]
    row_valid: torch.Tensor  # [T]
    row_prunable: torch.Tensor  # [T]
    knobs: SelectionKnobs

    def select(self, policy: str) -> LayerSelection:
        return select_layer_step(policy, self.logits, self.router, self.knobs, self.row_valid,
                                 self.row_prunable, self.correction_bias)


@st.composite
def steps(draw: st.DrawFn, kinds: tuple[str, ...] = ROUTER_KINDS) -> Step:
    kind = draw(st.sampled_from(kinds))
    grouped = kind in ("grouped-softmax", "biased-grouped")
    if grouped:
        groups, per_group = draw(st.sampled_from([2, 4, 8])), draw(st.sampled_from([2, 4, 8]))
        experts, topk_group = groups * per_group, draw(st.integers(1, groups))
        top_k = draw(st.integers(1, min(8, topk_group * per_group)))
    else:
        groups = topk_group = None  # type: ignore[assignment]
        experts = draw(st.sampled_from([4, 8, 16, 32, 64]))
        top_k = draw(st.integers(1, min(8, experts)))
    renormalize = {"softmax": True, "softmax-raw": False}.get(kind, draw(st.booleans()))
    router = RouterSpec(
        top_k=top_k, renormalize=renormalize,
        scoring="sigmoid" if kind in ("sigmoid", "biased", "biased-grouped") else "softmax",
        num_expert_group=groups, topk_group=topk_group,
        has_correction_bias=kind in ("biased", "biased-grouped"),
        ep_ranks=draw(st.sampled_from([r for r in (1, 1, 2, 4) if experts % r == 0])),
    )
    router.check(experts)
    rows = draw(st.integers(1, 40))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    skew = draw(st.floats(0.0, 3.0))
    logits = (torch.randn(experts, generator=gen) * skew)[None, :] + torch.randn(
        rows, experts, generator=gen) * draw(st.sampled_from([0.5, 1.5, 4.0]))
    if draw(st.booleans()):
        logits = logits.to(torch.bfloat16)  # real routers: bf16 logits, ties happen
    bias = (torch.randn(experts, generator=gen) * 0.3) if router.has_correction_bias else None
    n_valid = draw(st.integers(1, rows))
    index = torch.arange(rows)
    prefill_share = draw(st.sampled_from([0.0, 0.3, 1.0]))
    row_prunable = (torch.rand(rows, generator=gen) >= prefill_share) & (index < n_valid)
    knobs = make_knobs(
        budget=draw(st.integers(1, experts + 2)), alpha=draw(st.sampled_from([0.7, 1.0, 3.0])),
        beta=float(draw(st.sampled_from([0, 1, 2, 4]))), k0=draw(st.integers(1, top_k)),
    )
    return Step(logits, router, bias, index < n_valid, row_prunable, knobs)


def engine_routing(step: Step, selection: LayerSelection | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, ids) a row is routed with: the selection's routing, or (None) stock."""
    if selection is not None:
        return selection.topk_weights, selection.topk_ids
    z = torch.where(step.row_valid[:, None], step.logits.float(), 0.0)
    stock = stock_routing(z, step.router, step.correction_bias)
    return routed_weights(z, step.router, stock.ids, stock_gate_mass(stock)), stock.ids


@FAST
@given(steps(), st.sampled_from(POLICIES))
def test_pruned_rows_keep_top1_and_route_only_to_kept_experts(step: Step, policy: str) -> None:
    selection = step.select(policy)
    weights, ids = engine_routing(step, selection)
    stock_weights, stock_ids = engine_routing(step, None)
    pruned = selection.apply_rows
    assert torch.equal(pruned, step.row_valid & step.row_prunable)
    assert bool(selection.keep[stock_ids[:, 0][pruned]].all()), "a pruned row lost its top-1"
    assert torch.equal(ids[:, 0][pruned], stock_ids[:, 0][pruned]), "top-1 is no longer first"
    assert bool(selection.keep[ids[pruned]].all()), "a pruned row was routed to a dropped expert"
    assert int(selection.keep.sum()) >= step.router.top_k
    for tensor in (weights, selection.stats):
        assert bool(torch.isfinite(tensor).all())
    assert bool((selection.keep[None, :] | ~selection.allowed[pruned]).all())
    # weights sum as the original router's: 1 when renormalised, else the stock gate mass
    assert torch.allclose(weights.sum(-1), stock_weights.sum(-1), rtol=1e-5, atol=1e-6)


@FAST
@given(steps(), st.sampled_from(POLICIES))
def test_rows_not_pruned_route_exactly_stock(step: Step, policy: str) -> None:
    weights, ids = engine_routing(step, step.select(policy))
    stock_weights, stock_ids = engine_routing(step, None)
    fixed = ~(step.row_valid & step.row_prunable)
    assert torch.equal(ids[fixed], stock_ids[fixed])
    assert torch.allclose(weights[fixed], stock_weights[fixed], rtol=1e-6, atol=0)


@FAST
@given(steps(), st.sampled_from(POLICIES))
def test_disabled_step_changes_nothing(step: Step, policy: str) -> None:
    step.knobs.enabled.fill_(False)
    selection = step.select(policy)
    assert bool(selection.keep.all()) and not bool(selection.apply_rows.any())
    assert bool(selection.allowed.all())
    assert float(selection.stats.abs().sum()) == 0.0


@FAST
@given(steps(), st.sampled_from(POLICIES), st.integers(1, 12), st.sampled_from([50.0, 1e4]))
def test_padding_rows_neither_vote_nor_get_pruned(step: Step, policy: str, pad: int,
                                                  scale: float) -> None:
    selection = step.select(policy)
    experts = step.logits.shape[1]
    garbage = torch.randn(pad, experts) * scale
    garbage[0, 0] = float("inf")
    garbage[-1, -1] = float("nan")
    no = torch.zeros(pad, dtype=torch.bool)
    padded = Step(torch.cat([step.logits, garbage.to(step.logits.dtype)]), step.router,
                  step.correction_bias, torch.cat([step.row_valid, no]),
                  torch.cat([step.row_prunable, ~no]), step.knobs)
    with_padding = padded.select(policy)
    assert torch.equal(with_padding.keep, selection.keep)
    assert torch.allclose(with_padding.stats, selection.stats)  # sums of more (zero) terms
    assert not bool(with_padding.apply_rows[-pad:].any())
    assert bool(with_padding.allowed[-pad:].all())
    assert torch.equal(with_padding.topk_ids[:-pad], selection.topk_ids)


@FAST
@given(steps())
def test_budget_bound_and_monotone_in_m(step: Step) -> None:
    router, experts = step.router, step.logits.shape[1]
    stock = stock_routing(step.logits, router, step.correction_bias)
    pruned = step.row_valid & step.row_prunable
    distinct_top1 = int(stock.ids[:, 0][pruned].unique().numel())
    union = torch.zeros(experts, dtype=torch.bool)
    union[stock.ids[pruned].flatten()] = True
    previous = None
    for m in sorted({experts + 1, experts, *range(1, experts, max(1, experts // 8))},
                    reverse=True):
        step.knobs.budget.fill_(m)
        keep = step.select("budget").keep
        kept = int(keep.sum())
        if not bool(pruned.any()):
            assert kept == experts
        else:  # never an expert outside the pruned rows' stock union
            assert bool((keep <= union).all())
            if router.ep_ranks > 1:  # one level L for every rank (`selection.ep`)
                ranks = router.ep_ranks
                top1 = torch.zeros(experts, dtype=torch.bool)
                top1[stock.ids[:, 0][pruned]] = True
                held = union.view(ranks, -1).sum(dim=1)
                k_level = next(v for v in range(1, experts + 1)  # K experts to route to
                               if int(held.clamp_max(v).sum()) >= router.top_k)
                level = max(-(-m // ranks), int(top1.view(ranks, -1).sum(dim=1).max()), k_level)
                expected = int(held.clamp_max(level).sum())
            else:
                expected = min(int(union.sum()), max(m, distinct_top1, router.top_k))
            if not router.grouped:
                assert kept == expected, (kept, expected)
                if previous is not None:
                    assert bool((keep <= previous).all()), "a smaller budget kept a new expert"
            else:  # grouped: rows short of K kept experts in their groups keep their top-K
                assert kept >= expected, (kept, expected)
        previous = keep


@FAST
@given(steps(kinds=("softmax", "softmax-raw", "grouped-softmax")))
def test_piggyback_keeps_union_of_each_rows_top_k0(step: Step) -> None:
    keep = step.select("piggyback").keep
    stock = stock_routing(step.logits, step.router)
    pruned = step.row_valid & step.row_prunable
    own = set(stock.ids[pruned][:, : int(step.knobs.k0)].flatten().tolist())
    assert own <= set(torch.nonzero(keep).flatten().tolist())
    if not step.router.grouped and len(own) >= step.router.top_k:
        assert int(keep.sum()) == len(own)


@FAST
@given(steps(), st.sampled_from(POLICIES))
def test_policy_code_selects_the_same_keep_set_as_the_name(step: Step, policy: str) -> None:
    step.knobs.policy_code.fill_(POLICY_NAMES.index(policy))
    assert torch.equal(step.select("by_code").keep, step.select(policy).keep)


@FAST
@given(steps(kinds=("softmax", "softmax-raw", "sigmoid")), st.sampled_from(POLICIES))
def test_statistics_match_a_plain_loop(step: Step, policy: str) -> None:
    selection = step.select(policy)
    keep = selection.keep.tolist()
    logits = step.logits.double()
    top_k = step.router.top_k
    union: set[int] = set()
    mass_kept = mass_total = top1_kept = rerouted = 0.0
    rows = 0
    for t in range(logits.shape[0]):
        if not (bool(step.row_valid[t]) and bool(step.row_prunable[t])):
            continue
        rows += 1
        row = logits[t].tolist()
        chosen = sorted(range(len(row)), key=lambda e, r=row: (-r[e], e))[:top_k]
        if step.router.scoring == "softmax":
            gates = torch.softmax(logits[t], -1).tolist()
        else:
            gates = torch.sigmoid(logits[t]).tolist()
        union.update(chosen)
        for e in chosen:
            mass_total += gates[e]
            mass_kept += gates[e] if keep[e] else 0.0
        top1_kept += 1.0 if keep[chosen[0]] else 0.0
        tie = any(not keep[e] and row[e] == row[chosen[-1]] for e in range(len(row)))
        rerouted += 0.0 if all(keep[e] for e in chosen) and not tie else 1.0
    ranks, experts = step.router.ep_ranks, len(keep)
    block = experts // ranks
    rank_kept = max(sum(keep[r * block:(r + 1) * block]) for r in range(ranks))
    rank_union = max(len([e for e in union if e // block == r]) for r in range(ranks))
    pruned = [t for t in range(logits.shape[0])
              if bool(step.row_valid[t]) and bool(step.row_prunable[t])]

    def busiest_pairs(ids: list[list[int]]) -> float:
        counts = [0] * ranks
        for t in pruned:
            for e in ids[t]:
                counts[e // block] += 1
        return float(max(counts))

    stock_ids = [sorted(range(len(r)), key=lambda e, r=r: (-r[e], e))[:top_k]
                 for r in logits.tolist()]
    expected = [float(rows > 0), float(sum(keep)) * (rows > 0), float(len(union)), mass_kept,
                mass_total, top1_kept, float(rows), 0.0, rerouted,
                float(rank_kept) * (rows > 0), float(rank_union), float(rows * top_k),
                busiest_pairs(selection.topk_ids.tolist()), busiest_pairs(stock_ids)]
    got = selection.stats.tolist()
    assert all(abs(a - b) <= 1e-4 * max(1.0, abs(b)) for a, b in zip(got, expected, strict=True)
               ), (got, expected)


def test_budget_cuts_the_stock_union_on_a_skewed_batch() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(32, 64, generator=gen) * 2.0 + torch.randn(64, generator=gen)[None] * 2
    everyone = torch.ones(32, dtype=torch.bool)
    step = Step(logits, RouterSpec(top_k=6), None, everyone, everyone, make_knobs(budget=16))
    stats = dict(zip(("layer_steps", "kept", "stock_union"), step.select("budget").stats.tolist(),
                     strict=False))
    distinct_top1 = logits.argmax(-1).unique().numel()
    assert stats["kept"] == max(16, distinct_top1) < stats["stock_union"]


@settings(max_examples=EXAMPLES + 20, deadline=None)
@given(steps(kinds=("grouped-softmax", "biased-grouped")), st.sampled_from(POLICIES[1:]))
def test_grouped_routers_stay_viable_under_the_tightest_knobs(step: Step, policy: str) -> None:
    """Budget 1, k0 1, narrow bins: the keep set is as small as the rules allow, so a row's
    chosen groups (re-chosen on masked inputs) must still hold its top-1 and K kept experts."""
    step.knobs.budget.fill_(1)
    step.knobs.k0.fill_(1)
    step.knobs.alpha.fill_(8.0)
    selection = step.select(policy)
    _, ids = engine_routing(step, selection)
    _, stock_ids = engine_routing(step, None)
    pruned = selection.apply_rows
    assert torch.equal(ids[:, 0][pruned], stock_ids[:, 0][pruned]), "top-1 is no longer first"
    assert bool(selection.keep[ids[pruned]].all()), "a pruned row was routed to a dropped expert"


@FAST
@given(steps(), st.sampled_from([0.3, 0.6, 0.9, 1.0]))
def test_coverage_keeps_the_target_mass_with_the_fewest_experts(step: Step, target: float
                                                                ) -> None:
    """The kept experts hold at least ``coverage`` of the pruned rows' stock gate mass; a
    lower target never keeps more (non-grouped: the floor rules add in importance order)."""
    from lynx.selection import batch_totals

    step.knobs.coverage.fill_(target)
    keep = step.select("coverage").keep
    pruned = step.row_valid & step.row_prunable
    z = torch.where(step.row_valid[:, None], step.logits.float(), 0.0)
    batch = batch_totals(stock_routing(z, step.router, step.correction_bias), pruned)
    total = float(batch.importance.sum())
    assert float(batch.importance[keep].sum()) >= target * total - 1e-4 * max(total, 1.0)
    if not step.router.grouped and bool(pruned.any()):
        step.knobs.coverage.fill_(target / 2)
        assert bool((step.select("coverage").keep <= keep).all())


def test_the_top_k_floor_ranks_near_equal_experts_by_importance_not_by_id() -> None:
    """CI found `coverage` keeping, at target 0.3, an expert it dropped at 0.6 (sigmoid
    router, 3 rows, E64 top-8): the top-K floor ranked the union by 1e3 + importance in fp32,
    where 0.99977 and 0.99976 tie, and broke the tie by id. Expert 5 is the more important
    one here and must be the one the floor adds."""
    from lynx.selection.keep_rules import BatchRouting, with_top_k_floor

    importance = torch.zeros(8)
    importance[0], importance[2], importance[5] = 3.0, 0.99976, 0.99977
    union = importance > 0
    keep = torch.zeros(8, dtype=torch.bool)
    keep[0] = True
    batch = BatchRouting(None, importance, torch.zeros(8), union)  # type: ignore[arg-type]
    assert with_top_k_floor(keep, batch, 2).nonzero().flatten().tolist() == [0, 5]
    assert with_top_k_floor(keep, batch, 4).sum() == 4  # the union first, then the rest
    assert bool(with_top_k_floor(keep, batch, 4)[[0, 2, 5]].all())
