"""One batch across DP-attention ranks: the keep set from every EP rank's rows at once.

Shape legend: T this rank's rows, E experts, R ranks of the EP group.

Under DP attention (SGLang's ``--enable-dp-attention``, with an all-to-all MoE backend) each
rank holds different tokens, so a keep set chosen from one rank's rows alone does not shrink
the experts the whole group reads. One all-reduce (sum) per MoE layer of a [3, E] int64 tensor
gives every rank the same picture:
- the batch importance in fixed point (`keep_rules.fixed_point`: integer sums are exact and
  independent of the order, so every rank, and one process holding every row, get the same
  value bit for bit),
- the top-1 votes (the experts no policy may drop),
- the stock-union membership counts.
A rank with no rows (SGLang's ``TopK.empty_topk_output``) must still join with zeros, or the
collective deadlocks: `idle_contribution` is what it sends. The batch-level policies
(``budget``, ``coverage``) then choose the same keep set on every rank; each rank routes its
own rows restricted to it. Per-row policies (``affinity``, ``piggyback``) and the grouped
routers' viable-row rule still read the rank's own rows.

Cost: 24 E bytes per layer (E = 256: 6 KiB), latency-bound on any interconnect
(`benchmark/ep_balance.py` states the model and prints the estimate).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lynx.selection.keep_rules import BatchRouting, from_fixed_point, gate_mass_fixed

AllReduce = Callable[[torch.Tensor], None]  # sums a tensor over the EP group, in place


def local_totals(batch: BatchRouting, rows: torch.Tensor, weight: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """[3, E] int64 (importance in fixed point, top-1 votes, union count) of this rank's
    pruned ``rows`` [T] bool (each row's vote scaled by ``weight`` [T] when given)."""
    return torch.stack([gate_mass_fixed(batch.stock, rows, weight),
                        batch.top1_votes.to(torch.int64), batch.union.to(torch.int64)])


def idle_contribution(experts: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """What a rank with no rows sends: [3, E] zeros."""
    return torch.zeros(3, experts, dtype=torch.int64, device=device)


def global_batch(batch: BatchRouting, rows: torch.Tensor, all_reduce: AllReduce,
                 weight: torch.Tensor | None = None) -> BatchRouting:
    """``batch`` with its per-expert totals summed over the EP group (its stock routing stays
    this rank's own). One call of ``all_reduce`` on a [3, E] int64 tensor."""
    totals = local_totals(batch, rows, weight)
    all_reduce(totals)
    return batch._replace(importance=from_fixed_point(totals[0]),
                          top1_votes=totals[1].to(torch.float32), union=totals[2] > 0)
