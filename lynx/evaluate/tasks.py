"""lm-eval task definitions of the reference models' held-out tasks (`lynx.reference.tasks`).

``write_tasks(folder)`` writes, per task, an lm-eval YAML (``generate_until``, greedy, the
answer's leading digits scored by ``exact_match``) and its held-out problems as JSONL beside it;
``TaskManager(include_path=folder)`` then finds them by name (``lynx_add3``, ``lynx_add4``).
Each also has a log-likelihood twin, ``lynx_add3_choice`` (``multiple_choice``: the answer
against three near misses, the sums + 1, + 10 and + 100, scored by ``acc``; group
`CHOICE_GROUP`), scored in prefill: through a server it reaches Lynx only in evaluation mode
(``lynx-serve evaluate`` starts the Lynx server so for such tasks).
Files only: nothing is downloaded (``HF_DATASETS_OFFLINE`` holds).

A problem ``a+b`` is the prompt ``"a+b="``; the target is the sum's digits least-significant
first (`lynx.reference.tasks.answer_text`); the model ends its answer with its end-of-text
token, which SGLang stops at and leaves out of the text.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from lynx.reference.tasks import TASKS, answer_text, arithmetic_prompt

TASK_PREFIX = "lynx_"
GROUP = "lynx_heldout"
"""lm-eval group of every task below (``--tasks lynx_heldout`` runs them all)."""
CHOICE_GROUP = "lynx_heldout_choice"
"""lm-eval group of the log-likelihood twins (``--tasks lynx_heldout_choice``)."""
CHOICE_SUFFIX = "_choice"
NEAR_MISSES = (1, 10, 100)
MAX_ANSWER_TOKENS = 8


def task_names() -> list[str]:
    """The task names lm-eval knows after `write_tasks` (``lynx_add3``, ``lynx_add3_choice``,
    ...)."""
    return [TASK_PREFIX + name + suffix for name in TASKS for suffix in ("", CHOICE_SUFFIX)]


def task_config(name: str, data_file: Path) -> dict[str, object]:
    """The lm-eval YAML of task ``name`` (e.g. ``lynx_add3``) over the JSONL ``data_file``."""
    return {
        "task": name,
        "tag": [GROUP],
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["\n", "="], "max_gen_toks": MAX_ANSWER_TOKENS,
                              "do_sample": False, "temperature": 0.0},
        "filter_list": [{"name": "leading-digits", "filter": [
            {"function": "regex", "regex_pattern": r"^\s*(\d+)", "fallback": "[no digits]"},
            {"function": "take_first"}]}],
        "metric_list": [{"metric": "exact_match", "aggregation": "mean",
                         "higher_is_better": True}],
        "metadata": {"version": 1.0, "source": "lynx.reference.tasks held-out problems"},
    }


def choice_task_config(name: str, data_file: Path) -> dict[str, object]:
    """The lm-eval YAML of the log-likelihood twin ``name`` (e.g. ``lynx_add3_choice``)."""
    return {
        "task": name,
        "tag": [CHOICE_GROUP],
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{prompt}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{gold}}",
        "target_delimiter": "",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0, "source": "lynx.reference.tasks held-out problems, "
                     "the answer against the sums + 1, + 10 and + 100"},
    }


def choice_row(a: int, b: int) -> dict[str, object]:
    """One multiple-choice document: the answer at a position fixed by the problem."""
    misses = [str(a + b + d)[::-1] for d in NEAR_MISSES]
    gold = (a + b) % (len(misses) + 1)
    choices = [*misses[:gold], answer_text(a, b), *misses[gold:]]
    return {"prompt": arithmetic_prompt(a, b), "choices": choices, "gold": gold}


def write_tasks(folder: Path, limit: int | None = None) -> list[str]:
    """Write every task's YAML and JSONL (the first ``limit`` held-out problems, all 1024 by
    default) under ``folder``; returns the task names. Raises ValueError for a ``limit``
    outside [1, 1024]."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for key, task in TASKS.items():
        name = TASK_PREFIX + key
        problems = task.heldout_problems() if limit is None else task.heldout_problems(limit)
        if not problems:
            raise ValueError(f"{name}: limit must be >= 1")
        data = folder / f"{name}.jsonl"
        data.write_text("".join(
            json.dumps({"prompt": arithmetic_prompt(a, b), "answer": answer_text(a, b)}) + "\n"
            for a, b in problems))
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(task_config(name, data),
                                                            sort_keys=False))
        choice = name + CHOICE_SUFFIX
        rows = folder / f"{choice}.jsonl"
        rows.write_text("".join(json.dumps(choice_row(a, b)) + "\n" for a, b in problems))
        (folder / f"{choice}.yaml").write_text(yaml.safe_dump(choice_task_config(choice, rows),
                                                              sort_keys=False))
        names += [name, choice]
    return names
