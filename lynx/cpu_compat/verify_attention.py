"""Tree attention for speculative verify steps on SGLang's torch-native attention backend.

SGLang 0.5.23's ``TorchNativeAttnBackend.forward_extend`` reads ``extend_prefix_lens``, which
a TARGET_VERIFY batch does not have, and knows no draft-tree mask, so NGRAM speculative
decoding cannot run on the CPU engine. `register` adds an AROUND hook on that method (from
`lynx.cpu_compat.hooks.install`, CPU engine only): verify batches go to
`tree_verify_attention`, every other batch to SGLang's own code unchanged. Shapes: B
requests, n draft tokens per request, T = B*n query rows, H query heads, Hkv key/value heads,
D head size, P_b the verified prefix of request b.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.functional import scaled_dot_product_attention

BACKEND = "sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend"


def tree_verify_attention(
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor,
    tree_mask: torch.Tensor, draft_token_num: int, scaling: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Attention of each request's n draft tokens over its prefix and its draft-tree ancestors.

    query: [T, H, D]; k_cache, v_cache: [slots, Hkv, D] (the draft tokens' K/V already
    written at ``req_to_token[pool, P_b : P_b + n]``); req_pool_indices, seq_lens: [B]
    (seq_lens = P_b, the verified length, drafts excluded); tree_mask: [B*n*n] bool,
    ``[b, i, j]`` true when draft j is visible to draft i (ancestors and itself).
    Returns [T, H, D]: draft i of request b attends to all P_b prefix slots and to the drafts
    its mask row allows. Raises ValueError when the shapes disagree.
    """
    n = draft_token_num
    batch = int(seq_lens.numel())
    if query.shape[0] != batch * n or tree_mask.numel() != batch * n * n:
        raise ValueError(f"verify batch of {batch} requests x {n} drafts: query has "
                         f"{query.shape[0]} rows, tree mask {tree_mask.numel()} entries")
    masks = tree_mask.reshape(batch, n, n).to(torch.bool)
    out = torch.empty_like(query)
    for b in range(batch):
        prefix = int(seq_lens[b])
        slots = req_to_token[int(req_pool_indices[b]), : prefix + n].to(torch.int64)
        keys = k_cache[slots].movedim(0, 1).to(query.dtype)  # [Hkv, P+n, D]
        values = v_cache[slots].movedim(0, 1).to(query.dtype)
        visible = torch.cat([torch.ones(n, prefix, dtype=torch.bool), masks[b]], dim=1)
        rows = query[b * n:(b + 1) * n].movedim(0, 1)  # [H, n, D]
        attended = scaled_dot_product_attention(
            rows.unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0),
            attn_mask=visible, scale=scaling, enable_gqa=enable_gqa)
        out[b * n:(b + 1) * n] = attended.squeeze(0).movedim(1, 0)
    return out


def around_forward_extend(original: Any, backend: Any, q: torch.Tensor, k: torch.Tensor,
                          v: torch.Tensor, layer: Any, forward_batch: Any,
                          save_kv_cache: bool = True, *args: Any, **kwargs: Any) -> Any:
    """AROUND hook of ``TorchNativeAttnBackend.forward_extend``: verify batches only."""
    spec = getattr(forward_batch, "spec_info", None)
    if not forward_batch.forward_mode.is_target_verify() or spec is None:
        return original(backend, q, k, v, layer, forward_batch, save_kv_cache, *args, **kwargs)
    window = getattr(layer, "sliding_window_size", None)
    if layer.is_cross_attention or (window is not None and window > -1):
        raise NotImplementedError("Lynx's CPU verify attention covers causal self-attention "
                                  "without a sliding window")
    from sglang.srt.mem_cache.memory_pool import KVWriteLoc

    if save_kv_cache and k is not None and v is not None:
        backend.token_to_kv_pool.set_kv_buffer(
            layer, KVWriteLoc(forward_batch.out_cache_loc, backend.swa_out_cache_loc), k, v)
    out = tree_verify_attention(
        q.view(-1, layer.tp_q_head_num, layer.qk_head_dim),
        backend.token_to_kv_pool.get_key_buffer(layer.layer_id),
        backend.token_to_kv_pool.get_value_buffer(layer.layer_id),
        backend.req_to_token_pool.req_to_token, forward_batch.req_pool_indices,
        forward_batch.seq_lens, spec.custom_mask, spec.draft_token_num,
        scaling=layer.scaling, enable_gqa=layer.tp_q_head_num != layer.tp_k_head_num)
    return out.reshape(q.shape[0], layer.tp_q_head_num * layer.v_head_dim)


def register() -> None:
    """Register the verify hook with SGLang's HookRegistry (once per process)."""
    from lynx.cpu_compat.hooks import register_once

    register_once(f"{BACKEND}.forward_extend", around_forward_extend)
