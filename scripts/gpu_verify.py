"""GPU check stage ``verify``: speculative verify-step selection at production shapes.

A verify step of R requests x n draft tokens has R*n rows voting per request, weighted by
draft depth (`lynx.selection.speculative`). For every router of the conformance matrix at
R=16 and n in {4, 12} (64 and 192 rows, plus padding): the torch specification and its Triton
variant on the device, with the depth weights, must equal the CPU specification (keep sets
and ids bit for bit); one CUDA-graph capture per router with the weights in a static buffer,
refilled for a second tree and replayed, must equal the eager step; the eager and replayed
selection time per verify step is recorded. ``--dry-run``: the CPU specification only.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any

import torch
from gpu_common import ROUTERS, _inputs, _same

from lynx.selection import draft_depths, make_knobs, select_layer_step, verify_row_weights

REQUESTS = 16
DRAFTS = (4, 12)


def _tree_weights(requests: int, n: int, seed: int) -> torch.Tensor:
    """[R*n + 3] weights of random draft trees (each node a child of an earlier one), 0 on
    the three padding rows."""
    gen = torch.Generator().manual_seed(seed)
    depth = torch.zeros(requests, n, dtype=torch.int64)
    for i in range(1, n):
        parent = torch.randint(0, i, (requests,), generator=gen)
        depth[:, i] = depth.gather(1, parent[:, None])[:, 0] + 1
    prefix = torch.randint(5, 500, (requests,), generator=gen)
    positions = (depth + prefix[:, None]).reshape(-1)
    weights = verify_row_weights(draft_depths(positions, prefix, n), n)
    return torch.cat([weights, torch.zeros(3)])


def stage_verify(device: str, dry_run: bool) -> dict[str, Any]:
    failures: list[str] = []
    timings: dict[str, float] = {}
    cells = 0
    fns: dict[str, Any] = {"torch": select_layer_step}
    if not dry_run:
        from lynx.triton_selection.launcher import select_layer_step_triton

        fns["triton"] = select_layer_step_triton
    for name, (experts, router) in ROUTERS.items():
        for n in DRAFTS:
            rows = REQUESTS * n
            logits, bias = _inputs(experts, rows, n, router.has_correction_bias)
            weight = _tree_weights(REQUESTS, n, n)
            valid = torch.arange(logits.shape[0]) < rows
            case = (logits, bias, router, valid, weight)
            want = _run(select_layer_step, "cpu", *case)
            for label, fn in fns.items():
                cells += 1
                got = _run(fn, device, *case)
                if not _same(got, want):
                    failures.append(f"{name} {REQUESTS}x{n} {label}")
            if dry_run:
                continue
            timings[f"{name} {REQUESTS}x{n} eager_ms"] = _time(
                partial(_run, fns["triton"], device, *case))
            captured = _capture_check(logits, bias, router, valid, weight, n, device)
            if captured is not None:
                failures.append(f"{name} {REQUESTS}x{n} graph: {captured}")
    return {"ok": not failures, "cells": cells, "failures": failures, "timings_ms": timings}


def _run(fn: Any, dev: str, logits: torch.Tensor, bias: torch.Tensor | None, router: Any,
         valid: torch.Tensor, weight: torch.Tensor) -> Any:
    """One budget-2K verify selection on ``dev`` with the depth weights."""
    knobs = make_knobs(dev, budget=2 * router.top_k, policy="budget")
    v = valid.to(dev)
    return fn("budget", logits.to(dev), router, knobs, v, v,
              bias.to(dev) if bias is not None else None, row_weight=weight.to(dev))


def _time(fn: Any, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return round(sorted(times)[len(times) // 2], 4)


def _capture_check(logits: torch.Tensor, bias: torch.Tensor | None, router: Any,
                   valid: torch.Tensor, weight: torch.Tensor, n: int, device: str
                   ) -> str | None:
    """Capture once with the weights in a static buffer; refill for another tree; replay."""
    static_logits, static_weight = logits.to(device), weight.to(device)
    v = valid.to(device)
    b = bias.to(device) if bias is not None else None
    knobs = make_knobs(device, budget=2 * router.top_k, policy="budget")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for _ in range(2):
            select_layer_step("by_code", static_logits, router, knobs, v, v, b,
                              row_weight=static_weight)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = select_layer_step("by_code", static_logits, router, knobs, v, v, b,
                                row_weight=static_weight)
    static_weight.copy_(_tree_weights(REQUESTS, n, n + 100).to(device))
    graph.replay()
    torch.cuda.synchronize()
    want = select_layer_step("budget", static_logits, router, knobs, v, v, b,
                             row_weight=static_weight)
    return None if _same(out, want) else "replay differs from eager"
