"""What shadow mode (``LYNX_SHADOW``) costs a decode step, served: two SGLang CPU servers side
by side, Lynx on with policy ``off`` in both, one of them measuring in shadow mode.

    python benchmark/shadow_overhead.py [--model qwen3-moe-128] [--batches 16 32 64]
        [--reps 3] [--tokens 32] [--every 16] [--out benchmark/results/shadow_overhead.json]

For each repetition and decode batch B (in a shuffled order, the same batches of
training-split code prompts to both servers, one at a time), the mean host wall time of a
decode step over the batch (the plugin's ``lynx_step_duration_seconds{mode="decode"}`` sum
and count, before and after). Reported per B: the medians over repetitions, the shadow/off
ratio and the in-process cost of the recorder per layer-step (`ShadowRecorder.observe` on the
same shape, median of 200 calls; divided by ``--every`` in the share, as served). The issue's
target: <= 2% of a decode step at B >= 16.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmark.common import RESULTS_DIR, machine_description, rounded, write_json

MODELS = Path(__file__).resolve().parents[1] / "models"
STEP = "lynx_step_duration_seconds"
SERVER_ARGS = ("--dtype", "float32", "--max-total-tokens", "16384",
               "--max-running-requests", "64")  # decode batches of up to 64 rows


def decode_totals(url: str) -> tuple[float, float]:
    """(summed seconds, steps) of the server's decode steps so far."""
    from lynx.serving.metrics_reader import samples

    text = httpx.get(f"{url}/metrics", timeout=10).text
    total = sum(v for lab, v in samples(text, f"{STEP}_sum") if lab.get("mode") == "decode")
    count = sum(v for lab, v in samples(text, f"{STEP}_count") if lab.get("mode") == "decode")
    return total, count


def recorder_us(layers: int, experts: int, top_k: int, batch: int, calls: int = 200) -> float:
    """Median in-process cost [us] of one `ShadowRecorder.observe` (one layer-step)."""
    import torch

    from lynx.selection import RouterSpec
    from lynx.sglang_plugin.shadow import ShadowRecorder
    from lynx.sglang_plugin.step_state import RuntimeState, StepLayout
    from lynx_protocol.policy import PolicySpec

    state = RuntimeState(layers, experts, top_k, torch.device("cpu"), PolicySpec(name="off"))
    recorder = ShadowRecorder(state, Path(tempfile.gettempdir()) / "unused.json", 3600.0)
    state.begin_step(StepLayout("decode", batch, 0))
    logits = torch.randn(batch, experts, generator=torch.Generator().manual_seed(batch))
    ids = torch.topk(logits, top_k).indices
    spec = RouterSpec(top_k=top_k)
    times = []
    for _ in range(calls + 20):
        start = time.perf_counter()
        recorder.observe(0, logits, spec, None, ids)
        times.append(time.perf_counter() - start)
    return statistics.median(times[20:]) * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen3-moe-128", help="a name under models/ or a "
                        "checkpoint folder")
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--every", type=int, default=16,
                        help="LYNX_SHADOW_EVERY of the shadow server (1: every decode step)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "shadow_overhead.json")
    args = parser.parse_args(argv)
    import torch

    from lynx.reference.data import iter_sources
    from lynx.serving.client import generate_greedy
    from lynx.serving.models import moe_shape, read_config
    from lynx.serving.server import SglangServer, free_port

    model = Path(args.model) if Path(args.model).is_dir() else MODELS / args.model
    layers, experts, top_k = moe_shape(read_config(model))
    prompts = [text[:200] for text, _ in zip(iter_sources("train"),
                                              range(max(args.batches) * args.reps * 2),
                                              strict=False)]
    rng = random.Random(0)
    means: dict[str, dict[int, list[float]]] = {"off": {}, "shadow": {}}
    with tempfile.TemporaryDirectory(prefix="lynx-shadow-cost-") as tmp:
        envs = {"off": {"LYNX_ENABLED": "1", "LYNX_POLICY": '{"name": "off"}'},
                "shadow": {"LYNX_ENABLED": "1", "LYNX_SHADOW": f"{tmp}/shadow.json",
                           "LYNX_SHADOW_EVERY": str(args.every)}}
        servers = {name: SglangServer(model, free_port(), extra_args=SERVER_ARGS,
                                      env={**env, "OMP_NUM_THREADS": "1"},
                                      log_path=Path(tmp) / f"{name}.log").spawn()
                   for name, env in envs.items()}
        try:
            for server in servers.values():
                server.wait_ready()
            for server in servers.values():  # warm-up
                generate_greedy(server.url, prompts[:4], 4, ignore_eos=True)
            for rep in range(args.reps):
                for batch in rng.sample(args.batches, len(args.batches)):
                    chosen = rng.sample(prompts, batch)
                    for name in rng.sample(list(servers), 2):
                        url = servers[name].url
                        before = decode_totals(url)
                        generate_greedy(url, chosen, args.tokens, ignore_eos=True)
                        after = decode_totals(url)
                        steps = after[1] - before[1]
                        if steps:
                            means[name].setdefault(batch, []).append(
                                (after[0] - before[0]) / steps * 1e3)
                print(f"[shadow_overhead] repetition {rep + 1}/{args.reps} done", flush=True)
        finally:
            for server in servers.values():
                server.stop()
    torch.set_num_threads(1)
    rows = []
    for batch in sorted(args.batches):
        off = statistics.median(means["off"][batch])
        shadow = statistics.median(means["shadow"][batch])
        per_layer = recorder_us(layers, experts, top_k, batch)
        rows.append({"batch": batch, "off_runs_ms": [rounded(v, 3) for v in means["off"][batch]],
                     "shadow_runs_ms": [rounded(v, 3) for v in means["shadow"][batch]],
                     "off_step_ms": rounded(off, 3),
                     "shadow_step_ms": rounded(shadow, 3), "ratio": rounded(shadow / off, 4),
                     "recorder_us_per_layer_step": rounded(per_layer, 1),
                     "recorder_share_of_off_step": rounded(
                         layers * per_layer / 1e3 / off / args.every, 4)})
    result: dict[str, Any] = {"benchmark": "shadow_overhead", "machine": machine_description(),
                              "model": args.model, "every": args.every, "layers": layers,
                              "experts": experts,
                              "top_k": top_k, "reps": args.reps, "tokens": args.tokens,
                              "rows": rows}
    write_json(args.out, result)
    for row in rows:
        print(f"  B={row['batch']:>3}: decode step {row['off_step_ms']:.2f} ms off, "
              f"{row['shadow_step_ms']:.2f} ms shadow ({row['ratio']:.3f}x); recorder "
              f"{row['recorder_us_per_layer_step']:.0f} us x {layers} layers / {args.every} "
              f"= {100 * row['recorder_share_of_off_step']:.2f}% of the step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
