"""Property tests of every selection policy (hypothesis) and of routing with a keep set."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lynx.selection import batch_keep_mask, keep_budget, route_stock, route_with_keep
from lynx.sglang_plugin.selection_glue import layer_statistics

POLICIES = ("off", "budget", "affinity", "piggyback")
FAST = settings(max_examples=60, deadline=None)


@st.composite
def steps(draw: st.DrawFn) -> dict:
    experts = draw(st.sampled_from([4, 8, 16, 32, 64]))
    top_k = draw(st.integers(1, min(8, experts)))
    rows = draw(st.integers(1, 48))
    seed = draw(st.integers(0, 2**31 - 1))
    skew = draw(st.floats(0.0, 3.0))
    gen = torch.Generator().manual_seed(seed)
    popularity = torch.randn(experts, generator=gen) * skew
    logits = popularity[None, :] + torch.randn(rows, experts, generator=gen) * 1.5
    n_valid = draw(st.integers(1, rows))
    prefill = draw(st.integers(0, n_valid - 1))
    index = torch.arange(rows)
    return {
        "logits": logits, "top_k": top_k, "row_valid": index < n_valid,
        "row_prunable": (index < n_valid) & (index >= prefill),
        "budget": torch.tensor(draw(st.integers(1, experts + 2))),
        "alpha": torch.tensor(draw(st.sampled_from([0.7, 1.0, 2.0, 3.0]))),
        "beta": torch.tensor(float(draw(st.sampled_from([0, 1, 2, 4])))),
        "k0": torch.tensor(draw(st.integers(1, top_k))),
    }


def _keep(policy: str, step: dict) -> torch.Tensor:
    return batch_keep_mask(policy, step["logits"], top_k=step["top_k"],
                           row_valid=step["row_valid"], row_prunable=step["row_prunable"],
                           budget=step["budget"], alpha=step["alpha"], beta=step["beta"],
                           k0=step["k0"])


@FAST
@given(steps(), st.sampled_from(POLICIES))
def test_top1_kept_and_at_least_top_k(step: dict, policy: str) -> None:
    keep = _keep(policy, step)
    top1 = step["logits"].argmax(-1)
    assert bool(keep[top1[step["row_prunable"]]].all())
    assert int(keep.sum()) >= step["top_k"]


@FAST
@given(steps())
def test_budget_respected_and_monotone(step: dict) -> None:
    probs = torch.softmax(step["logits"], -1)
    prunable, top_k = step["row_prunable"], step["top_k"]
    distinct_top1 = int(probs.argmax(-1)[prunable].unique().numel())
    previous = None
    for m in range(probs.shape[1] + 1, 0, -1):
        keep = keep_budget(probs, top_k, prunable, torch.tensor(m))
        assert int(keep.sum()) == min(probs.shape[1], max(m, distinct_top1, top_k))
        if previous is not None:
            assert bool((keep <= previous).all()), "a smaller budget kept a new expert"
        previous = keep


@FAST
@given(steps(), st.sampled_from(POLICIES), st.integers(1, 16))
def test_padding_rows_do_not_vote(step: dict, policy: str, pad: int) -> None:
    keep = _keep(policy, step)
    garbage = torch.randn(pad, step["logits"].shape[1]) * 50
    padded = {**step, "logits": torch.cat([step["logits"], garbage]),
              "row_valid": torch.cat([step["row_valid"], torch.zeros(pad, dtype=torch.bool)]),
              "row_prunable": torch.cat([step["row_prunable"],
                                         torch.zeros(pad, dtype=torch.bool)])}
    assert torch.equal(_keep(policy, padded), keep)


@FAST
@given(steps(), st.sampled_from(POLICIES), st.booleans())
def test_prefill_rows_untouched_and_weights_keep_router_mass(
    step: dict, policy: str, renormalize: bool
) -> None:
    keep = _keep(policy, step)
    logits, top_k, prunable = step["logits"], step["top_k"], step["row_prunable"]
    weights, ids = route_with_keep(logits, top_k, renormalize, keep, prunable)
    stock_w, stock_ids = route_stock(logits, top_k, renormalize)
    fixed = ~prunable
    assert torch.equal(ids[fixed], stock_ids[fixed])
    assert torch.allclose(weights[fixed], stock_w[fixed])
    assert bool(keep[ids[prunable]].all()), "a pruned row was routed to a dropped expert"
    assert torch.isfinite(weights).all()
    assert torch.allclose(weights.sum(-1), stock_w.sum(-1), atol=1e-5)
    assert torch.equal(ids[:, 0][prunable], stock_ids[:, 0][prunable])  # top-1 survives


@FAST
@given(steps(), st.sampled_from(POLICIES))
def test_layer_statistics_match_a_plain_loop(step: dict, policy: str) -> None:
    keep = _keep(policy, step)
    probs = torch.softmax(step["logits"], -1)
    top_k, prunable = step["top_k"], step["row_prunable"]
    stats = layer_statistics(probs.double(), top_k, keep, prunable).tolist()
    union: set[int] = set()
    mass_kept = mass_total = top1_kept = 0.0
    rows = 0
    for t in range(probs.shape[0]):
        if not prunable[t]:
            continue
        rows += 1
        values, ids = probs[t].double().topk(top_k)
        union.update(ids.tolist())
        for v, e in zip(values.tolist(), ids.tolist(), strict=True):
            mass_total += v
            mass_kept += v if keep[e] else 0.0
        top1_kept += 1.0 if keep[ids[0]] else 0.0
    expected = [1.0 if rows else 0.0, float(keep.sum()) if rows else 0.0, float(len(union)),
                mass_kept, mass_total, top1_kept, float(rows)]
    assert all(abs(a - b) < 1e-6 for a, b in zip(stats, expected, strict=True)), (stats, expected)


def test_budget_cuts_the_union_on_a_skewed_batch() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(32, 64, generator=gen) * 2.0 + torch.randn(64, generator=gen)[None] * 2
    probs = torch.softmax(logits, -1)
    everyone = torch.ones(32, dtype=torch.bool)
    stock_union = probs.topk(6, -1).indices.unique().numel()
    keep = keep_budget(probs, 6, everyone, torch.tensor(16))
    distinct_top1 = probs.argmax(-1).unique().numel()
    assert int(keep.sum()) == max(16, distinct_top1) < stock_union
