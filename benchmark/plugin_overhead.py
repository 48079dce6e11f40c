"""Host cost of the Lynx plugin's hooks when they do not prune (policy ``off``), in-process.

    python benchmark/plugin_overhead.py [--steps N] [--out results/plugin_overhead.json]

Times the plugin's real hook methods (``lynx.sglang_plugin.runtime.LynxRuntime``) with a no-op in
place of
SGLang's own function: the ``ModelRunner.forward`` hook (row layout, knob writes, step
statistics and Prometheus counters, with the multiprocess collector SGLang uses) and the TopK
hook's pass-through. This is the fixed per-step cost a server with Lynx enabled pays on top
of stock; the end-to-end "policy off" ratio is compared against it in RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmark.common import RESULTS_DIR, machine_description, write_json

LAYERS, EXPERTS, TOP_K, BATCH = 4, 32, 4, 32  # qwen3-moe-mini's MoE shape, a C=32 step


class _DecodeMode:
    def is_idle(self) -> bool:
        return False

    def is_decode(self) -> bool:
        return True

    def is_mixed(self) -> bool:
        return False


def _median_us(fn: Any, steps: int) -> float:
    samples = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6


def measure(steps: int) -> dict[str, Any]:
    """Median host cost of the hooks; leaves the caller's environment and hook state as found
    (the multiprocess directory is set only for prometheus_client imported from here on)."""
    saved_env = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if saved_env is not None:
        return _measure(steps)
    with tempfile.TemporaryDirectory(prefix="lynx-prom-") as metrics_dir:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        try:
            return _measure(steps)
        finally:
            del os.environ["PROMETHEUS_MULTIPROC_DIR"]


def _measure(steps: int) -> dict[str, Any]:
    import torch

    from lynx.sglang_plugin.config import PluginConfig
    from lynx.sglang_plugin.exporter import StatsExporter
    from lynx.sglang_plugin.runtime import LynxRuntime
    from lynx.sglang_plugin.step_state import RuntimeState
    from lynx_protocol.policy import PolicySpec

    torch.set_num_threads(1)
    off = PolicySpec(name="off")
    config = PluginConfig(enabled=True, policy=off, controller=None, replica_id="bench",
                          stale_after_s=10.0, safe_policy=None, stats_interval_s=0.5)
    state = RuntimeState(LAYERS, EXPERTS, TOP_K, torch.device("cpu"), off)
    runtime = LynxRuntime(config)  # its own object: nothing global to save or restore
    runtime.state, runtime.exporter = state, StatsExporter(state, config)
    batch = SimpleNamespace(forward_mode=_DecodeMode(), batch_size=BATCH)
    runner = SimpleNamespace(is_draft_worker=False)
    topk = SimpleNamespace(topk_config=None, layer_id=0, is_draft=False)
    hidden, logits = torch.zeros(BATCH, 8), torch.zeros(BATCH, EXPERTS)

    def forward_hook() -> None:
        runtime.around_model_runner_forward(lambda _r, _b: None, runner, batch)

    def topk_hook() -> None:
        runtime.around_topk_forward(lambda *_a: None, topk, hidden, logits)

    forward_us = _median_us(forward_hook, steps)
    topk_us = _median_us(topk_hook, steps)
    return {"benchmark": "plugin_overhead", "machine": machine_description(), "steps": steps,
            "layers": LAYERS, "batch": BATCH, "forward_hook_us": round(forward_us, 2),
            "topk_passthrough_us": round(topk_us, 2),
            "per_step_us": round(forward_us + LAYERS * topk_us, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "plugin_overhead.json")
    args = parser.parse_args(argv)
    result = measure(args.steps)
    write_json(args.out, result)
    print(f"[plugin_overhead] ModelRunner.forward hook {result['forward_hook_us']:.1f} us, "
          f"TopK pass-through {result['topk_passthrough_us']:.1f} us x {LAYERS} layers: "
          f"{result['per_step_us']:.1f} us per step with policy off")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
