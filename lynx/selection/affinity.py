"""AffinityBinning (arXiv 2411.08982), computed exactly with integers.

Shape legend: T rows, E experts, K top_k, D support depth (bins counted in the batch score).

The published method bins each row's logits, q = ceil(alpha * (z - max z)) clamped at -beta,
scores each expert by c_e = sum over the B valid rows of B^q, re-ranks each row by
q + (c_e - B^q) / B and keeps the union of the rows' top-K. Because the bonus is < 1 and every
expert in one bin of one row subtracts the same B^q, a row's re-ranking is lexicographic:
own bin first, then c_e, then (our deterministic tie-break) the lower expert index.

c_e is a radix-B number whose digits n_{e,j} (rows putting e into bin -j) add up to B, so
ordering experts by c_e is ordering their count vectors (n_0, n_1, ...) lexicographically.
We compute that order exactly as one int64 key per expert, sum_j n_j (B+1)^(D-j), instead of
float powers whose rounding differs between implementations (the Triton kernel, other TP
ranks). D = beta, capped where the key would overflow int64 (B <= 64: 9 bins, B <= 256: 6,
B <= 512: 5); bins deeper than D merge into bin -D. With beta <= 0 (no clamp) D is the cap.
"""

from __future__ import annotations

import math

import torch

from lynx.selection.ranking import rank_descending

MAX_SUPPORT_DEPTH = 61  # deepest possible D (B = 1)
MIN_BIN = -2048  # re-rank bins floor: keeps q * E + rank exact in fp32 for E <= 4096
KEY_BITS = 62  # sum_j n_j (B+1)^(D-j) < (B+1)^(D+1) <= 2^62


def valid_row_count(row_valid: torch.Tensor) -> torch.Tensor:
    """B: number of valid rows, at least 1 (0-dim int64)."""
    return row_valid.sum().clamp_min(1)


def support_depth(n_valid: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """D (0-dim int64): bins counted in the batch score, ``min(beta, int64 cap)``."""
    cap = torch.floor(KEY_BITS * math.log(2.0) / torch.log(n_valid.double() + 1.0)) - 1.0
    depth = torch.where(beta > 0, torch.minimum(beta.double(), cap), cap)
    return depth.clamp(0, MAX_SUPPORT_DEPTH).to(torch.int64)


def radix_weights(n_valid: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
    """[MAX_SUPPORT_DEPTH + 1] int64: entry i = (B+1)^i for i <= D (larger i: (B+1)^D)."""
    exponent = torch.arange(MAX_SUPPORT_DEPTH + 1, device=n_valid.device).clamp_max(depth)
    return torch.pow(n_valid.to(torch.int64) + 1, exponent)


def affinity_bins(logits: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """[T,E] fp32 integer-valued bins ceil(alpha * (z - max z)) <= 0 (unclamped)."""
    z = logits.float()
    return torch.ceil(alpha.float() * (z - z.max(dim=-1, keepdim=True).values))


def support_keys(bins: torch.Tensor, row_valid: torch.Tensor, depth: torch.Tensor,
                 weights: torch.Tensor) -> torch.Tensor:
    """[E] int64 exact batch score key: sum over valid rows of (B+1)^(D + max(q, -D))."""
    digit = depth + torch.maximum(bins, -depth.to(bins.dtype)).to(torch.int64)  # [T,E]
    digit = digit.clamp(0, MAX_SUPPORT_DEPTH)  # only NaN rows can fall outside
    contribution = weights[digit] * row_valid[:, None].to(torch.int64)
    return contribution.sum(dim=0)


def reranked_keys(bins: torch.Tensor, beta: torch.Tensor, support_rank: torch.Tensor
                  ) -> torch.Tensor:
    """[T,E] fp32 distinct per-row keys: clamped bin first, then batch support rank."""
    experts = bins.shape[-1]
    clamped = torch.where(beta > 0, torch.maximum(bins, -beta.to(bins.dtype)), bins)
    clamped = clamped.clamp_min(MIN_BIN)
    return clamped * experts + (experts - 1 - support_rank).to(bins.dtype)[None, :]


def affinity_choices(logits: torch.Tensor, top_k: int, row_valid: torch.Tensor,
                     rows: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor
                     ) -> torch.Tensor:
    """[E] bool: union over ``rows`` of each row's top-K after the batch-aware re-rank.

    ``logits`` [T,E] are logit-domain router scores (see `routers.affinity_logits`);
    ``row_valid`` [T] rows that vote in the batch score (B = their count); ``rows`` [T] rows
    whose choices form the keep set."""
    bins = affinity_bins(logits, alpha)
    n_valid = valid_row_count(row_valid)
    depth = support_depth(n_valid, beta)
    keys = support_keys(bins, row_valid, depth, radix_weights(n_valid, depth))
    row_keys = reranked_keys(bins, beta, rank_descending(keys))
    picked = torch.zeros_like(row_keys, dtype=torch.bool)
    picked.scatter_(1, row_keys.topk(top_k, dim=-1).indices, True)
    return (picked & rows[:, None]).any(dim=0)
