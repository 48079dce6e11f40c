"""From a keep set to routing: the router's own rule restricted to the kept experts.

Shape legend: T rows, E experts, K top_k (routed experts; fused shared slots are the engine's).

- `row_allowed`: what a pruned row may route to: kept experts of the groups its stock routing
  chose (groups never change under Lynx); rows that are not pruned may route anywhere.
- `route_restricted`: the router's rule (choice score incl. correction bias, renormalize,
  raw-logit weights, routed scaling factor where SGLang applies it) over the allowed experts.
  Dropped experts are excluded exactly (a boolean, not a finite penalty), so no logit scale
  makes a pruned row reach one. Rows allowed everything get the stock routing.
- `merge_rerouted`: an engine's own routing with only the rows that need rerouting replaced:
  a row whose own top-K lies inside its allowed set stays the engine's, bit for bit (Lynx
  changes only what it prunes; the library's weights equal the engine's only to rounding).
- `masking_logit_bias` / `mask_rerouted_logits`: for engines that route from logits themselves
  (SGLang's bypassed and Triton-kernel TopK formats), a finite additive mask relative to each
  row's own logit span: every dropped expert ends at least ``MASK_MARGIN`` below every allowed
  one whatever the scale (a plain ``-inf`` can turn into NaN inside fused kernels), in the
  rerouted rows only. Valid for routers without a correction bias only (with one, a masked
  expert still competes on its bias).

Weights without renormalisation are rescaled to the row's stock top-K gate mass (the published
method's S_t: Lynx moves a row's weaker slots, it does not shrink the row's output); raw-logit
weights are never rescaled (they are not a mass).
"""

from __future__ import annotations

import torch

from lynx.selection.ranking import stable_top_k
from lynx.selection.routers import (
    RENORMALIZE_EPSILON,
    RouterSpec,
    StockRouting,
    gate_scores,
)

MASK_MARGIN = 1.0e4  # logits: dropped experts end this far below the row's smallest logit
MIN_MASS = 1.0e-30


def row_allowed(keep: torch.Tensor, apply_rows: torch.Tensor, stock: StockRouting
                ) -> torch.Tensor:
    """[T,E] bool: kept experts of the row's stock groups for pruned rows, all for others."""
    return ~apply_rows[:, None] | (keep[None, :] & torch.isfinite(stock.choice))


def rerouted_rows(stock: StockRouting, allowed: torch.Tensor, rows: torch.Tensor, *,
                  exact: bool) -> torch.Tensor:
    """[T] bool: the ``rows`` [T] an engine must reroute, because their stock top-K holds an
    expert outside ``allowed`` [T,E]. ``exact``: ``stock`` is the engine's own decision
    (`routers.engine_routing`). Otherwise the engine routes after the step (masked-logits
    formats) and may break a near-tie its own way, so a row with a dropped expert tied with its
    K-th choice counts too: masked, it cannot reach that expert."""
    outside = ~allowed.gather(1, stock.ids).all(dim=-1)
    if not exact:
        kth = stock.choice.gather(1, stock.ids[:, -1:])  # [T,1] the row's K-th choice score
        outside = outside | (torch.where(allowed, -torch.inf, stock.choice) >= kth).any(-1)
    return rows & outside


def stock_gate_mass(stock: StockRouting) -> torch.Tensor:
    """[T] each row's stock top-K gate mass (the scale of its un-renormalised weights)."""
    return stock.gate.float().sum(dim=-1)


def routed_weights(logits: torch.Tensor, router: RouterSpec, ids: torch.Tensor,
                   stock_mass: torch.Tensor) -> torch.Tensor:
    """[T,K] fp32 weights of the chosen ``ids`` [T,K] under the router's rule.

    ``stock_mass`` [T]: `stock_gate_mass` of the unrestricted routing (the target of the
    rescale when the router does not renormalise)."""
    z = logits.float()
    if router.weights == "raw_logits":
        chosen = z.gather(1, ids)
        weights = torch.softmax(chosen, dim=-1) if router.renormalize else chosen
    else:
        weights = gate_scores(z, router).gather(1, ids)
        if router.renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + RENORMALIZE_EPSILON)
        else:
            mass = weights.sum(dim=-1, keepdim=True).clamp_min(MIN_MASS)
            weights = weights * (stock_mass.float()[:, None] / mass)
    return weights * router.output_scale


def route_restricted(logits: torch.Tensor, router: RouterSpec, stock: StockRouting,
                     allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T,K] fp32, ids [T,K] int64 best first): each row's top-K by the router's
    choice score among its ``allowed`` [T,E] experts (ties: lower index), weighted by
    `routed_weights`. ``stock`` is `stock_routing` of the same logits and bias. A row needs
    K allowed experts (`keep_rules` guarantees it for pruned rows)."""
    choice = torch.where(allowed, stock.choice, -torch.inf)
    ids = stable_top_k(choice, router.top_k)
    return routed_weights(logits, router, ids, stock_gate_mass(stock)), ids


def merge_rerouted(own_ids: torch.Tensor, own_weights: torch.Tensor, routed_ids: torch.Tensor,
                   routed_weights: torch.Tensor, rerouted: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [T,K], weights [T,K]) in the dtypes of the engine's ``own_ids``/``own_weights``
    [T,K] (its routed columns): the library's ``routed_ids``/``routed_weights`` [T,K] in the
    ``rerouted`` [T] rows, the engine's own elsewhere. Pass the ``rerouted`` of a step given
    the same own ids as ``stock_ids``: the rows whose own ids hold an expert outside the keep
    set, judged on the engine's ids (so an expert outside it is never computed, even where the
    engine broke a near-tie differently), and the rows the statistics count. Static shapes, no
    host sync (capturable)."""
    rewrite = rerouted[:, None]
    return (torch.where(rewrite, routed_ids.to(own_ids.dtype), own_ids),
            torch.where(rewrite, routed_weights.to(own_weights.dtype), own_weights))


def masking_logit_bias(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """[T,E] fp32 additive bias: 0 where allowed, else ``-(row span + MASK_MARGIN)``.

    ``logits`` [T,E] must be finite in the rows that hold a disallowed expert."""
    z = logits.float()
    span = z.max(dim=-1, keepdim=True).values - z.min(dim=-1, keepdim=True).values
    return torch.where(allowed, 0.0, -(span + MASK_MARGIN))


def mask_rerouted_logits(logits: torch.Tensor, allowed: torch.Tensor, rerouted: torch.Tensor
                         ) -> torch.Tensor:
    """[T,E] logits for engines that route from logits: rows in ``rerouted`` [T] masked to
    their ``allowed`` [T,E] experts (`masking_logit_bias`), every other row the engine's
    ``logits`` untouched (so it routes them exactly as stock). Static shapes: capturable."""
    masked = apply_logit_bias(logits, masking_logit_bias(logits, allowed))
    return torch.where(rerouted[:, None], masked, logits)


def apply_logit_bias(logits: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``logits + bias`` in the logits' dtype, clamped to its finite range (never -inf)."""
    low = torch.finfo(logits.dtype).min
    return (logits.float() + bias).clamp_min(low).to(logits.dtype)
