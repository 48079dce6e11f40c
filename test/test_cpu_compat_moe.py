"""Expert parallelism on the CPU engine: SGLang's native MoE paths with non-local (-1) ids
(`lynx.cpu_compat.moe_native`), against SGLang's own functions on the whole layer.

Each EP rank holds a contiguous block of E/R experts and sees the other ranks' ids as -1 (what
SGLang's ``StandardDispatcher`` hands it); the combine adds the ranks' partial outputs. The sum
over ranks must equal the one-rank layer (fp32: to summation order), rows whose every pair is
on another rank included; without the hook SGLang's native path fails on -1, and its batch-1
torch-compile path silently wraps -1 to the last local expert.

Shape legend: T rows, H hidden, I expert width, E experts, K top_k, R EP ranks.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lynx.cpu_compat.moe_native import fused_moe_forward_native_local, moe_forward_native_local

native = pytest.importorskip("sglang.srt.layers.moe.fused_moe_native")
E, K, H, I = 8, 2, 16, 24  # noqa: E741


def _layer(w13: torch.Tensor, w2: torch.Tensor) -> SimpleNamespace:
    from sglang.srt.layers.moe.moe_runner import MoeRunnerConfig

    return SimpleNamespace(num_experts=w13.shape[0], w13_weight=w13, w2_weight=w2,
                           moe_runner_config=MoeRunnerConfig(activation="silu"))


def _inputs(rows: int, seed: int, dtype: torch.dtype = torch.float32):  # type: ignore[no-untyped-def]
    from sglang.srt.layers.moe.topk import StandardTopKOutput

    gen = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(E, 2 * I, H, generator=gen) * 0.2).to(dtype)
    w2 = (torch.randn(E, H, I, generator=gen) * 0.2).to(dtype)
    x = torch.randn(rows, H, generator=gen).to(dtype)
    weights, ids = torch.softmax(torch.randn(rows, E, generator=gen), -1).topk(K)
    ids[0] = torch.tensor([0, 1])  # a row whose every pair is on rank 0 (none on rank 1)
    topk = StandardTopKOutput(weights, ids.to(torch.int32), torch.zeros(rows, E))
    return w13, w2, x, topk


def _local(topk, rank: int, ranks: int):  # type: ignore[no-untyped-def]
    """The rank's view after SGLang's dispatcher: its experts' ids local, the others -1."""
    block = E // ranks
    ids = topk.topk_ids.long()
    mine = (ids >= rank * block) & (ids < (rank + 1) * block)
    return topk._replace(topk_ids=torch.where(mine, ids - rank * block, -1).to(torch.int32))


def _shard(w: torch.Tensor, rank: int, ranks: int) -> torch.Tensor:
    block = E // ranks
    return w[rank * block:(rank + 1) * block]


@pytest.mark.parametrize("ranks", [2, 4])
@pytest.mark.parametrize("rows", [1, 5, 33])
def test_the_ranks_partial_outputs_add_up_to_the_whole_layer(ranks: int, rows: int) -> None:
    w13, w2, x, topk = _inputs(rows, rows)
    whole = native.moe_forward_native(_layer(w13, w2), x, topk, _layer(w13, w2).moe_runner_config)
    parts = []
    for rank in range(ranks):
        layer = _layer(_shard(w13, rank, ranks), _shard(w2, rank, ranks))
        parts.append(moe_forward_native_local(native.moe_forward_native, layer, x,
                                              _local(topk, rank, ranks),
                                              layer.moe_runner_config))
    torch.testing.assert_close(sum(parts), whole, rtol=1e-6, atol=1e-6)
    assert parts[ranks - 1][0].abs().max() == 0  # row 0: no pair on the last rank


def test_without_the_hook_a_non_local_id_fails_and_with_it_stock_is_unchanged() -> None:
    w13, w2, x, topk = _inputs(6, 0)
    layer = _layer(_shard(w13, 0, 2), _shard(w2, 0, 2))
    with pytest.raises(RuntimeError, match="out of bounds"):
        native.moe_forward_native(layer, x, _local(topk, 0, 2), layer.moe_runner_config)
    whole = _layer(w13, w2)  # no -1 id: SGLang's own function, bit for bit
    assert torch.equal(
        moe_forward_native_local(native.moe_forward_native, whole, x, topk,
                                 whole.moe_runner_config),
        native.moe_forward_native(whole, x, topk, whole.moe_runner_config))


def test_the_batch1_compile_path_skips_non_local_pairs_instead_of_wrapping() -> None:
    from sglang.srt.layers.moe.token_dispatcher import StandardDispatchOutput

    w13, w2, x, topk = _inputs(1, 3)
    topk = topk._replace(topk_ids=torch.tensor([[1, 6]], dtype=torch.int32))  # one per rank
    whole = _layer(w13, w2)
    want = native.moe_forward_native(whole, x, topk, whole.moe_runner_config)
    parts, wrapped = [], []
    for rank in range(2):
        layer = _layer(_shard(w13, rank, 2), _shard(w2, rank, 2))
        dispatch = StandardDispatchOutput(x, None, _local(topk, rank, 2))
        parts.append(fused_moe_forward_native_local(native.fused_moe_forward_native, layer,
                                                    dispatch).hidden_states)
        wrapped.append(native.fused_moe_forward_native(layer, dispatch).hidden_states)
    torch.testing.assert_close(sum(parts), want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(sum(wrapped), want, rtol=1e-3, atol=1e-4)  # SGLang alone: wrong
