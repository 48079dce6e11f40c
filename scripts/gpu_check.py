"""One-shot GPU check of the selection library (no SGLang needed: the GPU machine has none).

    python scripts/gpu_check.py [--stage NAME] [--dry-run] [--out DIR]

NAME: selection, capture, nondrop, verify, moe_layer, selection_cost, ep_balance (default:
all, in that order).

Stages (results are written to ``$OUT`` or ``--out`` as each stage finishes):
- ``selection``: the library-level conformance cells on the device: `select_layer_step` (torch
  specification) and its Triton variant for the router of every real checkpoint of the
  conformance matrix, at T in {1, 4, 16, 64} with padding rows, under every policy; keep sets
  and routed ids must equal the CPU specification bit for bit, weights and stats allclose.
- ``capture``: one CUDA-graph capture per router of the selection step as the plugin drives
  it (``by_code``, knobs in device tensors), then off -> budget -> affinity -> piggyback -> off
  switches by ``fill_`` and replay; every replay must equal the eager step; no recapture.
- ``nondrop`` (`gpu_nondrop`): Lynx changes only what it prunes, under CUDA-graph capture:
  the selection step (Triton) + `merge_rerouted` + `mask_rerouted_logits` captured once per
  router; a budget that drops nothing replays to the engine's own ids, weights and logits bit
  for bit, a binding one changes exactly the rows whose own top-K holds a dropped expert.
- ``verify`` (`gpu_verify`): speculative verify-step selection (16 requests x 4 / 12 draft
  tokens, per-request depth weights), Triton vs specification and one graph capture per router.
- ``moe_layer`` / ``selection_cost`` (`gpu_moe`): one MoE layer at full production shapes in
  bf16, stock routing vs Lynx's (budget 2K), against the weights-read bound; the selection
  step's own cost, eager and graph-replayed.
- ``ep_balance`` (`gpu_ep`): expert parallelism on one GPU: the experts split into R = 4, 8
  blocks, each block timed alone as a grouped GEMM, the step = the slowest block; stock vs the
  global budget vs the per-rank level at m = E/4 (`lynx.selection.ep`).
``--dry-run`` runs the same set-up on the CPU (no Triton, no graphs, tiny shapes in fp32), so
the script is known to start before a GPU is ever available.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lynx.selection import POLICY_NAMES, RouterSpec, make_knobs, select_layer_step

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_common import POLICIES, ROUTERS, _inputs, _same
from gpu_ep import stage_ep_balance
from gpu_moe import stage_moe_layer, stage_selection_cost
from gpu_nondrop import stage_nondrop
from gpu_verify import stage_verify


def _step(fn: Any, policy: str, logits: torch.Tensor, router: RouterSpec, rows: int,
          bias: torch.Tensor | None, device: str, budget: int) -> Any:
    knobs = make_knobs(device, budget=budget, policy=policy if policy != "by_code" else "off")
    valid = torch.arange(logits.shape[0], device=device) < rows
    b = bias.to(device) if bias is not None else None
    return fn(policy, logits.to(device), router, knobs, valid, valid, b)


def stage_selection(device: str, dry_run: bool) -> dict[str, Any]:
    variants: dict[str, Any] = {"torch": select_layer_step}
    if not dry_run:
        from lynx.triton_selection.launcher import select_layer_step_triton

        variants["triton"] = select_layer_step_triton
    failures: list[str] = []
    cells = 0
    for name, (experts, router) in ROUTERS.items():
        for rows in (1, 4, 16, 64):
            logits, bias = _inputs(experts, rows, rows, router.has_correction_bias)
            for policy in POLICIES:
                budget = 2 * router.top_k
                want = _step(select_layer_step, policy, logits, router, rows, bias, "cpu",
                             budget)
                for label, fn in variants.items():
                    got = _step(fn, policy, logits, router, rows, bias, device, budget)
                    cells += 1
                    if not _same(got, want):
                        failures.append(f"{name} T={rows} {policy} {label}")
    return {"cells": cells, "failures": failures, "ok": not failures}


def stage_capture(device: str, dry_run: bool) -> dict[str, Any]:
    if dry_run:  # graphs need CUDA: check the eager by_code path the capture would record
        return {"ok": True, "captured": 0, "note": "dry run: eager by_code only"}
    failures: list[str] = []
    for name, (experts, router) in ROUTERS.items():
        logits, bias = _inputs(experts, 32, 7, router.has_correction_bias)
        logits = logits.to(device)
        b = bias.to(device) if bias is not None else None
        knobs = make_knobs(device, budget=2 * router.top_k, policy="off")
        valid = torch.arange(logits.shape[0], device=device) < 32
        static_in = logits.clone()
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up outside the graph
                select_layer_step("by_code", static_in, router, knobs, valid, valid, b)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = select_layer_step("by_code", static_in, router, knobs, valid, valid, b)
        for policy, budget in (("off", 0), ("budget", 2 * router.top_k), ("budget", 64),
                               ("affinity", 0), ("piggyback", 0), ("off", 0)):
            knobs.policy_code.fill_(POLICY_NAMES.index(policy))
            if budget:
                knobs.budget.fill_(budget)
            graph.replay()
            torch.cuda.synchronize()
            want = select_layer_step(policy, static_in, router, knobs, valid, valid, b)
            if not _same(out, want):
                failures.append(f"{name} {policy} m={budget}")
    return {"ok": not failures, "captured": len(ROUTERS), "failures": failures}


STAGES = {"selection": stage_selection, "capture": stage_capture, "nondrop": stage_nondrop,
          "moe_layer": stage_moe_layer, "selection_cost": stage_selection_cost,
          "verify": stage_verify, "ep_balance": stage_ep_balance}


def _timed_out(*_: object) -> None:
    raise TimeoutError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=sorted(STAGES), action="append")
    parser.add_argument("--dry-run", action="store_true", help="set-up and checks on the CPU")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_check_out")))
    parser.add_argument("--stage-timeout", type=int, default=90,
                        help="seconds one stage may run before it is recorded as timed out")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: use --dry-run")
    device = "cpu" if args.dry_run else "cuda"
    args.out.mkdir(parents=True, exist_ok=True)
    ok = True
    for stage in args.stage or list(STAGES):
        start = time.perf_counter()
        signal.signal(signal.SIGALRM, _timed_out)
        signal.alarm(args.stage_timeout)
        try:
            result = STAGES[stage](device, args.dry_run)
        except TimeoutError:
            result = {"ok": False, "error": f"timed out after {args.stage_timeout} s"}
        finally:
            signal.alarm(0)
        result.update(stage=stage, device=device, seconds=round(time.perf_counter() - start, 2))
        if device == "cuda":
            result["device_name"] = torch.cuda.get_device_name()
        (args.out / f"{stage}.json").write_text(json.dumps(result, indent=1) + "\n")
        print(f"[gpu_check] {stage}: {'ok' if result['ok'] else 'FAILED'} "
              f"({result['seconds']} s)", flush=True)
        ok = ok and result["ok"]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
