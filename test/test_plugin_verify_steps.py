"""The plugin's classification of SGLang's speculative verify steps (TARGET_VERIFY): their
own step mode, rows and per-request vote weights, pruned only under ``prune_verify``."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from sglang.srt.model_executor.forward_batch_info import ForwardMode
from sglang.srt.speculative.ngram_info import NgramVerifyInput

from lynx.sglang_plugin.step_state import VERIFY_SLOT, RuntimeState, layout_from_forward_batch
from lynx_protocol.policy import BudgetBucket, PolicySpec


def _verify_batch(requests: int, n: int, prefix: list[int]) -> SimpleNamespace:
    positions = torch.cat([torch.tensor(p) + torch.tensor([0] + [1] * (n - 1))
                           for p in prefix])
    spec = NgramVerifyInput(draft_token=torch.zeros(requests * n, dtype=torch.int64),
                            custom_mask=torch.ones(requests * n * n, dtype=torch.bool),
                            positions=positions, draft_token_num=n)
    return SimpleNamespace(forward_mode=ForwardMode.TARGET_VERIFY, batch_size=requests,
                           spec_info=spec, seq_lens=torch.tensor(prefix))


def test_target_verify_is_its_own_mode_pruned_only_under_prune_verify() -> None:
    layout = layout_from_forward_batch(_verify_batch(3, 4, [5, 9, 2]))
    assert (layout.mode, layout.n_valid, layout.prunable_start, layout.draft_tokens) == \
        ("verify", 12, 0, 4)
    assert layout.row_weight is not None
    assert torch.allclose(layout.row_weight.view(3, 4)[:, 0], torch.full((3,), 0.4))
    budget = [BudgetBucket(max_batch=1 << 20, all_layers=2)]
    state = RuntimeState(2, 8, 2, torch.device("cpu"), PolicySpec(name="budget", budgets=budget))
    assert state.begin_step(layout) is False  # default: verify steps routed stock
    assert state.row_weight is None
    state.stage_policy(PolicySpec(name="budget", budgets=budget, prune_verify=True), 1)
    assert state.begin_step(layout) is True
    assert state.row_weight is layout.row_weight
    assert int(state.knobs.stat_slot) == VERIFY_SLOT
    assert int(state.knobs.n_valid) == 12
