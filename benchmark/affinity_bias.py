"""AffinityBinning on routers with a correction bias: which scores to bin (issue 22).

Shape legend: T rows of a decode batch, E experts, K top_k.

SGLang's biased routers (DeepSeek-V3, GLM-4.5, Kimi-K2) choose by sigmoid(z) + b and weight the
chosen experts by sigmoid(z): a constant shift of b changes nothing they do. The published
method bins logits; for these routers Lynx once binned log(clamp(sigmoid(z) + b, 1e-6)), which
moves with the shift (DeepSeek-V3's real biases sit near +5, where that log compresses every
expert into one bin). This compares, on synthetic routers of the two checkpoints' shapes
(`benchmark.routing_data.SyntheticSkew` logits, bias ~ offset + N(0, 0.05)), at B = 16/32/64:

- ``choice_log``: the former scores, log(clamp(sigmoid(z) + b, 1e-6));
- ``gate_log``: log sigmoid(z), the log of the weight SGLang gives the expert (for softmax
  routers this is the logits up to a per-row constant: the published method unchanged); what
  Lynx ships (`lynx.selection.routers.affinity_logits`);
- ``choice_offset``: (sigmoid(z) + b - row max) / 0.25, the choice score relative to the row's
  best in logit units (sigmoid's slope at 0).

Each variant keeps the union of the rows' re-ranked top-K (`lynx.selection.affinity`) with
Lynx's keep rules (`finalize_keep`) and reports experts kept, the stock union, and the stock
top-K gate mass landing on kept experts, for several bias offsets (a variant whose numbers move
with the offset is not invariant). Writes ``benchmark/results/affinity_bias.json``.

    python benchmark/affinity_bias.py [--batches 16 32 64] [--draws 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmark.common import RESULTS_DIR, markdown_table, rounded, write_json
from benchmark.routing_data import SyntheticSkew
from lynx.selection import RouterSpec, batch_totals, finalize_keep, must_keep, stock_routing
from lynx.selection.affinity import affinity_choices
from lynx.selection.routers import affinity_logits, choice_scores, outside_groups_excluded
from lynx.selection.statistics import STAT_FIELDS, layer_statistics

ROUTERS = {  # public config.json values
    "DeepSeek-V3": (256, RouterSpec(top_k=8, scoring="sigmoid", num_expert_group=8,
                                    topk_group=4, has_correction_bias=True)),
    "Kimi-K2": (384, RouterSpec(top_k=8, scoring="sigmoid", has_correction_bias=True)),
}
OFFSETS = (0.0, -1.0, 2.0, 5.0)  # DeepSeek-V3's real biases sit near +5 (min +2.02)
Scores = Callable[[torch.Tensor, RouterSpec, torch.Tensor], torch.Tensor]


VARIANTS: dict[str, Scores] = {
    "choice_log": lambda z, r, b: outside_groups_excluded(
        torch.log(choice_scores(z, r, b).clamp_min(1e-6)), z, r, b),
    "gate_log": affinity_logits,
    "choice_offset": lambda z, r, b: outside_groups_excluded(
        (choice_scores(z, r, b) - choice_scores(z, r, b).max(-1, keepdim=True).values) / 0.25,
        z, r, b),
}


def keep_stats(scores: torch.Tensor, z: torch.Tensor, router: RouterSpec, bias: torch.Tensor,
               alpha: float, beta: float) -> dict[str, float]:
    """Experts kept, stock union and routing mass kept of one affinity layer-step."""
    rows = torch.ones(z.shape[0], dtype=torch.bool)
    batch = batch_totals(stock_routing(z, router, bias), rows)
    must = must_keep(batch)
    picks = affinity_choices(scores, router.top_k, rows, rows, torch.tensor(alpha),
                             torch.tensor(beta))
    keep = finalize_keep(picks, batch, must, router, rows)
    stats = dict(zip(STAT_FIELDS, layer_statistics(batch, keep, rows, ~rows, ~rows).tolist(),
                     strict=True))
    return {"kept": stats["kept"], "union": stats["stock_union"],
            "mass_kept": stats["mass_kept"] / stats["mass_total"]}


def run(batches: list[int], draws: int, alpha: float, beta: float) -> dict:
    """Every router x batch x variant x bias offset: mean kept, union and mass kept."""
    cells = []
    for name, (experts, router) in ROUTERS.items():
        logits = SyntheticSkew(seed=1).logits(1, max(batches) * draws, experts)[0]
        noise = torch.randn(experts, generator=torch.Generator().manual_seed(2)) * 0.05
        for batch in batches:
            for variant, score in VARIANTS.items():
                for offset in OFFSETS:
                    bias = noise + offset
                    runs = [keep_stats(score(z, router, bias), z, router, bias, alpha, beta)
                            for z in logits[: batch * draws].view(draws, batch, experts)]
                    cells.append({"router": name, "batch": batch, "variant": variant,
                                  "bias_offset": offset, **{
                                      key: rounded(statistics.mean(r[key] for r in runs))
                                      for key in ("kept", "union", "mass_kept")}})
    return {"alpha": alpha, "beta": beta, "draws": draws,
            "logits": SyntheticSkew(seed=1).describe(),
            "bias": "offset + 0.05 * N(0, 1) per expert", "cells": cells}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--draws", type=int, default=20, help="decode batches per cell")
    parser.add_argument("--alpha", type=float, default=3.0)
    parser.add_argument("--beta", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "affinity_bias.json")
    args = parser.parse_args()
    result = run(args.batches, args.draws, args.alpha, args.beta)
    write_json(args.out, result)
    rows = [[c["router"], c["batch"], c["variant"], c["bias_offset"], c["kept"], c["union"],
             f"{c['mass_kept']:.4f}"] for c in result["cells"]]
    print(markdown_table(["router", "B", "scores", "bias offset", "kept", "union",
                          "mass kept"], rows))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
