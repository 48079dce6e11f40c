"""The sort-free rankings are bitwise the stable descending argsort they replace.

Shape legend: T rows, E experts, K taken per row."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lynx.selection.ranking import order_key, rank_descending, stable_top_k

FAST = settings(max_examples=60, deadline=None)


def _argsort(scores: torch.Tensor) -> torch.Tensor:
    return torch.argsort(scores, dim=-1, descending=True, stable=True)


@st.composite
def tie_heavy(draw: st.DrawFn) -> torch.Tensor:
    """[T,E] fp32 with few distinct values: bf16-rounded, quantised, signed zeros, -inf."""
    rows, experts = draw(st.integers(1, 12)), draw(st.integers(1, 64))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(rows, experts, generator=gen) * draw(st.sampled_from([1e-3, 1.0, 1e3]))
    style = draw(st.sampled_from(["bf16", "quantised", "zeros", "inf", "plain"]))
    if style == "bf16":
        scores = scores.to(torch.bfloat16).float()
    elif style == "quantised":
        scores = torch.round(scores * 2) / 2
    elif style == "zeros":
        scores = torch.where(scores > 0, 0.0, -0.0) * torch.randint(0, 2, scores.shape,
                                                                     generator=gen)
    elif style == "inf":
        scores = torch.where(torch.rand(scores.shape, generator=gen) < 0.5, -torch.inf, scores)
    return scores


@FAST
@given(tie_heavy(), st.integers(1, 64))
def test_stable_top_k_is_the_stable_argsort_prefix(scores: torch.Tensor, k: int) -> None:
    k = min(k, scores.shape[-1])
    assert torch.equal(stable_top_k(scores, k), _argsort(scores)[:, :k])


@FAST
@given(tie_heavy())
def test_order_key_orders_like_the_stable_argsort(scores: torch.Tensor) -> None:
    keys = order_key(scores)
    assert torch.equal(torch.argsort(keys, dim=-1, descending=True), _argsort(scores))
    assert all(len(set(row.tolist())) == row.numel() for row in keys)  # distinct per row


@FAST
@given(tie_heavy())
def test_rank_descending_is_the_position_in_the_stable_argsort(scores: torch.Tensor) -> None:
    row = scores[0]
    ranks = rank_descending(row)
    assert torch.equal(_argsort(row)[ranks], torch.arange(row.numel()))


def test_rank_descending_keeps_large_integer_keys_exact() -> None:
    # AffinityBinning's batch keys are exact int64 radix sums beyond fp32's 24-bit mantissa.
    keys = torch.tensor([2**40 + 1, 2**40, 2**40 + 1, 5], dtype=torch.int64)
    assert rank_descending(keys).tolist() == [0, 2, 1, 3]


@st.composite
def adjacent_floats(draw: st.DrawFn) -> torch.Tensor:
    """[T,E] fp32 rows of neighbouring values: a base (normal, binade edge, subnormal, zero,
    huge) with each entry moved 0-3 fp32 neighbours up or down at random (so values repeat);
    up to 256 experts."""
    experts = draw(st.integers(2, 256))
    base = draw(st.sampled_from([1.0, -1.0, 2.0**-126, -(2.0**-126), 2.0**-149, 0.0,
                                 3.0e38, -3.0e38, 0.7, -1.5e-3]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    values = torch.full((2, experts), base, dtype=torch.float32)
    steps = torch.randint(-3, 4, (2, experts), generator=gen)
    for _ in range(3):  # walk each entry up to 3 fp32 neighbours away from the base
        up = torch.nextafter(values, torch.full_like(values, torch.inf))
        down = torch.nextafter(values, torch.full_like(values, -torch.inf))
        values = torch.where(steps > 0, up, torch.where(steps < 0, down, values))
        steps = steps - steps.sign()
    return values


@FAST
@given(adjacent_floats())
def test_neighbouring_fp32_values_keep_their_order_at_every_index(scores: torch.Tensor) -> None:
    # The key's per-index step must stay below the spacing of adjacent fp32 values (normal,
    # subnormal, at a binade edge, at fp32's largest magnitudes) for rows of up to 256.
    assert torch.equal(stable_top_k(scores, scores.shape[-1]), _argsort(scores))
    keys = order_key(scores)
    assert torch.equal(torch.argsort(keys, dim=-1, descending=True), _argsort(scores))
