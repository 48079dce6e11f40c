"""Every benchmark in one command: ``make bench`` (full) or ``make bench-quick`` (< 5 minutes).

    python benchmark/run_all.py [--quick]

1. MoE-layer microbenchmark (``benchmark/moe_layer.py``);
2. end-to-end decode + accuracy on the SGLang CPU server (``benchmark/e2e_decode.py``);
3. SLO attainment against quality cost (``benchmark/slo_pareto.py``: stock, every ladder
   rung and the adaptive controller on a trace replay; quick: qwen3-moe-mini x16, one
   repetition, a short replay; full: the decode-bound testbed); full runs also: speculative
   verify steps (``benchmark/verify_steps.py``), goodput (``benchmark/goodput.py``),
   the testbed's f, S and TPOT ratio (``benchmark/testbed.py``) and the speed/perplexity
   frontier of every policy, calibrated per-layer tables included, on the production-ratio
   model (``benchmark/frontier.py``), the share of SLO misses that come from prefill on the
   testbed (``benchmark/prefill_share.py``), and issue 25's: calibration through a server against
   transformers (``benchmark/calibrate_paths.py``), the shadow-built ladder and shadow mode's
   cost (``benchmark/shadow_ladder.py``, ``benchmark/shadow_overhead.py``) and the lm-eval
   gate on every reference model (``benchmark/eval_gate.py``);
4. ``benchmark/results/summary.json`` (the issue's schema), the PNGs under
   ``benchmark/results/`` and ``benchmark/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmark import (
    calibrate_paths,
    calibration_report,
    e2e_decode,
    ep_serving,
    ep_serving_report,
    eval_gate,
    frontier,
    goodput,
    moe_layer,
    plugin_overhead,
    prefill_share,
    report,
    results_md,
    shadow_ladder,
    shadow_overhead,
    slo_pareto,
    slo_pareto_report,
    testbed,
    verify_steps,
)
from benchmark.common import REPO_ROOT, RESULTS_DIR, models_dir, write_json


def run(quick: bool, out_dir: Path) -> dict[str, Any]:
    started = time.time()
    mode = ["--quick"] if quick else []
    # 0. the plugin's fixed host cost per step (seconds)
    plugin_overhead.main(["--steps", "2000" if quick else "20000",
                          "--out", str(out_dir / "plugin_overhead.json")])
    # 1. MoE layer
    margs = moe_layer.parse_args([*mode, "--out", str(out_dir / "moe_layer.json")])
    moe_layer.run_from_args(margs)
    # 2. end to end
    eargs = e2e_decode.parse_args([*mode, "--no-progress", "--out", str(out_dir / "e2e.json")])
    e2e_decode.finish(eargs, [e2e_decode.run_model(model, eargs) for model in eargs.models])
    # 3. SLO attainment against quality cost
    if slo_pareto.main([*mode, "--out", str(out_dir / "slo_pareto.json")]) != 0:
        raise SystemExit("run_all: slo_pareto failed")
    if not quick:
        verify_steps.main(["--out", str(out_dir / "verify_steps.json")])
        goodput.main(["--out", str(out_dir / "goodput.json")])
        frontier.main(["--out", str(out_dir / "frontier.json")])
        testbed.main(["--out", str(out_dir / "testbed.json")])
        ep_serving.main(["--aware-budget", "36", "--out", str(out_dir / "ep_serving.json")])
        prefill_share.main(["--out", str(out_dir / "prefill_share.json")])
        calibrate_paths.main(["--out", str(out_dir / "calibrate_paths.json")])
        shadow_ladder.main(["--out", str(out_dir / "shadow_ladder.json")])
        shadow_overhead.main(["--out", str(out_dir / "shadow_overhead.json")])
        eval_gate.main(["--out", str(out_dir / "eval_gate.json")])
    info = {"quick": quick, "elapsed_s": round(time.time() - started, 1),
            "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "loadavg_end": Path("/proc/loadavg").read_text().split()[:3],
            "frontier_c": eargs.frontier_c}
    write_json(out_dir / "run_info.json", info)
    summary = render(out_dir)
    print(f"[run_all] {'quick' if quick else 'full'} run done in {info['elapsed_s'] / 60:.1f} "
          f"min: {out_dir / 'summary.json'}")
    return summary


def render(out_dir: Path) -> dict[str, Any]:
    """Plots, summary.json and RESULTS.md from the JSON files of a finished run."""
    def load(name: str) -> dict[str, Any]:
        return dict(json.loads((out_dir / name).read_text()))

    moe, e2e, pareto, info = (load("moe_layer.json"), load("e2e.json"),
                              load("slo_pareto.json"), load("run_info.json"))
    e2e["rows"] = e2e_decode.summary_rows(e2e)  # derived data: today's definitions
    hook_cost = (load("plugin_overhead.json") if (out_dir / "plugin_overhead.json").exists()
                 else None)
    moe_layer.plot(moe, out_dir / "moe_layer.png")
    slo_pareto_report.plot(pareto, out_dir / "slo_pareto.png")
    report.plot_frontier(e2e, info["frontier_c"], out_dir / "frontier.png")
    summary = report.summary(moe["machine"], moe, e2e)
    summary["slo_pareto"] = slo_pareto_report.summary_block(pareto)
    bed = out_dir / "testbed.json"
    bed_data = json.loads(bed.read_text()) if bed.exists() else None
    if bed_data:
        summary["testbed"] = testbed.summary_block(bed_data)
    write_json(out_dir / "summary.json", summary)
    md_path = (REPO_ROOT / "benchmark" / "RESULTS.md" if out_dir.resolve() == RESULTS_DIR.resolve()
               else out_dir / "RESULTS.md")
    images = os.path.relpath(out_dir, md_path.parent)
    verify = out_dir / "verify_steps.json"
    good = out_dir / "goodput.json"
    front = out_dir / "frontier.json"
    ep = out_dir / "ep_serving.json"
    share = out_dir / "prefill_share.json"
    layer_frontier = json.loads(front.read_text()) if front.exists() else None
    md_path.write_text(results_md.results_markdown(moe, e2e, pareto, info, images, hook_cost,
                                        layer_frontier) + (
        verify_steps.markdown(json.loads(verify.read_text())) if verify.exists() else "") + (
        "\n## Goodput (SGLang's serving benchmark)\n" + goodput.markdown(
            json.loads(good.read_text())) if good.exists() else "") + (
        frontier.markdown(layer_frontier) if layer_frontier else "") + (
        testbed.markdown(bed_data) if bed_data else "") + (
        ep_serving_report.markdown(json.loads(ep.read_text())) if ep.exists() else "") + (
        prefill_share.markdown(json.loads(share.read_text())) if share.exists() else "")
        + calibration_report.markdown(out_dir))
    print(f"[run_all] wrote {out_dir}/{{summary.json,*.png}} and {md_path}", flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the < 5 minute smoke run")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--render-only", action="store_true",
                        help="only rebuild plots, summary.json and RESULTS.md from the JSONs")
    args = parser.parse_args(argv)
    if args.render_only:
        render(args.out_dir)
        return 0
    missing = [m for m in e2e_decode.MODELS if not (models_dir() / m / "config.json").is_file()]
    if missing:
        print(f"run_all: reference models {missing} missing under {models_dir()}: run "
              "`make models` (or set LYNX_MODELS_DIR)", file=sys.stderr)
        return 2
    run(args.quick, args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
