"""``make demo``: the decode-bound testbed on SGLang's CPU engine, stock vs Lynx steered by the
controller, with the MoE share f of a decode step that bounds what Lynx can buy.

The served model is the reference qwen3-moe-128 with every expert FFN widened x`WIDEN` in fp32
(function-preserving, built once under ``.cache/bench/models``): as on a GPU, its batched
decode steps spend most of their time reading expert weights (`benchmark/testbed.py` is the
full testbed, x128).
1. Stock SGLang (plugin off) answers a batch of held-out additions in one batched greedy
   request.
2. SGLang with Lynx (``LYNX_TIME_MOE=1``) and the policy controller beside it
   (``lynx-policy``, CURVE link): policy off (the MoE share f of a decode step, timed inside
   the server), the default policy, then the checkpoint's ladder (``PUT /v1/ladder``) and
   its rung within 1% held-out perplexity pinned by name (``PUT /v1/mode``).
Every run answers one untimed warm-up batch first (one-off work: a selection package compiled
for a new policy, caches) and the batch of additions (exact match), then ``TIMED`` decode
batches (held-out code prompts, ``MAX_NEW_TOKENS`` tokens each, EOS ignored); the demo prints
their median and, per layer, the experts kept vs the stock router's union over their pruned
steps.
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

from lynx.reference.data import REPO_ROOT
from lynx.reference.tasks import arithmetic_prompt, heldout_problems, parse_answer
from lynx.reference.widen import cached_widening
from lynx.serving.cli import lynx_env
from lynx.serving.client import generate_greedy
from lynx.serving.metrics_reader import metric_sum, samples
from lynx.serving.models import moe_shape, resolve_model, validate_checkpoint
from lynx.serving.server import DECODE_BOUND_FLAGS, SglangServer, free_port
from lynx.sglang_plugin.config import default_policy
from lynx_policy.testing import ControllerProcess  # the controller's process helper (a demo)
from lynx_protocol.ladder import load_ladder

BATCH = 32
MAX_NEW_TOKENS = 64  # per prompt of the timed decode batches (EOS ignored)
TIMED = 5  # timed batches per run (after one untimed warm-up batch); the median is printed
WIDEN = 64  # fits make demo's budget; the full testbed is x128
MAX_PPL_RISE = 0.01


@dataclass
class RunResult:
    label: str
    answers: list[str]
    exact_match: float
    wall_s: float
    kept: dict[int, float]
    union: dict[int, float]
    moe_share: float | None  # MoE ms / forward ms per decode step (LYNX_TIME_MOE servers)


def _totals(url: str) -> dict[str, dict[str, float]]:
    """Per-layer counters (kept experts, stock union, pruned layer-steps, summed over ranks)
    and the decode-step timers, keyed by layer or name."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out: dict[str, dict[str, float]] = {}
    for name in ("lynx_experts_kept_total", "lynx_experts_stock_union_total",
                 "lynx_layer_pruned_steps_total"):
        per_layer = out.setdefault(name, {})
        for labels, value in samples(text, name):
            per_layer[labels["layer"]] = per_layer.get(labels["layer"], 0.0) + value
    decode = out.setdefault("decode", {})
    for name in ("lynx_moe_seconds_total", "lynx_step_duration_seconds_sum"):
        decode[name] = sum(v for labels, v in samples(text, name)
                           if labels.get("mode") == "decode")
    return out


def _flush(server: SglangServer, prompt: str) -> None:
    time.sleep(0.5)  # let the plugin's statistics window close, then a step exports it
    generate_greedy(server.url, [prompt], 1)


def code_prompts(count: int = BATCH, chars: int = 160) -> list[str]:
    """Openings of held-out code files (the reference models' other training task): long
    decodes with varied routing, unlike additions, whose tokens route much alike."""
    from lynx.reference.data import iter_sources

    prompts = []
    for text in iter_sources("heldout"):
        if len(text) >= chars:
            prompts.append(text[:chars])
        if len(prompts) == count:
            break
    return prompts


def _batch(server: SglangServer, label: str) -> RunResult:
    """One untimed warm-up batch and the additions, then `TIMED` decode batches: median wall
    time, experts kept vs stock union per layer over their own pruned layer-steps, and the
    MoE share of their decode steps."""
    problems = heldout_problems(BATCH)
    prompts = [arithmetic_prompt(a, b) for a, b in problems]
    code = code_prompts()
    generate_greedy(server.url, code, MAX_NEW_TOKENS, ignore_eos=True)  # one-off work here
    completions, _ = generate_greedy(server.url, prompts, 8)  # the answers (exact match)
    _flush(server, prompts[0])
    before = _totals(server.url)
    walls = []
    for _ in range(TIMED):
        _, wall = generate_greedy(server.url, code, MAX_NEW_TOKENS, ignore_eos=True)
        walls.append(wall)
    _flush(server, prompts[0])
    after = _totals(server.url)
    answers = [c.text for c in completions]
    correct = sum(
        parse_answer(t) == a + b for t, (a, b) in zip(answers, problems, strict=True)
    )
    steps = {layer: value - before["lynx_layer_pruned_steps_total"].get(layer, 0.0)
             for layer, value in after["lynx_layer_pruned_steps_total"].items()}

    def per_step(name: str) -> dict[int, float]:
        return {int(layer): (after[name].get(layer, 0.0) - before[name].get(layer, 0.0)) / n
                for layer, n in steps.items() if n > 0}

    moe, forward = (after["decode"][n] - before["decode"][n] for n in (
        "lynx_moe_seconds_total", "lynx_step_duration_seconds_sum"))
    return RunResult(label, answers, correct / BATCH, statistics.median(walls),
                     per_step("lynx_experts_kept_total"),
                     per_step("lynx_experts_stock_union_total"),
                     moe / forward if moe > 0 and forward > 0 else None)


def _print_run(run: RunResult) -> None:
    share = "" if run.moe_share is None else f"; MoE share of a decode step f={run.moe_share:.2f}"
    print(f"[{run.label}] exact match {run.exact_match:6.1%}   decode batch of {BATCH} x "
          f"{MAX_NEW_TOKENS} tokens: median {run.wall_s:.3f}s over {TIMED}{share}")
    for layer in sorted(run.kept):
        print(f"    layer {layer}: experts kept {run.kept[layer]:6.2f} per pruned step "
              f"(stock router union {run.union.get(layer, 0.0):6.2f}), these batches")


def _wait_policy_version(server: SglangServer, version: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        generate_greedy(server.url, [arithmetic_prompt(1, 2)], 1)  # a step applies staged policy
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
        if metric_sum(text, "lynx_policy_version") == version:
            return
        time.sleep(0.3)
    raise TimeoutError(f"runtime did not apply policy version {version} in {timeout_s}s")


def testbed(model: str, widen: int) -> Path:
    """The widened fp32 copy the demo serves (``widen`` 1: the checkpoint itself)."""
    src = resolve_model(model)
    if widen <= 1:
        return src
    return cached_widening(src, widen, REPO_ROOT / ".cache" / "bench" / "models" /
                           f"{src.name}-wide{widen}-f32")


def run_demo(model: str = "qwen3-moe-128", port: int = 0, widen: int = WIDEN) -> int:
    print(f"building the testbed: {model}, experts widened x{widen} in fp32 (cached)...",
          flush=True)
    path = testbed(model, widen)
    _, experts, top_k = moe_shape(validate_checkpoint(path))
    ladder_file = path / "lynx_ladder.json"
    ladder = load_ladder(ladder_file)
    rung = [r for r in ladder.rungs if r.cost() <= MAX_PPL_RISE][-1]
    problems = heldout_problems(BATCH)
    print(f"model {path.name} ({experts} experts, top-{top_k}) on SGLang's CPU engine\n")

    with SglangServer(path, port or free_port(), env=lynx_env(False),
                      extra_args=DECODE_BOUND_FLAGS) as stock_server:
        stock = _batch(stock_server, "stock")
    _print_run(stock)

    with tempfile.TemporaryDirectory(prefix="lynx-demo-") as workdir:
        controller = ControllerProcess.launch(Path(workdir), overrides={
            "mode": "off", "policy": msgspec.to_builtins(default_policy(experts, top_k))},
            curve=True)  # CURVE on tcp://
        try:
            env = {**lynx_env(True, controller=controller.endpoint),
                   **controller.runtime_env(), "LYNX_STATS_INTERVAL_S": "0.2",
                   "LYNX_TIME_MOE": "1"}
            with SglangServer(path, free_port(), env=env,
                              extra_args=DECODE_BOUND_FLAGS) as server:
                print(f"\ncontroller at {controller.admin_url} (link {controller.endpoint})")
                off = _batch(server, "lynx, policy off")
                _print_run(off)
                reply = controller.admin.put("/v1/mode", json={"mode": "static"})
                reply.raise_for_status()
                _wait_policy_version(server, int(reply.json()["version"]))
                default = _batch(server, "lynx, default policy")
                _print_run(default)
                controller.admin.put("/v1/ladder", content=ladder_file.read_bytes()
                                     ).raise_for_status()
                body = {"mode": "static", "rung": rung.name}
                print(f"\nPUT /v1/ladder ({len(ladder.rungs)} rungs), PUT /v1/mode {body}: "
                      f"held-out perplexity {100 * rung.cost():+.2f}%")
                reply = controller.admin.put("/v1/mode", json=body)
                reply.raise_for_status()
                version = int(reply.json()["version"])
                _wait_policy_version(server, version)
                print(f"runtime applied policy version {version}")
                pinned = _batch(server, f"lynx, ladder rung {rung.name} (v{version})")
                _print_run(pinned)
        finally:
            controller.stop()

    print(f"\n{'problem':>10} {'stock':>8} {'off':>8} {'default':>8} {rung.name:>8}")
    for i, (a, b) in enumerate(problems[:6]):
        print(f"{f'{a}+{b}':>10} " + " ".join(f"{r.answers[i].strip()[:8]:>8}" for r in (
            stock, off, default, pinned)))
    same = sum(x == y for x, y in zip(stock.answers, pinned.answers, strict=True))
    print(f"\nexact match: stock {stock.exact_match:.1%}, lynx default "
          f"{default.exact_match:.1%}, rung {rung.name} {pinned.exact_match:.1%} "
          f"({same}/{BATCH} answers identical to stock)")
    f = off.moe_share
    bound = "" if f is None else (f"; the MoE blocks are f={f:.2f} of a decode step here, so "
                                  f"even free experts would give at most {1 / (1 - f):.1f}x")
    print(f"median batch time, stock / Lynx (above 1: faster): default "
          f"{stock.wall_s / default.wall_s:.2f}x, rung {rung.name} "
          f"{stock.wall_s / pinned.wall_s:.2f}x (policy off: {stock.wall_s / off.wall_s:.2f}x)"
          f"{bound}. Batches include their prefill; benchmark/testbed.py measures the full "
          "testbed (x128) under SGLang's serving benchmark.")
    return 0


if __name__ == "__main__":
    sys.exit(run_demo(*(sys.argv[1:2] or ["qwen3-moe-128"])))
