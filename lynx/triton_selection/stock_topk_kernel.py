"""Triton kernel: stock top-K routing of a tile of rows and its per-expert totals.

Shape legend: T rows, E experts, K top_k, BLOCK_T rows per program, BLOCK_E >= E (power of 2),
N = cdiv(T, BLOCK_T) programs.

Each program takes BLOCK_T rows: gate values (softmax or sigmoid of the logits), the top-K by
logit (repeated argmax; ties go to the lower expert index, like the torch spec's stable sort),
writes ids [T,K] and gate values [T,K], and sums over its rows, weighted by the row's pruned
flag, the gate mass each expert receives (in the spec's int64 fixed point, so every order of
rows and programs gives the same sum) and the top-1 votes it gets into partial [N,E] buffers.
No atomics: the launcher adds the N partial rows, so the result is the same on every run and
every TP rank. Specification: `lynx.selection.routers.
stock_routing` + `lynx.selection.keep_rules.batch_totals` (routers without groups or bias).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def stock_topk_kernel(
    logits_ptr, rows_ptr, ids_ptr, gate_ptr, partial_importance_ptr, partial_top1_ptr,
    num_rows, num_experts, logits_row_stride,
    TOP_K: tl.constexpr, SIGMOID: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
    SCALE: tl.constexpr,
):
    tile = tl.program_id(0)
    row_offsets = tile * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T]
    expert_offsets = tl.arange(0, BLOCK_E)  # [BLOCK_E]
    row_in = row_offsets < num_rows
    expert_in = expert_offsets < num_experts
    in_range = row_in[:, None] & expert_in[None, :]
    loaded = tl.load(
        logits_ptr + row_offsets[:, None] * logits_row_stride + expert_offsets[None, :],
        mask=in_range, other=0.0,
    ).to(tl.float32)
    logits = tl.where(expert_in[None, :], loaded, -float("inf"))  # [BLOCK_T, BLOCK_E]
    if SIGMOID:
        gate = tl.where(expert_in[None, :], tl.sigmoid(logits), 0.0)
    else:
        numerators = tl.exp(logits - tl.max(logits, axis=1)[:, None])
        numerators = tl.where(expert_in[None, :], numerators, 0.0)
        gate = numerators / tl.sum(numerators, axis=1)[:, None]
    row_weight = tl.load(rows_ptr + row_offsets, mask=row_in, other=0).to(tl.float32)

    remaining = logits
    importance = tl.zeros([BLOCK_E], dtype=tl.int64)
    top1_votes = tl.zeros([BLOCK_E], dtype=tl.float32)
    for slot in tl.static_range(TOP_K):
        best = tl.argmax(remaining, axis=1)  # [BLOCK_T], lower index on ties
        chosen = expert_offsets[None, :] == best[:, None]  # [BLOCK_T, BLOCK_E]
        best_gate = tl.sum(tl.where(chosen, gate, 0.0), axis=1)  # [BLOCK_T]
        tl.store(ids_ptr + row_offsets * TOP_K + slot, best.to(tl.int64), mask=row_in)
        tl.store(gate_ptr + row_offsets * TOP_K + slot, best_gate, mask=row_in)
        mass = (best_gate * row_weight * SCALE).to(tl.int64)  # spec: keep_rules.fixed_point
        importance += tl.sum(tl.where(chosen, mass[:, None], 0), axis=0)
        if slot == 0:
            top1_votes = tl.sum(tl.where(chosen, row_weight[:, None], 0.0), axis=0)
        remaining = tl.where(chosen, -float("inf"), remaining)

    partial_offsets = tile * num_experts + expert_offsets
    tl.store(partial_importance_ptr + partial_offsets, importance, mask=expert_in)
    tl.store(partial_top1_ptr + partial_offsets, top1_votes, mask=expert_in)
