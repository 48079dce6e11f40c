"""Speculative-decoding verify steps: how the draft rows of a request vote.

Shape legend: T rows of a verify step = R requests x n draft tokens, request r owning rows
``[r*n, (r+1)*n)`` (SGLang's TARGET_VERIFY layout); E experts.

A verify step runs the target model on every request's draft tree at once, so its expert
union is larger than a decode step's (XShare, arXiv 2602.07265, prunes verify batches with a
hierarchical, request-then-batch selection and reports +14% throughput). Lynx's version:

1. per request: the request's rows share one vote of total weight 1, split over its rows in
   proportion to ``1 / (1 + depth)``, depth being the row's distance from the root of its
   draft tree. The root row's output is always used; a row at depth d is used only if the
   whole path to it is accepted, so the experts of rows likely to count weigh more;
2. across requests: the weighted votes are summed into the batch importance every keep policy
   ranks by (`lynx.selection.keep_rules.weighted_importance`).
Every row still keeps its own top-1 expert (`keep_rules.must_keep` is unweighted), and the
statistics stay unweighted sums over rows.
"""

from __future__ import annotations

import torch


def draft_depths(positions: torch.Tensor, seq_lens: torch.Tensor, draft_tokens: int
                 ) -> torch.Tensor:
    """[T] int64 depth of each draft row in its request's tree.

    positions: [T] position of each draft token (SGLang: prefix length + depth); seq_lens:
    [R] verified length of each request; T must equal R * draft_tokens (ValueError)."""
    if positions.numel() != seq_lens.numel() * draft_tokens:
        raise ValueError(f"{positions.numel()} draft rows for {seq_lens.numel()} requests x "
                         f"{draft_tokens} draft tokens")
    prefix = torch.repeat_interleave(seq_lens.to(torch.int64), draft_tokens)
    return (positions.to(torch.int64) - prefix).clamp_min(0)


def verify_row_weights(depths: torch.Tensor, draft_tokens: int) -> torch.Tensor:
    """[T] fp32 vote weight of each verify row: ``1 / (1 + depth)`` normalised so that each
    request's n rows sum to 1. depths: [T] (see `draft_depths`), T = R * draft_tokens."""
    if draft_tokens < 1 or depths.numel() % draft_tokens:
        raise ValueError(f"{depths.numel()} rows do not split into requests of "
                         f"{draft_tokens} draft tokens")
    raw = 1.0 / (1.0 + depths.to(torch.float32))
    per_request = raw.view(-1, draft_tokens)
    return (per_request / per_request.sum(dim=1, keepdim=True)).reshape(-1)
