"""Speculative decoding (NGRAM) verify steps: stock vs Lynx's ``prune_verify``, on the CPU.

    python benchmark/verify_steps.py [--requests 16] [--draft-tokens 4 12] [--budget 8]
        [--out benchmark/results/verify_steps.json]

For each number of draft tokens n, one SGLang server (``--speculative-algorithm NGRAM``) per
variant, the same requests in one batch: ``stock`` (Lynx on with policy ``off``: routing
exactly stock, its hooks only time the steps) and ``lynx`` (``budget`` with ``prune_verify``).
A non-speculative stock server gives the reference greedy outputs. Requests: ``--requests``
held-out additions (exact match) and as many held-out Python-source continuations (where
n-gram drafts get accepted). Reported per variant:
- acceptance: SGLang's ``spec_accept_length`` (tokens per verify step, bonus token included)
  and ``spec_accept_rate``, means over requests;
- quality: arithmetic exact match; token agreement of every output with the non-speculative
  reference (fraction of requests whose output is identical, and of matching characters);
- cost: the wall time of verify steps (``lynx_step_duration_seconds{mode="verify"}``) and of
  the MoE blocks inside them (``LYNX_TIME_MOE=1``: ``lynx_moe_seconds_total{mode="verify"}``),
  per verify step; experts kept vs the stock union per layer-step.
Timings on this shared CPU are noisy: compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmark.common import machine_description, rounded, write_json
from lynx.reference.data import iter_sources
from lynx.reference.tasks import arithmetic_prompt, heldout_problems, parse_answer
from lynx.serving.metrics_reader import samples
from lynx.serving.server import SglangServer, free_port

MODEL = Path(__file__).resolve().parents[1] / "models" / "qwen3-moe-mini"
BASE_ARGS = ("--dtype", "float32", "--max-total-tokens", "16384")


def requests(count: int) -> tuple[list[str], list[int]]:
    """``count`` additions and ``count`` code prompts (the first 400 characters of held-out
    stdlib files); returns (prompts, the additions' answers)."""
    problems = heldout_problems(count)
    code = [text[:400] for text, _ in zip(iter_sources("heldout"), range(count), strict=False)]
    return [arithmetic_prompt(a, b) for a, b in problems] + code, [a + b for a, b in problems]


def _metric(text: str, name: str, mode: str) -> float:
    return sum(v for labels, v in samples(text, name) if labels.get("mode") == mode)


def run_variant(prompts: list[str], draft_tokens: int | None, policy: dict[str, Any],
                tokens: int, log_dir: Path) -> dict[str, Any]:
    """One server, one batch of all ``prompts``; its outputs, acceptance and step costs."""
    args = BASE_ARGS if draft_tokens is None else (
        *BASE_ARGS, "--speculative-algorithm", "NGRAM",
        "--speculative-num-draft-tokens", str(draft_tokens))
    env = {"LYNX_ENABLED": "1", "LYNX_POLICY": json.dumps(policy), "LYNX_TIME_MOE": "1",
           "LYNX_STATS_INTERVAL_S": "0.5"}
    port = free_port()
    with SglangServer(MODEL, port, extra_args=args, env=env,
                      log_path=log_dir / f"verify-{draft_tokens}-{policy['name']}-{port}.log"
                      ) as server:
        body = {"text": prompts, "sampling_params": {"max_new_tokens": tokens,
                                                     "temperature": 0}}
        httpx.post(f"{server.url}/generate", json={**body, "text": prompts[:2]}, timeout=900)
        before = httpx.get(f"{server.url}/metrics", timeout=10).text
        start = time.perf_counter()
        items = httpx.post(f"{server.url}/generate", json=body, timeout=1800).json()
        wall = time.perf_counter() - start
        time.sleep(1.0)
        after = httpx.get(f"{server.url}/metrics", timeout=10).text

    def delta(name: str, mode: str) -> float:
        return _metric(after, name, mode) - _metric(before, name, mode)

    steps = delta("lynx_step_duration_seconds_count", "verify")
    meta = [item["meta_info"] for item in items]
    kept = sum(v for _, v in samples(after, "lynx_experts_kept_total")) - sum(
        v for _, v in samples(before, "lynx_experts_kept_total"))
    union = sum(v for _, v in samples(after, "lynx_experts_stock_union_total")) - sum(
        v for _, v in samples(before, "lynx_experts_stock_union_total"))
    return {
        "texts": [item["text"] for item in items], "wall_s": wall, "verify_steps": steps,
        "verify_step_ms": 1e3 * delta("lynx_step_duration_seconds_sum", "verify") / steps
        if steps else None,
        "verify_moe_ms": 1e3 * delta("lynx_moe_seconds_total", "verify") / steps
        if steps else None,
        "accept_length": sum(m.get("spec_accept_length", 1.0) for m in meta) / len(meta),
        "accept_rate": sum(m.get("spec_accept_rate", 0.0) for m in meta) / len(meta),
        "kept_over_union": kept / union if union else 1.0,
    }


def quality(result: dict[str, Any], reference: list[str], answers: list[int]) -> None:
    texts = result.pop("texts")
    n = len(answers)
    result["exact_match"] = sum(parse_answer(t) == a for t, a in
                                zip(texts[:n], answers, strict=True)) / n
    result["identical_outputs"] = sum(t == r for t, r in zip(texts, reference, strict=True)
                                      ) / len(texts)
    same = sum(sum(x == y for x, y in zip(t, r, strict=False))
               for t, r in zip(texts, reference, strict=True))
    result["char_agreement"] = same / max(sum(len(r) for r in reference), 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=16, help="additions and code prompts each")
    parser.add_argument("--draft-tokens", type=int, nargs="+", default=[4, 12])
    parser.add_argument("--budget", type=int, default=8, help="experts kept per layer (of 32)")
    parser.add_argument("--tokens", type=int, default=32, help="max new tokens per request")
    parser.add_argument("--out", type=Path, default=Path("benchmark/results/verify_steps.json"))
    args = parser.parse_args(argv)
    prompts, answers = requests(args.requests)
    log_dir = Path("/tmp/lynx-verify-bench")
    log_dir.mkdir(exist_ok=True)
    off = {"name": "off"}
    lynx = {"name": "budget", "budgets": [{"max_batch": 1 << 20, "all_layers": args.budget}],
            "prune_verify": True}
    reference = run_variant(prompts, None, off, args.tokens, log_dir)["texts"]
    rows = []
    for n in args.draft_tokens:
        stock = run_variant(prompts, n, off, args.tokens, log_dir)
        pruned = run_variant(prompts, n, lynx, args.tokens, log_dir)
        for name, result in (("stock", stock), ("lynx", pruned)):
            quality(result, reference, answers)
            rows.append({"draft_tokens": n, "variant": name,
                         **{k: rounded(v) if isinstance(v, float) else v
                            for k, v in result.items()}})
        for key in ("verify_step_ms", "verify_moe_ms"):
            if stock[key] and pruned[key]:
                rows[-1][f"{key}_speedup"] = rounded(stock[key] / pruned[key])
        print(json.dumps(rows[-2]), "\n", json.dumps(rows[-1]), flush=True)
    write_json(args.out, {"machine": machine_description(), "model": MODEL.name,
                          "requests": 2 * args.requests, "budget": args.budget,
                          "tokens": args.tokens, "rows": rows})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
