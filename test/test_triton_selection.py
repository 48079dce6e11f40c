"""The Triton kernels against their torch specification.

On the CPU they run in Triton's interpreter (``TRITON_INTERPRET=1``). The check runs in a
subprocess so the variable is set before Triton is imported (a test process may already hold
Triton through SGLang); it asserts the kernels really are interpreted. The test is skipped
only if a trivial probe kernel cannot run in the interpreter, with that error as the reason.
On a machine with CUDA the same check also runs on the GPU.

Shape legend: T rows, E experts, K top_k (kept small: the interpreter is slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

PROBE = textwrap.dedent("""
    import traceback
    try:
        import torch, triton, triton.language as tl

        @triton.jit
        def probe(x_ptr, BLOCK: tl.constexpr):
            offsets = tl.arange(0, BLOCK)
            tl.store(x_ptr + offsets, tl.load(x_ptr + offsets) + 1)

        x = torch.zeros(8, device=DEVICE)
        probe[(1,)](x, BLOCK=8)
        assert x.sum().item() == 8
    except Exception:
        print(json.dumps({"probe_failed": traceback.format_exc()}))
        raise SystemExit(0)
""")

CHECK = textwrap.dedent("""
    import torch
    from lynx.selection import (RouterSpec, make_knobs, select_layer_step,
                                torch_batch_routing)
    from lynx.selection.affinity import affinity_choices
    from lynx.triton_selection import launcher
    from lynx.triton_selection.stock_topk_kernel import stock_topk_kernel
    from lynx.triton_selection.affinity_kernels import affinity_support_kernel

    kinds = {type(stock_topk_kernel).__name__, type(affinity_support_kernel).__name__}
    results = {"kernel_types": sorted(kinds), "cases": []}
    shapes = [(1, 8, 2), (7, 8, 2), (20, 32, 4), (5, 60, 3), (33, 16, 8)]
    for seed, (rows, experts, top_k) in enumerate(shapes):
        gen = torch.Generator().manual_seed(seed)
        logits = (torch.randn(rows, experts, generator=gen) * 2
                  + torch.randn(experts, generator=gen)[None] * 1.5).to(torch.bfloat16)
        valid = torch.arange(rows) < max(1, rows - 2)
        prunable = valid & (torch.rand(rows, generator=gen) > 0.25)
        logits, valid, prunable = logits.to(DEVICE), valid.to(DEVICE), prunable.to(DEVICE)
        case = {"shape": [rows, experts, top_k]}
        for scoring in ("softmax", "sigmoid"):
            router = RouterSpec(top_k=top_k, scoring=scoring)
            want = torch_batch_routing(logits.float(), router, None, prunable)
            got = launcher.triton_batch_routing(logits.float(), router, None, prunable)
            case[scoring + "_ids_equal"] = torch.equal(got.stock.ids, want.stock.ids)
            case[scoring + "_gate_close"] = torch.allclose(got.stock.gate, want.stock.gate,
                                                            atol=1e-6)
            case[scoring + "_importance_close"] = torch.allclose(
                got.importance, want.importance, atol=1e-5)
            case[scoring + "_votes_equal"] = torch.equal(got.top1_votes, want.top1_votes)
            case[scoring + "_union_equal"] = torch.equal(got.union, want.union)
        for alpha, beta in ((3.0, 2.0), (1.0, 0.0), (0.7, 4.0), (8.0, 1.0)):
            a = torch.tensor(alpha, device=DEVICE)
            b = torch.tensor(beta, device=DEVICE)
            case[f"affinity_{alpha}_{beta}_equal"] = torch.equal(
                launcher.affinity_choices_triton(logits.float(), top_k, valid, prunable, a, b),
                affinity_choices(logits.float(), top_k, valid, prunable, a, b))
        grouped = RouterSpec(top_k=top_k, num_expert_group=2, topk_group=1) \\
            if experts % 2 == 0 and experts // 2 >= top_k else RouterSpec(top_k=top_k)
        policies = ("budget", "affinity", "piggyback") + (("off", "by_code") if seed == 2 else ())
        for name, router in (("plain", RouterSpec(top_k=top_k, renormalize=False)),
                             ("grouped", grouped)):
            for policy in policies:
                knobs = make_knobs(DEVICE, budget=max(1, experts // 4), k0=1,
                                   policy="affinity")
                want = select_layer_step(policy, logits, router, knobs, valid, prunable)
                got = launcher.select_layer_step_triton(policy, logits, router, knobs, valid,
                                                        prunable)
                case[f"step_{name}_{policy}_equal"] = (
                    torch.equal(got.keep, want.keep)
                    and torch.equal(got.allowed, want.allowed)
                    and torch.equal(got.topk_ids, want.topk_ids)
                    and torch.allclose(got.topk_weights, want.topk_weights, atol=1e-6)
                    and torch.allclose(got.stats, want.stats, atol=1e-4))
        results["cases"].append(case)
    print(json.dumps(results))
""")


def _run(device: str, env_extra: dict[str, str]) -> dict:
    script = f"import json\nDEVICE = {device!r}\n" + PROBE + CHECK
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **env_extra})
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    assert lines, proc.stderr[-4000:]
    result = json.loads(lines[-1])
    if "probe_failed" in result:
        pytest.skip(f"Triton cannot run a trivial kernel on {device}: {result['probe_failed']}")
    return result


def _assert_all_match(result: dict) -> None:
    assert len(result["cases"]) == 5
    for case in result["cases"]:
        failed = [key for key, ok in case.items() if key != "shape" and ok is not True]
        assert not failed, (case["shape"], failed)


def test_kernels_match_torch_spec_in_triton_interpreter_on_cpu() -> None:
    result = _run("cpu", {"TRITON_INTERPRET": "1"})
    assert result["kernel_types"] == ["InterpretedFunction"], result["kernel_types"]
    _assert_all_match(result)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_kernels_match_torch_spec_on_gpu() -> None:
    result = _run("cuda", {})
    assert result["kernel_types"] == ["JITFunction"], result["kernel_types"]
    _assert_all_match(result)
