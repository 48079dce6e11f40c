"""Pure-torch versions of the ``sgl_kernel`` CPU ops SGLang's speculative decoding calls.

Reached with ``--speculative-algorithm NGRAM`` on SGLang 0.5.23's CPU engine (traced with
``LYNX_CPU_COMPAT_TRACE``). Each op has the semantics of the Triton kernel SGLang runs on
GPUs for the same step (``sglang/kernels/ops/...``); test/test_cpu_compat_spec.py checks
each against that Triton kernel run in Triton's interpreter. In place, like the kernels.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

import torch

from lynx.cpu_compat.ops import token_pool_spans


def _rows_at(address: int, n_rows: int, row_bytes: int) -> torch.Tensor:
    """A uint8 [n_rows, row_bytes] view of host memory at ``address`` (no copy)."""
    buffer = (ctypes.c_uint8 * (n_rows * row_bytes)).from_address(address)
    return torch.frombuffer(buffer, dtype=torch.uint8).view(n_rows, row_bytes)


def copy_all_layer_kv_cache_cpu(
    data_ptrs: torch.Tensor, strides: torch.Tensor, tgt_loc: torch.Tensor,
    src_loc: torch.Tensor,
) -> None:
    """Copy KV slots ``src_loc[i] -> tgt_loc[i]`` in every layer buffer of a KV pool.

    data_ptrs: [L] int64/uint64 host addresses of the per-layer K and V buffers;
    strides: [L] bytes per token slot of each buffer; tgt_loc, src_loc: [N] slot indices.
    All sources are read before any target is written (the Triton kernel's "safe for
    in-place copy"). Raises ValueError on mismatched lengths or negative slots.
    """
    if tgt_loc.numel() != src_loc.numel():
        raise ValueError(f"{tgt_loc.numel()} target slots for {src_loc.numel()} sources")
    if data_ptrs.numel() != strides.numel():
        raise ValueError(f"{data_ptrs.numel()} buffers but {strides.numel()} strides")
    if src_loc.numel() == 0:
        return
    src = src_loc.to(torch.int64)
    tgt = tgt_loc.to(torch.int64)
    if bool((src < 0).any()) or bool((tgt < 0).any()):
        raise ValueError("KV slot indices must be non-negative")
    n_rows = int(torch.maximum(src.max(), tgt.max())) + 1
    for address, stride in zip(data_ptrs.tolist(), strides.tolist(), strict=True):
        rows = _rows_at(int(address), n_rows, int(stride))
        rows[tgt] = rows[src]  # gather first (advanced indexing copies), then scatter


def reconstruct_indices_from_tree_mask(
    tree_mask: torch.Tensor, verified_seq_len: torch.Tensor, positions: torch.Tensor,
    retrieve_index: torch.Tensor, retrieve_next_token: torch.Tensor,
    retrieve_next_sibling: torch.Tensor, batch_size: int, draft_token_num: int,
) -> None:
    """NGRAM verify metadata of each request's draft tree, from its ancestor mask.

    tree_mask: [B*n*n] bool, ``tree_mask[b, i, j]`` marks node j an ancestor of node i (i
    included); verified_seq_len: [B]; outputs [B*n] int64 (n = draft_token_num), written in
    place: positions = #strict ancestors + verified_seq_len, retrieve_index = b*n + i,
    retrieve_next_token = first child (-1: none), retrieve_next_sibling = next node with the
    same parent (-1: none, or a root). Contract of SGLang's ``reconstruct_tree`` kernel.
    """
    if batch_size == 0:
        return
    n = draft_token_num
    mask = tree_mask.reshape(batch_size, n, n).to(torch.bool)
    node = torch.arange(n)
    row, col = node.view(n, 1), node.view(1, n)
    ancestors = mask & (col < row)  # [B, i, j]: j a strict ancestor of i
    depth = ancestors.sum(dim=2)
    positions.view(batch_size, n).copy_(depth + verified_seq_len.view(-1, 1).to(torch.int64))
    retrieve_index.view(batch_size, n).copy_(torch.arange(batch_size * n).view(batch_size, n))
    parent = torch.where(ancestors, col, -1).amax(dim=2)  # [B, i]
    first_child = torch.where(ancestors, row, n).amin(dim=1)  # [B, j]: min i with j < i
    retrieve_next_token.view(batch_size, n).copy_(torch.where(first_child < n, first_child, -1))
    same_parent = (parent.unsqueeze(2) == parent.unsqueeze(1)) & (row > col)  # [B, k, tid]
    sibling = torch.where(same_parent, row, n).amin(dim=1)
    retrieve_next_sibling.view(batch_size, n).copy_(
        torch.where((parent >= 0) & (sibling < n), sibling, -1))


def assign_extend_cache_locs_cpu(
    req_pool_indices: torch.Tensor, req_to_token: torch.Tensor, start_offset: torch.Tensor,
    end_offset: torch.Tensor, out_cache_loc: torch.Tensor, pool_len: int,
) -> None:
    """Read each request's KV slots ``req_to_token[req_pool_indices[i], start[i]:end[i]]``
    into ``out_cache_loc``, requests packed in order (the inverse of
    `lynx.cpu_compat.ops.assign_req_to_token_pool_cpu`). ValueError: see `token_pool_spans`."""
    rows, columns = token_pool_spans(req_pool_indices, req_to_token, start_offset, end_offset,
                                     out_cache_loc.numel(), pool_len)
    out_cache_loc[:rows.numel()] = req_to_token[rows, columns].to(out_cache_loc.dtype)


def fill_bonus_tokens_cpu(
    accept_tokens: torch.Tensor, accept_lens: torch.Tensor, bonus_tokens: torch.Tensor,
    accept_stride: int,
) -> None:
    """bonus_tokens[b] = the last accepted token of request b:
    ``accept_tokens.flat[b * accept_stride + accept_lens[b] - 1]`` (accept_lens counts the
    bonus token). bonus_tokens: [B], written in place."""
    batch = accept_lens.numel()
    index = torch.arange(batch) * accept_stride + accept_lens.to(torch.int64) - 1
    bonus_tokens[:batch] = accept_tokens.reshape(-1)[index].to(bonus_tokens.dtype)


def fill_accept_out_cache_loc_cpu(
    accept_index: torch.Tensor, out_cache_loc: torch.Tensor,
    accept_out_cache_loc: torch.Tensor,
) -> None:
    """Compact the KV slots of accepted draft tokens: for every entry ``accept_index[p] >= 0``
    (flattened, in order), ``accept_out_cache_loc[#accepted before p] =
    out_cache_loc[accept_index[p]]``; -1 entries are skipped."""
    flat = accept_index.reshape(-1).to(torch.int64)
    accepted = flat[flat >= 0]
    accept_out_cache_loc[:accepted.numel()] = out_cache_loc[accepted].to(
        accept_out_cache_loc.dtype)


def verify_tree_greedy_cpu(
    predicts: torch.Tensor, accept_index: torch.Tensor, accept_token_num: torch.Tensor,
    candidates: torch.Tensor, retrive_index: torch.Tensor, retrive_next_token: torch.Tensor,
    retrive_next_sibling: torch.Tensor, target_predict: torch.Tensor,
) -> None:
    """Greedy verification of each request's draft tree against the target's argmax tokens.

    candidates, retrive_*: [B, n] (n draft tokens, tree as first-child / next-sibling
    links); target_predict: [B*n] (or [B, n]) target argmax at every draft node;
    accept_index: [B, S] out (retrieve indices of the accepted path, root first, S the
    speculative steps + 1); accept_token_num: [B] out (tokens accepted after the root);
    predicts: [B*n] out (the target token at every accepted node). Walks down from the root:
    at each level the child whose draft token equals the target's prediction at the last
    accepted node is accepted, else the walk stops (SGLang's ``verify_tree_greedy``).
    """
    batch = candidates.shape[0]
    steps = accept_index.shape[1]
    target = target_predict.reshape(-1).tolist()
    cand, index = candidates.tolist(), retrive_index.tolist()
    next_token, next_sibling = retrive_next_token.tolist(), retrive_next_sibling.tolist()
    flat_predicts = predicts.view(-1)
    for b in range(batch):
        last = index[b][0]
        accept_index[b, 0] = last
        accepted, node = 0, 0
        for _ in range(1, steps):
            node = next_token[b][node]
            wanted = target[last]
            while node != -1 and cand[b][node] != wanted:
                node = next_sibling[b][node]
            if node == -1:
                break
            flat_predicts[last] = wanted
            accepted += 1
            last = index[b][node]
            accept_index[b, accepted] = last
        accept_token_num[b] = accepted
        flat_predicts[last] = target[last]


SPEC_OPS: dict[str, Callable[..., Any]] = {
    "copy_all_layer_kv_cache_cpu": copy_all_layer_kv_cache_cpu,
    "reconstruct_indices_from_tree_mask": reconstruct_indices_from_tree_mask,
    "assign_extend_cache_locs_cpu": assign_extend_cache_locs_cpu,
    "fill_bonus_tokens_cpu": fill_bonus_tokens_cpu,
    "fill_accept_out_cache_loc_cpu": fill_accept_out_cache_loc_cpu,
    "verify_tree_greedy_cpu": verify_tree_greedy_cpu,
}
