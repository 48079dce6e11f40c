"""Capturability on the CPU: each policy's step compiles with fullgraph=True (no graph break, no
data-dependent Python branch), and knob changes (``fill_``) take effect without recompiling."""

from __future__ import annotations

import pytest
import torch

from lynx.selection import batch_keep_mask, masking_bias
from lynx.sglang_plugin.selection_glue import layer_statistics

torch._dynamo.config.cache_size_limit = 64


def make_step(policy: str, top_k: int):
    def step(logits: torch.Tensor, n_valid: torch.Tensor, prunable_start: torch.Tensor,
             enabled: torch.Tensor, budget: torch.Tensor, alpha: torch.Tensor,
             beta: torch.Tensor, k0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.arange(logits.shape[0])
        valid = rows < n_valid
        prunable = valid & (rows >= prunable_start) & enabled
        keep = batch_keep_mask(policy, logits, top_k=top_k, row_valid=valid,
                               row_prunable=prunable, budget=budget, alpha=alpha, beta=beta,
                               k0=k0)
        stats = layer_statistics(torch.softmax(logits, -1), top_k, keep, prunable)
        return masking_bias(keep, prunable), stats

    return step


@pytest.mark.parametrize("policy", ["budget", "affinity", "piggyback"])
def test_step_compiles_fullgraph_and_follows_knobs_without_recompile(policy: str) -> None:
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(24, 16, generator=gen) * 2 + torch.randn(16, generator=gen)[None]
    knobs = {
        "n_valid": torch.tensor(20), "prunable_start": torch.tensor(4),
        "enabled": torch.tensor(True), "budget": torch.tensor(14), "alpha": torch.tensor(3.0),
        "beta": torch.tensor(2.0), "k0": torch.tensor(2),
    }
    eager = make_step(policy, 4)
    compiled = torch.compile(eager, fullgraph=True, backend="aot_eager", dynamic=False)
    bias, stats = compiled(logits, **knobs)
    ref_bias, ref_stats = eager(logits, **knobs)
    assert torch.equal(bias, ref_bias) and torch.allclose(stats, ref_stats)
    assert bool((bias[:4] == 0).all()) and bool((bias[20:] == 0).all())  # prefill + padding rows

    with torch._dynamo.config.patch(error_on_recompile=True):
        knobs["budget"].fill_(4)
        knobs["alpha"].fill_(1.0)
        knobs["k0"].fill_(1)
        tight_bias, _ = compiled(logits, **knobs)
        assert torch.equal(tight_bias, eager(logits, **knobs)[0])
        knobs["enabled"].fill_(False)
        off_bias, off_stats = compiled(logits, **knobs)
    assert bool((off_bias == 0).all()) and float(off_stats[-1]) == 0.0
    if policy == "budget":  # a tighter budget masks more
        assert int((tight_bias < 0).sum()) > int((bias < 0).sum())
