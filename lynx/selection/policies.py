"""Keep-set policies: which experts one MoE layer computes in one step, shared by the batch.

Shape legend: T rows (tokens) of the step, E experts, K top_k.

A policy is ``fn(inputs: PolicyInputs, knobs: SelectionKnobs) -> keep [E] bool``; the step
(`lynx.selection.step`) then applies `keep_rules.finalize_keep`, so a policy only states its
idea. Policies are pure static-shape tensor math: no ``.item()``, ``nonzero``, boolean
indexing or Python branching on tensor values; knobs are 0-dim device tensors, so a captured
CUDA graph / ``torch.compile(fullgraph=True)`` graph follows a ``fill_`` without recapture.

- ``off``: keep everything (stock routing).
- ``budget`` (ours): rank experts must-keep first (every pruned row's top-1), then by batch
  importance (summed stock top-K gate mass of the pruned rows), lower index on ties; keep the
  first ``max(m, #must-keep, K)`` of the experts the pruned rows' stock top-K use (never one
  outside that union). One fixed ranking, so a smaller m keeps a subset. Under expert
  parallelism (``RouterSpec.ep_ranks`` R > 1, ``ep_balance``) the budget is spent per rank
  instead: every rank keeps its best up to one level max(ceil(m/R), forced per rank, the
  level giving K experts in all) (`lynx.selection.ep`).
- ``affinity``: the published AffinityBinning (`lynx.selection.affinity`) over the pruned
  rows (B = their count: prefill and padding rows neither vote nor count), binning the log
  gate (`routers.affinity_logits`).
- ``piggyback`` (OEA-style): each pruned row keeps its top-``k0``; the union is the active set
  the rows' other slots are re-routed onto.
- ``coverage`` (ours): the fewest experts, by batch importance, whose summed stock top-K gate
  mass over the pruned rows reaches ``knobs.coverage`` of the step's total (adapts the keep
  set to how concentrated each layer-step is; every row's top-1 still kept on top).
- ``by_code``: whichever of the above ``knobs.policy_code`` names (index into POLICY_NAMES),
  for engines that capture one graph and let a controller switch policies at run time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import NamedTuple

import torch

from lynx.selection.affinity import affinity_choices
from lynx.selection.ep import keep_per_rank, rank_level
from lynx.selection.keep_rules import RANK_FIRST, BatchRouting
from lynx.selection.ranking import rank_descending
from lynx.selection.routers import RouterSpec, affinity_logits

POLICY_NAMES: tuple[str, ...] = ("off", "budget", "affinity", "piggyback", "coverage")  # code
NO_BUDGET_LIMIT = 1 << 30


class SelectionKnobs(NamedTuple):
    """Run-time knobs as preallocated 0-dim device tensors (change them with ``fill_``)."""

    enabled: torch.Tensor  # bool: prune at all in this step
    budget: torch.Tensor  # int64 [experts]: ``budget`` policy's m for this layer
    alpha: torch.Tensor  # float32: ``affinity`` bin width 1/alpha logits
    beta: torch.Tensor  # float32: ``affinity`` clamp depth (<= 0: no clamp)
    k0: torch.Tensor  # int64: ``piggyback`` slots each row keeps (clamped to [1, K])
    policy_code: torch.Tensor  # int64: index into POLICY_NAMES, read by ``by_code`` only
    coverage: torch.Tensor  # float32 in (0, 1]: ``coverage`` policy's target mass fraction


def make_knobs(device: torch.device | str | None = None, *, enabled: bool = True,
               budget: int = NO_BUDGET_LIMIT, alpha: float = 3.0, beta: float = 2.0,
               k0: int = 1, policy: str = "off", coverage: float = 0.9) -> SelectionKnobs:
    """Allocate a knob set once (before any graph capture)."""
    def scalar(value: bool | int | float, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(value, dtype=dtype, device=device)

    return SelectionKnobs(
        enabled=scalar(enabled, torch.bool), budget=scalar(budget, torch.int64),
        alpha=scalar(alpha, torch.float32), beta=scalar(beta, torch.float32),
        k0=scalar(k0, torch.int64), policy_code=scalar(POLICY_NAMES.index(policy), torch.int64),
        coverage=scalar(coverage, torch.float32),
    )


class PolicyInputs(NamedTuple):
    """Everything a policy may read about one layer-step (all on the step's device)."""

    logits: torch.Tensor  # [T,E] fp32 router logits
    router: RouterSpec
    correction_bias: torch.Tensor | None  # [E] for biased routers
    rows: torch.Tensor  # [T] bool rows this step prunes (valid, finite, prunable, enabled):
    # the only rows that vote, so padding and prefill rows never change a keep set
    batch: BatchRouting  # stock routing and per-expert totals over ``rows``
    must: torch.Tensor  # [E] bool experts no policy may drop


KeepPolicy = Callable[[PolicyInputs, SelectionKnobs], torch.Tensor]


def keep_off(inputs: PolicyInputs, knobs: SelectionKnobs) -> torch.Tensor:
    return torch.ones(inputs.logits.shape[-1], dtype=torch.bool, device=inputs.logits.device)


def keep_budget(inputs: PolicyInputs, knobs: SelectionKnobs) -> torch.Tensor:
    must = inputs.must
    score = must.to(torch.float32) * RANK_FIRST + inputs.batch.importance
    ranks = inputs.router.ep_ranks
    if ranks > 1 and inputs.router.ep_balance:  # the budget per EP rank (`selection.ep`)
        level = rank_level(must, knobs.budget, ranks, inputs.batch.union, inputs.router.top_k)
        return keep_per_rank(score, inputs.batch.union, level, ranks)
    limit = torch.maximum(knobs.budget.to(torch.int64),
                          must.sum().clamp_min(inputs.router.top_k))
    # Experts no pruned row routes to would only give the rows' remapped slots somewhere new
    # to go, so the keep set stays inside the stock union.
    return (rank_descending(score) < limit) & inputs.batch.union


def keep_affinity(inputs: PolicyInputs, knobs: SelectionKnobs) -> torch.Tensor:
    scores = affinity_logits(inputs.logits, inputs.router, inputs.correction_bias)
    return affinity_choices(scores, inputs.router.top_k, inputs.rows, inputs.rows,
                            knobs.alpha, knobs.beta)


def keep_piggyback(inputs: PolicyInputs, knobs: SelectionKnobs) -> torch.Tensor:
    ids = inputs.batch.stock.ids  # [T,K]
    top_k = ids.shape[1]
    slots = torch.arange(top_k, device=ids.device) < knobs.k0.clamp(1, top_k)  # [K]
    own = torch.zeros(inputs.logits.shape, dtype=torch.bool, device=ids.device)
    own.scatter_(1, ids, inputs.rows[:, None] & slots[None, :])
    return own.any(dim=0)


def keep_coverage(inputs: PolicyInputs, knobs: SelectionKnobs) -> torch.Tensor:
    importance = inputs.batch.importance  # [E]
    order = torch.argsort(importance, descending=True, stable=True)
    ranked = importance[order]
    before = torch.cumsum(ranked, dim=0) - ranked  # mass of the experts ranked above
    target = knobs.coverage.clamp(0.0, 1.0) * importance.sum()
    keep_ranked = (before < target) & (ranked > 0)
    return torch.zeros_like(keep_ranked).scatter(0, order, keep_ranked)


def keep_by_code(inputs: PolicyInputs, knobs: SelectionKnobs,
                 policies: Mapping[str, KeepPolicy] | None = None) -> torch.Tensor:
    """Every named policy, then the one ``knobs.policy_code`` selects (device-side choice)."""
    table = policies if policies is not None else KEEP_POLICIES
    keep = keep_off(inputs, knobs)
    for code, name in enumerate(POLICY_NAMES):
        if name != "off":
            keep = torch.where(knobs.policy_code == code, table[name](inputs, knobs), keep)
    return keep


KEEP_POLICIES: Mapping[str, KeepPolicy] = MappingProxyType({
    "off": keep_off,
    "budget": keep_budget,
    "affinity": keep_affinity,
    "piggyback": keep_piggyback,
    "coverage": keep_coverage,
    "by_code": keep_by_code,
})


def keep_policy(name: str, policies: Mapping[str, KeepPolicy] | None = None) -> KeepPolicy:
    """The policy registered under ``name`` (ValueError naming the known ones otherwise)."""
    table = policies if policies is not None else KEEP_POLICIES
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown selection policy {name!r}; known: {sorted(table)}") from None
