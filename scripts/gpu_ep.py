"""GPU check: the MoE layer as one grouped GEMM (`grouped_moe`, PyTorch's ``torch._grouped_mm``)
and the expert-parallel stage (`stage_ep_balance`): per EP rank, the time of its block of
experts; the step waits for the slowest rank (used by `gpu_check.py`; no SGLang needed).

Shape legend: B rows, E experts, K top_k, H hidden, I expert FFN width, R EP ranks, P routed
(row, expert) pairs, G groups (experts of a block).

`grouped_moe` takes the pairs sorted by expert (`grouped_plan`, built before timing) and runs
the gate/up and down projections as one grouped GEMM each over the block's experts: an expert
with no rows is an empty group, so its weights are never read, and the layer's cost follows
the experts used (a per-expert Python loop hides that at decode behind its launch cost). Each
group's rows are padded to ``align`` (16: what the bf16 grouped GEMM wants; the padding rows
are zero and cost no weight reads).
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import torch

from lynx.selection import RouterSpec, make_knobs, select_layer_step
from lynx.selection.ep import rank_loads

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_common import timer


class GroupedPlan(NamedTuple):
    """Where a block's pairs go in the padded grouped-GEMM buffer (routing only: built once,
    outside any timed region, so the timed part has no host sync)."""

    picked: torch.Tensor  # [P'] flat pair index of this block's pairs, by expert
    slot: torch.Tensor  # [P'] their rows in the padded buffer
    rows: torch.Tensor  # [P'] their token rows
    offs: torch.Tensor  # [G] int32 end of each group in the buffer
    size: int  # buffer rows


def grouped_plan(ids: torch.Tensor, groups: int, first: int = 0, align: int = 16
                 ) -> GroupedPlan:
    """The plan for the pairs of ``ids`` [B,K] routed to experts [first, first + G)."""
    local = ids.flatten() - first  # [P]
    mine = (local >= 0) & (local < groups)
    local = torch.where(mine, local, groups)  # pairs of other blocks sort last
    order = torch.argsort(local, stable=True)
    counts = torch.bincount(local, minlength=groups + 1)[:groups]  # [G]
    padded = (counts + align - 1) // align * align
    ends = torch.cumsum(padded, 0)
    n = int(counts.sum())
    picked = order[:n]
    expert_of = local[picked]
    within = torch.arange(n, device=ids.device) - (torch.cumsum(counts, 0) - counts)[expert_of]
    slot = (ends - padded)[expert_of] + within
    return GroupedPlan(picked, slot, picked // ids.shape[1], ends.to(torch.int32),
                       int(ends[-1]) if groups else 0)


def grouped_moe(x: torch.Tensor, weights: torch.Tensor, plan: GroupedPlan, w13: torch.Tensor,
                w2: torch.Tensor) -> torch.Tensor:
    """[B,H] output of a block's pairs (``plan``; weights [B,K]; w13 [G,2I,H], w2 [G,H,I],
    e.g. one EP rank's block): gather, two grouped GEMMs, weighted scatter-add."""
    buffer = x.new_zeros(plan.size, x.shape[1])
    buffer[plan.slot] = x[plan.rows]
    gate_up = torch._grouped_mm(buffer, w13.transpose(-2, -1), offs=plan.offs)  # [rows, 2I]
    gate, up = gate_up.chunk(2, dim=-1)
    y = torch._grouped_mm(torch.nn.functional.silu(gate) * up, w2.transpose(-2, -1),
                          offs=plan.offs)  # [rows, H]
    out = torch.zeros_like(x)
    out.index_add_(0, plan.rows, y[plan.slot] * weights.flatten()[plan.picked, None].to(y.dtype))
    return out


SHAPES = (("Qwen3-30B-A3B", 128, 8, 2048, 768), ("DeepSeek-V2-Lite", 64, 6, 2048, 1408))
DRY_SHAPES = (("tiny-fine", 16, 4, 64, 32),)


def stage_ep_balance(device: str, dry_run: bool) -> dict[str, Any]:
    """Per EP rank R in {4, 8} (dry run: 2), stock vs global budget vs the per-rank level at
    the same budget m = E/4: each rank's block timed alone (grouped GEMM), the step's time =
    the slowest rank's; median of interleaved repetitions."""
    dtype = torch.float32 if dry_run else torch.bfloat16
    reps, clock = (2 if dry_run else 15), timer(device)
    rows_out = []
    for name, experts, top_k, hidden, ffn in (DRY_SHAPES if dry_run else SHAPES):
        gen = torch.Generator().manual_seed(0)
        w13 = (torch.randn(experts, 2 * ffn, hidden, generator=gen) * 0.02).to(dtype).to(device)
        w2 = (torch.randn(experts, hidden, ffn, generator=gen) * 0.02).to(dtype).to(device)
        skew = torch.randn(experts, generator=gen) * 1.5
        for ranks in ((2,) if dry_run else (4, 8)):
            block = experts // ranks
            for batch in ((4, 16) if dry_run else (16, 64, 128)):
                x = torch.randn(batch, hidden, generator=gen).to(dtype).to(device)
                logits = (skew[None] + torch.randn(batch, experts, generator=gen) * 1.5
                          ).to(device)
                everyone = torch.ones(batch, dtype=torch.bool, device=device)
                base = RouterSpec(top_k=top_k)
                routes = {"stock": select_layer_step("off", logits, base, make_knobs(device),
                                                     everyone, everyone)}
                knobs = make_knobs(device, budget=experts // 4, policy="budget")
                routes["global"] = select_layer_step("budget", logits, base, knobs, everyone,
                                                     everyone)
                routes["ep_aware"] = select_layer_step(
                    "budget", logits, replace(base, ep_ranks=ranks), knobs, everyone, everyone)
                calls = {v: [partial(grouped_moe, x, sel.topk_weights,
                                     grouped_plan(sel.topk_ids, block, r * block),
                                     w13[r * block:(r + 1) * block], w2[r * block:(r + 1) * block])
                             for r in range(ranks)] for v, sel in routes.items()}
                times: dict[str, list[float]] = {v: [] for v in routes}
                for rep in range(reps + 1):  # the first is a warm-up
                    for variant, per_rank in calls.items():
                        slowest = max(clock(call) for call in per_rank)
                        if rep:
                            times[variant].append(slowest)
                for variant, sel in routes.items():
                    used = torch.zeros(experts, dtype=torch.bool, device=device)
                    used[sel.topk_ids.flatten()] = True
                    loads = rank_loads(used, ranks)
                    rows_out.append({
                        "shape": name, "ep": ranks, "batch": batch, "variant": variant,
                        "max_rank_experts": int(loads.max()),
                        "mean_rank_experts": round(float(loads.float().mean()), 2),
                        "slowest_rank_ms": round(statistics.median(times[variant]), 4)})
    by_cell: dict[tuple, dict[str, dict]] = {}
    for row in rows_out:
        by_cell.setdefault((row["shape"], row["ep"], row["batch"]), {})[row["variant"]] = row
    ok = all(c["ep_aware"]["max_rank_experts"] <= c["global"]["max_rank_experts"]
             <= c["stock"]["max_rank_experts"] for c in by_cell.values())
    return {"ok": ok, "dtype": str(dtype), "budget": "E/4", "rows": rows_out}
