"""Batched decode attention (`lynx.cpu_compat.decode_attention`) against SGLang's own
per-request loop (``TorchNativeAttnBackend._run_sdpa_forward_decode``), the specification."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lynx.cpu_compat.decode_attention import (
    around_run_sdpa_forward_decode,
    batched_decode_attention,
)


def _sglang_loop():
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    return TorchNativeAttnBackend._run_sdpa_forward_decode


def _case(seed: int, batch: int, heads: int, kv_heads: int, dim: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 40, (batch,), generator=g)
    slots = 1 + int(lens.sum()) + 8
    k = torch.randn(slots, kv_heads, dim, generator=g).to(dtype)
    v = torch.randn(slots, kv_heads, dim, generator=g).to(dtype)
    table = torch.zeros(batch + 3, 64, dtype=torch.int32)
    pool = torch.randperm(batch + 3, generator=g)[:batch]
    free = torch.randperm(slots - 1, generator=g) + 1  # slot 0 is SGLang's padding slot
    start = 0
    for b in range(batch):
        n = int(lens[b])
        table[pool[b], :n] = free[start:start + n].to(torch.int32)
        table[pool[b], n:] = 7  # stale entries past the length must not count
        start += n
    query = torch.randn(batch, heads, dim, generator=g).to(dtype)
    return query, k, v, table, pool, lens


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), batch=st.integers(1, 12),
       heads=st.sampled_from([(4, 4), (4, 2), (8, 1)]), dim=st.sampled_from([16, 32]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_batched_decode_matches_sglangs_loop(seed, batch, heads, dim, dtype) -> None:
    query, k, v, table, pool, lens = _case(seed, batch, heads[0], heads[1], dim, dtype)
    gqa = heads[0] != heads[1]
    expected = torch.empty_like(query)
    _sglang_loop()(None, query, expected, k, v, table, pool, lens, None, scaling=0.17,
                   enable_gqa=gqa)
    got = batched_decode_attention(query, k, v, table, pool, lens, 0.17, gqa)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert got.dtype == query.dtype and got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)


def test_the_hook_takes_the_plain_case_and_leaves_the_rest_to_sglang(monkeypatch) -> None:
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    backend = object.__new__(TorchNativeAttnBackend)  # the loop needs no state of it
    query, k, v, table, pool, lens = _case(3, 5, 4, 2, 16, torch.float32)
    calls: list[str] = []

    def original(*args, **kwargs):
        calls.append("sglang")
        return _sglang_loop()(*args, **kwargs)

    out = torch.empty_like(query)
    around_run_sdpa_forward_decode(original, None, query, out, k, v, table, pool, lens,
                                   None, 0.25, True)
    assert calls == []  # batched
    expected = torch.empty_like(query)
    _sglang_loop()(None, query, expected, k, v, table, pool, lens, None, 0.25, True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    for extra in ({"sliding_window_size": 8}, {"is_cross_attn": True}):
        around_run_sdpa_forward_decode(original, backend, query, torch.empty_like(query), k,
                                       v, table, pool, lens, None, 0.25, True, **extra)
    monkeypatch.setenv("LYNX_CPU_DECODE_ATTENTION", "loop")
    around_run_sdpa_forward_decode(original, backend, query, torch.empty_like(query), k, v,
                                   table, pool, lens, None, 0.25, True)
    assert calls == ["sglang"] * 3
    with pytest.raises(ValueError, match="3 requests has 5 query rows"):
        batched_decode_attention(query, k, v, table, pool[:3], lens[:3])
