"""Expert-parallel keep sets: spend a budget per EP rank, so that the slowest rank gets faster.

Shape legend: E experts, R EP ranks, B = E / R experts per rank (SGLang's layout: rank r holds
the contiguous block [r*B, (r+1)*B)).

Under expert parallelism an MoE step waits for its busiest rank, which reads the weights of its
active experts. A global budget keeps the m most important experts wherever they live, so the
whole keep set can sit on one rank (XShare, arXiv 2602.07265, reports up to 3x lower peak
per-GPU load from balancing the kept experts per GPU). Lynx's EP rule, one level for all ranks:

    L = max(ceil(m / R), max_r forced_r, L_K),  forced = experts no policy may drop (top-1s)

where L_K is the lowest level at which the ranks hold K experts of the union in all (every
row needs K kept experts to route to: a rank-blind top-K floor added after the level would
pile the missing experts onto the rank with the most important ones, above the level),

and each rank keeps its forced experts, then its most important others of the stock union, up
to L. A rank below the level fills up to it for free (the step waits for the slowest rank
anyway), so the level keeps more routing mass than m spread by importance alone, at a max-rank
load of L instead of up to m. Among the sets inside the union that hold every forced expert
and at most L experts per rank, it keeps the most batch importance (each rank independently
takes its best; `test/test_selection_ep.py` checks both claims against brute force).
Static shapes, no host sync: CUDA-graph capturable; the level is a tensor.
"""

from __future__ import annotations

import torch


def rank_level(forced: torch.Tensor, budget: torch.Tensor, ranks: int,
               union: torch.Tensor | None = None, top_k: int = 0) -> torch.Tensor:
    """0-dim int64 L: ``max(ceil(budget / R), most forced experts on one rank, L_K)``, L_K the
    lowest level at which the ranks hold min(K, |union|) experts of ``union`` in all (0
    without a union).

    ``forced``, ``union`` [E] bool, ``budget`` 0-dim int (experts, the policy's m), ``ranks``
    R (E % R must be 0: ValueError otherwise), ``top_k`` K."""
    experts = forced.shape[0]
    if ranks < 1 or experts % ranks:
        raise ValueError(f"{experts} experts do not split into {ranks} EP ranks")
    per_rank = forced.view(ranks, experts // ranks).sum(dim=1).max()
    share = (budget.to(torch.int64) + ranks - 1) // ranks
    level = torch.maximum(share, per_rank)
    if union is None or top_k < 1:
        return level
    held = union.view(ranks, -1).sum(dim=1)  # [R]
    levels = torch.arange(1, experts // ranks + 1, device=union.device)  # [B]
    total = torch.minimum(held[None, :], levels[:, None]).sum(dim=1)  # [B] kept at each level
    need = torch.clamp(held.sum(), max=top_k)
    return torch.maximum(level, (total < need).sum() + 1)


def rank_positions(score: torch.Tensor, ranks: int) -> torch.Tensor:
    """[E] int64 position of each expert in its rank's order by descending ``score`` [E]
    (ties: the lower id), what a stable descending sort within each rank's block gives."""
    blocks = score.view(ranks, -1)
    order = torch.argsort(blocks, dim=1, descending=True, stable=True)
    positions = torch.arange(blocks.shape[1], device=score.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions).reshape(-1)


def keep_per_rank(score: torch.Tensor, union: torch.Tensor, level: torch.Tensor, ranks: int
                  ) -> torch.Tensor:
    """[E] bool: on every rank, its ``level`` best experts by ``score`` [E] (forced ones
    ranked first by the caller) among the stock ``union`` [E] bool."""
    shifted = torch.where(union, score, -torch.inf)  # experts outside the union rank last
    return (rank_positions(shifted, ranks) < level) & union


def rank_loads(keep: torch.Tensor, ranks: int) -> torch.Tensor:
    """[R] int64 active experts per rank of a keep set [E] bool."""
    return keep.view(ranks, -1).sum(dim=1)
