"""The first selection API (keep set from softmax-like scores), kept for existing callers.

New code should call `lynx.selection.select_layer_step`. Shape legend: T rows, E experts,
K top_k; ``probs`` [T,E] are router probabilities, ``logits`` [T,E] logit-domain scores, row
masks [T] bool (``prunable`` rows are valid decode rows), knobs 0-dim tensors.
"""

from __future__ import annotations

import torch

from lynx.selection.keep_rules import batch_totals, fill_groups, finalize_keep, must_keep
from lynx.selection.policies import PolicyInputs, SelectionKnobs, keep_policy
from lynx.selection.routers import (
    EXCLUDED,
    RouterSpec,
    StockRouting,
    chosen_groups,
    restrict_to_chosen_groups,
    stock_routing,
)
from lynx.selection.routing import masking_bias, route_reference, route_with_mask

PROBABILITY_FLOOR = 1.0e-30


def batch_importance(probs: torch.Tensor, top_k: int, prunable: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(importance [E], top-1 votes [E]) of the prunable rows' stock top-K."""
    order = torch.argsort(probs, dim=-1, descending=True, stable=True)
    ids = order[:, :top_k]
    batch = batch_totals(StockRouting(probs, ids, probs.gather(1, ids)), prunable)
    return batch.importance, batch.top1_votes


def batch_keep_mask(policy: str, logits: torch.Tensor, *, top_k: int, row_valid: torch.Tensor,
                    row_prunable: torch.Tensor, budget: torch.Tensor, alpha: torch.Tensor,
                    beta: torch.Tensor, k0: torch.Tensor,
                    policy_code: torch.Tensor | None = None) -> torch.Tensor:
    """The keep set [E] for one layer-step of a softmax router under ``policy``
    (``by_code``: the policy ``policy_code`` names, chosen on the device)."""
    z = logits.float()
    router = RouterSpec(top_k=top_k)
    rows = row_valid & row_prunable
    enabled = torch.ones((), dtype=torch.bool, device=z.device)
    code = torch.zeros_like(budget) if policy_code is None else policy_code
    knobs = SelectionKnobs(enabled, budget, alpha, beta, k0, code)
    batch = batch_totals(stock_routing(z, router), rows)
    must = must_keep(batch)
    inputs = PolicyInputs(z, router, None, row_valid, rows, batch, must)
    return finalize_keep(keep_policy(policy)(inputs, knobs), batch, must, router, rows)


def _log(probs: torch.Tensor) -> torch.Tensor:
    return probs.float().clamp_min(PROBABILITY_FLOOR).log()


def keep_budget(probs: torch.Tensor, top_k: int, prunable: torch.Tensor,
                budget: torch.Tensor) -> torch.Tensor:
    return batch_keep_mask("budget", _log(probs), top_k=top_k, row_valid=prunable,
                           row_prunable=prunable, budget=budget, alpha=budget.new_ones(()),
                           beta=budget.new_ones(()), k0=budget.new_ones(()))


def keep_piggyback(probs: torch.Tensor, top_k: int, prunable: torch.Tensor,
                   k0: torch.Tensor) -> torch.Tensor:
    return batch_keep_mask("piggyback", _log(probs), top_k=top_k, row_valid=prunable,
                           row_prunable=prunable, budget=k0.new_zeros(()),
                           alpha=k0.new_ones(()), beta=k0.new_ones(()), k0=k0)


def keep_affinity(logits: torch.Tensor, top_k: int, row_valid: torch.Tensor,
                  prunable: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor
                  ) -> torch.Tensor:
    zero = torch.zeros((), dtype=torch.int64, device=logits.device)
    return batch_keep_mask("affinity", logits, top_k=top_k, row_valid=row_valid,
                           row_prunable=prunable, budget=zero, alpha=alpha, beta=beta,
                           k0=zero + 1)


def keep_all(num_experts: int, device: torch.device) -> torch.Tensor:
    return torch.ones(num_experts, dtype=torch.bool, device=device)


def restrict_to_groups(choice_logits: torch.Tensor, num_groups: int, topk_group: int,
                       top2_sum: bool) -> torch.Tensor:
    """Each row's scores outside its ``topk_group`` groups set to EXCLUDED (group score: best
    expert, or the sum of the top-2 ``exp(score)`` for biased routers)."""
    router = RouterSpec(top_k=1, num_expert_group=num_groups, topk_group=topk_group,
                        has_correction_bias=top2_sum)
    scores = choice_logits.float()
    chosen = chosen_groups(scores.exp() if top2_sum else scores, router)
    return restrict_to_chosen_groups(choice_logits, chosen, EXCLUDED)


def ensure_groups(keep: torch.Tensor, importance: torch.Tensor, num_groups: int,
                  topk_group: int, min_per_group: int = 1) -> torch.Tensor:
    """``keep`` with ``topk_group`` groups active and ``min_per_group`` experts kept in every
    active group (see `keep_rules.fill_groups`)."""
    return fill_groups(keep, importance, keep, num_groups, topk_group, min_per_group)


def route_stock(logits: torch.Tensor, top_k: int, renormalize: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax top-K routing: (weights [T,K], ids [T,K])."""
    return route_reference(logits, RouterSpec(top_k=top_k, renormalize=renormalize))


def route_with_keep(logits: torch.Tensor, top_k: int, renormalize: bool, keep: torch.Tensor,
                    prunable: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stock routing of the masked logits; without renormalisation pruned rows keep their
    original top-K gate mass."""
    return route_with_mask(logits, masking_bias(keep, prunable), top_k, renormalize)
