"""Which fixed budget tables stay within the quality budget (the SLO experiments' static
baselines and the adaptive controller's quality floor).

Quality budget (issue 10): <= 2% perplexity rise on held-out code and <= 1 point exact-match
loss on held-out additions, both at the batch size where pruning is most aggressive (the
ramp's peak bucket): perplexity with transformers on the checkpoint, the same selection on
every MoE router (`benchmark.accuracy.code_scores`), exact match through the live Lynx server
(`benchmark.accuracy.exact_match_server`, ``batch`` rows decoded together).
"""

from __future__ import annotations

from typing import Any

from benchmark.accuracy import code_scores, compare_code, exact_match_server
from benchmark.common import OFF, budget_variant, models_dir, rounded
from benchmark.serving_pair import ServingPair

MAX_PPL_RISE = 0.02
MAX_EM_LOSS_POINTS = 1.0


def static_candidates(num_experts: int, top_k: int) -> list[int]:
    """Budgets swept as static tables: k .. E/2 (every one keeps each token's top-1)."""
    values = {top_k, top_k + top_k // 2, 2 * top_k, 3 * top_k, num_experts // 4,
              num_experts // 2}
    return sorted(v for v in values if top_k <= v < num_experts)


def sweep(pair: ServingPair, model: str, budgets: list[int], batch: int, problems: int,
          windows: int, window_len: int, threads: int = 2) -> list[dict[str, Any]]:
    """One row per budget: ppl rise, exact match (stock and Lynx) and ``within_budget``."""
    import torch

    from lynx.reference.loading import load_reference

    pair.set_policy(OFF)
    em_stock = exact_match_server(pair.lynx.url, problems, batch)
    torch.set_num_threads(threads)
    model_obj, tok = load_reference(models_dir() / model, dtype=torch.float32)
    stock = code_scores(model_obj, tok, OFF, batch, windows, window_len)
    rows = []
    for m in budgets:
        variant = budget_variant(m)
        code = compare_code(stock, code_scores(model_obj, tok, variant, batch, windows,
                                               window_len))
        pair.set_policy(variant)
        em = exact_match_server(pair.lynx.url, problems, batch)
        loss = 100.0 * (em_stock - em)
        rows.append({"budget": m, "batch": batch, "ppl_rise": rounded(code["ppl_rise"], 5),
                     "next_token_agreement": rounded(code["next_token_agreement"], 4),
                     "exact_match_stock": em_stock, "exact_match": em,
                     "em_loss_points": rounded(loss, 2),
                     "within_budget": code["ppl_rise"] <= MAX_PPL_RISE
                     and loss <= MAX_EM_LOSS_POINTS})
        print(f"[slo] quality budget:{m} at batch {batch}: ppl {100 * code['ppl_rise']:+.2f}%, "
              f"EM {em:.3f} (stock {em_stock:.3f}) -> "
              f"{'within' if rows[-1]['within_budget'] else 'outside'} the quality budget",
              flush=True)
    pair.set_policy(OFF)
    return rows
