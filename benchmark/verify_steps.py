"""Speculative decoding (NGRAM) verify steps: stock vs Lynx's ``prune_verify``, on the CPU.

    python benchmark/verify_steps.py [--requests 8] [--draft-tokens 4 12] [--budget 8]
        [--reps 3] [--out benchmark/results/verify_steps.json]

For each number of draft tokens n, one SGLang server (``--speculative-algorithm NGRAM``) per
variant, both up at once, the same batches sent to each in a shuffled order (``--reps``
batches, distinct prompts each: NGRAM learns from what it served): ``stock`` (Lynx on with
policy ``off``: routing exactly stock, its hooks only time the steps) and ``lynx`` (``budget``
with ``prune_verify``).
A non-speculative stock server gives the reference greedy outputs. Requests: ``--requests``
held-out additions (exact match) and as many held-out Python-source continuations (where
n-gram drafts get accepted). Reported per variant:
- acceptance: SGLang's ``spec_accept_length`` (tokens per verify step, bonus token included)
  and ``spec_accept_rate``, means over requests;
- quality: arithmetic exact match; token agreement of every output with the non-speculative
  reference (fraction of requests whose output is identical, and of matching characters);
  held-out code perplexity with the verify steps' selection (``VerifyHook``: teacher-forced,
  ``--requests`` windows x n consecutive tokens per step, depth weights) vs stock;
- cost: the wall time of verify steps (``lynx_step_duration_seconds{mode="verify"}``) and of
  the MoE blocks inside them (``LYNX_TIME_MOE=1``: ``lynx_moe_seconds_total{mode="verify"}``),
  per verify step; experts kept vs the stock union per layer-step.
Timings on this shared CPU are noisy: compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmark.accuracy import SelectionHook
from benchmark.common import machine_description, rounded, write_json
from lynx.reference.data import iter_sources
from lynx.reference.tasks import arithmetic_prompt, heldout_problems, parse_answer
from lynx.serving.metrics_reader import samples
from lynx.serving.server import SglangServer, free_port

MODEL = Path(__file__).resolve().parents[1] / "models" / "qwen3-moe-mini"
BASE_ARGS = ("--dtype", "float32", "--max-total-tokens", "16384")


def requests(count: int, reps: int) -> list[tuple[list[str], list[int]]]:
    """Per repetition, ``count`` additions and ``count`` code prompts (the first 400 characters
    of held-out stdlib files), distinct across repetitions (NGRAM learns from what it served);
    each as (prompts, the additions' answers)."""
    problems = heldout_problems(count * reps)
    code = [text[:400] for text, _ in zip(iter_sources("heldout"), range(count * reps),
                                           strict=False)]
    out = []
    for r in range(reps):
        chunk = problems[r * count:(r + 1) * count]
        out.append(([arithmetic_prompt(a, b) for a, b in chunk]
                    + code[r * count:(r + 1) * count], [a + b for a, b in chunk]))
    return out


def _metric(text: str, name: str, mode: str | None = None) -> float:
    return sum(v for labels, v in samples(text, name) if mode is None or labels.get("mode") == mode)


def make_server(draft_tokens: int | None, policy: dict[str, Any], log_dir: Path
                ) -> SglangServer:
    args = BASE_ARGS if draft_tokens is None else (
        *BASE_ARGS, "--speculative-algorithm", "NGRAM",
        "--speculative-num-draft-tokens", str(draft_tokens))
    env = {"LYNX_ENABLED": "1", "LYNX_POLICY": json.dumps(policy), "LYNX_TIME_MOE": "1",
           "LYNX_STATS_INTERVAL_S": "0.5"}
    port = free_port()
    return SglangServer(MODEL, port, extra_args=args, env=env,
                        log_path=log_dir / f"verify-{draft_tokens}-{policy['name']}-{port}.log")


def one_batch(url: str, prompts: list[str], tokens: int) -> dict[str, Any]:
    """All ``prompts`` in one ``/generate`` call: outputs, acceptance, verify-step costs."""
    body = {"text": prompts, "sampling_params": {"max_new_tokens": tokens, "temperature": 0}}
    before = httpx.get(f"{url}/metrics", timeout=10).text
    start = time.perf_counter()
    items = httpx.post(f"{url}/generate", json=body, timeout=1800).json()
    wall = time.perf_counter() - start
    time.sleep(1.0)  # the statistics window closes
    after = httpx.get(f"{url}/metrics", timeout=10).text

    def delta(name: str, mode: str | None = None) -> float:
        return _metric(after, name, mode) - _metric(before, name, mode)

    steps = delta("lynx_step_duration_seconds_count", "verify")
    meta = [item["meta_info"] for item in items]
    union = delta("lynx_experts_stock_union_total")
    return {
        "texts": [item["text"] for item in items], "wall_s": wall, "verify_steps": steps,
        "verify_step_ms": 1e3 * delta("lynx_step_duration_seconds_sum", "verify") / steps
        if steps else 0.0,
        "verify_moe_ms": 1e3 * delta("lynx_moe_seconds_total", "verify") / steps
        if steps else 0.0,
        "accept_length": sum(m.get("spec_accept_length", 1.0) for m in meta) / len(meta),
        "accept_rate": sum(m.get("spec_accept_rate", 0.0) for m in meta) / len(meta),
        "kept_over_union": delta("lynx_experts_kept_total") / union if union else 1.0,
    }


def interleaved(batches: list[list[str]], draft_tokens: int | None,
                policies: dict[str, dict[str, Any]], tokens: int, log_dir: Path
                ) -> dict[str, list[dict[str, Any]]]:
    """One server per policy, all up at once; batch r goes to every server in a shuffled
    order before batch r+1 (noise on a shared machine hits every variant alike)."""
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in policies}
    order = random.Random(draft_tokens or 0)
    with contextlib.ExitStack() as stack:
        servers = {name: stack.enter_context(make_server(draft_tokens, policy, log_dir))
                   for name, policy in policies.items()}
        for server in servers.values():  # warm-up outside the measurement
            one_batch(server.url, ["1+1=", "def f(x):"], 4)
        for prompts in batches:
            names = list(servers)
            order.shuffle(names)
            for name in names:
                results[name].append(one_batch(servers[name].url, prompts, tokens))
    return results


def summarise(runs: list[dict[str, Any]], reference: list[list[str]],
              answers: list[list[int]]) -> dict[str, Any]:
    """Medians of the costs over repetitions; acceptance and quality over all requests."""
    out: dict[str, Any] = {key: statistics.median(r[key] for r in runs) for key in
                           ("wall_s", "verify_step_ms", "verify_moe_ms", "kept_over_union")}
    out["verify_steps"] = sum(r["verify_steps"] for r in runs)
    for key in ("accept_length", "accept_rate"):
        out[key] = statistics.fmean(r[key] for r in runs)
    merged = {"texts": [t for r in runs for t in r["texts"]]}
    quality(merged, [t for ref in reference for t in ref], answers)
    merged.pop("texts", None)
    return {**out, **merged}


def quality(result: dict[str, Any], reference: list[str], answers: list[list[int]]) -> None:
    """Exact match of the additions (the first half of each repetition's batch) and
    agreement of every output with the non-speculative reference."""
    texts = result.pop("texts")
    per_rep = len(texts) // len(answers)
    sums = [parse_answer(texts[r * per_rep + i]) == a
            for r, rep in enumerate(answers) for i, a in enumerate(rep)]
    result["exact_match"] = sum(sums) / len(sums)
    result["identical_outputs"] = sum(t == r for t, r in zip(texts, reference, strict=True)
                                      ) / len(texts)
    same = sum(sum(x == y for x, y in zip(t, r, strict=False))
               for t, r in zip(texts, reference, strict=True))
    result["char_agreement"] = same / max(sum(len(r) for r in reference), 1)


class VerifyHook(SelectionHook):
    """Teacher-forced scoring shaped like verify steps: the ``batch`` windows' positions in
    blocks of ``drafts`` consecutive tokens form one verify step (a chain draft tree, depths
    0..drafts-1), selected with the per-request depth weights `prune_verify` uses."""

    drafts = 4

    def __call__(self, module: Any, inputs: Any, output: Any) -> Any:
        import torch

        from lynx.selection import merge_rerouted, select_layer_step, verify_row_weights

        if not bool(self.knobs.enabled):
            return output
        router_logits, scores, stock_ids = output
        experts, top_k = router_logits.shape[-1], self.router.top_k
        z = router_logits.float().view(self.batch, -1, experts)
        own = stock_ids.view(self.batch, -1, top_k)  # transformers' own top-K (the engine's)
        positions, n = z.shape[1], self.drafts
        weights = torch.empty(self.batch, positions, top_k)
        ids = torch.empty(self.batch, positions, top_k, dtype=torch.int64)
        rerouted = torch.empty(self.batch, positions, dtype=torch.bool)
        for start in range(0, positions, n):
            block = z[:, start:start + n]  # [R, n', E]
            width = block.shape[1]
            rows = torch.ones(self.batch * width, dtype=torch.bool)
            depth = torch.arange(width).repeat(self.batch)
            step = select_layer_step(self.variant.policy, block.reshape(-1, experts),
                                     self.router, self.knobs, rows, rows,
                                     self.correction_bias,
                                     row_weight=verify_row_weights(depth, width),
                                     stock_ids=own[:, start:start + n].reshape(-1, top_k))
            weights[:, start:start + width] = step.topk_weights.view(self.batch, width, -1)
            ids[:, start:start + width] = step.topk_ids.view(self.batch, width, -1)
            rerouted[:, start:start + width] = step.rerouted.view(self.batch, width)
        # As the server: rows with nothing dropped keep transformers' own routing.
        flat_ids, flat_weights = merge_rerouted(
            stock_ids, scores, ids.reshape(-1, top_k), weights.reshape(-1, top_k),
            rerouted.reshape(-1))
        stock_top1 = router_logits.argmax(-1, keepdim=True)
        self.rows += stock_top1.numel()
        self.top1_kept += int((flat_ids == stock_top1).any(-1).sum())
        return router_logits, flat_weights, flat_ids


def perplexity_rise(budget: int, drafts: list[int], requests: int) -> dict[int, Any]:
    """Held-out code perplexity, stock vs verify-shaped pruning at each draft count."""
    from benchmark.accuracy import code_scores, compare_code, load_model
    from benchmark.common import OFF, budget_variant

    model, tok = load_model(MODEL)
    stock = code_scores(model, tok, OFF, requests, 2 * requests, 97)
    out = {}
    for n in drafts:
        hook = type(f"VerifyHook{n}", (VerifyHook,), {"drafts": n})
        lynx = code_scores(model, tok, budget_variant(budget), requests, 2 * requests, 97,
                           hook_factory=hook)
        out[n] = {k: rounded(v) for k, v in compare_code(stock, lynx).items()}
    return out


def markdown(result: dict[str, Any]) -> str:
    """The RESULTS.md section of one run."""
    head = ("| draft tokens | variant | accept length | accept rate | verify step ms | "
            "MoE ms / verify step | kept / union | exact match | identical outputs | "
            "ppl rise |\n|" + "---|" * 10 + "\n")
    lines = [f"| {r['draft_tokens']} | {r['variant']} | {r['accept_length']:.2f} | "
             f"{r['accept_rate']:.2f} | {r['verify_step_ms']:.0f} | {r['verify_moe_ms']:.0f} | "
             f"{r['kept_over_union']:.2f} | {r['exact_match']:.2f} | "
             f"{r['identical_outputs']:.2f} | {r.get('ppl_rise', 0.0):+.2%} |"
             for r in result["rows"]]
    return (f"\n## Speculative verify steps (NGRAM)\n\n`python benchmark/verify_steps.py`: "
            f"{result['model']}, batches of {result['batch']} requests x {result['reps']} "
            f"interleaved, budget {result['budget']} of 32 experts with `prune_verify`; "
            "times are medians per verify step (`LYNX_TIME_MOE=1`).\n\n" + head
            + "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=8,
                        help="additions and code prompts each, per batch (2x requests in all)")
    parser.add_argument("--draft-tokens", type=int, nargs="+", default=[4, 12])
    parser.add_argument("--budget", type=int, default=8, help="experts kept per layer (of 32)")
    parser.add_argument("--tokens", type=int, default=32, help="max new tokens per request")
    parser.add_argument("--reps", type=int, default=3, help="batches per variant (interleaved)")
    parser.add_argument("--out", type=Path, default=Path("benchmark/results/verify_steps.json"))
    args = parser.parse_args(argv)
    sets = requests(args.requests, args.reps)
    batches, answers = [p for p, _ in sets], [a for _, a in sets]
    log_dir = Path(tempfile.mkdtemp(prefix="lynx-verify-bench-"))
    off = {"name": "off"}
    lynx = {"name": "budget", "budgets": [{"max_batch": 1 << 20, "all_layers": args.budget}],
            "prune_verify": True}
    plain = interleaved(batches, None, {"stock": off}, args.tokens, log_dir)["stock"]
    reference = [r["texts"] for r in plain]
    ppl = perplexity_rise(args.budget, args.draft_tokens, 2 * args.requests)
    rows = []
    for n in args.draft_tokens:
        runs = interleaved(batches, n, {"stock": off, "lynx": lynx}, args.tokens, log_dir)
        stock, pruned = (summarise(runs[v], reference, answers) for v in ("stock", "lynx"))
        pruned.update(ppl_rise=ppl[n]["ppl_rise"],
                      next_token_agreement=ppl[n]["next_token_agreement"])
        for key in ("verify_step_ms", "verify_moe_ms"):
            pruned[f"{key}_speedup"] = stock[key] / pruned[key] if pruned[key] else None
        for name, result in (("stock", stock), ("lynx", pruned)):
            rows.append({"draft_tokens": n, "variant": name, **{
                k: rounded(v) if isinstance(v, float) else v for k, v in result.items()}})
            print(json.dumps(rows[-1]), flush=True)
    result = {"machine": machine_description(), "model": MODEL.name,
              "batch": 2 * args.requests, "reps": args.reps, "budget": args.budget,
              "tokens": args.tokens, "rows": rows, "perplexity": ppl}
    write_json(args.out, result)
    print(markdown(result))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
