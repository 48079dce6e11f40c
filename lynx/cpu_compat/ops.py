"""Pure-torch versions of the ``sgl_kernel`` CPU ops that SGLang's serving path can call.

Traced on SGLang 0.5.23 (``LYNX_CPU_COMPAT_TRACE``): plain CPU serving of Mixtral and
Qwen3-MoE with ``--attention-backend torch_native`` resolves a handful of names at import time
and calls none of them; `assign_req_to_token_pool_cpu` is reached by the speculative-decoding
allocator (``alloc_for_spec_decode``); NGRAM speculative decoding calls six more
(`lynx.cpu_compat.spec_ops`). Every other name raises (see `stand_in.MissingOp`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def token_pool_spans(
    req_pool_indices: torch.Tensor, req_to_token: torch.Tensor, start_offset: torch.Tensor,
    end_offset: torch.Tensor, capacity: int, pool_len: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows [N], columns [N]) int64 of every slot ``req_to_token[req_pool_indices[i],
    start_offset[i]:end_offset[i]]``, requests packed in order (N = the summed span lengths).

    ``capacity``: entries of the packed side (``out_cache_loc``). Raises ValueError when
    pool_len disagrees with the table, a span is negative, N exceeds ``capacity`` or a span
    lies outside the token pool."""
    if req_to_token.shape[1] != pool_len:
        raise ValueError(
            f"pool_len={pool_len} but req_to_token has {req_to_token.shape[1]} columns"
        )
    lengths = (end_offset - start_offset).to(torch.int64)
    if bool((lengths < 0).any()):
        raise ValueError("end_offset must be >= start_offset for every request")
    total = int(lengths.sum())
    if total > capacity:
        raise ValueError(f"{total} slots requested but out_cache_loc holds {capacity}")
    rows = torch.repeat_interleave(req_pool_indices.to(torch.int64), lengths)
    starts = torch.repeat_interleave(start_offset.to(torch.int64), lengths)
    first_of_request = torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
    columns = starts + torch.arange(total, dtype=torch.int64) - first_of_request
    if bool((columns >= pool_len).any()):
        raise ValueError("a request's end_offset exceeds the token pool length")
    if bool((columns < 0).any()):
        raise ValueError("a request's start_offset is negative")
    return rows, columns


def assign_req_to_token_pool_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    pool_len: int,
) -> None:
    """Write each request's new KV slots into its row of the request→token table.

    Request ``i`` owns ``req_to_token[req_pool_indices[i], start_offset[i]:end_offset[i]]``;
    its slots are the next ``end - start`` entries of ``out_cache_loc`` (requests packed in
    order). In place, like the kernel it stands in for. ValueError: see `token_pool_spans`.
    """
    rows, columns = token_pool_spans(req_pool_indices, req_to_token, start_offset, end_offset,
                                     out_cache_loc.numel(), pool_len)
    req_to_token[rows, columns] = out_cache_loc[:rows.numel()].to(req_to_token.dtype)


OPS: dict[str, Callable[..., Any]] = {
    "assign_req_to_token_pool_cpu": assign_req_to_token_pool_cpu,
}
