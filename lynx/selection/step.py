"""One MoE layer in one step: router logits and knobs in, routing and statistics out.

Shape legend: T rows (tokens, padded size), E experts, K top_k (routed experts).

`select_layer_step` is the one function an engine plugin calls inside its top-k hook (and that
a CUDA graph captures): static shapes, no host sync, knobs read from device tensors. The
policy name and the `RouterSpec` are Python constants of the captured graph; everything that
changes at run time (enabled, budget, alpha, beta, k0, policy_code, valid/prunable rows) is a
tensor.

What the plugin passes:
- ``logits`` [T,E] router logits as the engine computed them (any float dtype);
- ``router``: the layer's `RouterSpec` (every router kind: softmax, grouped, sigmoid + bias,
  renormalize, raw-logit weights, routed scaling factor and where it applies);
- ``knobs``: `SelectionKnobs` (see `make_knobs`; ``budget`` may be a view ``budgets[layer]``);
- ``row_valid`` [T] bool: real rows (False for CUDA-graph padding: they neither vote, nor get
  pruned, nor enter any statistic, whatever their values), ``row_prunable`` [T] bool: decode
  rows (prefill rows: False, routed exactly stock);
- ``correction_bias`` [E]: the router's bias, for routers with ``has_correction_bias``;
- ``row_weight`` [T] fp32 (optional): each pruned row's vote in the batch importance
  (speculative verify steps: `lynx.selection.speculative.verify_row_weights`); default 1;
- ``stock_ids`` [T,K] (optional): the engine's own top-K, where it routed before the step.

What it gets back (`LayerSelection`): the keep set, the rows pruned, the rows rerouted, the
experts each row may route to, the routing itself (pruned rows: the router's rule restricted
to ``allowed``, see `lynx.selection.routing`; other rows: the stock routing of the library),
and `STAT_FIELDS` stats.

Lynx changes only what it prunes: a pruned row whose stock top-K lies inside its ``allowed``
set is *not rerouted* (`routing.rerouted_rows`; without ``stock_ids`` the engine routes after
the step, so a row whose K-th choice ties with a dropped expert counts as rerouted too). An
engine keeps its own output for every row outside ``rerouted`` (the library's routing equals
the engine's only to float rounding, and a bf16 MoE turns that into an occasional greedy
flip), so a layer-step that drops no expert is the engine's own, bit for bit. Such rows
still count in every statistic (``rows``, kept = union).
A valid row whose logits hold NaN/inf is never pruned and never voted with; it is counted in
``nonfinite_rows``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import NamedTuple

import torch

from lynx.selection.global_batch import AllReduce, global_batch
from lynx.selection.keep_rules import (
    BatchRouting,
    batch_totals,
    finalize_keep,
    must_keep,
    weighted_importance,
)
from lynx.selection.policies import (
    KeepPolicy,
    PolicyInputs,
    SelectionKnobs,
    keep_by_code,
    keep_policy,
)
from lynx.selection.routers import RouterSpec, engine_routing, stock_routing
from lynx.selection.routing import rerouted_rows, route_restricted, row_allowed
from lynx.selection.statistics import layer_statistics


class LayerSelection(NamedTuple):
    keep: torch.Tensor  # [E] bool experts this layer computes for the pruned rows
    apply_rows: torch.Tensor  # [T] bool rows pruned this step (valid, finite, prunable, on)
    rerouted: torch.Tensor  # [T] bool pruned rows whose stock top-K holds a non-allowed expert
    allowed: torch.Tensor  # [T,E] bool experts each row may route to (all for other rows)
    topk_weights: torch.Tensor  # [T,K] fp32 routing weights (see module doc)
    topk_ids: torch.Tensor  # [T,K] int64 routed expert ids, best first
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
    row_weight: torch.Tensor | None = None,
    stock_ids: torch.Tensor | None = None,
    all_reduce: AllReduce | None = None,
) -> LayerSelection:
    """Keep set, routing and statistics for one layer-step (see the module doc).

    ``policies`` replaces the policy table and ``batch_routing`` the stock-routing pass (the
    Triton package passes its kernels through these). ``stock_ids`` [T,K]: the engine's own
    top-K where it routed before the step (SGLang's STANDARD output): the stock routing is
    then the engine's decision (`routers.engine_routing`), ties broken its way.
    ``all_reduce`` (DP attention): sums the per-expert totals over the EP group, so the keep
    set comes from every rank's rows (`lynx.selection.global_batch`). Raises ValueError for
    an unknown policy name or a biased router without ``correction_bias``."""
    choose = resolve_policy(policy, policies)
    finite = torch.isfinite(logits).all(dim=-1)  # [T]
    usable = row_valid & finite
    z = torch.where(usable[:, None], logits.float(), 0.0)  # padding may hold inf/NaN
    rows = usable & row_prunable & knobs.enabled
    if stock_ids is not None:
        batch = batch_totals(engine_routing(z, router, correction_bias, stock_ids), rows)
    else:
        batch = batch_routing(z, router, correction_bias, rows)
    if row_weight is not None:
        batch = weighted_importance(batch, rows, row_weight)
    if all_reduce is not None:  # DP attention: the EP group's rows as one batch
        batch = global_batch(batch, rows, all_reduce, row_weight)
    must = must_keep(batch)
    inputs = PolicyInputs(z, router, correction_bias, rows, batch, must)
    keep = finalize_keep(choose(inputs, knobs), batch, must, router, rows)
    allowed = row_allowed(keep, rows, batch.stock)
    rerouted = rerouted_rows(batch.stock, allowed, rows, exact=stock_ids is not None)
    weights, ids = route_restricted(z, router, batch.stock, allowed)
    stats = layer_statistics(batch, keep, rows, row_valid & ~finite, rerouted,
                             router.ep_ranks, ids)
    return LayerSelection(keep, rows, rerouted, allowed, weights, ids, stats)
