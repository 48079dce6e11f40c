"""The RESULTS.md section of `benchmark/ep_serving.py`'s four arms."""

from __future__ import annotations

from typing import Any

from benchmark.ep_serving import mass_matched


def markdown(payload: dict[str, Any]) -> str:
    """RESULTS.md section of a finished run."""
    rows, base = payload["summary"], payload["summary"].get("ep2", {})
    header = ["arm", "TPOT ms", "vs ep2", "busiest rank ms/step", "vs ep2",
              "busiest rank experts lynx / stock", "busiest rank pairs lynx / stock",
              "mass kept", "EM", "same as tp2"]

    def ratio(key: str, value: float | None) -> str:
        return f"{base[key] / value:.2f}x" if value and base.get(key) else "-"

    def pair(row: dict[str, Any], name: str) -> str:
        lynx, stock = row.get(f"{name}:lynx"), row.get(f"{name}:stock")
        return f"{lynx:.1f} / {stock:.1f}" if lynx is not None and stock else "-"

    lines = []
    for arm, row in rows.items():
        tpot, busiest = row.get("median_tpot_ms"), row.get("busiest_rank_ms")
        lines.append([arm, f"{tpot:.1f}", ratio("median_tpot_ms", tpot),
                      "-" if busiest is None else f"{busiest:.1f}",
                      ratio("busiest_rank_ms", busiest), pair(row, "experts_max"),
                      pair(row, "pairs_max"), f"{row.get('mass_kept', 1.0):.3f}",
                      f"{row['exact_match']:.3f}", f"{row['same_as_tp2']:.3f}"])
    table = "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                      + ["| " + " | ".join(r) + " |" for r in lines])
    return _section(payload, table) + equal_mass_sentence(payload)


def equal_mass_sentence(payload: dict[str, Any]) -> str:
    """The global budget against the per-rank arm when it ran at another budget, one line:
    whether they compare at equal routing mass (`mass_matched`) and the ratios."""
    rows = payload["summary"]
    glob, row = rows.get("ep2-global"), rows.get("ep2-aware")
    aware_budget = payload.get("aware_budget", payload["budget"])
    if glob is None or row is None or aware_budget == payload["budget"]:
        return ""
    matched = mass_matched(rows)

    def ratio(key: str) -> str:
        return (f"{glob[key] / row[key]:.2f}x" if glob.get(key) and row.get(key) else "-")

    return (f"\nThe per-rank arm ran at budget {aware_budget}, the global one at "
            f"{payload['budget']}: routing mass kept {row.get('mass_kept', 1.0):.3f} vs "
            f"{glob.get('mass_kept', 1.0):.3f} ("
            + ("at least the global budget's: they compare at equal routing mass"
               if matched else "less than the global budget's: not an equal-mass comparison")
            + f"). Global / per-rank: TPOT {ratio('median_tpot_ms')}, busiest rank's expert "
            f"time {ratio('busiest_rank_ms')} (above 1x: the per-rank arm is faster); busiest "
            f"rank experts {row.get('experts_max:lynx', float('nan')):.1f} (per rank) vs "
            f"{glob.get('experts_max:lynx', float('nan')):.1f} (global).\n")


def _section(payload: dict[str, Any], table: str) -> str:
    return f"""
## Expert parallelism on this CPU (four arms)
`python benchmark/ep_serving.py` -- {payload['model']}, `--tp-size 2` (one core per rank),
budget {payload['budget']} experts per layer in the pruned arms (the per-rank arm at
{payload.get('aware_budget', payload['budget'])}), SGLang's serving benchmark at
C={payload['concurrency']} ({payload['input_len']} prompt / {payload['output_len']} output
tokens), {payload['reps']} interleaved repetitions, medians. `ep2` is EP with policy off (stock
routing; the plugin's CPU fix for the other rank's -1 ids is what lets SGLang serve EP here).
Busiest rank ms/step: the slowest rank's own expert time per decode step, before the combine
(`LYNX_TIME_MOE=1`). Experts and pairs: `lynx_ep_rank_experts_max` / `lynx_ep_rank_pairs_max`
sampled every second during the timed run (stock = what the batch's stock top-k needed). EM and
"same as tp2": greedy answers to {payload.get('problems', 64)} held-out additions, batched
{payload['concurrency']} at a time. Perplexity is not measured through the servers (Lynx
prunes decode steps; a prompt's log-probabilities come from an unpruned prefill).

{table}
"""
