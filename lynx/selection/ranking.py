"""Deterministic rankings without a full sort (the selection step's hot spots).

Shape legend: T rows, E experts (N entries), K experts taken per row.

Both rankings return exactly what a stable descending ``torch.argsort`` gives (ties to the
lower index), but with small fixed-size work a compiler fuses: a full stable sort of every
row was most of the selection step's CPU time (four ``aten::sort`` calls, ~60 us each at
T=32, E=128). Scores must not hold NaN (the step feeds finite logits and sums; ``-inf`` is
fine: it ranks last, ties to the lower index like any other value).
"""

from __future__ import annotations

import torch


def order_key(scores: torch.Tensor) -> torch.Tensor:
    """[T,E] int64 keys, distinct within a row, that order entries of ``scores`` [T,E] fp32 by
    descending value, then ascending index: the float's order-preserving integer image
    (IEEE-754 sign-magnitude flipped to two's complement; -0.0 folded onto +0.0) in the high
    32 bits, ``E - 1 - index`` in the low ones."""
    experts = scores.shape[-1]
    value = torch.where(scores == 0, 0.0, scores.float()).view(torch.int32).to(torch.int64)
    ordered = torch.where(value < 0, -(value & 0x7FFFFFFF) - 1, value)  # monotone in value
    index = torch.arange(experts, device=scores.device)
    return ordered * (1 << 32) + (experts - 1 - index)


def stable_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[T,K] int64 ids of each row's ``k`` largest ``scores`` [T,E], best first, ties to the
    lower index: bitwise ``torch.argsort(scores, -1, descending=True, stable=True)[:, :k]``.

    ``torch.topk`` leaves the order of equal values unspecified (and bf16 logits tie often),
    so it runs over `order_key`, whose entries are distinct. Raises RuntimeError if k > E."""
    return torch.topk(order_key(scores), k, dim=-1).indices


def rank_descending(score: torch.Tensor) -> torch.Tensor:
    """[N] int64 rank of each entry of ``score`` [N] by descending value, ties to the lower
    index (the position a stable descending argsort gives it). One row: a sort is cheap."""
    order = torch.argsort(score, descending=True, stable=True)
    ranks = torch.empty_like(order)
    return ranks.scatter_(0, order, torch.arange(score.shape[0], device=score.device))
