"""Verify-step selection: per-request, depth-weighted votes (lynx.selection.speculative).
Torch only (runs under every Python of `make python-versions`); the plugin's classification
of SGLang's TARGET_VERIFY steps is in test_plugin_verify_steps.py."""

from __future__ import annotations

import pytest
import torch

from lynx.selection import (
    RouterSpec,
    draft_depths,
    make_knobs,
    select_layer_step,
    verify_row_weights,
)
from lynx_protocol.policy import PolicySpec

ROUTER = RouterSpec(top_k=2, scoring="softmax", renormalize=True)


def test_row_weights_sum_to_one_per_request_and_favour_shallow_rows() -> None:
    depths = torch.tensor([0, 1, 1, 2, 0, 1, 2, 3])
    weights = verify_row_weights(depths, 4)
    assert torch.allclose(weights.view(2, 4).sum(dim=1), torch.ones(2))
    assert weights[0] > weights[1] > weights[3]
    assert weights[1] == weights[2]
    with pytest.raises(ValueError, match="do not split into requests of 3"):
        verify_row_weights(depths, 3)


def test_depths_from_positions_and_prefix_lengths() -> None:
    positions = torch.tensor([10, 11, 11, 12, 4, 5, 6, 7])
    assert draft_depths(positions, torch.tensor([10, 4]), 4).tolist() == [0, 1, 1, 2,
                                                                         0, 1, 2, 3]
    with pytest.raises(ValueError, match="8 draft rows for 3 requests"):
        draft_depths(positions, torch.tensor([1, 2, 3]), 4)


def _logits(rows: list[list[int]]) -> torch.Tensor:
    """Router logits whose stock top-2 per row are the listed experts (first one strongest)."""
    out = torch.full((len(rows), 8), -4.0)
    for r, (first, second) in enumerate(rows):
        out[r, first], out[r, second] = 3.0, 2.0
    return out


def test_weights_change_which_experts_a_budget_keeps_but_never_a_top1() -> None:
    # One request of 4 draft rows: the root (depth 0) needs experts {0, 1}; three deep rows
    # (depths 3) agree on {2, 3}. Unweighted, experts 2 and 3 dominate the batch importance;
    # weighted by depth, the root's second choice (1) outranks them.
    logits = _logits([[0, 1], [2, 3], [2, 3], [2, 3]])
    rows = torch.ones(4, dtype=torch.bool)
    knobs = make_knobs(budget=3, policy="budget")
    flat = select_layer_step("budget", logits, ROUTER, knobs, rows, rows)
    weight = verify_row_weights(torch.tensor([0, 3, 3, 3]), 4)
    weighted = select_layer_step("budget", logits, ROUTER, knobs, rows, rows,
                                 row_weight=weight)
    assert flat.keep.nonzero().flatten().tolist() == [0, 2, 3]
    assert weighted.keep.nonzero().flatten().tolist() == [0, 1, 2]
    for selection in (flat, weighted):  # every row's own top-1, whatever the weights
        assert bool(selection.keep[logits.argmax(dim=1)].all())
        assert torch.equal(selection.topk_ids[:, 0], logits.argmax(dim=1))
    # statistics stay unweighted row sums
    assert float(weighted.stats[6]) == 4.0


def test_prune_verify_is_encoded_only_when_set() -> None:
    import msgspec

    assert b"prune_verify" not in msgspec.json.encode(PolicySpec(name="budget"))
    wire = msgspec.json.encode(PolicySpec(name="budget", prune_verify=True))
    assert msgspec.json.decode(wire, type=PolicySpec).prune_verify is True
