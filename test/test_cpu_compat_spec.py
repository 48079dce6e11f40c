"""CPU stand-in ops for speculative decoding, and tree attention for verify steps.

The ops are checked against the Triton kernels SGLang runs on GPUs for the same step (run in
Triton's interpreter, test/spec_ops_reference.py); the KV copy against a plain loop; the
verify attention against SGLang's own causal extend attention (a chain-shaped tree is a
causal block) and against attending node by node over the prefix and the node's ancestors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from torch.nn.functional import scaled_dot_product_attention

from lynx.cpu_compat.spec_ops import copy_all_layer_kv_cache_cpu
from lynx.cpu_compat.verify_attention import tree_verify_attention

HERE = Path(__file__).parent


def test_spec_ops_equal_sglang_triton_kernels_in_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "SGLANG_USE_CPU_ENGINE": "1"}
    proc = subprocess.run([sys.executable, str(HERE / "spec_ops_reference.py"), "3"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"cases": 18, "failures": {}}


def test_copy_all_layer_kv_cache_reads_every_source_before_writing() -> None:
    gen = torch.Generator().manual_seed(0)
    buffers = [torch.randn(40, 2, 8, generator=gen), torch.randn(40, 3, 4, generator=gen)]
    src = torch.tensor([3, 7, 9, 11])
    tgt = torch.tensor([7, 3, 20, 9])  # 3<->7 swap, and 9 is both a source and a target
    expected = [b.clone() for b in buffers]
    for exp, orig in zip(expected, buffers, strict=True):
        exp[tgt] = orig.clone()[src]
    ptrs = torch.tensor([b.data_ptr() for b in buffers], dtype=torch.int64)
    strides = torch.tensor([b[0].numel() * b.element_size() for b in buffers])
    copy_all_layer_kv_cache_cpu(ptrs, strides, tgt, src)
    for got, exp in zip(buffers, expected, strict=True):
        assert torch.equal(got, exp)


def test_copy_all_layer_kv_cache_rejects_mismatched_slots() -> None:
    with pytest.raises(ValueError, match="3 target slots for 2 sources"):
        copy_all_layer_kv_cache_cpu(torch.zeros(1, dtype=torch.int64), torch.ones(1),
                                    torch.arange(3), torch.arange(2))


def _verify_batch(gen: torch.Generator, prefix: list[int], n: int, heads: int = 4,
                  kv_heads: int = 2, dim: int = 8):
    batch = len(prefix)
    slots = sum(p + n for p in prefix) + 5
    k_cache = torch.randn(slots, kv_heads, dim, generator=gen)
    v_cache = torch.randn(slots, kv_heads, dim, generator=gen)
    req_to_token = torch.zeros(batch + 2, 64, dtype=torch.int32)
    order = torch.randperm(slots, generator=gen)
    cursor = 0
    pool = torch.tensor([2, 0, 3][:batch])
    for b, p in enumerate(prefix):
        req_to_token[pool[b], : p + n] = order[cursor: cursor + p + n].to(torch.int32)
        cursor += p + n
    query = torch.randn(batch * n, heads, dim, generator=gen)
    return query, k_cache, v_cache, req_to_token, pool, torch.tensor(prefix)


def test_chain_tree_equals_sglang_causal_extend_attention() -> None:
    gen = torch.Generator().manual_seed(1)
    n, prefix = 5, [7, 3, 11]
    query, k, v, table, pool, seq = _verify_batch(gen, prefix, n)
    chain = torch.tril(torch.ones(n, n, dtype=torch.bool)).repeat(len(prefix), 1, 1)
    got = tree_verify_attention(query, k, v, table, pool, seq, chain.reshape(-1), n,
                                scaling=0.3, enable_gqa=True)
    expected = torch.empty_like(query)
    TorchNativeAttnBackend._run_sdpa_forward_extend(
        None, query, expected, k, v, table, pool, seq + n, seq, torch.full_like(seq, n),
        scaling=0.3, enable_gqa=True, causal=True)
    assert torch.allclose(got, expected, atol=1e-6)


def test_branching_tree_attends_to_prefix_and_ancestors_only() -> None:
    gen = torch.Generator().manual_seed(2)
    n, prefix = 6, [4, 9]
    parents = [-1, 0, 0, 1, 2, 2]  # two branches from the root
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i, parent in enumerate(parents):
        if parent >= 0:
            mask[i] = mask[parent]
        mask[i, i] = True
    query, k, v, table, pool, seq = _verify_batch(gen, prefix, n)
    got = tree_verify_attention(query, k, v, table, pool, seq, mask.repeat(2, 1, 1).reshape(-1),
                                n, enable_gqa=True)
    for b, p in enumerate(prefix):
        row = table[pool[b]].to(torch.int64)
        for i in range(n):
            visible = torch.cat([row[:p], row[p:p + n][mask[i]]])
            keys, values = k[visible].movedim(0, 1), v[visible].movedim(0, 1)
            q = query[b * n + i].unsqueeze(1)  # [H, 1, D]
            ref = scaled_dot_product_attention(q.unsqueeze(0), keys.unsqueeze(0),
                                               values.unsqueeze(0), enable_gqa=True)
            assert torch.allclose(got[b * n + i], ref.squeeze(0).squeeze(1), atol=1e-6), (b, i)
    # a sibling branch must not leak: node 3 (under 1) differs if node 2 were visible
    leaked = mask.clone()
    leaked[3, 2] = True
    other = tree_verify_attention(query, k, v, table, pool, seq,
                                  leaked.repeat(2, 1, 1).reshape(-1), n, enable_gqa=True)
    assert not torch.allclose(other[3], got[3])


def test_verify_attention_rejects_mismatched_batch() -> None:
    gen = torch.Generator().manual_seed(3)
    query, k, v, table, pool, seq = _verify_batch(gen, [3, 4], 4)
    with pytest.raises(ValueError, match="2 requests x 3 drafts"):
        tree_verify_attention(query, k, v, table, pool, seq, torch.ones(18, dtype=torch.bool), 3)
