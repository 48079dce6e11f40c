"""Qwen2-MoE's gated shared expert on the CPU engine (`lynx.cpu_compat.shared_gate`): the
Triton kernel's arithmetic (fp32 accumulation, the sum stored in the output's dtype, in
place). End to end, a served tiny Qwen2-MoE's prompt log-probabilities equal transformers'
(`test_e2e_calibrate_kinds`)."""

from __future__ import annotations

import pytest
import torch

from lynx.cpu_compat.shared_gate import around_fused_gate_sigmoid_mul_add


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_gated_shared_output_is_added_in_place(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    hidden, shared, final = (torch.randn(5, 64, generator=gen).to(dtype) for _ in range(3))
    gate = torch.randn(64, generator=gen).to(dtype)
    want = (torch.sigmoid(hidden.double() @ gate.double())[:, None] * shared.double()
            + final.double()).to(dtype)
    target = final.clone()
    assert around_fused_gate_sigmoid_mul_add(None, hidden, gate, shared, target) is None
    assert target.dtype == dtype
    # fp32 accumulation against a float64 reference: within fp32 (resp. bf16) rounding
    eps = 2e-6 if dtype == torch.float32 else 2 ** -7
    torch.testing.assert_close(target, want, rtol=0, atol=eps * float(want.abs().max()))


def test_other_devices_keep_sglang_s_kernel() -> None:
    calls = []
    meta = torch.empty(2, 4, device="meta")
    around_fused_gate_sigmoid_mul_add(lambda *a: calls.append(len(a)), meta, meta[0], meta,
                                      meta)
    assert calls == [4]
