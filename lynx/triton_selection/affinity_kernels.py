"""Triton kernels: AffinityBinning's batch support and per-row re-ranked top-K.

Shape legend: T rows, E experts, K top_k, BLOCK_T rows per program, BLOCK_E >= E (power of 2),
N = cdiv(T, BLOCK_T) programs, D support depth, W = MAX_SUPPORT_DEPTH + 1 radix weights.

Specification: `lynx.selection.affinity` (integer keys, so kernel and spec agree exactly).
1. `affinity_support_kernel`: bins q = ceil(alpha * (z - max z)) of a tile of rows; each valid
   row adds (B+1)^(D + max(q, -D)) (a gather from the radix weight table) to each expert's
   int64 support key; per-program sums go to a partial [N,E] buffer (no atomics).
2. The launcher adds the partial keys and ranks the experts (torch, [E]).
3. `affinity_choice_kernel`: per row, key = clamp(q, -beta) * E + (E - 1 - support rank),
   distinct within a row; its top-K by repeated argmax; per-program counts of pruned rows that
   picked each expert go to a partial [N,E] buffer; an expert is kept if any row picked it.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile_bins(logits_ptr, alpha_ptr, row_offsets, expert_offsets, num_rows, num_experts,
               logits_row_stride):
    row_in = row_offsets < num_rows
    expert_in = expert_offsets < num_experts
    in_range = row_in[:, None] & expert_in[None, :]
    loaded = tl.load(
        logits_ptr + row_offsets[:, None] * logits_row_stride + expert_offsets[None, :],
        mask=in_range, other=0.0,
    ).to(tl.float32)
    logits = tl.where(expert_in[None, :], loaded, -float("inf"))
    alpha = tl.load(alpha_ptr).to(tl.float32)
    bins = tl.ceil(alpha * (logits - tl.max(logits, axis=1)[:, None]))
    return tl.where(in_range, bins, 0.0), in_range


@triton.jit
def affinity_support_kernel(
    logits_ptr, valid_ptr, alpha_ptr, depth_ptr, radix_weights_ptr, partial_keys_ptr,
    num_rows, num_experts, logits_row_stride,
    MAX_DEPTH: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    tile = tl.program_id(0)
    row_offsets = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    expert_offsets = tl.arange(0, BLOCK_E)
    bins, in_range = _tile_bins(logits_ptr, alpha_ptr, row_offsets, expert_offsets, num_rows,
                                num_experts, logits_row_stride)
    depth = tl.load(depth_ptr)  # int64
    digit = depth + tl.maximum(bins, -depth.to(tl.float32)).to(tl.int64)
    digit = tl.where(in_range, tl.minimum(tl.maximum(digit, 0), MAX_DEPTH), 0)
    weight = tl.load(radix_weights_ptr + digit, mask=in_range, other=0)  # [BLOCK_T, BLOCK_E]
    valid = tl.load(valid_ptr + row_offsets, mask=row_offsets < num_rows, other=0)
    keys = tl.sum(weight * valid.to(tl.int64)[:, None], axis=0)  # [BLOCK_E] int64
    tl.store(partial_keys_ptr + tile * num_experts + expert_offsets, keys,
             mask=expert_offsets < num_experts)


@triton.jit
def affinity_choice_kernel(
    logits_ptr, rows_ptr, alpha_ptr, beta_ptr, support_rank_ptr, partial_picks_ptr,
    num_rows, num_experts, logits_row_stride,
    TOP_K: tl.constexpr, MIN_BIN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    tile = tl.program_id(0)
    row_offsets = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    expert_offsets = tl.arange(0, BLOCK_E)
    expert_in = expert_offsets < num_experts
    bins, in_range = _tile_bins(logits_ptr, alpha_ptr, row_offsets, expert_offsets, num_rows,
                                num_experts, logits_row_stride)
    beta = tl.load(beta_ptr).to(tl.float32)
    clamped = tl.where(beta > 0, tl.maximum(bins, -beta), bins)
    clamped = tl.maximum(clamped, MIN_BIN)
    support_rank = tl.load(support_rank_ptr + expert_offsets, mask=expert_in, other=0)
    bonus = (num_experts - 1 - support_rank).to(tl.float32)
    keys = tl.where(in_range, clamped * num_experts + bonus[None, :], -float("inf"))

    picked = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.int32)
    for _slot in tl.static_range(TOP_K):
        best = tl.argmax(keys, axis=1)
        chosen = expert_offsets[None, :] == best[:, None]
        picked = tl.where(chosen, 1, picked)
        keys = tl.where(chosen, -float("inf"), keys)
    row_weight = tl.load(rows_ptr + row_offsets, mask=row_offsets < num_rows, other=0)
    picks = tl.sum(picked * row_weight.to(tl.int32)[:, None], axis=0)  # [BLOCK_E]
    tl.store(partial_picks_ptr + tile * num_experts + expert_offsets, picks, mask=expert_in)
