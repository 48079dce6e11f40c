"""The accuracy gate: EleutherAI's lm-eval against a stock and a Lynx SGLang server, per-task
paired deltas with standard errors, pass or fail against the user's threshold.

lm-eval talks to each server through SGLang's OpenAI-compatible ``/v1/completions``
(``local-completions``, string prompts, greedy) with ``concurrency`` requests in flight, so
the Lynx server decodes real batches and prunes them. A log-likelihood task
(``loglikelihood``, ``multiple_choice``, ``loglikelihood_rolling``) is scored entirely in
prefill, which a serving Lynx never prunes: such tasks run against a Lynx server in evaluation
mode (`lynx.sglang_plugin.evaluation`: prefill rows pruned by position groups across the
requests in flight, as decode steps of that many rows), with the checkpoint's tokenizer
(lm-eval needs it to split context from continuation). Generation and log-likelihood tasks
cannot share a run (one server cannot serve both ways; `GateError`).

Paired delta of a task (the same documents on both servers): d_i = lynx_i - stock_i of the
task's primary metric per document, delta = mean(d) and its standard error
stdev(d) / sqrt(n), both in points (x100 for a [0, 1] metric). A task passes when
delta >= -threshold.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx


class GateError(ValueError):
    """Bad gate input (an unknown task, a log-likelihood task, a server without a model);
    the message is one line."""


@dataclass(frozen=True)
class TaskScores:
    """One server's per-document scores of one task."""

    task: str
    metric: str
    """``metric,filter`` as lm-eval names it (e.g. ``exact_match,leading-digits``)."""
    per_doc: dict[int, float]
    """doc_id -> the metric's value for that document."""


@dataclass(frozen=True)
class TaskDelta:
    task: str
    metric: str
    stock: float
    """Stock server's mean [points]."""
    lynx: float
    delta: float
    """Mean paired difference, Lynx - stock [points]."""
    stderr: float
    """Standard error of ``delta`` [points]."""
    n: int
    passed: bool


def served_model(url: str) -> str:
    """The model name a server serves (``GET /v1/models``). Raises GateError."""
    try:
        data = httpx.get(f"{url}/v1/models", timeout=30).json()["data"]
        return str(data[0]["id"])
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
        raise GateError(f"{url}: no served model at /v1/models ({exc})") from None


def _offline_env(cache: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_CACHE", str(cache))


PREFILL_SCORED = ("loglikelihood", "multiple_choice", "loglikelihood_rolling")


def check_tasks(tasks: Sequence[str], include_path: Sequence[Path]) -> tuple[list[str], bool]:
    """(the leaf task names ``tasks`` (names or groups) expand to, whether they are scored in
    prefill); GateError for an unknown name, an unknown output type, or generation and
    log-likelihood tasks mixed."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=[str(p) for p in include_path] or None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise GateError(f"unknown lm-eval task(s) {unknown} (include paths: "
                        f"{[str(p) for p in include_path]})")
    try:
        leaves = manager.load(list(tasks))["tasks"]  # groups and tags expand to leaf tasks
    except Exception as exc:  # lm-eval and datasets raise many kinds; one line names it
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise GateError(f"cannot load lm-eval task(s) {list(tasks)} offline: {first}"
                        ) from None
    kinds = {name: task.OUTPUT_TYPE for name, task in leaves.items()}
    unknown_kind = {n: k for n, k in kinds.items()
                    if k != "generate_until" and k not in PREFILL_SCORED}
    if unknown_kind:
        raise GateError(f"{unknown_kind}: output types the gate cannot run")
    prefill = {n for n, k in kinds.items() if k in PREFILL_SCORED}
    if prefill and len(prefill) != len(kinds):
        raise GateError(f"{sorted(prefill)} are scored in prefill (evaluation mode) and "
                        f"{sorted(set(kinds) - prefill)} by generation (serving): run them "
                        "in separate evaluations")
    return sorted(leaves), bool(prefill)


def run_tasks(url: str, tasks: Sequence[str], include_path: Sequence[Path],
              concurrency: int, limit: int | None, cache: Path,
              tokenizer: Path | None = None) -> dict[str, TaskScores]:
    """lm-eval's per-document scores of ``tasks`` on the server at ``url``; ``tokenizer``:
    the checkpoint folder, for tasks scored in prefill (token ids on the wire)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    _offline_env(cache)
    manager = TaskManager(include_path=[str(p) for p in include_path] or None)
    args = {"base_url": f"{url}/v1/completions", "model": served_model(url),
            "num_concurrent": concurrency, "tokenizer_backend": None,
            "tokenized_requests": False, "max_retries": 3, "timeout": 600}
    if tokenizer is not None:
        args.update(tokenizer_backend="huggingface", tokenizer=str(tokenizer),
                    tokenized_requests=True)
    result = simple_evaluate(model="local-completions", model_args=args, tasks=list(tasks),
                             task_manager=manager, limit=limit, log_samples=True,
                             bootstrap_iters=0, verbosity="WARNING")
    if result is None:
        raise GateError(f"{url}: lm-eval returned no results")
    scores = {}
    for task, samples in result["samples"].items():
        metric = primary_metric(result["results"][task])
        name, flt = metric.split(",", 1)
        per_doc = {int(s["doc_id"]): float(s[name]) for s in samples if s["filter"] == flt}
        scores[task] = TaskScores(task, metric, per_doc)
    return scores


def primary_metric(results: dict[str, Any]) -> str:
    """The first ``metric,filter`` key of a task's lm-eval results (not a stderr)."""
    for key in results:
        if "," in key and "_stderr" not in key:
            return key
    raise GateError(f"no metric in lm-eval results {sorted(results)}")


def paired_delta(stock: TaskScores, lynx: TaskScores, threshold: float,
                 scale: float = 100.0) -> TaskDelta:
    """Paired delta of one task (module docstring); ``scale`` turns the metric into points.
    Raises GateError when the two runs share no document."""
    docs = sorted(set(stock.per_doc) & set(lynx.per_doc))
    if not docs:
        raise GateError(f"{stock.task}: the two servers scored no common document")
    diffs = [lynx.per_doc[d] - stock.per_doc[d] for d in docs]
    delta = scale * statistics.fmean(diffs)
    stderr = scale * statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else 0.0
    return TaskDelta(
        task=stock.task, metric=stock.metric,
        stock=round(scale * statistics.fmean(stock.per_doc[d] for d in docs), 3),
        lynx=round(scale * statistics.fmean(lynx.per_doc[d] for d in docs), 3),
        delta=round(delta, 3), stderr=round(stderr, 3), n=len(docs),
        passed=delta >= -threshold)


def compare(stock: dict[str, TaskScores], lynx: dict[str, TaskScores], threshold: float
            ) -> list[TaskDelta]:
    """Every task's paired delta (tasks both servers ran, sorted by name)."""
    return [paired_delta(stock[t], lynx[t], threshold) for t in sorted(set(stock) & set(lynx))]


def report(deltas: list[TaskDelta], threshold: float, extra: dict[str, Any]) -> dict[str, Any]:
    """The gate's JSON report."""
    return {"threshold_points": threshold, "passed": all(d.passed for d in deltas),
            "tasks": [asdict(d) for d in deltas], **extra}


def table(deltas: list[TaskDelta]) -> str:
    """A plain-text table of the deltas."""
    lines = [f"{'task':<16} {'metric':<28} {'stock':>7} {'lynx':>7} {'delta':>8} "
             f"{'stderr':>7} {'n':>5}  verdict"]
    for d in deltas:
        lines.append(f"{d.task:<16} {d.metric:<28} {d.stock:7.2f} {d.lynx:7.2f} "
                     f"{d.delta:+8.2f} {d.stderr:7.2f} {d.n:5d}  "
                     f"{'pass' if d.passed else 'FAIL'}")
    return "\n".join(lines)
