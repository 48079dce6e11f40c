"""The CPU stand-in for sgl_kernel: op vs a plain reference, and the import fallback rules."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from lynx.cpu_compat.ops import assign_req_to_token_pool_cpu
from lynx.cpu_compat.stand_in import StandInOpMissing, build_module


def _reference_assign(req_pool_indices, req_to_token, start, end, out_cache_loc):
    out = req_to_token.clone()
    cursor = 0
    for i in range(len(req_pool_indices)):
        row = int(req_pool_indices[i])
        for col in range(int(start[i]), int(end[i])):
            out[row, col] = out_cache_loc[cursor]
            cursor += 1
    return out


@pytest.mark.parametrize("seed", range(5))
def test_assign_req_to_token_pool_matches_reference(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    pool_rows, pool_len, n_req = 16, 64, 6
    req_pool_indices = torch.randperm(pool_rows, generator=gen)[:n_req].to(torch.int64)
    start = torch.randint(0, 40, (n_req,), generator=gen, dtype=torch.int64)
    end = start + torch.randint(0, 20, (n_req,), generator=gen, dtype=torch.int64)
    total = int((end - start).sum())
    out_cache_loc = torch.randint(1, 10_000, (total + 3,), generator=gen, dtype=torch.int64)
    table = torch.zeros(pool_rows, pool_len, dtype=torch.int32)
    expected = _reference_assign(req_pool_indices, table, start, end, out_cache_loc)
    assign_req_to_token_pool_cpu(req_pool_indices, table, start, end, out_cache_loc, pool_len)
    assert torch.equal(table, expected)


def test_assign_rejects_overflowing_request() -> None:
    table = torch.zeros(2, 8, dtype=torch.int32)
    with pytest.raises(ValueError, match="exceeds the token pool length"):
        assign_req_to_token_pool_cpu(
            torch.tensor([0]), table, torch.tensor([6]), torch.tensor([10]),
            torch.arange(4), 8,
        )


def test_unknown_op_resolves_but_raises_naming_it() -> None:
    module = build_module("sgl_kernel")
    op = module.fused_experts_cpu  # import-time resolution must succeed
    with pytest.raises(StandInOpMissing, match=r"sgl_kernel\.fused_experts_cpu"):
        op(torch.zeros(1))
    assert module.assign_req_to_token_pool_cpu is assign_req_to_token_pool_cpu


def _probe(env_extra: dict[str, str]) -> str:
    code = (
        "import sgl_kernel, sys;"
        "print('stand-in' if getattr(sgl_kernel, '__lynx_stand_in__', False) else 'real')"
    )
    env = {**os.environ, **env_extra}
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    return proc.stdout.strip() + proc.stderr[-2000:]


def test_stand_in_served_only_for_cpu_engine_without_working_real_build() -> None:
    # CPU engine requested and real sgl_kernel fails (no libcuda here): the stand-in loads.
    assert _probe({"SGLANG_USE_CPU_ENGINE": "1"}).startswith("stand-in")
    # Not the CPU engine: nothing is intercepted, the real package's own error surfaces.
    out = _probe({"SGLANG_USE_CPU_ENGINE": "0"})
    assert not out.startswith("stand-in")
    assert "libcuda" in out or "ImportError" in out or out.startswith("real")
    # Explicitly disabled.
    assert not _probe({"SGLANG_USE_CPU_ENGINE": "1", "LYNX_CPU_COMPAT": "0"}).startswith("stand-in")


def test_real_build_is_never_shadowed(tmp_path) -> None:
    # A working sgl_kernel earlier on the path must win over the stand-in.
    fake = tmp_path / "sgl_kernel"
    fake.mkdir()
    (fake / "__init__.py").write_text("WORKING = True\n")
    out = _probe({"SGLANG_USE_CPU_ENGINE": "1", "PYTHONPATH": str(tmp_path)})
    assert out.startswith("real")
