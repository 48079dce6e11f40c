"""Launchers for the Triton selection kernels (GPU, or the CPU under ``TRITON_INTERPRET=1``)."""

from __future__ import annotations

import torch

from lynx.selection.policies import RANK_FIRST, _rank_of


def batch_importance_triton(probs_or_logits: torch.Tensor, top_k: int, prunable: torch.Tensor,
                            *, from_logits: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `lynx.selection.policies.batch_importance` (input: router logits)."""
    import triton

    from lynx.triton_selection.batch_importance_kernel import batch_importance_kernel

    if not from_logits:
        raise ValueError("the kernel takes router logits (it computes the softmax itself)")
    logits = probs_or_logits.contiguous()
    rows, experts = logits.shape
    importance = torch.zeros(experts, dtype=torch.float32, device=logits.device)
    top1_votes = torch.zeros(experts, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return importance, top1_votes
    batch_importance_kernel[(rows,)](
        logits, prunable.to(torch.int32).contiguous(), importance, top1_votes,
        experts, logits.stride(0),
        TOP_K=top_k, BLOCK_E=triton.next_power_of_2(experts),
    )
    return importance, top1_votes


def keep_budget_triton(logits: torch.Tensor, top_k: int, prunable: torch.Tensor,
                       budget: torch.Tensor) -> torch.Tensor:
    """`lynx.selection.policies.keep_budget` with the per-row work in the Triton kernel."""
    importance, top1_votes = batch_importance_triton(logits, top_k, prunable)
    must = top1_votes > 0
    score = importance + must.to(importance.dtype) * RANK_FIRST
    limit = torch.maximum(budget.to(torch.int64), must.sum().clamp_min(top_k))
    return _rank_of(score) < limit
