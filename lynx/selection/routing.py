"""From a keep set to what the engine's router consumes, and the reference routing it yields.

Shape legend: T rows, E experts, K top_k.

- Softmax and plain sigmoid routers: an additive logit bias [T,E] (0, or MASK_VALUE on dropped
  experts of pruned rows); the engine's own top-K then never picks a dropped expert.
- Routers with a correction bias (choose by ``gate + bias``): masking logits is wrong there (a
  masked expert still scores its bias and can win with weight 0), so the *bias* is masked:
  per row ([T,E]), or shared ([E]) when the engine reads one bias for all rows.
- `route_reference` is the engine's routing on those inputs; with ``renormalize=False`` it
  rescales pruned rows' weights to the row's stock top-K gate mass (rows that are not pruned
  are reproduced bit for bit, so the rescale is 1 there).
"""

from __future__ import annotations

import torch

from lynx.selection.routers import (
    RENORMALIZE_EPSILON,
    RouterSpec,
    StockRouting,
    gate_scores,
    stock_routing,
)

MASK_VALUE = -1.0e4  # finite: -inf turns into NaN inside some fused kernels


def masking_bias(keep: torch.Tensor, apply_rows: torch.Tensor) -> torch.Tensor:
    """[T,E] fp32 additive bias: MASK_VALUE where a pruned row meets a dropped expert, else 0."""
    return torch.where(apply_rows[:, None] & ~keep[None, :], MASK_VALUE, 0.0)


def masked_correction_bias(correction_bias: torch.Tensor, keep: torch.Tensor,
                           apply_rows: torch.Tensor,
                           row_allowed: torch.Tensor | None = None) -> torch.Tensor:
    """[T,E] fp32 per-row correction bias: the router's bias, plus MASK_VALUE on dropped
    experts of pruned rows (rows that are not pruned see exactly the router's bias).

    ``row_allowed`` [T,E] (top-2 scored grouped routers: ``isfinite(stock.choice)``, the
    experts of each row's stock groups) also masks, for pruned rows, every expert outside
    them, so a pruned row routes within its own groups as the stock router did."""
    dropped = ~keep[None, :] if row_allowed is None else ~keep[None, :] | ~row_allowed
    mask = torch.where(apply_rows[:, None] & dropped, MASK_VALUE, 0.0)
    return correction_bias.float()[None, :] + mask


def shared_masked_correction_bias(correction_bias: torch.Tensor, keep: torch.Tensor,
                                  row_valid: torch.Tensor, apply_rows: torch.Tensor,
                                  router: RouterSpec) -> torch.Tensor:
    """[E] fp32 one bias for all rows, for engines that read the bias by pointer: masked only
    when every valid row is pruned (a prefill row in the step leaves it unmasked).

    Top-2 scored grouped routers get their stock bias back (no pruning): their guarantees
    need the per-row group confinement of `masked_correction_bias`."""
    all_pruned = apply_rows.any() & ~(row_valid & ~apply_rows).any()
    if router.groups_score_top2:
        all_pruned = torch.zeros_like(all_pruned)
    return correction_bias.float() + torch.where(all_pruned & ~keep, MASK_VALUE, 0.0)


def stock_gate_mass(stock: StockRouting) -> torch.Tensor:
    """[T] each row's stock top-K gate mass (the scale of its un-renormalised weights)."""
    return stock.gate.sum(dim=-1)


def route_reference(logits: torch.Tensor, router: RouterSpec, *,
                    logit_bias: torch.Tensor | None = None,
                    correction_bias: torch.Tensor | None = None,
                    stock_mass: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T,K] fp32, ids [T,K] int64) the engine routes to on masked inputs.

    ``logit_bias`` [T,E] is added to the logits; ``correction_bias`` ([E] or [T,E], possibly
    masked) replaces the router's bias. Weights are gate values of the chosen experts,
    renormalised (SGLang's epsilon) when ``router.renormalize``; otherwise, if ``stock_mass``
    [T] (`stock_gate_mass` of the unmasked routing) is given, rescaled to it."""
    z = logits.float() if logit_bias is None else logits.float() + logit_bias
    routed = stock_routing(z, router, correction_bias)
    weights = gate_scores(z, router).gather(1, routed.ids)
    if router.renormalize:
        return weights / (weights.sum(dim=-1, keepdim=True) + RENORMALIZE_EPSILON), routed.ids
    if stock_mass is not None:
        weights = rescale_to_stock_mass(weights, stock_mass)
    return weights, routed.ids


def route_with_mask(logits: torch.Tensor, bias: torch.Tensor, top_k: int, renormalize: bool
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stock softmax top-K routing of ``logits + bias`` (weights [T,K], ids [T,K]).

    With ``renormalize=False`` the kept weights are rescaled to the row's original top-K gate
    mass, so every row's weights sum as the unpruned router's do."""
    router = RouterSpec(top_k=top_k, renormalize=renormalize)
    mass = None if renormalize else stock_gate_mass(stock_routing(logits, router))
    return route_reference(logits, router, logit_bias=bias, stock_mass=mass)


def rescale_to_stock_mass(weights: torch.Tensor, stock_mass: torch.Tensor) -> torch.Tensor:
    """Engine-side helper: scale each row's routed weights [T,K] to its stock gate mass [T]."""
    mass = weights.float().sum(dim=-1, keepdim=True).clamp_min(1e-30)
    return (weights.float() * (stock_mass.float()[:, None] / mass)).to(weights.dtype)
