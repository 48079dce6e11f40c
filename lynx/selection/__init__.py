"""Engine-agnostic batch-aware expert selection: pure functions over tensors.

Shape legend (used in every module):
- T: rows (tokens) of the step, padded size included; E: experts; K: top_k;
- L: MoE layers (a plugin keeps one knob row per layer); G: expert groups.

Entry point: `select_layer_step(policy, logits [T,E], router, knobs, row_valid [T],
row_prunable [T], correction_bias [E] | None) -> LayerSelection` (keep [E], apply_rows [T],
logit_bias [T,E] | None, correction_bias [T,E] | None, stats [len(STAT_FIELDS)]).
No engine import, no global state, no host sync: CUDA-graph capturable, knobs are tensors.
The torch code is the specification; `lynx.triton_selection` runs the hot part in Triton.
"""

from __future__ import annotations

from lynx.selection.affinity import affinity_choices, rank_descending
from lynx.selection.compat import (
    batch_importance,
    batch_keep_mask,
    ensure_groups,
    keep_affinity,
    keep_all,
    keep_budget,
    keep_piggyback,
    restrict_to_groups,
    route_stock,
    route_with_keep,
)
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
from lynx.selection.routers import RouterSpec, StockRouting, stock_routing
from lynx.selection.routing import (
    MASK_VALUE,
    masked_correction_bias,
    masking_bias,
    rescale_to_stock_mass,
    route_reference,
    route_with_mask,
    shared_masked_correction_bias,
    stock_gate_mass,
)
from lynx.selection.statistics import STAT_FIELDS, layer_statistics, statistics_dict
from lynx.selection.step import LayerSelection, select_layer_step, torch_batch_routing

POLICIES = POLICY_NAMES  # earlier name

__all__ = [
    "KEEP_POLICIES", "MASK_VALUE", "NO_BUDGET_LIMIT", "POLICIES", "POLICY_NAMES",
    "STAT_FIELDS", "BatchRouting", "KeepPolicy", "LayerSelection", "PolicyInputs",
    "RouterSpec", "SelectionKnobs", "StockRouting", "affinity_choices", "batch_importance",
    "batch_keep_mask", "batch_totals", "ensure_groups", "finalize_keep", "keep_affinity",
    "keep_all", "keep_budget", "keep_piggyback", "keep_policy", "layer_statistics",
    "make_knobs", "masked_correction_bias", "masking_bias", "must_keep", "rank_descending",
    "rescale_to_stock_mass", "restrict_to_groups", "route_reference", "route_stock",
    "route_with_keep", "route_with_mask", "select_layer_step", "shared_masked_correction_bias",
    "statistics_dict", "stock_gate_mass", "stock_routing", "torch_batch_routing",
]
