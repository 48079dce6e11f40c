"""``lynx-serve evaluate``: the accuracy gate as one command (`lynx.evaluate.gate`).

    lynx-serve evaluate --model qwen3-moe-128 [--policy JSON | --policy-file F | --rung NAME]
        [--tasks lynx_heldout] [--include-path DIR] [--limit 256] [--concurrency 16]
        [--threshold 1.0] [--stock-url URL] [--out report.json] [--attach [LADDER]]

Starts a stock SGLang server (unless ``--stock-url`` names a running one) and a Lynx server
with the policy under test (default: what the checkpoint ships, else the built-in default),
one after the other; runs the lm-eval tasks on each (the project's held-out tasks are written
by `lynx.evaluate.tasks`; ``--include-path`` adds the user's own task YAMLs); prints per-task
deltas with standard errors and how much the Lynx server pruned; writes the JSON report.
With ``--rung NAME --attach``, each task's measured drop is written into that rung of the
ladder as a cost of its own kind (`lynx.evaluate.attach`).
Exit 0: every task within ``--threshold`` points; 1: a task is not; 2: bad input.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lynx.serving.server import ServeError, SglangServer, free_port

CONCURRENCY_MIN = 16
"""Generation tasks run with at least this many requests in flight: real decode batches."""


def add_parser(sub: Any) -> None:
    """The ``evaluate`` subcommand of ``lynx-serve``."""
    ev = sub.add_parser("evaluate", help="accuracy gate: lm-eval on a stock and a Lynx server")
    ev.add_argument("--model", required=True, help="reference model name or checkpoint folder")
    what = ev.add_mutually_exclusive_group()
    what.add_argument("--policy", help="the policy under test as JSON (LYNX_POLICY)")
    what.add_argument("--policy-file", type=Path, help="the policy under test (JSON file)")
    what.add_argument("--rung", help="a rung of the checkpoint's lynx_ladder.json")
    ev.add_argument("--tasks", default="lynx_heldout",
                    help="comma-separated lm-eval tasks or groups: generation tasks, or "
                    "log-likelihood ones (e.g. lynx_heldout_choice; the Lynx server then runs "
                    "in evaluation mode), not both")
    ev.add_argument("--include-path", type=Path, action="append", default=[],
                    help="a folder of your own lm-eval task YAMLs (repeatable)")
    ev.add_argument("--limit", type=int, default=256, help="documents per task")
    ev.add_argument("--concurrency", type=int, default=32,
                    help=f"requests in flight (>= {CONCURRENCY_MIN}: real decode batches)")
    ev.add_argument("--threshold", type=float, default=1.0,
                    help="largest allowed drop per task [points]")
    ev.add_argument("--attach", nargs="?", const="", metavar="LADDER",
                    help="with --rung: write each task's measured drop into that rung of this "
                    "ladder file as an acc_drop_<task> cost (default: the checkpoint's "
                    "lynx_ladder.json)")
    ev.add_argument("--stock-url", help="compare against this running stock server")
    ev.add_argument("--out", type=Path, help="write the JSON report here")


def _lynx_env(args: argparse.Namespace) -> dict[str, str]:
    from lynx.sglang_plugin.config import load_config

    env = {"LYNX_ENABLED": "1"}
    if args.policy:
        env["LYNX_POLICY"] = args.policy
    elif args.policy_file:
        env["LYNX_POLICY_FILE"] = str(args.policy_file)
    elif args.rung:
        env["LYNX_LADDER_RUNG"] = args.rung
    load_config(env)  # the plugin's own validation, before any server starts
    return env


@contextlib.contextmanager
def _server(model: Path, env: dict[str, str], work: Path, name: str,
            extra_args: tuple[str, ...] = ()) -> Iterator[str]:
    server = SglangServer(model, free_port(), env=env, log_path=work / f"{name}.log",
                          extra_args=extra_args)
    print(f"[evaluate] starting the {name} server ({model.name})", file=sys.stderr, flush=True)
    with server:
        yield server.url


def _pruning(url: str, model: str) -> dict[str, float]:
    """How much the Lynx server pruned during the run. Step counts are live; the row and
    expert counters come with the statistics window, which a step after
    ``LYNX_STATS_INTERVAL_S`` (1 s) closes: one short request after a pause closes it."""
    import time

    import httpx

    from lynx.serving.metrics_reader import metric_sum, samples

    time.sleep(1.5)
    httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "1+1=",
                                              "max_tokens": 2, "temperature": 0}, timeout=60)
    time.sleep(0.5)
    text = httpx.get(f"{url}/metrics", timeout=10).text
    steps = {labels.get("pruned"): value for labels, value in samples(text, "lynx_steps_total")
             if labels.get("mode") == "decode"}
    kept = metric_sum(text, "lynx_experts_kept_total")
    union = metric_sum(text, "lynx_experts_stock_union_total")
    decode = sum(steps.values())
    return {"pruned_decode_steps": steps.get("true", 0.0), "decode_steps": decode,
            "pruned_layer_steps": metric_sum(text, "lynx_layer_pruned_steps_total"),
            "pruned_rows": metric_sum(text, "lynx_pruned_rows_total"),
            "kept_over_stock_union": round(kept / union, 4) if union else 1.0}


def _attach_target(args: argparse.Namespace, model: Path) -> Path | None:
    """The ladder ``--attach`` writes to, checked before any server starts (None: no attach).
    ServeError: no ``--rung``, or a ladder that is damaged or lacks the rung."""
    from lynx.sglang_plugin.config import CHECKPOINT_LADDER
    from lynx_protocol.ladder import LadderError, load_ladder

    if args.attach is None:
        return None
    if not args.rung:
        raise ServeError("evaluate: --attach needs --rung (the rung the costs belong to)")
    path = Path(args.attach) if args.attach else model / CHECKPOINT_LADDER
    try:
        names = [r.name for r in load_ladder(path).rungs]
    except LadderError as exc:
        raise ServeError(f"evaluate: --attach: {exc}") from None
    if args.rung not in names:
        raise ServeError(f"evaluate: --attach: {path} has no rung {args.rung!r} ({names})")
    return path


def _attach(path: Path, args: argparse.Namespace, deltas: list[Any],
            pruning: dict[str, float]) -> None:
    """Write the drops into the rung (`lynx.evaluate.attach`), unless nothing was pruned."""
    from importlib.metadata import version

    from lynx.evaluate.attach import attach_to_file, cost_kind

    if not pruning["pruned_rows"]:
        print(f"not attached to {path}: the Lynx server pruned nothing, so the drops are "
              "stock's")
        return
    attach_to_file(path, args.rung, deltas, f"lm-eval {version('lm_eval')} (lynx-serve "
                   f"evaluate), {args.concurrency} requests in flight, limit {args.limit}")
    kinds = ", ".join(cost_kind(d.task) for d in deltas)
    print(f"attached to rung {args.rung} of {path}: {kinds}")


def run(args: argparse.Namespace) -> int:
    """The gate (module docstring); ServeError / GateError on bad input."""
    from lynx.evaluate import gate
    from lynx.evaluate.tasks import write_tasks
    from lynx.serving.models import resolve_model

    if args.concurrency < CONCURRENCY_MIN or args.limit < 1 or args.threshold < 0:
        raise ServeError(f"evaluate: need --concurrency >= {CONCURRENCY_MIN}, --limit >= 1 "
                         "and --threshold >= 0")
    missing = [str(p) for p in args.include_path if not p.is_dir()]
    if missing:
        raise ServeError(f"evaluate: --include-path {missing} is not a folder")
    model = resolve_model(args.model)
    ladder_path = _attach_target(args, model)
    env = _lynx_env(args)
    work = Path(tempfile.mkdtemp(prefix="lynx-evaluate-"))
    write_tasks(work / "tasks")
    include = [work / "tasks", *args.include_path]
    tasks, in_prefill = gate.check_tasks([t.strip() for t in args.tasks.split(",")
                                          if t.strip()], include)
    extra: tuple[str, ...] = ()
    if in_prefill:  # log-likelihood: only evaluation mode prunes prefill rows
        from lynx.sglang_plugin.config import EVALUATION_MODE

        env = {**env, "LYNX_EVALUATION": EVALUATION_MODE}
        extra = ("--disable-radix-cache",)
    tokenizer = model if in_prefill else None
    cache = work / "datasets"
    with contextlib.ExitStack() as stack:
        stock_url = args.stock_url or stack.enter_context(
            _server(model, {"LYNX_ENABLED": "0"}, work, "stock"))
        stock = gate.run_tasks(stock_url, tasks, include, args.concurrency, args.limit, cache,
                               tokenizer)
    with _server(model, env, work, "lynx", extra) as url:
        lynx = gate.run_tasks(url, tasks, include, args.concurrency, args.limit, cache,
                              tokenizer)
        pruning = _pruning(url, gate.served_model(url))
    deltas = gate.compare(stock, lynx, args.threshold)
    policy = {k: v for k, v in env.items() if k != "LYNX_ENABLED"} or {"policy": "checkpoint"}
    out = gate.report(deltas, args.threshold, {
        "model": str(model), "policy": policy, "concurrency": args.concurrency,
        "limit": args.limit, "lynx_server": pruning, "harness": "lm-eval local-completions",
        "evaluation_mode": in_prefill})
    print(gate.table(deltas))
    steps = (f"{pruning['pruned_layer_steps']:.0f} prefill position groups x layers pruned "
             "(evaluation mode)" if in_prefill else f"{pruning['pruned_decode_steps']:.0f} of "
             f"{pruning['decode_steps']:.0f} decode steps pruned")
    print(f"Lynx server: {steps} ({pruning['pruned_rows']:.0f} rows), experts kept / stock "
          f"union {pruning['kept_over_stock_union']:.3f}"
          + ("  (nothing was pruned: the gate measured stock)"
             if not pruning["pruned_rows"] else ""))
    if ladder_path is not None:
        _attach(ladder_path, args, deltas, pruning)
    print("gate: " + ("PASS" if out["passed"] else "FAIL")
          + f" (threshold {args.threshold:g} points)")
    if args.out:
        import json

        args.out.write_text(json.dumps(out, indent=1) + "\n")
    return 0 if out["passed"] else 1
