"""The Triton kernel against its torch specification: on the CPU through Triton's interpreter
(``TRITON_INTERPRET=1``, in a subprocess so the flag is set before triton loads), and on a GPU
when one is present."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

CHECK = textwrap.dedent("""
    import json, sys, torch
    from lynx.selection.policies import batch_importance, keep_budget
    from lynx.triton_selection.launcher import batch_importance_triton, keep_budget_triton
    device = sys.argv[1]
    results = []
    for seed, (rows, experts, top_k) in enumerate([(1, 8, 2), (7, 8, 2), (16, 32, 4),
                                                   (33, 64, 6), (5, 60, 3)]):
        gen = torch.Generator().manual_seed(seed)
        logits = (torch.randn(rows, experts, generator=gen) * 2
                  + torch.randn(experts, generator=gen)[None] * 2).to(device)
        prunable = (torch.rand(rows, generator=gen) > 0.25).to(device)
        want_imp, want_votes = batch_importance(torch.softmax(logits, -1), top_k, prunable)
        imp, votes = batch_importance_triton(logits, top_k, prunable)
        budget = torch.tensor(max(1, experts // 4), device=device)
        same_keep = torch.equal(keep_budget_triton(logits, top_k, prunable, budget),
                                keep_budget(torch.softmax(logits, -1), top_k, prunable, budget))
        results.append({
            "shape": [rows, experts, top_k],
            "importance_close": bool(torch.allclose(imp, want_imp, atol=1e-5)),
            "votes_equal": bool(torch.equal(votes, want_votes)),
            "keep_equal": bool(same_keep),
        })
    print(json.dumps(results))
""")


def _run(device: str, env_extra: dict[str, str]) -> list[dict]:
    proc = subprocess.run([sys.executable, "-c", CHECK, device], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **env_extra})
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    return json.loads(proc.stdout.strip().splitlines()[-1])


def _assert_all_match(results: list[dict]) -> None:
    assert len(results) == 5
    for case in results:
        assert case["importance_close"] and case["votes_equal"] and case["keep_equal"], case


def test_kernel_matches_torch_spec_in_triton_interpreter_on_cpu() -> None:
    _assert_all_match(_run("cpu", {"TRITON_INTERPRET": "1"}))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_kernel_matches_torch_spec_on_gpu() -> None:
    _assert_all_match(_run("cuda", {}))
