"""Calibration through a running SGLang server against calibration in transformers (issue 25).

    python benchmark/calibrate_paths.py [--model qwen3-moe-128] [--batch 32] [--windows 64]
        [--window-len 96] [--heldout-windows 64] [--unseen DIR] [--quick]
        [--out benchmark/results/calibrate_paths.json]

1. ``transformers``: `lynx.calibrate.ladder.build_ladder` on the fp32 checkpoint in-process
   (what `lynx-serve calibrate --ladder` runs without ``--server``), timed.
2. ``server``: the same call with ``server=``: one SGLang CPU server (fp32, evaluation mode
   ``LYNX_EVALUATION=prefill-as-decode``, ``--disable-radix-cache``) and its own controller
   (`lynx_policy.testing.ControllerProcess`), each policy set through the admin API. Timed
   from the first measurement (server start-up reported apart).
3. Both ladders' tables (the same mean budgets, so the same rung names) measured the same way
   afterwards, in transformers at ``--batch`` rows per step (`measure_table`): held-out code
   perplexity rise (the calibration's held-out split) and *unseen* code perplexity rise
   (``--unseen``, default pip's installed source: code neither path calibrated on), at each
   rung's experts computed. Also: per layer, the largest difference of the two paths'
   single-layer sensitivities, and whether each rung's table is identical.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmark.common import RESULTS_DIR, machine_description, rounded, write_json

MODELS = Path(__file__).resolve().parents[1] / "models"


def default_unseen() -> Path:
    """pip's installed source: Python code the reference models never trained on."""
    import pip

    return Path(pip.__file__).parent / "_internal"


def server_ladder(folder: Path, kwargs: dict[str, Any], workdir: Path
                  ) -> tuple[Any, dict[str, Any], float, float]:
    """(ladder, report, start-up seconds, calibration seconds) through a server."""
    from lynx.calibrate.ladder import build_ladder
    from lynx.serving.server import SglangServer, free_port
    from lynx_policy.testing import DEFAULT_TOKEN, ControllerProcess

    flags = ("--disable-radix-cache", "--dtype", "float32")
    start = time.monotonic()
    with ControllerProcess.launch(workdir / "ctl", {"mode": "off"}) as ctl:
        env = {"LYNX_ENABLED": "1", "LYNX_EVALUATION": "prefill-as-decode",
               "LYNX_STATS_INTERVAL_S": "3600", **ctl.runtime_env()}
        with SglangServer(folder, free_port(), extra_args=flags, env=env,
                          log_path=workdir / "server.log") as server:
            started = time.monotonic()
            ladder, report = build_ladder(folder, **kwargs,
                                          server=(server.url, ctl.admin_url, DEFAULT_TOKEN))
            done = time.monotonic()
    return ladder, report, started - start, done - started


def rise_of(model: Any, windows: Any, per_layer: list[int], batch: int, stock: float) -> float:
    from lynx.calibrate.ladder import measure_table, table_policy

    nll = measure_table(model, windows, table_policy(per_layer), batch)[0]
    return math.expm1(nll - stock)


def evaluate(folder: Path, ladders: dict[str, Any], batch: int, windows: int, window_len: int,
             unseen: Path, seed: int) -> list[dict[str, Any]]:
    """Every rung of each ladder at ``batch``: experts computed, held-out and unseen-code
    perplexity rise, measured in transformers on the same windows."""
    import torch

    from lynx.calibrate.corpus import calibration_streams, corpus_windows, read_documents
    from lynx.calibrate.ladder import measure_table
    from lynx.reference.loading import load_reference
    from lynx_protocol.ladder import table_for
    from lynx_protocol.policy import PolicySpec

    model, tok = load_reference(folder, dtype=torch.float32)
    _, heldout, _ = calibration_streams(tok, None)
    train_u, held_u = calibration_streams(tok, read_documents(str(unseen)))[:2]
    unseen_stream = torch.cat([train_u, held_u])
    sets = {"heldout": corpus_windows(heldout, windows, window_len,
                                      torch.Generator().manual_seed(seed + 1), "held-out code"),
            "unseen": corpus_windows(unseen_stream, windows, window_len,
                                     torch.Generator().manual_seed(seed + 2), "unseen code")}
    off = PolicySpec(name="off")
    stock = {k: measure_table(model, w, off, batch)[0] for k, w in sets.items()}
    rows = []
    for path, ladder in ladders.items():
        for rung in ladder.rungs:
            table = table_for(rung, batch)
            row: dict[str, Any] = {"path": path, "rung": rung.name,
                                   "per_layer": list(table.per_layer),
                                   "experts_computed": table.experts_computed,
                                   "ladder_ppl_rise": table.cost()}
            for key, w in sets.items():
                row[f"{key}_ppl_rise"] = (0.0 if rung.name == "none" else
                                          rise_of(model, w, list(table.per_layer), batch,
                                                  stock[key]))
            rows.append({k: rounded(v, 5) if isinstance(v, float) else v
                         for k, v in row.items()})
    return rows


def compare(reports: dict[str, dict[str, Any]], ladders: dict[str, Any]) -> dict[str, Any]:
    """Largest sensitivity difference per layer [nats] and, per rung present in both ladders,
    whether the tables are equal."""
    (mine,), (theirs,) = reports["server"]["per_batch"], reports["transformers"]["per_batch"]
    diff = [max((abs(a[m] - b[m]) for m in b), default=0.0)  # a dense layer: no curve
            for a, b in zip(mine["sensitivity_nats"], theirs["sensitivity_nats"], strict=True)]
    server = {r.name: r for r in ladders["server"].rungs}
    same = {r.name: [list(t.per_layer) for t in r.tables] ==
            [list(t.per_layer) for t in server[r.name].tables]
            for r in ladders["transformers"].rungs if r.name in server}
    return {"max_sensitivity_diff_nats": [round(d, 6) for d in diff],
            "largest_sensitivity_nats": round(max((v for row in theirs["sensitivity_nats"]
                                                   for v in row.values()), default=0.0), 6),
            "same_table": same,
            "rungs": {p: [r.name for r in ladder.rungs] for p, ladder in ladders.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="qwen3-moe-128")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--window-len", type=int, default=96)
    parser.add_argument("--heldout-windows", type=int, default=64)
    parser.add_argument("--unseen", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--quick", action="store_true",
                        help="qwen3-moe-mini, 16 windows of 48 tokens at batch 16")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "calibrate_paths.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.batch, args.windows, args.window_len, args.heldout_windows = \
            "qwen3-moe-mini", 16, 16, 48, 16
    folder = MODELS / args.model
    if not (folder / "config.json").is_file():
        parser.error(f"{folder}: no checkpoint (make setup trains nothing; see README)")
    if min(args.batch, args.windows, args.window_len, args.heldout_windows) < 1 or \
            args.windows % args.batch or args.heldout_windows % args.batch:
        parser.error("--windows and --heldout-windows must be positive multiples of --batch")
    unseen = args.unseen or default_unseen()
    if not unseen.exists():
        parser.error(f"--unseen {unseen}: no such file or directory")

    from lynx.calibrate.ladder import build_ladder

    kwargs = {"batches": (args.batch,), "windows": args.windows, "window_len": args.window_len,
              "heldout_windows": args.heldout_windows, "seed": args.seed}
    ladders: dict[str, Any] = {}
    reports: dict[str, Any] = {}
    wall: dict[str, float] = {}
    begun = time.monotonic()
    ladders["transformers"], reports["transformers"] = build_ladder(folder, **kwargs)
    wall["transformers"] = time.monotonic() - begun
    print(f"transformers path: {wall['transformers']:.0f} s", flush=True)
    work = Path(tempfile.mkdtemp(prefix="lynx-calpaths-"))  # the server's log stays there
    ladders["server"], reports["server"], startup, wall["server"] = server_ladder(
        folder, kwargs, work)
    shutil.rmtree(work, ignore_errors=True)
    print(f"server path: {wall['server']:.0f} s (+{startup:.0f} s start-up)", flush=True)
    rows = evaluate(folder, ladders, args.batch, args.heldout_windows, args.window_len, unseen,
                    args.seed)
    result = {"benchmark": "calibrate_paths", "machine": machine_description(),
              "model": args.model, "batch": args.batch,
              "calibration": f"{args.windows} windows x {args.window_len} tokens, held-out "
                             f"{args.heldout_windows} windows, seed {args.seed}",
              "unseen": f"{unseen.parent.name}/{unseen.name}",
              "wall_s": {k: round(v, 1) for k, v in wall.items()},
              "server_startup_s": round(startup, 1),
              "comparison": compare(reports, ladders), "rungs": rows,
              "total_s": round(time.monotonic() - begun, 1)}
    print(f"{'path':13s} {'rung':5s} {'experts':>8s} {'ladder':>8s} {'heldout':>8s} "
          f"{'unseen':>8s}  per_layer")
    for r in rows:
        print(f"{r['path']:13s} {r['rung']:5s} {r['experts_computed']:8.2f} "
              f"{100 * (r['ladder_ppl_rise'] or 0):+7.2f}% {100 * r['heldout_ppl_rise']:+7.2f}% "
              f"{100 * r['unseen_ppl_rise']:+7.2f}%  {r['per_layer']}")
    print("same tables:", result["comparison"]["same_table"])
    print("max sensitivity diff [nats] per layer:",
          result["comparison"]["max_sensitivity_diff_nats"])
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
