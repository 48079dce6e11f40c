"""Metamorphic properties: the keep set is invariant to whatever SGLang's routing is invariant
to, for every policy and router kind (hypothesis; issue 22).

- a constant shift of the correction bias (the router chooses by an argmax of gate + bias);
- the order of the rows (same keep set; each row's routing follows the row, bit for bit);
- an added row that is not prunable (prefill), wherever it sits in the batch;
- padding rows, whatever they hold (`test_selection_properties`: padding).

Each property runs on both stock routings the plugin uses: the library's own (masked-logits
formats) and an engine's own top-K (STANDARD: SGLang routes first, ``stock_ids``), here an
engine that breaks exact ties toward the higher id and returns its top-K unsorted.

Shape legend: T rows, E experts, K top_k."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from test_selection_properties import FAST, POLICIES, Step, steps

from lynx.selection import (
    LayerSelection,
    RouterSpec,
    make_knobs,
    select_layer_step,
    stock_routing,
)
from lynx.selection.ranking import stable_top_k
from lynx.selection.statistics import STAT_FIELDS


def _stock(step: Step, logits: torch.Tensor, bias: torch.Tensor | None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [T,K], groups [T,E] bool) of the stock routing of the valid rows."""
    z = torch.where(step.row_valid[:, None], logits.float(), 0.0)
    stock = stock_routing(z, step.router, bias)
    return stock.ids, torch.isfinite(stock.choice)


def engine_ids(step: Step, logits: torch.Tensor, bias: torch.Tensor | None, seed: int
               ) -> torch.Tensor:
    """[T,K] int32 an engine's own top-K: exact ties broken toward the higher id (the library
    breaks them toward the lower), columns in a seeded shuffled order (SGLang: unsorted)."""
    z = torch.where(step.row_valid[:, None], logits.float(), 0.0)
    choice = stock_routing(z, step.router, bias).choice
    experts, top_k = choice.shape[1], step.router.top_k
    ids = experts - 1 - stable_top_k(choice.flip(-1), top_k)
    gen = torch.Generator().manual_seed(seed)
    order = torch.argsort(torch.rand(ids.shape, generator=gen), dim=1)
    return ids.gather(1, order).to(torch.int32)


def run(step: Step, policy: str, ids: torch.Tensor | None) -> LayerSelection:
    """The step as the plugin runs it: library stock routing (``ids`` None) or the engine's."""
    return select_layer_step(policy, step.logits, step.router, step.knobs, step.row_valid,
                             step.row_prunable, step.correction_bias, stock_ids=ids)


def _same_routing(a: LayerSelection, b: LayerSelection, rows: torch.Tensor | None = None
                  ) -> None:
    """Keep sets equal; per row (``rows`` of ``b`` in ``a``'s order), the same routing: ids
    bit for bit, weights to rounding (torch's CPU kernels round an element differently in a
    vector lane and in the scalar tail, so a row's weights may move in the last bit with its
    position; an engine keeps its own weights for every row not rerouted)."""
    pick = (lambda t: t) if rows is None else (lambda t: t[rows])
    assert torch.equal(a.keep, b.keep), "the keep set changed"
    for name in ("apply_rows", "rerouted", "allowed", "topk_ids"):
        assert torch.equal(getattr(a, name), pick(getattr(b, name))), name
    torch.testing.assert_close(a.topk_weights, pick(b.topk_weights))


def _same_statistics(a: LayerSelection, b: LayerSelection) -> None:
    """Counts equal exactly; routing-mass sums to rounding (summed in another order)."""
    counts = [STAT_FIELDS.index(f) for f in ("kept", "stock_union", "rows", "rerouted_rows")]
    assert torch.equal(a.stats[counts], b.stats[counts])
    torch.testing.assert_close(a.stats, b.stats)


@FAST
@given(steps(kinds=("biased", "biased-grouped")), st.sampled_from(POLICIES),
       st.sampled_from([-1.0, 2.0, 5.0, -0.25]), st.booleans())
def test_a_constant_bias_shift_changes_no_keep_set(step: Step, policy: str, shift: float,
                                                   engine: bool) -> None:
    assert step.correction_bias is not None
    shifted = step.correction_bias + shift
    before, after = _stock(step, step.logits, step.correction_bias), _stock(
        step, step.logits, shifted)
    # fp32 rounding of gate + bias can flip a near-tie for SGLang's router too: only shifts
    # that leave the router's own choice (ids and groups) unchanged are the premise.
    assume(torch.equal(before[0], after[0]) and torch.equal(before[1], after[1]))
    moved = Step(step.logits, step.router, shifted, step.row_valid, step.row_prunable,
                 step.knobs)
    ids = engine_ids(step, step.logits, step.correction_bias, 0) if engine else None
    moved_ids = engine_ids(moved, step.logits, shifted, 0) if engine else None
    _same_routing(run(step, policy, ids), run(moved, policy, moved_ids))


@FAST
@given(steps(), st.sampled_from(POLICIES), st.randoms(use_true_random=False), st.booleans())
def test_row_order_changes_no_keep_set_and_routing_follows_the_row(
        step: Step, policy: str, rng, engine: bool) -> None:  # type: ignore[no-untyped-def]
    order = list(range(step.logits.shape[0]))
    rng.shuffle(order)
    perm = torch.tensor(order)
    shuffled = Step(step.logits[perm], step.router, step.correction_bias, step.row_valid[perm],
                    step.row_prunable[perm], step.knobs)
    ids = engine_ids(step, step.logits, step.correction_bias, 1) if engine else None
    selection = run(step, policy, ids)
    permuted = run(shuffled, policy, ids[perm] if ids is not None else None)
    _same_routing(permuted, selection, perm)
    _same_statistics(permuted, selection)


@FAST
@given(steps(), st.sampled_from(POLICIES), st.integers(0, 40), st.sampled_from([0.5, 4.0]),
       st.booleans())
def test_an_added_prefill_row_changes_no_keep_set(step: Step, policy: str, where: int,
                                                  scale: float, engine: bool) -> None:
    rows, experts = step.logits.shape
    at = where % (rows + 1)
    prefill = (torch.randn(1, experts, generator=torch.Generator().manual_seed(where))
               * scale).to(step.logits.dtype)

    def insert(tensor: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return torch.cat([tensor[:at], value, tensor[at:]])

    yes = torch.ones(1, dtype=torch.bool)
    grown = Step(insert(step.logits, prefill), step.router, step.correction_bias,
                 insert(step.row_valid, yes), insert(step.row_prunable, ~yes), step.knobs)
    grown_ids = engine_ids(grown, grown.logits, step.correction_bias, 2) if engine else None
    ids = None
    if grown_ids is not None:  # the same engine decision for every row but the new one
        ids = torch.cat([grown_ids[:at], grown_ids[at + 1:]])
    selection, with_prefill = run(step, policy, ids), run(grown, policy, grown_ids)
    others = torch.tensor([i for i in range(rows + 1) if i != at], dtype=torch.long)
    _same_routing(selection, with_prefill, others)
    assert not bool(with_prefill.apply_rows[at]) and not bool(with_prefill.rerouted[at])
    _same_statistics(with_prefill, selection)


@FAST
@given(steps(), st.sampled_from(POLICIES))
def test_rerouted_rows_are_exactly_the_pruned_rows_with_a_dropped_expert(step: Step,
                                                                          policy: str) -> None:
    """The rows an engine rewrites. Judged on the engine's own top-K: exactly the pruned rows
    whose own ids leave ``allowed``. Judged on the library's (the engine routes later, masked
    formats): those, plus the rows where a dropped expert ties with the K-th choice (the
    engine may break that tie toward it); every other row's routing is the stock routing."""
    own = engine_ids(step, step.logits, step.correction_bias, 3)
    exact = run(step, policy, own)
    outside = ~exact.allowed.gather(1, own.long()).all(dim=-1)
    assert torch.equal(exact.rerouted, exact.apply_rows & outside)

    judged = run(step, policy, None)
    z = torch.where(step.row_valid[:, None], step.logits.float(), 0.0)
    stock = stock_routing(z, step.router, step.correction_bias)
    outside = ~judged.allowed.gather(1, stock.ids).all(dim=-1)
    kth = stock.choice.gather(1, stock.ids[:, -1:])
    tied = (torch.where(judged.allowed, -torch.inf, stock.choice) == kth).any(-1)
    assert torch.equal(judged.rerouted, judged.apply_rows & (outside | tied))
    still = ~judged.rerouted
    assert torch.equal(judged.topk_ids[still], stock.ids[still])


@FAST
@given(steps(kinds=("softmax", "softmax-raw", "sigmoid")), st.sampled_from(POLICIES))
def test_a_kernel_routing_masked_logits_never_reaches_a_dropped_expert(step: Step,
                                                                      policy: str) -> None:
    """Masked-logits formats: the kernel routes after Lynx and breaks ties its own way (here
    toward the higher id). Rows Lynx leaves unmasked must not reach a dropped expert even so,
    and they route exactly as the kernel would unmasked."""
    from lynx.selection import mask_rerouted_logits

    sel = run(step, policy, None)
    z = torch.where(step.row_valid[:, None], step.logits.float(), 0.0)
    masked = mask_rerouted_logits(z, sel.allowed, sel.rerouted)
    experts, top_k = z.shape[1], step.router.top_k

    def kernel(logits: torch.Tensor) -> torch.Tensor:
        return experts - 1 - stable_top_k(logits.flip(-1), top_k)

    ids = kernel(masked)
    assert bool(sel.allowed.gather(1, ids)[sel.apply_rows].all()), "a dropped expert computed"
    assert torch.equal(ids[~sel.rerouted], kernel(z)[~sel.rerouted])


@FAST
@given(steps(), st.sampled_from(POLICIES), st.integers(0, 1000))
def test_the_engines_column_order_changes_nothing(step: Step, policy: str, seed: int) -> None:
    """SGLang returns its top-K unsorted; the order of its columns must not matter (ties in
    the row's ranking go to the lower id, not to the earlier column)."""
    ids = engine_ids(step, step.logits, step.correction_bias, seed)
    _same_routing(run(step, policy, ids), run(step, policy, ids.flip(-1)))


def test_an_engines_tied_ids_rank_by_id_not_by_column() -> None:
    """Row 0 ties experts 1 and 3 for its top-1: whichever column SGLang put first, the lower
    id is the row's top-1 (must-keep), so the keep set is the same (budget 1)."""
    logits = torch.tensor([[1.0, 3.0, 0.0, 3.0], [3.0, 0.0, 2.0, 0.5]])
    rows = torch.ones(2, dtype=torch.bool)
    router, knobs = RouterSpec(top_k=2), make_knobs(budget=1)
    keeps = [select_layer_step("budget", logits, router, knobs, rows, rows,
                               stock_ids=torch.tensor(ids)).keep.nonzero().flatten().tolist()
             for ids in ([[3, 1], [0, 2]], [[1, 3], [0, 2]])]
    assert keeps == [[0, 1], [0, 1]]


KIMI_K2 = RouterSpec(top_k=8, scoring="sigmoid", has_correction_bias=True)  # E384
DEEPSEEK_V3 = RouterSpec(top_k=8, scoring="sigmoid", num_expert_group=8, topk_group=4,
                         has_correction_bias=True, routed_scaling_factor=2.5)  # E256


@pytest.mark.parametrize(("router", "experts"), [(KIMI_K2, 384), (DEEPSEEK_V3, 256)],
                         ids=["Kimi-K2", "DeepSeek-V3"])
@pytest.mark.parametrize("policy", POLICIES)
def test_production_biased_routers_keep_the_same_set_for_any_bias_offset(
        router: RouterSpec, experts: int, policy: str) -> None:
    """The reported cell: `affinity` kept 34, 33 and 25 of Kimi-K2's experts for bias shifts
    0, -1 and +2 (it binned log(sigmoid + bias)); DeepSeek-V3's real biases sit near +5."""
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(experts, generator=gen) * 1.5)[None, :] + torch.randn(
        32, experts, generator=gen) * 1.5
    bias = torch.randn(experts, generator=gen) * 0.05
    rows = torch.ones(32, dtype=torch.bool)
    knobs = make_knobs(budget=24, alpha=3.0, beta=2.0, coverage=0.8)
    selections = []
    for shift in (0.0, -1.0, 2.0, 5.0):
        assert torch.equal(stock_routing(logits, router, bias + shift).ids,
                           stock_routing(logits, router, bias).ids)  # the premise
        selections.append(select_layer_step(policy, logits, router, knobs, rows, rows,
                                            bias + shift))
    for other in selections[1:]:
        _same_routing(other, selections[0])
    if policy in ("budget", "affinity", "coverage"):  # (piggyback keeps grouped rows whole)
        assert int(selections[0].keep.sum()) < int(selections[0].stats[2])  # it does prune


@pytest.mark.parametrize(("policy", "knob"), [("budget", {"budget": 2}),
                                              ("coverage", {"coverage": 0.6})])
def test_an_exact_importance_tie_is_broken_by_expert_id_in_any_row_order(
        policy: str, knob: dict) -> None:
    """Experts 5 and 9 receive the same multiset of gate mass from different rows: a tie in
    exact arithmetic that fp32 sums in row order broke by rounding (the keep set then
    depended on the order of the batch in 17 of 20 draws). The fixed-point sum ties exactly,
    so the lower id wins whatever the order."""
    router = RouterSpec(top_k=2, scoring="sigmoid")  # elementwise gates: equal values
    for seed in range(10):
        gen = torch.Generator().manual_seed(seed)
        half = 24
        u = torch.rand(half, generator=gen)
        logits = torch.randn(2 * half, 32, generator=gen) - 6.0
        logits[:, 0] = 10.0  # everyone's top-1
        logits[:half, 5] = 5.0 + u  # second choice of the first half ...
        logits[half:, 9] = 5.0 + u[torch.randperm(half, generator=gen)]  # ... and the rest
        rows = torch.ones(2 * half, dtype=torch.bool)
        knobs = make_knobs(**knob)
        for _ in range(4):
            order = torch.randperm(2 * half, generator=gen)
            keep = select_layer_step(policy, logits[order], router, knobs, rows, rows).keep
            assert keep.nonzero().flatten().tolist() == [0, 5], (seed, policy)

