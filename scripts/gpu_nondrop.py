"""GPU check stage ``nondrop``: Lynx changes only what it prunes, under CUDA-graph capture.

Per router of the conformance matrix, 32 decode rows + 3 NaN padding rows: the engine's own
routing (the torch specification's ids, int32 and unsorted as SGLang returns them, passed as
``stock_ids``; its weights one ulp off, as SGLang's differ from the library's by rounding) and
one captured graph of what the plugin's TopK hook runs: the selection step (Triton variant,
``by_code``, knobs in device tensors) with `merge_rerouted` (STANDARD format), and the step
without the engine's ids with `mask_rerouted_logits` (masked-logits formats). Replays:
- a budget of the stock union (nothing dropped): ids, weights and logits are the engine's own,
  bit for bit, in every row; no row is rerouted or masked;
- budget K (binding): exactly the rows whose own top-K holds a dropped expert change; the
  others stay bit for bit; every such row is masked, the others' logits are untouched.
``--dry-run``: the same checks eagerly with the torch specification on the CPU.
"""

from __future__ import annotations

from typing import Any

import torch
from gpu_common import ROUTERS, _inputs

from lynx.selection import (
    POLICY_NAMES,
    make_knobs,
    mask_rerouted_logits,
    merge_rerouted,
    routed_weights,
    select_layer_step,
    stock_gate_mass,
    stock_routing,
)

ROWS = 32


def _bitwise(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(((a == b) | (a.isnan() & b.isnan()) if a.is_floating_point() else a == b).all())


def _hook(step: Any, logits: torch.Tensor, router: Any, knobs: Any, valid: torch.Tensor,
          bias: torch.Tensor | None, own_ids: torch.Tensor, own_weights: torch.Tensor
          ) -> tuple[torch.Tensor, ...]:
    """STANDARD (SGLang routed first: its ids judge) and masked-logits (judged before the
    kernel routes) as the plugin drives them."""
    sel = step("by_code", logits, router, knobs, valid, valid, bias, stock_ids=own_ids)
    ids, weights = merge_rerouted(own_ids, own_weights, sel.topk_ids, sel.topk_weights,
                                  sel.rerouted)
    before = step("by_code", logits, router, knobs, valid, valid, bias)
    masked = mask_rerouted_logits(logits, before.allowed, before.rerouted)
    return ids, weights, masked, sel.keep, sel.rerouted, before.rerouted


def _runner(step: Any, args: tuple, dry_run: bool) -> Any:
    """A callable that runs the hook's work: eagerly (dry run) or by replaying one captured
    CUDA graph (knobs changed by ``fill_`` between replays reach it without recapture)."""
    if dry_run:
        return lambda: _hook(step, *args)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up (Triton compiles) outside the graph
            _hook(step, *args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _hook(step, *args)

    def replay() -> tuple[torch.Tensor, ...]:
        graph.replay()
        torch.cuda.synchronize()
        return captured

    return replay


def stage_nondrop(device: str, dry_run: bool) -> dict[str, Any]:
    step: Any = select_layer_step
    if not dry_run:
        from lynx.triton_selection.launcher import select_layer_step_triton as step
    failures: list[str] = []
    for name, (experts, router) in ROUTERS.items():
        logits, bias = _inputs(experts, ROWS, 11, router.has_correction_bias)
        logits = logits.to(device)
        b = bias.to(device) if bias is not None else None
        valid = torch.arange(logits.shape[0], device=device) < ROWS
        z = torch.where(valid[:, None], logits, 0.0)
        stock = stock_routing(z, router, b)
        own_ids = stock.ids.flip(-1).to(torch.int32)  # the engine's: int32, unsorted
        # SGLang's weights equal the library's to rounding only: stand for that by one ulp.
        own_weights = torch.nextafter(routed_weights(z, router, stock.ids,
                                                     stock_gate_mass(stock)),
                                      torch.tensor(float("inf"), device=device))
        union = int(stock.ids[:ROWS].unique().numel())
        knobs = make_knobs(device, budget=union, policy="budget")
        knobs.policy_code.fill_(POLICY_NAMES.index("budget"))
        run = _runner(step, (logits, router, knobs, valid, b, own_ids, own_weights), dry_run)
        ids, weights, masked, _, rerouted, masked_rows = run()  # nothing dropped
        if not (_bitwise(ids, own_ids) and _bitwise(weights, own_weights)
                and _bitwise(masked, logits) and not bool(rerouted.any())
                and not bool(masked_rows.any())):
            failures.append(f"{name}: a non-binding budget changed the engine's routing")
        knobs.budget.fill_(router.top_k)  # binding
        ids, weights, masked, keep, rerouted, masked_rows = (t.clone() for t in run())
        fits = keep[stock.ids].all(dim=-1) | ~valid
        same = (ids == own_ids).all(-1) & (weights == own_weights).all(-1)
        untouched = (masked == logits).all(-1) | logits.isnan().any(-1)
        if not (bool(rerouted.any()) and torch.equal(rerouted, ~fits)
                and torch.equal(same, fits) and bool(untouched[~masked_rows].all())
                and bool((masked_rows >= ~fits).all())):
            failures.append(f"{name}: a binding budget changed a row with nothing dropped")
    return {"ok": not failures, "routers": len(ROUTERS), "failures": failures,
            "captured": 0 if dry_run else len(ROUTERS)}
