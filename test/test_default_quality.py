"""The plugin's default operating point keeps every reference model within the quality goal
(<= 2% held-out perplexity rise, <= 1 point exact-match loss) at every batch size, measured
on a small fixed sample with the real checkpoints (transformers, the same selection step
applied to each router by a forward hook; every row of a step prunable, so slightly
pessimistic against a server, which never prunes prefill rows).

Sample: 64 held-out code windows of 96 tokens, and 128 held-out additions per task (one
problem = 0.8 points, so "at most one problem lost" is the resolvable form of <= 1 point)."""

from __future__ import annotations

import pytest
import torch
from conftest import reference_model

from benchmark.accuracy import code_scores, compare_code, selection_hooks
from benchmark.common import OFF, default_variant
from lynx.reference.evaluate import generate_answers, model_tasks
from lynx.reference.loading import load_reference
from lynx.reference.tasks import TASKS, parse_answer
from lynx.serving.models import REFERENCE_MODELS

pytestmark = pytest.mark.slow  # ~3 min: three checkpoints x three batch sizes
BATCHES = (4, 16, 64)
WINDOWS, WINDOW_LEN, PROBLEMS = 64, 96, 128
MAX_PPL_RISE = 0.02


def _correct(model: object, tok: object, task: str, batch: int) -> int:
    problems = TASKS[task].heldout_problems(PROBLEMS)
    answers = generate_answers(model, tok, problems, batch_size=batch)  # type: ignore[arg-type]
    return sum(parse_answer(text) == a + b for text, (a, b) in zip(answers, problems,
                                                                    strict=True))


@pytest.mark.parametrize("name", sorted(REFERENCE_MODELS))
def test_default_policy_meets_the_quality_goal_at_every_batch_size(name: str) -> None:
    torch.manual_seed(0)
    folder = reference_model(name)
    model, tok = load_reference(folder, dtype=torch.float32)
    config = model.config
    experts = int(getattr(config, "num_local_experts", None) or config.num_experts)
    default = default_variant(experts, int(config.num_experts_per_tok))
    tasks = model_tasks(folder)
    for batch in BATCHES:
        stock = code_scores(model, tok, OFF, batch, WINDOWS, WINDOW_LEN)
        lynx = compare_code(stock, code_scores(model, tok, default, batch, WINDOWS, WINDOW_LEN))
        assert lynx["ppl_rise"] <= MAX_PPL_RISE, (name, batch, lynx)
        assert lynx["hook_top1_kept_rate"] == 1.0  # every token keeps its top-1 expert
        for task in tasks:
            stock_right = _correct(model, tok, task, batch)
            with selection_hooks(model, default, batch) as hooks:
                lynx_right = _correct(model, tok, task, batch)
            assert sum(h.rows for h in hooks) > 0  # the hooks really pruned decode steps
            assert lynx_right >= stock_right - 1, (name, task, batch, stock_right, lynx_right)
