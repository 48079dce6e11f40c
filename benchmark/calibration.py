"""Calibrated per-layer tables vs the same mean budget in every layer (held-out perplexity).

    python benchmark/calibration.py [--model qwen3-moe-128] [--target-mean 40]
                                    [--batches 16,32,64] [--out benchmark/results/calibration.json]

`lynx.calibrate.calibrate` fits the tables on training-split code; both policies are then
scored on held-out code (64 windows x 128 tokens, `benchmark.accuracy.code_scores`) at each
batch size. Prints one row per batch and writes JSON.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmark.accuracy import code_scores, compare_code
from benchmark.common import (
    OFF,
    RESULTS_DIR,
    Variant,
    markdown_table,
    models_dir,
    rounded,
    write_json,
)


def run(model: str, target_mean: float, batches: list[int], windows: int = 64,
        window_len: int = 128) -> dict[str, Any]:
    import torch

    from lynx.calibrate import calibrate, model_shape
    from lynx.reference.loading import load_reference
    from lynx_protocol.policy import BudgetBucket, PolicySpec

    torch.set_num_threads(1)
    started = time.time()
    fitted = calibrate(models_dir() / model, target_mean, batches)
    net, tok = load_reference(models_dir() / model, dtype=torch.float32)
    experts, _, _ = model_shape(net)
    uniform = PolicySpec(name="budget", budgets=[
        BudgetBucket(max_batch=3, all_layers=experts),
        BudgetBucket(max_batch=1_000_000, all_layers=int(target_mean))])
    rows = []
    for batch in batches:
        stock = code_scores(net, tok, OFF, batch, windows, window_len)
        rise = {name: compare_code(stock, code_scores(net, tok, Variant("budget", name, spec),
                                                      batch, windows, window_len))["ppl_rise"]
                for name, spec in (("uniform", uniform), ("calibrated", fitted["policy"]))}
        rows.append({"batch": batch, "ppl_rise_uniform": rounded(rise["uniform"], 5),
                     "ppl_rise_calibrated": rounded(rise["calibrated"], 5)})
    return {"model": model, "target_mean": target_mean, "calibration": {
        k: v for k, v in fitted.items() if k != "policy"}, "rows": rows,
        "elapsed_s": round(time.time() - started, 1)}


def markdown(result: dict[str, Any]) -> str:
    """The RESULTS.md section of a finished run."""
    tables = {b["batch"]: b["budgets"] for b in result["calibration"]["per_batch"]}
    return (f"\n## Calibrated per-layer budgets (`lynx-serve calibrate`)\n\n"
            f"{result['model']}, mean budget {result['target_mean']:g} per layer: held-out code "
            "perplexity rise of the calibrated table vs the same budget in every layer "
            "(`python benchmark/calibration.py`).\n\n" + markdown_table(
                ["B", "uniform", "calibrated", "per-layer table"],
                [[r["batch"], f"{100 * r['ppl_rise_uniform']:+.2f}%",
                  f"{100 * r['ppl_rise_calibrated']:+.2f}%", tables[r["batch"]]]
                 for r in result["rows"]]) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen3-moe-128")
    parser.add_argument("--target-mean", type=float, default=40.0)
    parser.add_argument("--batches", default="16,32,64")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "calibration.json")
    args = parser.parse_args(argv)
    result = run(args.model, args.target_mean, [int(b) for b in args.batches.split(",")])
    print(markdown(result))
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
