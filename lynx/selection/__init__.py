"""Engine-agnostic batch-aware expert selection: pure functions over tensors.

Shape legend (used in every module):
- T: rows (tokens) of the step, padded size included; E: experts; K: top_k (routed experts);
- L: MoE layers (a plugin keeps one knob row per layer); G: expert groups.

Entry point: `select_layer_step(policy, logits [T,E], router, knobs, row_valid [T],
row_prunable [T], correction_bias [E] | None, row_weight=[T] | None) -> LayerSelection`
(keep [E], apply_rows [T], rerouted [T], allowed [T,E], topk_weights [T,K], topk_ids [T,K],
stats [len(STAT_FIELDS)]); an engine keeps its own routing in every row not rerouted
(`merge_rerouted`).
No engine import, no global state, no host sync: CUDA-graph capturable, knobs are tensors.
The torch code is the specification; `lynx.triton_selection` runs the hot part in Triton.
"""

from __future__ import annotations

from lynx.selection.affinity import affinity_choices
from lynx.selection.keep_rules import BatchRouting, batch_totals, finalize_keep, must_keep
from lynx.selection.policies import (
    KEEP_POLICIES,
    NO_BUDGET_LIMIT,
    POLICY_NAMES,
    KeepPolicy,
    PolicyInputs,
    SelectionKnobs,
    keep_policy,
    make_knobs,
)
from lynx.selection.ranking import rank_descending
from lynx.selection.routers import RouterSpec, StockRouting, gate_scores, stock_routing
from lynx.selection.routing import (
    MASK_MARGIN,
    apply_logit_bias,
    mask_rerouted_logits,
    masking_logit_bias,
    merge_rerouted,
    route_restricted,
    routed_weights,
    row_allowed,
    stock_gate_mass,
)
from lynx.selection.speculative import draft_depths, verify_row_weights
from lynx.selection.statistics import STAT_FIELDS, layer_statistics, statistics_dict
from lynx.selection.step import LayerSelection, select_layer_step, torch_batch_routing

__all__ = [
    "KEEP_POLICIES",
    "MASK_MARGIN",
    "NO_BUDGET_LIMIT",
    "POLICY_NAMES",
    "STAT_FIELDS",
    "BatchRouting",
    "KeepPolicy",
    "LayerSelection",
    "PolicyInputs",
    "RouterSpec",
    "SelectionKnobs",
    "StockRouting",
    "affinity_choices",
    "apply_logit_bias",
    "batch_totals",
    "draft_depths",
    "finalize_keep",
    "gate_scores",
    "keep_policy",
    "layer_statistics",
    "make_knobs",
    "mask_rerouted_logits",
    "masking_logit_bias",
    "merge_rerouted",
    "must_keep",
    "rank_descending",
    "route_restricted",
    "routed_weights",
    "row_allowed",
    "select_layer_step",
    "statistics_dict",
    "stock_gate_mass",
    "stock_routing",
    "torch_batch_routing",
    "verify_row_weights",
]
