"""AffinityBinning: the integer implementation against the published method computed exactly
(Python fractions), and the radix-key bounds. Shape legend: T rows, E experts, K top_k."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lynx.selection.affinity import (
    affinity_bins,
    affinity_choices,
    radix_weights,
    support_depth,
    support_keys,
    valid_row_count,
)


def published_choices(bins: torch.Tensor, row_valid: list[bool], rows: list[bool],
                      beta: int, top_k: int) -> set[int]:
    """The paper's steps 1-5 in exact arithmetic: h = B^q, c = sum over valid rows, re-rank
    q + (c - h)/B, union of each row's top-K (ties: lower expert index)."""
    batch = sum(row_valid)
    q = [[max(int(v), -beta) if beta > 0 else int(v) for v in row] for row in bins.tolist()]
    h = [[Fraction(batch) ** v for v in row] for row in q]
    experts = len(q[0])
    support = [sum((h[t][e] for t in range(len(q)) if row_valid[t]), Fraction(0))
               for e in range(experts)]
    kept: set[int] = set()
    for t in range(len(q)):
        if not rows[t]:
            continue
        reranked = [q[t][e] + (support[e] - h[t][e]) / batch for e in range(experts)]
        kept.update(sorted(range(experts), key=lambda e, r=reranked: (-r[e], e))[:top_k])
    return kept


@st.composite
def batches(draw: st.DrawFn) -> dict:
    experts = draw(st.sampled_from([4, 8, 16, 32]))
    rows = draw(st.integers(1, 24))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    logits = (torch.randn(experts, generator=gen) * draw(st.floats(0, 2)))[None] + torch.randn(
        rows, experts, generator=gen) * draw(st.sampled_from([0.3, 1.0, 2.5]))
    if draw(st.booleans()):
        logits = logits.to(torch.bfloat16).float()
    n_valid = draw(st.integers(1, rows))
    valid = torch.arange(rows) < n_valid
    return {
        "logits": logits, "row_valid": valid,
        "rows": valid & (torch.rand(rows, generator=gen) > draw(st.sampled_from([0.0, 0.5]))),
        "top_k": draw(st.integers(1, min(6, experts))),
        "alpha": draw(st.sampled_from([0.7, 1.0, 3.0, 8.0])),
        "beta": draw(st.sampled_from([0, 1, 2, 4])),
    }


@settings(max_examples=60, deadline=None)
@given(batches())
def test_integer_affinity_equals_the_published_method_in_exact_arithmetic(case: dict) -> None:
    alpha, beta = torch.tensor(case["alpha"]), torch.tensor(float(case["beta"]))
    bins = affinity_bins(case["logits"], alpha)
    depth = int(support_depth(valid_row_count(case["row_valid"]), beta))
    deepest = int(bins[case["row_valid"]].min())
    if case["beta"] == 0 and deepest < -depth:
        return  # unclamped bins deeper than the int64 key holds: documented approximation
    ours = affinity_choices(case["logits"], case["top_k"], case["row_valid"], case["rows"],
                            alpha, beta)
    expected = published_choices(bins, case["row_valid"].tolist(), case["rows"].tolist(),
                                 case["beta"], case["top_k"])
    assert set(torch.nonzero(ours).flatten().tolist()) == expected


@settings(max_examples=40, deadline=None)
@given(batches())
def test_support_keys_order_experts_like_their_bin_count_vectors(case: dict) -> None:
    alpha, beta = torch.tensor(case["alpha"]), torch.tensor(float(case["beta"]))
    bins = affinity_bins(case["logits"], alpha)
    n_valid = valid_row_count(case["row_valid"])
    depth = support_depth(n_valid, beta)
    keys = support_keys(bins, case["row_valid"], depth, radix_weights(n_valid, depth)).tolist()
    clamped = torch.maximum(bins, -depth.float())[case["row_valid"]]  # [B,E]
    counts = [tuple(int((clamped[:, e] == -j).sum()) for j in range(int(depth) + 1))
              for e in range(bins.shape[1])]
    for a in range(len(keys)):
        for b in range(len(keys)):
            assert (keys[a] > keys[b]) == (counts[a] > counts[b])


@pytest.mark.parametrize("batch", [1, 2, 3, 7, 16, 64, 65, 255, 256, 511, 512, 1024, 4096])
@pytest.mark.parametrize("beta", [0.0, 2.0, 8.0, 64.0])
def test_support_depth_keeps_keys_inside_int64(batch: int, beta: float) -> None:
    depth = int(support_depth(torch.tensor(batch), torch.tensor(beta)))
    assert batch * (batch + 1) ** depth < 2**62  # the largest possible key
    if beta > 0:
        assert depth <= beta
    if beta == 2.0 and batch <= 4096:
        assert depth == 2  # shipped betas fit exactly for every served batch size
    weights = radix_weights(torch.tensor(batch), torch.tensor(depth)).tolist()
    assert weights[: depth + 1] == [(batch + 1) ** i for i in range(depth + 1)]


def test_padding_does_not_change_radix_base() -> None:
    """B counts valid rows only: the same real rows padded to a CUDA-graph size choose alike."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 16, generator=gen) * 2
    valid = torch.ones(5, dtype=torch.bool)
    alpha, beta = torch.tensor(3.0), torch.tensor(2.0)
    alone = affinity_choices(logits, 4, valid, valid, alpha, beta)
    padded_logits = torch.cat([logits, torch.randn(11, 16, generator=gen) * 9])
    padded_valid = torch.cat([valid, torch.zeros(11, dtype=torch.bool)])
    assert torch.equal(affinity_choices(padded_logits, 4, padded_valid, padded_valid, alpha,
                                        beta), alone)
