"""Routing with a keep set: the reference semantics the engine's own top-k reproduces.

Shapes as in `lynx.selection.policies`; ids [T,K] int64, weights [T,K] float32.
"""

from __future__ import annotations

import torch

MASK_VALUE = -1.0e4  # finite: -inf turns into NaN inside some fused kernels


def masking_bias(keep: torch.Tensor, prunable: torch.Tensor) -> torch.Tensor:
    """Additive logit bias [T,E]: MASK_VALUE on dropped experts of prunable rows, else 0."""
    return torch.where(prunable[:, None] & ~keep[None, :], MASK_VALUE, 0.0)


def route_stock(logits: torch.Tensor, top_k: int, renormalize: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax top-k routing as SGLang's torch-native path does it: (weights, ids)."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = probs.topk(top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, ids


def route_with_keep(logits: torch.Tensor, top_k: int, renormalize: bool, keep: torch.Tensor,
                    prunable: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stock routing of the masked logits. With ``renormalize=False`` each pruned row's weights
    are rescaled to its original top-k gate mass (the router's output scale is preserved)."""
    masked = logits.float() + masking_bias(keep, prunable)
    weights, ids = route_stock(masked, top_k, renormalize)
    if not renormalize:
        original_mass = route_stock(logits, top_k, False)[0].sum(-1, keepdim=True)
        scale = original_mass / weights.sum(-1, keepdim=True).clamp_min(1e-20)
        weights = torch.where(prunable[:, None], weights * scale, weights)
    return weights, ids
