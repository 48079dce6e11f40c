"""Batched decode attention for SGLang's torch-native attention backend (CPU engine).

SGLang 0.5.23's ``TorchNativeAttnBackend._run_sdpa_forward_decode`` loops over the requests of
a decode batch ("this loop process a sequence per iter, this is inefficient"): B gathers and
B SDPA calls per layer and step. On the decode-bound testbed (`benchmark/testbed.py`) that loop
is the largest cost outside the MoE blocks. `batched_decode_attention` does the same
attention in one gather and one SDPA call over the batch padded to its longest sequence, the
padding masked out; results agree with the loop to float rounding (tested against SGLang's
own code). Only the plain case is taken: self-attention, no encoder, no sliding window;
everything else goes to SGLang's loop unchanged. ``LYNX_CPU_DECODE_ATTENTION=loop`` keeps
SGLang's loop everywhere.

Shapes: B requests (one query row each), H query heads, Hkv key/value heads, D head size,
L the longest sequence of the batch, S KV-cache slots.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch.nn.functional import scaled_dot_product_attention

TARGET = ("sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend."
          "_run_sdpa_forward_decode")


def batched_decode_attention(query: torch.Tensor, k_cache: torch.Tensor,
                             v_cache: torch.Tensor, req_to_token: torch.Tensor,
                             req_pool_indices: torch.Tensor, seq_lens: torch.Tensor,
                             scaling: float | None = None, enable_gqa: bool = False
                             ) -> torch.Tensor:
    """Each request's one query row attending over its ``seq_lens[b]`` cached tokens.

    query: [B, H, D]; k_cache, v_cache: [S, Hkv, D]; req_to_token: [pool, max_context] slot
    of each request's tokens; req_pool_indices, seq_lens: [B]. Returns [B, H, D] in
    ``query``'s dtype. Raises ValueError when the query rows are not one per request."""
    batch = int(seq_lens.numel())
    if query.shape[0] != batch:
        raise ValueError(f"decode batch of {batch} requests has {query.shape[0]} query rows")
    longest = int(seq_lens.max()) if batch else 0
    positions = torch.arange(longest, device=query.device)
    valid = positions[None, :] < seq_lens[:, None].to(positions.device)  # [B, L]
    slots = req_to_token[req_pool_indices.long(), :longest].long()  # [B, L]
    slots = torch.where(valid, slots, torch.zeros_like(slots))  # padding reads slot 0
    keys = k_cache[slots].to(query.dtype).permute(0, 2, 1, 3)  # [B, Hkv, L, D]
    values = v_cache[slots].to(query.dtype).permute(0, 2, 1, 3)
    out = scaled_dot_product_attention(
        query.unsqueeze(2), keys, values, attn_mask=valid[:, None, None, :], scale=scaling,
        enable_gqa=enable_gqa)  # [B, H, 1, D]
    return out.squeeze(2)


def around_run_sdpa_forward_decode(original: Any, backend: Any, query: torch.Tensor,
                                   output: torch.Tensor, k_cache: torch.Tensor,
                                   v_cache: torch.Tensor, req_to_token: torch.Tensor,
                                   req_pool_indices: torch.Tensor, seq_lens: torch.Tensor,
                                   encoder_lens: torch.Tensor | None = None, scaling: Any = None,
                                   enable_gqa: bool = False, causal: bool = False,
                                   is_cross_attn: bool = False,
                                   sliding_window_size: int | None = None) -> torch.Tensor:
    """AROUND hook: the plain decode case batched, every other case SGLang's own loop."""
    plain = (encoder_lens is None and not is_cross_attn and sliding_window_size is None
             and query.shape[0] == seq_lens.numel() and seq_lens.numel() > 0
             and os.environ.get("LYNX_CPU_DECODE_ATTENTION", "batched") != "loop")
    if not plain:
        return original(backend, query, output, k_cache, v_cache, req_to_token,
                        req_pool_indices, seq_lens, encoder_lens, scaling, enable_gqa, causal,
                        is_cross_attn, sliding_window_size)
    output.copy_(batched_decode_attention(query, k_cache, v_cache, req_to_token,
                                          req_pool_indices, seq_lens, scaling, enable_gqa))
    return output


def register() -> None:
    """Register the hook with SGLang's HookRegistry (once per process)."""
    from lynx.cpu_compat.hooks import register_once

    register_once(TARGET, around_run_sdpa_forward_decode)
