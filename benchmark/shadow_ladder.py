"""The shadow-built ladder against the perplexity-calibrated one, at equal experts computed.

    python benchmark/shadow_ladder.py [--model qwen3-moe-128] [--requests 96] [--tokens 48]
        [--out benchmark/results/shadow_ladder.json]

1. One SGLang CPU server with ``LYNX_SHADOW`` serves ``--requests`` greedy completions of
   training-split code prompts (the calibration's own data), ``--batch`` at a time, each
   ``--tokens`` long: decode steps of ``--batch`` rows, served stock.
2. ``lynx-serve shadow-ladder``'s builder turns the runtime's file into a ladder (cost kind
   ``mass_lost``; buckets with ``--min-steps`` decode steps).
3. Every rung of both ladders (the shadow one and the checkpoint's ``lynx_ladder.json``) is
   measured the same way, in transformers: its table for ``--batch`` rows on the same
   held-out code windows decoded ``--batch`` at a time (`lynx.calibrate.ladder.measure_table`):
   held-out perplexity rise vs no pruning, experts computed per layer and step, routing mass
   kept.
4. Per shadow rung, the calibrated ladder's perplexity rise at the same experts computed
   (linear between its rungs) and the gap: how much quality the routing-mass proxy gives away;
   and a uniform budget at the rung's mean (what no calibration at all gives).
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmark.common import RESULTS_DIR, machine_description, rounded, write_json

MODELS = Path(__file__).resolve().parents[1] / "models"


def serve_shadow(model: Path, requests: int, batch: int, tokens: int, workdir: Path) -> Path:
    """Serve the traffic with LYNX_SHADOW and return the statistics file."""
    from lynx.reference.data import iter_sources
    from lynx.serving.client import generate_greedy
    from lynx.serving.server import DECODE_BOUND_FLAGS, SglangServer, free_port

    shadow = workdir / "shadow.json"
    prompts = [text[:300] for text, _ in zip(iter_sources("train"), range(requests),
                                             strict=False)]
    env = {"LYNX_ENABLED": "1", "LYNX_SHADOW": str(shadow), "LYNX_STATS_INTERVAL_S": "0.5"}
    with SglangServer(model, free_port(), extra_args=DECODE_BOUND_FLAGS, env=env,
                      log_path=workdir / "server.log") as server:
        for start in range(0, len(prompts), batch):
            generate_greedy(server.url, prompts[start:start + batch], tokens, ignore_eos=True)
        time.sleep(1.0)
        generate_greedy(server.url, prompts[:1], 2)  # a step after the interval: rewritten
    return shadow


def measure_tables(model: Path, tables: dict[str, list[dict[str, Any]]], batch: int,
                   windows: int, window_len: int) -> dict[str, list[dict[str, Any]]]:
    """Each curve's tables (``rung``, ``per_layer``, ``ladder_cost``) measured on the same
    held-out windows, ``batch`` rows a step: the points with their measurements added."""
    import torch

    from lynx.calibrate.corpus import calibration_streams, corpus_windows
    from lynx.calibrate.ladder import measure_table, table_policy
    from lynx.reference.loading import load_reference
    from lynx_protocol.policy import PolicySpec

    net, tok = load_reference(model, dtype=torch.float32)
    _, heldout, what = calibration_streams(tok, None)
    held = corpus_windows(heldout, windows - windows % batch, window_len,
                          torch.Generator().manual_seed(12), f"the heldout {what}")
    stock_nll, _, _ = measure_table(net, held, PolicySpec(name="off"), batch)
    out: dict[str, list[dict[str, Any]]] = {}
    for curve, points in tables.items():
        for point in points:
            nll, experts, mass = measure_table(net, held, table_policy(point["per_layer"]),
                                               batch)
            out.setdefault(curve, []).append({
                **point, "experts_computed": rounded(experts, 3), "mass_kept": rounded(mass, 5),
                "ppl_rise": rounded(math.expm1(nll - stock_nll), 5)})
    return out


def ladder_points(ladder: Any, batch: int) -> list[dict[str, Any]]:
    """Each rung's table for ``batch`` rows."""
    from lynx_protocol.ladder import table_for

    return [{"rung": r.name, "per_layer": list(table_for(r, batch).per_layer),
             "ladder_cost": rounded(table_for(r, batch).cost(ladder.kind) or 0.0, 5)}
            for r in ladder.rungs]


def at_experts(curve: list[dict[str, Any]], experts: float) -> float | None:
    """The calibrated curve's perplexity rise at ``experts`` (linear between rungs; None
    outside its range)."""
    points = sorted((p["experts_computed"], p["ppl_rise"]) for p in curve)
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x0 <= experts <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (experts - x0) / (x1 - x0)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen3-moe-128")
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--min-steps", type=int, default=20)
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--window-len", type=int, default=96)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "shadow_ladder.json")
    args = parser.parse_args(argv)
    from lynx.calibrate.shadow_ladder import ladder_from_shadow, read_shadow
    from lynx_protocol.ladder import load_ladder

    model = MODELS / args.model
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lynx-shadow-") as tmp:
        shadow_file = serve_shadow(model, args.requests, args.batch, args.tokens, Path(tmp))
        served_s = time.perf_counter() - start
        shadow, report = ladder_from_shadow(read_shadow([shadow_file]),
                                            min_steps=args.min_steps, max_mass_lost=0.5)
    calibrated = load_ladder(model / "lynx_ladder.json")
    layers, experts = shadow.model.num_layers, shadow.model.num_experts
    shadow_points = ladder_points(shadow, args.batch)
    uniform = [{"rung": f"u{p['rung'][1:]}", "per_layer": [int(p["rung"][1:])] * layers,
                "ladder_cost": None} for p in shadow_points[1:]
               if p["rung"][1:].isdigit() and int(p["rung"][1:]) < experts]
    curves = measure_tables(model, {"shadow": shadow_points,
                                    "calibrated": ladder_points(calibrated, args.batch),
                                    "uniform": uniform},
                            args.batch, args.windows, args.window_len)
    for point in curves["shadow"]:
        reference = at_experts(curves["calibrated"], point["experts_computed"])
        point["calibrated_ppl_rise_at_same_experts"] = (None if reference is None
                                                        else rounded(reference, 5))
        point["gap"] = None if reference is None else rounded(point["ppl_rise"] - reference, 5)
        same = next((u for u in curves["uniform"] if u["rung"][1:] == point["rung"][1:]), None)
        point["uniform_ppl_rise_at_same_mean"] = None if same is None else same["ppl_rise"]
    result = {"benchmark": "shadow_ladder", "machine": machine_description(),
              "model": args.model, "batch": args.batch, "requests": args.requests,
              "tokens": args.tokens, "served_s": rounded(served_s, 1),
              "shadow_steps_by_bucket": report["steps_by_bucket"],
              "heldout": f"{args.windows} windows x {args.window_len} tokens", **curves}
    write_json(args.out, result)
    print(f"[shadow_ladder] {args.model}, B={args.batch}: shadow statistics from "
          f"{args.requests} requests x {args.tokens} tokens ({served_s:.0f} s served)")
    for point in curves["shadow"]:
        print(f"  shadow {point['rung']:>5}: {point['experts_computed']:6.2f} experts, "
              f"ppl {100 * point['ppl_rise']:+.2f}% (mass kept {point['mass_kept']:.4f}); "
              f"calibrated at the same experts: "
              + ("n/a" if point["gap"] is None else
                 f"{100 * point['calibrated_ppl_rise_at_same_experts']:+.2f}%, gap "
                 f"{100 * point['gap']:+.2f} points")
              + ("" if point["uniform_ppl_rise_at_same_mean"] is None else
                 f"; uniform budget {point['rung'][1:]}: "
                 f"{100 * point['uniform_ppl_rise_at_same_mean']:+.2f}%"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
