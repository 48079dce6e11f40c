"""SGLang's native MoE paths with non-local (-1) expert ids: expert parallelism on the CPU engine.

With ``--ep-size N`` and no all-to-all backend, SGLang's ``StandardDispatcher`` maps the ids of
experts held by other EP ranks to ``-1`` (``_map_topk_ids_to_local_experts``); each rank
computes its local pairs and the combine all-reduce adds the ranks' partial outputs. The CPU
engine's MoE (``moe_forward_native``, taken without AMX) cannot skip them: its
``cnts.scatter_`` fails with "index -1 is out of bounds", and the ``--enable-torch-compile``
batch-1 path (``fused_moe_forward_native``) silently wraps -1 to the last local expert.

`register` (from `lynx.cpu_compat.hooks.install`, CPU engine only) adds AROUND hooks on both;
the Lynx plugin adds the batch-1 one on every device (`register_compile_path`):
- `moe_forward_native_local`: a call without -1 ids is SGLang's own, unchanged. Otherwise the
  local (row, slot) pairs become one-slot rows that SGLang's own function computes (its expert
  math, activations and biases untouched, weight 1), and the pairs' outputs are weighted and
  summed per row in fp32 as SGLang sums its slots; a row with no local pair contributes 0.
- `fused_moe_forward_native_local`: -1 pairs get expert 0 and weight 0 (static shapes, no
  branch on values: it runs under torch.compile), so they add exactly 0.
Shapes: T rows, H hidden, K slots (routed + fused shared), P local pairs.
"""

from __future__ import annotations

from typing import Any

import torch

NATIVE = "sglang.srt.layers.moe.fused_moe_native"


def moe_forward_native_local(original: Any, layer: Any, x: torch.Tensor, topk_output: Any,
                             moe_runner_config: Any, *args: Any, **kwargs: Any) -> Any:
    """AROUND hook of SGLang's ``moe_forward_native(layer, x [T,H], topk_output, config)``:
    [T,H] in ``x``'s dtype, the rank's partial output (non-local pairs skipped)."""
    weights, ids = topk_output.topk_weights, topk_output.topk_ids  # [T,K] each
    local = ids >= 0
    if bool(local.all()):  # the CPU engine: a host check costs nothing
        return original(layer, x, topk_output, moe_runner_config, *args, **kwargs)
    rows, slots = local.nonzero(as_tuple=True)  # [P]
    out = torch.zeros(x.shape[0], x.shape[1], dtype=weights.dtype, device=x.device)
    if rows.numel():
        pairs = topk_output._replace(topk_weights=torch.ones_like(weights[rows, slots, None]),
                                     topk_ids=ids[rows, slots, None])
        expert = original(layer, x[rows], pairs, moe_runner_config, *args, **kwargs)  # [P,H]
        out.index_add_(0, rows, expert.to(weights.dtype) * weights[rows, slots, None])
    return out.to(x.dtype)


def fused_moe_forward_native_local(original: Any, layer: Any, dispatch_output: Any,
                                   *args: Any, **kwargs: Any) -> Any:
    """AROUND hook of SGLang's batch-1 ``fused_moe_forward_native(layer, dispatch_output)``:
    -1 pairs routed to expert 0 with weight 0 instead of wrapping to the last expert."""
    topk = dispatch_output.topk_output
    local = topk.topk_ids >= 0
    safe = topk._replace(topk_ids=torch.where(local, topk.topk_ids, 0),
                         topk_weights=torch.where(local, topk.topk_weights, 0.0))
    return original(layer, dispatch_output._replace(topk_output=safe), *args, **kwargs)


HOOKS = {f"{NATIVE}.moe_forward_native": moe_forward_native_local,
         f"{NATIVE}.fused_moe_forward_native": fused_moe_forward_native_local}


def register(targets: tuple[str, ...] = tuple(HOOKS)) -> None:
    """Register the hooks of ``targets`` with SGLang's HookRegistry (once per process)."""
    from lynx.cpu_compat.hooks import register_once

    for target in targets:
        register_once(target, HOOKS[target])


def register_compile_path() -> None:
    """The batch-1 torch-compile path's hook alone: the Lynx plugin registers it on every
    device (its wrap of -1 ids is silent there too; for ids >= 0 the hook changes nothing)."""
    register((f"{NATIVE}.fused_moe_forward_native",))
