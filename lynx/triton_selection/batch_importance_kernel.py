"""Triton kernel: the per-row hot part of the ``budget`` policy (and the statistics).

One program per row: softmax over the E router logits, the row's top-K by repeated argmax,
then atomic adds of the top-K probabilities into ``importance[E]`` and of one vote for the
top-1 expert into ``top1_votes[E]``, both weighted by the row's prunable flag. The torch
function `lynx.selection.policies.batch_importance` is the specification.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def batch_importance_kernel(
    logits_ptr, prunable_ptr, importance_ptr, top1_votes_ptr,
    num_experts, row_stride,
    TOP_K: tl.constexpr, BLOCK_E: tl.constexpr,
):
    row = tl.program_id(0)
    offsets = tl.arange(0, BLOCK_E)
    in_range = offsets < num_experts
    logits = tl.load(logits_ptr + row * row_stride + offsets, mask=in_range,
                     other=-float("inf")).to(tl.float32)
    weight = tl.load(prunable_ptr + row).to(tl.float32)
    shifted = logits - tl.max(logits, axis=0)
    numerators = tl.where(in_range, tl.exp(shifted), 0.0)
    probs = numerators / tl.sum(numerators, axis=0)
    remaining = tl.where(in_range, probs, -1.0)
    for rank in tl.static_range(TOP_K):
        best = tl.argmax(remaining, axis=0)
        best_prob = tl.max(remaining, axis=0)
        tl.atomic_add(importance_ptr + best, best_prob * weight)
        if rank == 0:
            tl.atomic_add(top1_votes_ptr + best, weight)
        remaining = tl.where(offsets == best, -1.0, remaining)
