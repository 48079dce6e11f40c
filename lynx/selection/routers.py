"""Router kinds and their stock (unpruned) routing, computed the way SGLang computes it.

Shape legend: T rows (tokens) of the step, E experts, K top_k, G expert groups.

Every router scores each expert (``gate``: softmax or sigmoid of the logits), *chooses* by a
score (``choice``: the logits, or ``gate + correction_bias`` for DeepSeek-V3 style routers),
optionally first restricts each row to its ``topk_group`` best groups, takes the top-K by
choice and gives each chosen expert a weight: its gate value (renormalised over the K when
``renormalize``), or its raw logit for runners that route on raw logits (SGLang's flashinfer
TRT-LLM routed path; softmax over the K when ``renormalize``); times the routed scaling factor
where SGLang applies it inside TopK (``scale_on_output``). `stock_routing` reproduces the
selection in fp32 with deterministic ties (lower expert index first); it is the ground truth
the policies and statistics are built on.

Router kinds of SGLang 0.5.23 and their `RouterSpec` (from the checkpoints' config.json):
- softmax top-K, renormalised or not (Mixtral, Qwen2/3-MoE, OLMoE, GPT-OSS with router bias);
- grouped softmax (DeepSeek-V2: groups scored by their best expert);
- sigmoid + correction bias, one group or grouped by top-2 sums (DeepSeek-V3, GLM-4.5, Kimi-K2);
- fused shared experts (``shared_slots``: SGLang appends them as the last TopK columns; Lynx
  never prunes or counts them: the library routes the ``top_k`` routed experts only).
Custom routing functions (Llama-4) are not router kinds here: the engine glue passes them
through.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

from lynx.selection.ranking import stable_top_k

RENORMALIZE_EPSILON = 1.0e-20  # SGLang's _RENORMALIZE_SUM_EPSILON
EXCLUDED = -1.0e4  # logit-domain value of experts outside a row's chosen groups (finite)


@dataclass(frozen=True)
class RouterSpec:
    """Static description of one MoE layer's router (a Python constant per layer).

    ``scoring``: how gate values come from logits. ``num_expert_group``/``topk_group``: grouped
    routing (DeepSeek); groups score by their best expert, or by the sum of their top-2 choice
    scores when the router has a correction bias. ``has_correction_bias``: the router chooses by
    ``gate + bias`` (a [E] tensor passed next to the logits); Lynx then masks that bias, never
    the logits.
    """

    top_k: int  # routed experts per row (fused shared slots excluded)
    renormalize: bool = True
    scoring: Literal["softmax", "sigmoid"] = "softmax"
    num_expert_group: int | None = None
    topk_group: int | None = None
    has_correction_bias: bool = False
    weights: Literal["gate", "raw_logits"] = "gate"  # raw_logits: weight = the chosen logit
    routed_scaling_factor: float | None = None
    scale_on_output: bool = False  # the factor multiplies the TopK weights (else: later)
    shared_slots: int = 0  # fused shared-expert columns the engine appends (never pruned)
    ep_ranks: int = 1  # expert-parallel ranks holding contiguous blocks of E/R experts
    ep_balance: bool = True  # with ep_ranks > 1: budgets are spent per rank (`selection.ep`)

    @property
    def grouped(self) -> bool:
        return bool(self.num_expert_group and self.num_expert_group > 1 and self.topk_group)

    @property
    def groups_score_top2(self) -> bool:
        """Groups are scored by the sum of their two best choice scores (biased routers)."""
        return self.grouped and self.has_correction_bias

    @property
    def output_scale(self) -> float:
        """Factor the routed weights carry in the TopK output (1 unless ``scale_on_output``)."""
        if self.scale_on_output and self.routed_scaling_factor is not None:
            return float(self.routed_scaling_factor)
        return 1.0

    def check(self, num_experts: int) -> None:
        """Raise ValueError if the spec cannot route ``num_experts`` experts."""
        if not 1 <= self.top_k <= num_experts:
            raise ValueError(f"top_k={self.top_k} must be in [1, {num_experts}]")
        if self.ep_ranks < 1 or num_experts % self.ep_ranks:
            raise ValueError(f"{num_experts} experts do not split into {self.ep_ranks} EP ranks")
        if self.scoring not in ("softmax", "sigmoid"):
            raise ValueError(f"unsupported scoring {self.scoring!r}")
        if self.weights == "raw_logits" and (self.scoring != "softmax" or self.grouped
                                             or self.has_correction_bias):
            raise ValueError("raw-logit weights exist only for plain softmax routers")
        if self.grouped:
            groups, chosen = self.num_expert_group or 0, self.topk_group or 0
            if num_experts % groups:
                raise ValueError(f"{num_experts} experts do not split into {groups} groups")
            per_group = num_experts // groups
            if not 1 <= chosen <= groups or chosen * per_group < self.top_k:
                raise ValueError(f"topk_group={chosen} of {groups} groups of {per_group} "
                                 f"experts cannot hold top_k={self.top_k}")
            if self.groups_score_top2 and per_group < 2:
                raise ValueError("top-2 group scores need at least 2 experts per group")


class StockRouting(NamedTuple):
    """The router's own decision for every row (fp32)."""

    choice: torch.Tensor  # [T,E] score the router ranks by; outside chosen groups: -inf
    ids: torch.Tensor  # [T,K] int64, best first (ids[:, 0] is the row's top-1)
    gate: torch.Tensor  # [T,K] gate value of each chosen expert, before renormalisation


def gate_scores(logits: torch.Tensor, router: RouterSpec) -> torch.Tensor:
    """[T,E] gate value of every expert."""
    z = logits.float()
    return torch.softmax(z, dim=-1) if router.scoring == "softmax" else torch.sigmoid(z)


def choice_scores(logits: torch.Tensor, router: RouterSpec,
                  correction_bias: torch.Tensor | None) -> torch.Tensor:
    """[T,E] the score the router ranks experts by, before any group restriction.

    Without a correction bias this is the logits themselves (softmax and sigmoid are monotone,
    so the ranking is the same and nothing is lost to rounding). ``correction_bias`` may be [E]
    or per row [T,E]."""
    z = logits.float()
    if not router.has_correction_bias:
        return z
    if correction_bias is None:
        raise ValueError("router has a correction bias but none was passed")
    bias = correction_bias.float()
    return gate_scores(z, router) + (bias if bias.dim() == 2 else bias[None, :])


def chosen_groups(choice: torch.Tensor, router: RouterSpec) -> torch.Tensor:
    """[T,G] bool: the ``topk_group`` groups each row routes within (ties: lower group)."""
    rows, experts = choice.shape
    groups = router.num_expert_group
    assert groups is not None and router.topk_group is not None
    grouped = choice.view(rows, groups, experts // groups)
    if router.groups_score_top2:
        group_score = grouped.topk(2, dim=-1).values.sum(dim=-1)
    else:
        group_score = grouped.max(dim=-1).values
    order = torch.argsort(group_score, dim=-1, descending=True, stable=True)
    chosen = torch.zeros_like(group_score, dtype=torch.bool)
    return chosen.scatter_(1, order[:, : router.topk_group], True)


def restrict_to_chosen_groups(scores: torch.Tensor, chosen: torch.Tensor,
                              fill: float | torch.Tensor) -> torch.Tensor:
    """``scores`` [T,E] with every expert outside the row's chosen groups set to ``fill``
    (a number, or a tensor broadcastable to [T,E])."""
    rows, experts = scores.shape
    groups = chosen.shape[1]
    allowed = chosen[:, :, None].expand(rows, groups, experts // groups).reshape(rows, experts)
    return torch.where(allowed, scores, torch.as_tensor(fill, dtype=scores.dtype,
                                                        device=scores.device))


def stock_routing(logits: torch.Tensor, router: RouterSpec,
                  correction_bias: torch.Tensor | None = None) -> StockRouting:
    """The router's top-K for every row (ids best first, stable ties)."""
    choice = choice_scores(logits, router, correction_bias)
    if router.grouped:
        choice = restrict_to_chosen_groups(choice, chosen_groups(choice, router), -torch.inf)
    ids = stable_top_k(choice, router.top_k)
    gate = gate_scores(logits, router).gather(1, ids)
    return StockRouting(choice, ids, gate)


def engine_routing(logits: torch.Tensor, router: RouterSpec,
                   correction_bias: torch.Tensor | None, engine_ids: torch.Tensor
                   ) -> StockRouting:
    """The engine's own top-K decision as the stock routing (``engine_ids`` [T,K], any column
    order: SGLang returns its top-K unsorted), so that near-ties the engine broke its own way
    (bf16 logits tie often; CPU and CUDA kernels break ties differently) are what the keep
    set, the statistics and the rerouted rows are judged on.

    Ids are sorted best first by the router's choice score (ties: lower id), gates read at
    them; grouped routers route within the library's chosen groups plus any group an engine
    id lies in. Ids outside [0, E) (SGLang's -1 on padded rows) are clamped: such rows must
    not be pruned rows. Shapes: ``logits`` [T,E] (finite), ``correction_bias`` [E]."""
    experts = logits.shape[-1]
    unrestricted = choice_scores(logits, router, correction_bias)
    ids = engine_ids.long().clamp(0, experts - 1).sort(dim=1).values  # column order: gone
    ids = ids.gather(1, stable_top_k(unrestricted.gather(1, ids), ids.shape[1]))
    choice = unrestricted
    if router.grouped:
        groups = router.num_expert_group
        assert groups is not None
        chosen = chosen_groups(unrestricted, router)
        chosen = chosen.scatter(1, ids // (experts // groups), True)  # engine ids' groups too
        choice = restrict_to_chosen_groups(unrestricted, chosen, -torch.inf)
    return StockRouting(choice, ids, gate_scores(logits, router).gather(1, ids))


def affinity_logits(logits: torch.Tensor, router: RouterSpec,
                    correction_bias: torch.Tensor | None) -> torch.Tensor:
    """[T,E] logit-domain scores for AffinityBinning's bins: the log of the gate, the weight
    the router gives each expert (softmax: the logits, up to a per-row constant the bins
    subtract anyway; sigmoid: log sigmoid(z)).

    The correction bias only chooses, it never weighs (DeepSeek-V3), so it is not binned: the
    bins are then invariant to everything the router's own choice is invariant to, a constant
    shift of the bias included (binning log(sigmoid + bias) was not: it compresses every expert
    into one bin at DeepSeek-V3's biases near +5; `benchmark/affinity_bias.py`). Grouped
    routers: experts outside the row's chosen groups sit EXCLUDED below the row's best expert,
    so they fall into the deepest bin. Shapes: ``logits`` [T,E], ``correction_bias`` [E]."""
    z = logits.float()
    if router.scoring == "sigmoid":
        z = torch.nn.functional.logsigmoid(z)
    return outside_groups_excluded(z, logits, router, correction_bias)


def outside_groups_excluded(scores: torch.Tensor, logits: torch.Tensor, router: RouterSpec,
                            correction_bias: torch.Tensor | None) -> torch.Tensor:
    """[T,E] logit-domain ``scores`` with every expert outside the row's chosen groups (by
    ``logits`` [T,E] and the bias) set EXCLUDED below the row's best score; unchanged for
    routers without groups."""
    if not router.grouped:
        return scores
    chosen = chosen_groups(choice_scores(logits, router, correction_bias), router)
    return restrict_to_chosen_groups(scores, chosen,
                                     scores.max(dim=-1, keepdim=True).values + EXCLUDED)
