"""``make demo``: a reference MoE on SGLang's CPU engine, stock then Lynx steered by the controller.

1. Stock SGLang (plugin off) answers a batch of held-out additions in one batched greedy request.
2. SGLang with Lynx and the policy controller beside it (``lynx-policy``, static mode) answers
   the same batch with the default policy; Lynx's counters over the timed batches give experts
   kept per layer vs the union the stock router would have used, per pruned layer-step.
3. One policy change through the controller's admin API (a tighter budget); the demo waits
   until the runtime reports the new policy version and runs the batch again.
Every server answers one untimed warm-up batch first (one-off work: a selection package
compiled for a new policy, caches), then ``TIMED`` batches; the demo prints their median.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import msgspec

from lynx.reference.tasks import arithmetic_prompt, heldout_problems, parse_answer
from lynx.serving.cli import lynx_env
from lynx.serving.client import generate_greedy
from lynx.serving.metrics_reader import metric_sum, samples
from lynx.serving.models import moe_shape, resolve_model, validate_checkpoint
from lynx.serving.server import SglangServer, free_port
from lynx.sglang_plugin.config import default_policy
from lynx_policy.testing import ControllerProcess

BATCH = 32
MAX_NEW_TOKENS = 6
TIMED = 5  # timed batches per run (after one untimed warm-up batch); the median is printed


@dataclass
class RunResult:
    label: str
    answers: list[str]
    exact_match: float
    wall_s: float
    kept: dict[int, float]
    union: dict[int, float]


def _layer_totals(url: str) -> dict[str, dict[int, float]]:
    """Per-layer counters: kept experts, stock union, pruned layer-steps (summed over ranks)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out: dict[str, dict[int, float]] = {}
    for name in ("lynx_experts_kept_total", "lynx_experts_stock_union_total",
                 "lynx_layer_pruned_steps_total"):
        per_layer = out.setdefault(name, {})
        for labels, value in samples(text, name):
            layer = int(labels["layer"])
            per_layer[layer] = per_layer.get(layer, 0.0) + value
    return out


def _flush(server: SglangServer, prompt: str) -> None:
    time.sleep(0.5)  # let the plugin's statistics window close, then a step exports it
    generate_greedy(server.url, [prompt], 1)


def _batch(server: SglangServer, label: str) -> RunResult:
    """One untimed warm-up batch, then `TIMED` batches: median wall time, and experts kept
    vs stock union per layer over the timed batches' own pruned layer-steps."""
    problems = heldout_problems(BATCH)
    prompts = [arithmetic_prompt(a, b) for a, b in problems]
    generate_greedy(server.url, prompts, MAX_NEW_TOKENS)  # warm-up: one-off work lands here
    _flush(server, prompts[0])
    before = _layer_totals(server.url)
    walls = []
    for _ in range(TIMED):
        completions, wall = generate_greedy(server.url, prompts, MAX_NEW_TOKENS)
        walls.append(wall)
    _flush(server, prompts[0])
    after = _layer_totals(server.url)
    answers = [c.text for c in completions]
    correct = sum(
        parse_answer(t) == a + b for t, (a, b) in zip(answers, problems, strict=True)
    )
    steps = {layer: value - before["lynx_layer_pruned_steps_total"].get(layer, 0.0)
             for layer, value in after["lynx_layer_pruned_steps_total"].items()}

    def per_step(name: str) -> dict[int, float]:
        return {layer: (after[name].get(layer, 0.0) - before[name].get(layer, 0.0)) / n
                for layer, n in steps.items() if n > 0}

    return RunResult(label, answers, correct / BATCH, statistics.median(walls),
                     per_step("lynx_experts_kept_total"),
                     per_step("lynx_experts_stock_union_total"))


def _print_run(run: RunResult) -> None:
    print(f"[{run.label}] exact match {run.exact_match:6.1%}   batch of {BATCH}: median "
          f"{run.wall_s:.3f}s over {TIMED} timed batches (after a warm-up batch)")
    for layer in sorted(run.kept):
        print(f"    layer {layer}: experts kept {run.kept[layer]:5.2f} per pruned step "
              f"(stock router union {run.union.get(layer, 0.0):5.2f}), these batches")


def _wait_policy_version(server: SglangServer, version: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        generate_greedy(server.url, [arithmetic_prompt(1, 2)], 1)  # a step applies staged policy
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
        if metric_sum(text, "lynx_policy_version") == version:
            return
        time.sleep(0.3)
    raise TimeoutError(f"runtime did not apply policy version {version} in {timeout_s}s")


def run_demo(model: str = "mixtral-mini", port: int = 0) -> int:
    path = resolve_model(model)
    _, experts, top_k = moe_shape(validate_checkpoint(path))
    problems = heldout_problems(BATCH)
    print(f"model {model} ({experts} experts, top-{top_k}) on SGLang's CPU engine\n")

    with SglangServer(path, port or free_port(), env=lynx_env(False)) as stock_server:
        stock = _batch(stock_server, "stock")
    _print_run(stock)

    with tempfile.TemporaryDirectory(prefix="lynx-demo-") as workdir:
        start_policy = msgspec.to_builtins(default_policy(experts, top_k))
        controller = ControllerProcess.launch(Path(workdir), overrides={
            "mode": "static", "policy": start_policy}, curve=True)  # CURVE on tcp://
        try:
            env = {**lynx_env(True, controller=controller.endpoint),
                   **controller.runtime_env()}
            env["LYNX_STATS_INTERVAL_S"] = "0.2"
            with SglangServer(path, free_port(), env=env) as server:
                print(f"\ncontroller at {controller.admin_url} (link {controller.endpoint})")
                default = _batch(server, "lynx, default policy")
                _print_run(default)
                tighter = {"name": "budget", "budgets": [
                    {"max_batch": 3, "all_layers": experts},
                    {"max_batch": 100000, "all_layers": top_k}]}
                print(f"\nPUT /v1/policy {tighter}")
                reply = controller.admin.put("/v1/policy", json=tighter)
                reply.raise_for_status()
                version = int(reply.json()["version"])
                _wait_policy_version(server, version)
                print(f"runtime applied policy version {version}")
                tight = _batch(server, f"lynx, budget {top_k} (v{version})")
                _print_run(tight)
        finally:
            controller.stop()

    print(f"\n{'problem':>10} {'stock':>8} {'default':>8} {'tight':>8}   (answers reversed)")
    for i, (a, b) in enumerate(problems[:6]):
        print(f"{f'{a}+{b}':>10} {stock.answers[i].strip():>8} {default.answers[i].strip():>8} "
              f"{tight.answers[i].strip():>8}")
    print(f"\nexact match: stock {stock.exact_match:.1%}, lynx default {default.exact_match:.1%}, "
          f"lynx tight {tight.exact_match:.1%}")
    print(f"median batch time relative to stock (below 1: faster): lynx default "
          f"{default.wall_s / stock.wall_s:.2f}, lynx tight {tight.wall_s / stock.wall_s:.2f}. "
          "This reference model's decode step is mostly framework time on a CPU, so reading "
          "fewer experts moves it little (benchmark/RESULTS.md).")
    return 0


if __name__ == "__main__":
    sys.exit(run_demo(*(sys.argv[1:2] or ["mixtral-mini"])))
