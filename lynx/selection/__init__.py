"""Engine-agnostic batch-aware expert selection (see `lynx.selection.policies`)."""

from __future__ import annotations

import torch

from lynx.selection.policies import (
    batch_importance,
    ensure_groups,
    keep_affinity,
    keep_all,
    keep_budget,
    keep_piggyback,
    restrict_to_groups,
)
from lynx.selection.routing import masking_bias, route_stock, route_with_keep

POLICIES = ("off", "budget", "affinity", "piggyback")


def batch_keep_mask(policy: str, logits: torch.Tensor, *, top_k: int, row_valid: torch.Tensor,
                    row_prunable: torch.Tensor, budget: torch.Tensor, alpha: torch.Tensor,
                    beta: torch.Tensor, k0: torch.Tensor) -> torch.Tensor:
    """The keep set [E] for one layer-step under ``policy`` (knobs are 0-dim tensors)."""
    if policy == "off":
        return keep_all(logits.shape[-1], logits.device)
    if policy == "affinity":
        return keep_affinity(logits, top_k, row_valid, row_prunable, alpha, beta)
    probs = torch.softmax(logits.float(), dim=-1)
    if policy == "budget":
        return keep_budget(probs, top_k, row_prunable, budget)
    if policy == "piggyback":
        return keep_piggyback(probs, top_k, row_prunable, k0)
    raise ValueError(f"unknown policy {policy!r}; expected one of {POLICIES}")


__all__ = [
    "POLICIES", "batch_importance", "batch_keep_mask", "ensure_groups", "keep_affinity",
    "keep_all", "keep_budget", "keep_piggyback", "masking_bias", "restrict_to_groups",
    "route_stock", "route_with_keep",
]
