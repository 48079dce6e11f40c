"""``make demo``: the reference model on SGLang's CPU engine, stock and with Lynx, same prompts.

Starts a real ``sglang.launch_server`` twice (plugin off, then on with the default policy), sends
the same batch of held-out addition problems as one batched greedy request, and prints answers,
exact match, latency and — from Lynx's own Prometheus metrics — experts kept per layer against
the union the stock router would have used.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import httpx

from lynx.reference.tasks import arithmetic_prompt, heldout_problems, parse_answer
from lynx.serving.cli import lynx_env
from lynx.serving.client import generate_greedy
from lynx.serving.metrics_reader import read_layer_gauges
from lynx.serving.models import resolve_model
from lynx.serving.server import SglangServer, free_port

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


def _run(label: str, model: str, port: int, lynx: bool) -> RunResult:
    problems = heldout_problems(BATCH)
    prompts = [arithmetic_prompt(a, b) for a, b in problems]
    server = SglangServer(resolve_model(model), port or free_port(), env=lynx_env(lynx))
    print(f"[{label}] starting SGLang (CPU engine) on {server.url} ...", flush=True)
    with server:
        generate_greedy(server.url, prompts[:2], MAX_NEW_TOKENS)  # warm-up
        completions, wall = generate_greedy(server.url, prompts, MAX_NEW_TOKENS)
        metrics_text = httpx.get(f"{server.url}/metrics", timeout=10).text
    answers = [c.text for c in completions]
    correct = sum(
        parse_answer(text) == a + b for text, (a, b) in zip(answers, problems, strict=True)
    )
    kept = read_layer_gauges(metrics_text, "lynx_experts_kept_mean")
    union = read_layer_gauges(metrics_text, "lynx_experts_stock_union_mean")
    return RunResult(label, answers, correct / len(problems), wall, kept, union)


def run_demo(model: str = "mixtral-mini", port: int = 0) -> int:
    stock = _run("stock", model, port, lynx=False)
    lynx = _run("lynx", model, port, lynx=True)
    problems = heldout_problems(BATCH)
    print(f"\nmodel {model}: {BATCH} held-out additions in one batched greedy request\n")
    print(f"{'problem':>12}  {'stock':>10}  {'lynx':>10}")
    for (a, b), s, lx in list(zip(problems, stock.answers, lynx.answers, strict=True))[:8]:
        print(f"{f'{a}+{b}':>12}  {s.strip()!s:>10}  {lx.strip()!s:>10}")
    print("  ...")
    print(f"\nexact match   stock {stock.exact_match:6.1%}   lynx {lynx.exact_match:6.1%}")
    print(f"batch latency stock {stock.wall_s:6.3f}s   lynx {lynx.wall_s:6.3f}s   "
          f"(ratio {stock.wall_s / lynx.wall_s:.2f}x; one run, noisy)")
    if lynx.kept:
        print("\nexperts per MoE layer in pruned decode steps (mean): kept by Lynx vs stock union")
        for layer in sorted(lynx.kept):
            stock_union = lynx.union.get(layer, 0.0)
            print(f"  layer {layer}: kept {lynx.kept[layer]:5.2f}  vs stock {stock_union:5.2f}")
    else:
        print("\n(no Lynx metrics: no decode step was pruned)")
    return 0


if __name__ == "__main__":
    sys.exit(run_demo(*(sys.argv[1:2] or ["mixtral-mini"])))
