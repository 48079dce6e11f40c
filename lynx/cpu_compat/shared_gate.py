"""Qwen2-MoE's gated shared expert on the CPU engine.

SGLang 0.5.23's ``Qwen2MoeSparseMoeBlock`` adds ``sigmoid(h . w_gate) * shared_output`` to the
routed output with ``fused_gate_sigmoid_mul_add``, a Triton kernel, whenever the gate is not
an AMX layer, and Triton has no CPU driver: a Qwen2-MoE checkpoint (Qwen1.5-MoE, Qwen2-57B-A14B)
fails at its first prefill with "0 active drivers". `around_fused_gate_sigmoid_mul_add` computes
the kernel's own arithmetic in torch for CPU tensors (fp32 accumulation, the result in the
output's dtype) and leaves every other device to the kernel.
Shapes: T rows, H hidden.
"""

from __future__ import annotations

from typing import Any

import torch

TARGET = "sglang.kernels.ops.elementwise.elementwise.fused_gate_sigmoid_mul_add"


def around_fused_gate_sigmoid_mul_add(original: Any, hidden_states: torch.Tensor,
                                      gate_weight: torch.Tensor, shared_output: torch.Tensor,
                                      final_hidden_states: torch.Tensor) -> None:
    """AROUND hook: ``final_hidden_states`` [T,H] += sigmoid(``hidden_states`` [T,H] @
    ``gate_weight`` [H]) * ``shared_output`` [T,H], in place, as the Triton kernel does."""
    if hidden_states.device.type != "cpu":
        return original(hidden_states, gate_weight, shared_output, final_hidden_states)
    gate = torch.sigmoid(hidden_states.float() @ gate_weight.float())  # [T]
    result = gate[:, None] * shared_output.float() + final_hidden_states.float()
    final_hidden_states.copy_(result)
    return None


def register() -> None:
    """Register the hook with SGLang's HookRegistry (once per process)."""
    from lynx.cpu_compat.hooks import register_once

    register_once(TARGET, around_fused_gate_sigmoid_mul_add)
