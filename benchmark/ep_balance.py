"""Expert-parallel balance at production scale (simulation; issue 24): how many experts the
busiest EP rank reads per MoE layer-step, stock vs Lynx's global budget vs its per-rank level
(`lynx.selection.ep`), compared at equal routing mass kept.

Shape legend: T rows of a decode batch (TP+EP: every rank sees the whole batch), E experts,
R EP ranks (contiguous blocks of E/R experts, SGLang's layout), K top_k.

Routing: `benchmark.routing_data.SyntheticSkew` logits (fitted to the trained fine-grained
reference model), biased routers with a correction bias ~ 5 + N(0, 0.05) (DeepSeek-V3's real
biases sit near +5). For each (model, R, T) and variant, the smallest budget whose routing mass
kept reaches ``--mass`` (binary search: mass is monotone in the budget for both rules), then
per rank: active experts (max, mean) and token pairs routed there (max). Writes
``benchmark/results/ep_balance.json`` (one row per model, ep, batch, variant), and under
``dp_allreduce`` the stated cost of DP attention's one all-reduce per MoE layer
(`allreduce_cost`).

    python benchmark/ep_balance.py [--ep 4 8 16 32 64] [--batches 8 32 128 256] [--draws 3]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmark.common import RESULTS_DIR, markdown_table, rounded, write_json
from benchmark.routing_data import SyntheticSkew
from lynx.selection import STAT_FIELDS, RouterSpec, make_knobs, select_layer_step
from lynx.selection.ep import rank_loads

MODELS = {  # public config.json values (routed experts)
    "DeepSeek-V3": (256, RouterSpec(top_k=8, scoring="sigmoid", num_expert_group=8,
                                    topk_group=4, has_correction_bias=True)),
    "Qwen3-235B-A22B": (128, RouterSpec(top_k=8)),
    "Kimi-K2": (384, RouterSpec(top_k=8, scoring="sigmoid", has_correction_bias=True)),
}
MASS, KEPT = STAT_FIELDS.index("mass_kept"), STAT_FIELDS.index("mass_total")
MOE_LAYERS = {"DeepSeek-V3": 58, "Qwen3-235B-A22B": 94, "Kimi-K2": 60}  # config.json:
# num_hidden_layers minus the dense first_k_dense_replace layers


def allreduce_cost(eps: list[int], alpha_us: float, gbs: float) -> list[dict]:
    """DP attention's one all-reduce per MoE layer of a [3, E] int64 tensor
    (`lynx.selection.global_batch`), stated model: a ring of R ranks, 2(R-1) steps of latency
    ``alpha_us`` each plus 2(R-1)/R of the bytes at ``gbs`` GB/s per link (the upper estimate),
    and a binary tree, 2 ceil(log2 R) steps plus twice the bytes (the lower one; NCCL picks
    a tree or low-latency protocol for messages this small)."""
    rows = []
    for name, (experts, _) in MODELS.items():
        size = 3 * experts * 8
        for ranks in eps:
            us = 2 * (ranks - 1) * alpha_us + 2 * (ranks - 1) / ranks * size / (gbs * 1e3)
            tree = 2 * math.ceil(math.log2(ranks)) * alpha_us + 2 * size / (gbs * 1e3)
            rows.append({"model": name, "ep": ranks, "bytes": size, "us_per_layer": rounded(us),
                         "ms_per_step": rounded(us * MOE_LAYERS[name] / 1e3),
                         "tree_us_per_layer": rounded(tree),
                         "tree_ms_per_step": rounded(tree * MOE_LAYERS[name] / 1e3)})
    return rows


def _select(logits: torch.Tensor, router: RouterSpec, bias: torch.Tensor | None,
            budget: int) -> object:
    rows = torch.ones(logits.shape[0], dtype=torch.bool)
    return select_layer_step("budget", logits, router, make_knobs(budget=budget), rows, rows,
                             bias)


def _mass(selection: object) -> float:
    stats = selection.stats  # type: ignore[attr-defined]
    return float(stats[MASS] / stats[KEPT])


def at_mass(logits: torch.Tensor, router: RouterSpec, bias: torch.Tensor | None,
            target: float) -> object:
    """The selection at the smallest budget whose routing mass kept reaches ``target``."""
    low, high = 1, logits.shape[1]
    while low < high:
        mid = (low + high) // 2
        if _mass(_select(logits, router, bias, mid)) >= target:
            high = mid
        else:
            low = mid + 1
    return _select(logits, router, bias, low)


def rank_row(keep: torch.Tensor, ids: torch.Tensor, ranks: int, mass: float) -> dict:
    """Per-rank load of a keep set [E] and the routed ids [T,K] that ran."""
    loads = rank_loads(keep, ranks).float()
    pairs = torch.bincount(ids.flatten() // (keep.numel() // ranks), minlength=ranks)
    return {"max_rank_experts": float(loads.max()), "mean_rank_experts": float(loads.mean()),
            "max_rank_pairs": float(pairs.max()), "mass_kept": mass}


def run(eps: list[int], batches: list[int], draws: int, target: float) -> dict:
    """Every model x R x T x variant: mean over ``draws`` decode batches."""
    rows = []
    for name, (experts, router) in MODELS.items():
        logits = SyntheticSkew(seed=3).logits(1, max(batches) * draws, experts)[0]
        gen = torch.Generator().manual_seed(4)
        bias = (torch.randn(experts, generator=gen) * 0.05 + 5.0
                if router.has_correction_bias else None)
        for ranks in (r for r in eps if experts % r == 0):
            ep_router = replace(router, ep_ranks=ranks)
            for batch in batches:
                cells: dict[str, list[dict]] = {"stock": [], "global": [], "ep_aware": []}
                for z in logits[: batch * draws].view(draws, batch, experts):
                    stock = _select(z, router, bias, experts)  # budget E: nothing dropped
                    union = torch.zeros(experts, dtype=torch.bool)
                    union[stock.topk_ids.flatten()] = True
                    cells["stock"].append(rank_row(union, stock.topk_ids, ranks, 1.0))
                    for variant, spec in (("global", router), ("ep_aware", ep_router)):
                        sel = at_mass(z, spec, bias, target)
                        cells[variant].append(rank_row(sel.keep, sel.topk_ids, ranks,
                                                       _mass(sel)))
                for variant, runs in cells.items():
                    rows.append({"model": name, "ep": ranks, "batch": batch,
                                 "variant": variant, **{
                                     key: rounded(statistics.mean(r[key] for r in runs))
                                     for key in runs[0]}})
    return {"mass_target": target, "draws": draws, "routing": SyntheticSkew(seed=3).describe(),
            "rows": rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ep", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32, 128, 256])
    parser.add_argument("--draws", type=int, default=3, help="decode batches per cell")
    parser.add_argument("--mass", type=float, default=0.9, help="routing mass kept, (0, 1]")
    parser.add_argument("--allreduce-alpha-us", type=float, default=5.0,
                        help="DP attention cost model: per-step latency of a ring all-reduce")
    parser.add_argument("--allreduce-gbs", type=float, default=400.0,
                        help="DP attention cost model: link bandwidth [GB/s] (NVLink-class)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "ep_balance.json")
    args = parser.parse_args(argv)
    if not 0.0 < args.mass <= 1.0 or args.draws < 1 or min(args.ep + args.batches) < 1 or not (
            args.allreduce_alpha_us >= 0 and args.allreduce_gbs > 0):
        parser.error("--mass must be in (0, 1]; --draws, --ep, --batches and --allreduce-gbs "
                     "positive; --allreduce-alpha-us >= 0")
    result = run(args.ep, args.batches, args.draws, args.mass)
    result["dp_allreduce"] = {"alpha_us": args.allreduce_alpha_us, "gbs": args.allreduce_gbs,
                              "rows": allreduce_cost(args.ep, args.allreduce_alpha_us,
                                                     args.allreduce_gbs)}
    write_json(args.out, result)
    print(markdown_table(["model", "EP", "T", "variant", "max rank experts", "mean",
                          "max rank pairs", "mass kept"],
                         [[r["model"], r["ep"], r["batch"], r["variant"], r["max_rank_experts"],
                           r["mean_rank_experts"], r["max_rank_pairs"], r["mass_kept"]]
                          for r in result["rows"]]))
    print(markdown_table(["model", "EP", "all-reduce bytes", "ring us/layer", "ring ms/step",
                          "tree us/layer", "tree ms/step"],
                         [[r["model"], r["ep"], r["bytes"], r["us_per_layer"], r["ms_per_step"],
                           r["tree_us_per_layer"], r["tree_ms_per_step"]]
                          for r in result["dp_allreduce"]["rows"]]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
