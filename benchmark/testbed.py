"""The decode-bound testbed: a served model whose decode steps, as on a GPU, are bound by
reading expert weights, so that pruning experts moves served latency.

    python benchmark/testbed.py [--build-only] [--models qwen3-moe-128] [--reps 3]

Recipe (`build`): the committed checkpoint's experts widened xN, function-preserving
(`lynx.reference.widen`: every expert FFN neuron repeated N times, the down projection divided
by N; routing and outputs unchanged), in float32, cached under ``.cache/bench/models/`` (never
committed; ``make testbed`` builds it), with the checkpoint's ladder beside it. Served with
`SERVER_FLAGS` (a KV pool for 32 full requests instead of the default 4,096 tokens) and one
OpenMP thread per server (`benchmark.serving_pair`).

Measured (`measure`): SGLang's serving benchmark at C=32 on the stock server and the Lynx
server (``LYNX_TIME_MOE=1``) with policy off and with a rung of the ladder, interleaved, medians
over repetitions (`benchmark.e2e_latency`). f = MoE ms per decode step / TPOT (policy off;
the client's view, prefill stalls and scheduling included); ``moe_share_of_forward`` = MoE ms
/ forward ms per decode step, both timed inside the server;
S = MoE ms per step, off / rung; the Amdahl bound 1/((1-f)+f/S); the TPOT ratio off / rung,
and the rung's held-out perplexity rise from the ladder. The rung: the most aggressive one
within 1% held-out perplexity (``--max-ppl-rise``). Written to ``results/testbed.json``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmark.common import CACHE_DIR, RESULTS_DIR, Variant, machine_description, models_dir
from benchmark.common import write_json as write_result
from lynx.serving.server import DECODE_BOUND_FLAGS
from lynx_protocol.ladder import Ladder, batch_rule_edges, load_ladder, rung_policy

WIDEN = {"qwen3-moe-128": 128, "qwen3-moe-mini": 128}
"""Expert widening per testbed model: the smallest power of two giving f >= 0.8 at C=32."""
SERVER_FLAGS = DECODE_BOUND_FLAGS
CONCURRENCY = 32
NO_PRUNING_BELOW = 4
LADDER_FILE = "lynx_ladder.json"


def build(model: str, widen: int | None = None) -> Path:
    """The float32 widened copy of reference checkpoint ``model`` (built once, cached; the
    checkpoint's ladder copied beside it when newer). Returns its folder."""
    from lynx.reference.widen import cached_widening

    factor = widen or WIDEN[model]
    return cached_widening(models_dir() / model, factor,
                           CACHE_DIR / "models" / f"{model}-wide{factor}-f32")


def rung_within(ladder: Ladder, max_ppl_rise: float) -> str:
    """The most aggressive rung whose held-out perplexity rise is within ``max_ppl_rise``."""
    within = [r for r in ladder.rungs if r.cost() <= max_ppl_rise]
    return within[-1].name


def rung_variant(ladder: Ladder, name: str) -> Variant:
    return Variant("ladder", name, rung_policy(ladder, name, batch_rule_edges(
        ladder, NO_PRUNING_BELOW), NO_PRUNING_BELOW))


def measure(model: str, args: argparse.Namespace) -> dict[str, Any]:
    """f, S, Amdahl bound and TPOT ratio of the testbed of ``model`` at C=32 (module doc)."""
    from benchmark.e2e_latency import latency_row, measure_latency
    from benchmark.serving_pair import ServingPair, counter_delta

    folder = build(model, args.widen)
    ladder = load_ladder(folder / LADDER_FILE)
    name = args.rung or rung_within(ladder, args.max_ppl_rise)
    variant = rung_variant(ladder, name)
    with tempfile.TemporaryDirectory(prefix="lynx-testbed-") as tmp, ServingPair.launch(
            folder, Path(tmp), extra_args=SERVER_FLAGS,
            extra_lynx_env={"LYNX_TIME_MOE": "1"}) as pair:
        before = pair.lynx_counters()
        lat = measure_latency(pair, variant, CONCURRENCY, args, Path(tmp), folder)
        delta = counter_delta(before, pair.lynx_counters())
        union = delta.get("lynx_experts_stock_union_total", 0.0)
        kept = delta.get("lynx_experts_kept_total", 0.0) / union if union else 1.0
        row = latency_row(model, variant, CONCURRENCY, lat, kept)
    rung, off = ladder.rung(name), lat["off"]
    step_share = (round(off["moe_ms_per_step"] / off["forward_ms_per_step"], 4)
                  if off.get("forward_ms_per_step") else None)
    return {"model": model, "served": folder.name, "widen": args.widen or WIDEN[model],
            "concurrency": CONCURRENCY, "rung": name, "ppl_rise": round(rung.cost(), 5),
            "moe_share_f": row.get("moe_share"), "moe_share_of_forward": step_share,
            "forward_ms_per_step_off": round(off.get("forward_ms_per_step", 0.0), 3),
            "moe_speedup_s": row.get("moe_speedup"),
            "amdahl_bound": row.get("amdahl_bound"),
            "tpot_ratio": row.get("tpot_ratio_off"), "row": row}


SUMMARY_KEYS = ("model", "concurrency", "moe_share_f", "moe_speedup_s", "amdahl_bound",
                "tpot_ratio", "ppl_rise")


def summary_block(data: dict[str, Any]) -> dict[str, Any]:
    """``summary.json``'s ``testbed``: the first (production-ratio) testbed's numbers."""
    first = data["testbeds"][0]
    return {key: first.get(key) for key in SUMMARY_KEYS}


def markdown(data: dict[str, Any]) -> str:
    """The RESULTS.md section: one row per testbed."""
    rows = ["| model | widen | C | f (TPOT) | f (forward) | rung | ppl rise | S | Amdahl bound "
            "| TPOT ratio off / rung |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["testbeds"]:
        rows.append(f"| {r['model']} | x{r['widen']} | {r['concurrency']} | {r['moe_share_f']} "
                    f"| {r['moe_share_of_forward']} | {r['rung']} | "
                    f"{100 * r['ppl_rise']:+.2f}% | {r['moe_speedup_s']} | {r['amdahl_bound']} "
                    f"| {r['tpot_ratio']} |")
    return ("\n## The decode-bound testbed (`benchmark/testbed.py`)\n\nExperts widened in fp32, "
            f"one OpenMP thread per server, {data['reps']} interleaved repetitions (medians): "
            "the MoE blocks' share f of the client TPOT and of the forward (policy off), the "
            "in-server MoE speedup S at the ladder rung within 1% held-out perplexity, the "
            "Amdahl bound and the TPOT ratio.\n\n" + "\n".join(rows) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="qwen3-moe-128")
    parser.add_argument("--widen", type=int, default=None, help="override WIDEN (power of 2)")
    parser.add_argument("--build-only", action="store_true")
    parser.add_argument("--rung", default="", help="rung to measure (default: --max-ppl-rise)")
    parser.add_argument("--max-ppl-rise", type=float, default=0.01)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--waves", type=int, default=2)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "testbed.json")
    args = parser.parse_args(argv)
    args.progress = True
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in WIDEN]
    if unknown or args.reps < 1 or args.waves < 1 or not 0 < args.max_ppl_rise <= 1 or (
            args.widen is not None and (args.widen < 1 or args.widen & (args.widen - 1))):
        parser.error(f"models must be among {sorted(WIDEN)} (got {unknown}); --reps, --waves "
                     ">= 1; 0 < --max-ppl-rise <= 1; --widen a power of two")
    if args.build_only:
        for model in models:
            print(f"testbed {model}: {build(model, args.widen)}")
        return 0
    rows = [measure(m, args) for m in models]
    for r in rows:
        print(f"testbed {r['model']} x{r['widen']} C={r['concurrency']}: f={r['moe_share_f']} "
              f"(of the forward: {r['moe_share_of_forward']}) "
              f"S={r['moe_speedup_s']} (rung {r['rung']}, ppl {100 * r['ppl_rise']:+.2f}%) "
              f"Amdahl bound {r['amdahl_bound']} TPOT ratio {r['tpot_ratio']}")
    write_result(args.out, {"machine": machine_description(), "reps": args.reps,
                            "testbeds": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
