"""The lm-eval accuracy gate on every reference model, at the default policy and at the ladder's
fastest rung within the perplexity budget (issue 25).

    python benchmark/eval_gate.py [--models mixtral-mini,qwen3-moe-mini,qwen3-moe-128]
        [--task-sets lynx_heldout lynx_heldout_choice] [--limit 256] [--concurrency 32]
        [--max-ppl-rise 0.01] [--out benchmark/results/eval_gate.json]

Per model: one stock SGLang CPU server (started here, ``--stock-url`` for every run), then
``lynx-serve evaluate`` (`lynx.evaluate.cli`) once per (policy, task set), each starting its
Lynx server: the default (what the checkpoint ships, else the built-in default) and
``--rung R``, R the last rung of the checkpoint's ``lynx_ladder.json`` whose held-out
perplexity rise is <= ``--max-ppl-rise``. Generation task sets run with ``--concurrency``
requests in flight; log-likelihood ones (``lynx_heldout_choice``) in evaluation mode.
Writes one row per (model, policy, task): stock and Lynx scores, the delta with its standard
error, the verdict at ``--threshold`` points, and how much the Lynx server pruned.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmark.common import RESULTS_DIR, machine_description, write_json

MODELS = Path(__file__).resolve().parents[1] / "models"


def fastest_rung(folder: Path, max_rise: float) -> tuple[str, float, float]:
    """(name, largest held-out perplexity rise over its tables, experts computed) of the
    furthest rung whose every table is within ``max_rise`` (rung 0 at worst); `LadderError`
    for a damaged ladder."""
    from lynx_protocol.ladder import load_ladder

    ladder = load_ladder(folder / "lynx_ladder.json")

    def worst(rung: Any) -> float:
        return max((t.cost(ladder.kind) or 0.0) for t in rung.tables)

    rung = [r for r in ladder.rungs if worst(r) <= max_rise][-1]
    return rung.name, worst(rung), rung.experts()


def run_gate(model: str, stock_url: str, flags: list[str], tasks: str, args: argparse.Namespace,
             out: Path) -> dict[str, Any]:
    """One ``lynx-serve evaluate`` against the running stock server; its JSON report."""
    from lynx.serving.cli import main

    code = main(["evaluate", "--model", model, *flags, "--tasks", tasks,
                 "--limit", str(args.limit), "--concurrency", str(args.concurrency),
                 "--threshold", str(args.threshold), "--stock-url", stock_url,
                 "--out", str(out)])
    if code == 2 or not out.is_file():
        raise SystemExit(f"eval_gate: lynx-serve evaluate {model} {flags} {tasks}: exit {code}")
    report: dict[str, Any] = json.loads(out.read_text())
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="mixtral-mini,qwen3-moe-mini,qwen3-moe-128")
    parser.add_argument("--task-sets", nargs="+", default=["lynx_heldout",
                                                           "lynx_heldout_choice"])
    parser.add_argument("--limit", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--threshold", type=float, default=1.0)
    parser.add_argument("--max-ppl-rise", type=float, default=0.01)
    parser.add_argument("--policy", action="append", default=[], metavar="LABEL=JSON",
                        help="also gate this policy (repeatable), e.g. "
                        "'budget4={\"name\":\"budget\",...}'")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "eval_gate.json")
    args = parser.parse_args(argv)
    extra: dict[str, list[str]] = {}
    for item in args.policy:
        label, sep, spec = item.partition("=")
        if not sep or not label or not spec.strip().startswith("{"):
            parser.error(f"--policy {item!r}: expected LABEL=JSON")
        extra[label] = ["--policy", spec]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if not (MODELS / m / "lynx_ladder.json").is_file():
            parser.error(f"{m}: no checkpoint with a lynx_ladder.json under {MODELS}")
    if args.limit < 1 or args.concurrency < 16 or args.threshold < 0 or args.max_ppl_rise < 0:
        parser.error("need --limit >= 1, --concurrency >= 16, --threshold >= 0 and "
                     "--max-ppl-rise >= 0")

    from lynx.serving.server import SglangServer, free_port

    begun = time.monotonic()
    rows: list[dict[str, Any]] = []
    work = Path(tempfile.mkdtemp(prefix="lynx-evalgate-"))
    for model in models:
        rung, rise, experts = fastest_rung(MODELS / model, args.max_ppl_rise)
        policies = {"default": ([], None, None), f"rung:{rung}": (["--rung", rung], rise, experts),
                    **{label: (flags, None, None) for label, flags in extra.items()}}
        with SglangServer(MODELS / model, free_port(), env={"LYNX_ENABLED": "0"},
                          log_path=work / f"stock-{model}.log") as stock:
            for label, (flags, ladder_rise, ladder_experts) in policies.items():
                for tasks in args.task_sets:
                    out = work / f"{model}-{label.replace(':', '_')}-{tasks}.json"
                    report = run_gate(model, stock.url, flags, tasks, args, out)
                    for task in report["tasks"]:
                        rows.append({"model": model, "policy": label, "task_set": tasks,
                                     "ladder_ppl_rise": ladder_rise,
                                     "ladder_experts_computed": ladder_experts,
                                     "evaluation_mode": report["evaluation_mode"],
                                     "lynx_server": report["lynx_server"], **task})
                    print(f"[eval_gate] {model} {label} {tasks}: "
                          f"{'PASS' if report['passed'] else 'FAIL'}", flush=True)
    result = {"benchmark": "eval_gate", "machine": machine_description(),
              "limit": args.limit, "concurrency": args.concurrency,
              "threshold_points": args.threshold, "max_ppl_rise": args.max_ppl_rise,
              "rows": rows, "total_s": round(time.monotonic() - begun, 1)}
    print(f"{'model':15s} {'policy':10s} {'task':18s} {'stock':>6s} {'lynx':>6s} "
          f"{'delta':>6s} {'se':>5s} {'kept/union':>10s}")
    for r in rows:
        print(f"{r['model']:15s} {r['policy']:10s} {r['task']:18s} {r['stock']:6.1f} "
              f"{r['lynx']:6.1f} {r['delta']:+6.1f} {r['stderr']:5.1f} "
              f"{r['lynx_server']['kept_over_stock_union']:10.3f}")
    write_json(args.out, result)
    print(f"wrote {args.out} ({result['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
