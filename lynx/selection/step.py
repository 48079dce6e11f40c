"""One MoE layer in one step: router logits and knobs in, masking inputs and statistics out.

Shape legend: T rows (tokens, padded size), E experts, K top_k.

`select_layer_step` is the function an engine plugin calls inside its top-k hook (and that a
CUDA graph captures): static shapes, no host sync, knobs read from device tensors. The
policy name and the `RouterSpec` are Python constants of the captured graph; everything that
changes at run time (enabled, budget, alpha, beta, k0, policy_code, valid/prunable rows) is a
tensor.

What the plugin passes:
- ``logits`` [T,E] router logits as the engine computed them (any float dtype);
- ``router``: the layer's `RouterSpec` (top-K, renormalize, scoring, groups, bias or not);
- ``knobs``: `SelectionKnobs` (see `make_knobs`; ``budget`` may be a view ``budgets[layer]``);
- ``row_valid`` [T] bool: real rows (False for CUDA-graph padding: they neither vote nor get
  pruned), ``row_prunable`` [T] bool: decode rows (prefill rows: False, routed exactly stock);
- ``correction_bias`` [E]: the router's bias, for routers with ``has_correction_bias``.

What it gets back (`LayerSelection`): the keep set, the rows pruned, and either a logit bias
to add to the logits before the engine's top-K or a per-row masked correction bias to route
with instead of the router's own (see `lynx.selection.routing`), plus `STAT_FIELDS` stats.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import NamedTuple

import torch

from lynx.selection.keep_rules import BatchRouting, batch_totals, finalize_keep, must_keep
from lynx.selection.policies import (
    KeepPolicy,
    PolicyInputs,
    SelectionKnobs,
    keep_by_code,
    keep_policy,
)
from lynx.selection.routers import RouterSpec, stock_routing
from lynx.selection.routing import masked_correction_bias, masking_bias
from lynx.selection.statistics import layer_statistics


class LayerSelection(NamedTuple):
    keep: torch.Tensor  # [E] bool experts this layer computes for the pruned rows
    apply_rows: torch.Tensor  # [T] bool rows pruned this step (valid, prunable, enabled)
    logit_bias: torch.Tensor | None  # [T,E] fp32 add to logits; None for biased routers
    correction_bias: torch.Tensor | None  # [T,E] fp32 masked bias; biased routers only
    stats: torch.Tensor  # [len(STAT_FIELDS)] fp32


BatchRoutingFn = Callable[
    [torch.Tensor, RouterSpec, "torch.Tensor | None", torch.Tensor], BatchRouting
]


def torch_batch_routing(logits: torch.Tensor, router: RouterSpec,
                        correction_bias: torch.Tensor | None, rows: torch.Tensor
                        ) -> BatchRouting:
    """Stock routing and per-expert totals in plain torch (the specification)."""
    return batch_totals(stock_routing(logits, router, correction_bias), rows)


def resolve_policy(name: str, policies: Mapping[str, KeepPolicy] | None) -> KeepPolicy:
    if name == "by_code" and policies is not None:
        return partial(keep_by_code, policies=policies)
    return keep_policy(name, policies)


def select_layer_step(
    policy: str, logits: torch.Tensor, router: RouterSpec, knobs: SelectionKnobs,
    row_valid: torch.Tensor, row_prunable: torch.Tensor,
    correction_bias: torch.Tensor | None = None, *,
    policies: Mapping[str, KeepPolicy] | None = None,
    batch_routing: BatchRoutingFn = torch_batch_routing,
) -> LayerSelection:
    """Keep set, masking inputs and statistics for one layer-step (see the module doc).

    ``policies`` replaces the policy table and ``batch_routing`` the stock-routing pass (the
    Triton package passes its kernels through these)."""
    choose = resolve_policy(policy, policies)
    z = torch.where(row_valid[:, None], logits.float(), 0.0)  # padding may hold inf/NaN
    rows = row_valid & row_prunable & knobs.enabled
    batch = batch_routing(z, router, correction_bias, rows)
    must = must_keep(batch)
    inputs = PolicyInputs(z, router, correction_bias, row_valid, rows, batch, must)
    keep = finalize_keep(choose(inputs, knobs), batch, must, router, rows)
    stats = layer_statistics(batch.stock, keep, rows)
    if router.has_correction_bias:
        assert correction_bias is not None
        allowed = torch.isfinite(batch.stock.choice) if router.groups_score_top2 else None
        return LayerSelection(keep, rows, None,
                              masked_correction_bias(correction_bias, keep, rows, allowed), stats)
    return LayerSelection(keep, rows, masking_bias(keep, rows), None, stats)
