"""Launchers for the Triton selection kernels (CUDA, or the CPU under ``TRITON_INTERPRET=1``).

Shape legend: T rows, E experts, K top_k, N = cdiv(T, BLOCK_ROWS) kernel programs.

Each launcher allocates its outputs with static shapes and launches a fixed grid, so it can be
captured in a CUDA graph; device knobs are passed as pointers (no ``.item()``). Routers the
kernels do not cover (grouped, or with a correction bias) use the torch specification.
`select_layer_step_triton` is `lynx.selection.select_layer_step` with the kernels plugged in.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import torch
import triton

from lynx.selection.affinity import (
    MAX_SUPPORT_DEPTH,
    MIN_BIN,
    radix_weights,
    rank_descending,
    support_depth,
    valid_row_count,
)
from lynx.selection.keep_rules import IMPORTANCE_SCALE, BatchRouting, from_fixed_point
from lynx.selection.policies import KEEP_POLICIES, KeepPolicy, PolicyInputs, SelectionKnobs
from lynx.selection.routers import RouterSpec, StockRouting, affinity_logits
from lynx.selection.step import LayerSelection, select_layer_step, torch_batch_routing
from lynx.triton_selection.affinity_kernels import (
    affinity_choice_kernel,
    affinity_support_kernel,
)
from lynx.triton_selection.stock_topk_kernel import stock_topk_kernel

BLOCK_ROWS = 16


def _block_experts(num_experts: int) -> int:
    return max(16, triton.next_power_of_2(num_experts))


def _programs(num_rows: int) -> int:
    return max(1, triton.cdiv(num_rows, BLOCK_ROWS))


def kernel_covers(router: RouterSpec) -> bool:
    """Whether `stock_topk_kernel` implements this router (plain softmax or sigmoid)."""
    return not router.grouped and not router.has_correction_bias


def triton_batch_routing(logits: torch.Tensor, router: RouterSpec,
                         correction_bias: torch.Tensor | None, rows: torch.Tensor
                         ) -> BatchRouting:
    """`lynx.selection.torch_batch_routing` with the per-row work in `stock_topk_kernel`."""
    if not kernel_covers(router):
        return torch_batch_routing(logits, router, correction_bias, rows)
    logits = logits.contiguous()
    num_rows, num_experts = logits.shape
    programs = _programs(num_rows)
    device = logits.device
    ids = torch.empty(num_rows, router.top_k, dtype=torch.int64, device=device)
    gate = torch.empty(num_rows, router.top_k, dtype=torch.float32, device=device)
    partial_importance = torch.empty(programs, num_experts, dtype=torch.int64, device=device)
    partial_top1 = torch.empty(programs, num_experts, dtype=torch.float32, device=device)
    stock_topk_kernel[(programs,)](
        logits, rows.to(torch.int32), ids, gate, partial_importance, partial_top1,
        num_rows, num_experts, logits.stride(0),
        TOP_K=router.top_k, SIGMOID=router.scoring == "sigmoid",
        BLOCK_T=BLOCK_ROWS, BLOCK_E=_block_experts(num_experts), SCALE=IMPORTANCE_SCALE,
    )
    stock = StockRouting(logits.float(), ids, gate)
    union = torch.zeros(num_rows, num_experts, dtype=torch.bool, device=device).scatter_(
        1, ids, rows[:, None].expand_as(ids)).any(dim=0)
    return BatchRouting(stock, from_fixed_point(partial_importance.sum(dim=0)),
                        partial_top1.sum(dim=0), union)


def affinity_choices_triton(scores: torch.Tensor, top_k: int, row_valid: torch.Tensor,
                            rows: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor
                            ) -> torch.Tensor:
    """`lynx.selection.affinity_choices` with the per-row work in the affinity kernels."""
    scores = scores.contiguous()
    num_rows, num_experts = scores.shape
    programs = _programs(num_rows)
    device = scores.device
    n_valid = valid_row_count(row_valid)
    depth = support_depth(n_valid, beta)
    partial_keys = torch.empty(programs, num_experts, dtype=torch.int64, device=device)
    block = {"BLOCK_T": BLOCK_ROWS, "BLOCK_E": _block_experts(num_experts)}
    affinity_support_kernel[(programs,)](
        scores, row_valid.to(torch.int32), alpha, depth, radix_weights(n_valid, depth),
        partial_keys, num_rows, num_experts, scores.stride(0), MAX_DEPTH=MAX_SUPPORT_DEPTH,
        **block,
    )
    support_rank = rank_descending(partial_keys.sum(dim=0))
    partial_picks = torch.empty(programs, num_experts, dtype=torch.int32, device=device)
    affinity_choice_kernel[(programs,)](
        scores, rows.to(torch.int32), alpha, beta, support_rank, partial_picks,
        num_rows, num_experts, scores.stride(0), TOP_K=top_k, MIN_BIN=MIN_BIN, **block,
    )
    return partial_picks.sum(dim=0) > 0


def keep_affinity_triton(inputs: PolicyInputs, knobs: SelectionKnobs) -> torch.Tensor:
    scores = affinity_logits(inputs.logits, inputs.router, inputs.correction_bias)
    return affinity_choices_triton(scores, inputs.router.top_k, inputs.rows, inputs.rows,
                                   knobs.alpha, knobs.beta)


TRITON_POLICIES: Mapping[str, KeepPolicy] = MappingProxyType(
    {**KEEP_POLICIES, "affinity": keep_affinity_triton})


def select_layer_step_triton(
    policy: str, logits: torch.Tensor, router: RouterSpec, knobs: SelectionKnobs,
    row_valid: torch.Tensor, row_prunable: torch.Tensor,
    correction_bias: torch.Tensor | None = None, row_weight: torch.Tensor | None = None,
    stock_ids: torch.Tensor | None = None,
) -> LayerSelection:
    """Same contract and results as `lynx.selection.select_layer_step`, kernels inside (with
    ``stock_ids``, the engine's own routing replaces the stock-routing kernel)."""
    return select_layer_step(policy, logits, router, knobs, row_valid, row_prunable,
                             correction_bias, policies=TRITON_POLICIES,
                             batch_routing=triton_batch_routing, row_weight=row_weight,
                             stock_ids=stock_ids)
