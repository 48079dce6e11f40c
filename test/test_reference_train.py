"""Training plan of the reference models: the spec table and the checkpoint selection rule."""

from __future__ import annotations

import torch

from lynx.reference.specs import SPECS, Selection
from lynx.reference.tasks import TASKS
from lynx.reference.train import _keep_if_in_band, _select


def test_production_ratio_spec() -> None:
    spec = SPECS["qwen3-moe-128"]
    assert spec.architecture == "Qwen3MoeForCausalLM"
    assert spec.config["num_experts"] == 128 and spec.config["num_experts_per_tok"] == 8
    assert spec.config["norm_topk_prob"] is True
    assert set(spec.tasks) <= set(TASKS) and "add4" in spec.tasks
    assert spec.selection is not None and spec.selection.task in spec.tasks
    assert all(len(s.digit_weights) == TASKS["add4"].digits for s in spec.stages)
    # Upcycled from a model that `--model all` trains first.
    assert spec.init_from is not None
    assert list(SPECS).index(spec.init_from) < list(SPECS).index("qwen3-moe-128")
    for name in ("mixtral-mini", "qwen3-moe-mini"):  # the committed minis: unchanged plan
        assert SPECS[name].tasks == ("add3",) and SPECS[name].selection is None
        assert [s.steps for s in SPECS[name].stages] == [1000, 800]


def _run(scores: list[float]) -> tuple[int, torch.Tensor]:
    """Replay a training log: the weight equals the step; return the kept step and weight."""
    spec = SPECS["qwen3-moe-128"]
    assert spec.selection == Selection("add4", spec.selection.low, spec.selection.high)
    model = torch.nn.Linear(1, 1, bias=False)
    log, kept = [], None
    for step, score in enumerate(scores, start=1):
        with torch.no_grad():
            model.weight.fill_(step)
        entry = {"step": step, "validation_add4_exact_match": score}
        log.append(entry)
        kept = _keep_if_in_band(spec, model, entry, kept)
    return _select(spec, model, log, kept), model.weight.detach().clone()


def test_selection_keeps_latest_in_band_checkpoint_only_above_the_band() -> None:
    low, high = SPECS["qwen3-moe-128"].selection.low, SPECS["qwen3-moe-128"].selection.high
    mid = (low + high) / 2
    step, weight = _run([0.1, mid, mid, 0.99])  # overshoot: back to step 3
    assert step == 3 and weight.item() == 3
    step, weight = _run([0.1, mid, 0.7])  # undershoot at the end: the final weights stay
    assert step == 3 and weight.item() == 3
    step, weight = _run([0.1, 0.99, 0.99])  # never in band: the final weights stay
    assert step == 3 and weight.item() == 3
    step, weight = _run([mid, 0.99, high])  # final in band: kept
    assert step == 3 and weight.item() == 3
