"""``make demo``: a reference MoE on SGLang's CPU engine, stock then Lynx steered by the controller.

1. Stock SGLang (plugin off) answers a batch of held-out additions in one batched greedy request.
2. SGLang with Lynx and the policy controller beside it (``lynx-policy``, static mode) answers
   the same batch with the default policy; Lynx's metrics give experts kept per layer vs the
   union the stock router would have used.
3. One policy change through the controller's admin API (a tighter budget); the demo waits
   until the runtime reports the new policy version and runs the batch again.
"""

from __future__ import annotations

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
from lynx.serving.metrics_reader import metric_sum, read_layer_gauges
from lynx.serving.models import moe_shape, resolve_model, validate_checkpoint
from lynx.serving.server import SglangServer, free_port
from lynx.sglang_plugin.config import default_policy
from lynx_policy.testing import ControllerProcess

BATCH = 32
MAX_NEW_TOKENS = 6


@dataclass
class RunResult:
    label: str
    answers: list[str]
    exact_match: float
    wall_s: float
    kept: dict[int, float]
    union: dict[int, float]


def _batch(server: SglangServer, label: str) -> RunResult:
    problems = heldout_problems(BATCH)
    prompts = [arithmetic_prompt(a, b) for a, b in problems]
    completions, wall = generate_greedy(server.url, prompts, MAX_NEW_TOKENS)
    time.sleep(0.5)  # let the plugin's statistics window close
    generate_greedy(server.url, prompts[:1], 1)
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    answers = [c.text for c in completions]
    correct = sum(
        parse_answer(t) == a + b for t, (a, b) in zip(answers, problems, strict=True)
    )
    return RunResult(label, answers, correct / BATCH, wall,
                     read_layer_gauges(text, "lynx_experts_kept_mean"),
                     read_layer_gauges(text, "lynx_experts_stock_union_mean"))


def _print_run(run: RunResult) -> None:
    print(f"[{run.label}] exact match {run.exact_match:6.1%}   batch of {BATCH} in "
          f"{run.wall_s:.3f}s")
    for layer in sorted(run.kept):
        print(f"    layer {layer}: experts kept {run.kept[layer]:5.2f}  "
              f"(stock router union {run.union.get(layer, 0.0):5.2f})")


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
          f"lynx tight {tight.exact_match:.1%}  (single runs on a shared CPU: latency is noisy)")
    return 0


if __name__ == "__main__":
    sys.exit(run_demo(*(sys.argv[1:2] or ["mixtral-mini"])))
