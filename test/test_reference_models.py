"""The committed reference checkpoints: load in transformers, answer held-out problems, and the
``load_reference`` helper fails with one clear line on missing or corrupt folders."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lynx.reference.evaluate import generate_answers, model_tasks
from lynx.reference.loading import ReferenceModelError, load_reference
from lynx.reference.specs import SPECS
from lynx.reference.tasks import TASKS, heldout_problems, parse_answer

MODELS = Path(__file__).resolve().parents[1] / "models"
EXPECTED = {  # name: (architecture, experts, top-k)
    "mixtral-mini": ("MixtralForCausalLM", 8, 2),
    "qwen3-moe-mini": ("Qwen3MoeForCausalLM", 32, 4),
    "qwen3-moe-128": ("Qwen3MoeForCausalLM", 128, 8),
}
HARD = "qwen3-moe-128"  # the production-ratio model, also trained and scored on TASKS["add4"]


def _folder(name: str) -> Path:
    folder = MODELS / name
    if not (folder / "config.json").is_file():
        pytest.fail(f"reference model {name} missing at {folder}: run `make models`")
    return folder


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_checkpoint_files_config_and_card(name: str) -> None:
    folder = _folder(name)
    arch, experts, top_k = EXPECTED[name]
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == [arch]
    assert (config.get("num_local_experts") or config.get("num_experts")) == experts
    assert config["num_experts_per_tok"] == top_k
    assert config["max_position_embeddings"] >= 512
    weights = folder / "model.safetensors"
    assert weights.stat().st_size <= 20_000_000
    with safe_open(weights, "pt") as fh:
        assert {fh.get_tensor(k).dtype for k in fh.keys()} == {torch.bfloat16}  # noqa: SIM118
    scores = json.loads((folder / "eval.json").read_text())
    card = (folder / "MODEL_CARD.md").read_text()
    assert f"{scores['arithmetic_exact_match']:.1%} at top-{top_k}" in card
    assert f"{scores['arithmetic_exact_match_top1']:.1%} at top-1" in card
    assert scores["arithmetic_problems"] == 1024 and scores["code_windows"] == 200


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_committed_model_answers_heldout_problems(name: str) -> None:
    torch.set_num_threads(2)
    model, tok = load_reference(_folder(name))
    problems = heldout_problems(32)
    answers = generate_answers(model, tok, problems, batch_size=32)
    correct = sum(parse_answer(t) == a + b for t, (a, b) in zip(answers, problems, strict=True))
    assert correct >= 30, (correct, answers[:8])
    # Batched (left-padded) greedy decoding agrees with one-at-a-time decoding.
    assert generate_answers(model, tok, problems[:3], batch_size=1) == answers[:3]


def test_every_spec_is_committed_and_covered() -> None:
    assert set(SPECS) == set(EXPECTED)
    assert model_tasks(_folder("mixtral-mini")) == ["add3"]  # trained before named tasks
    assert model_tasks(_folder(HARD)) == ["add3", "add4"]


def test_production_ratio_model_is_small_routed_and_off_ceiling() -> None:
    folder = _folder(HARD)
    assert (folder / "model.safetensors").stat().st_size <= 32_000_000
    scores = json.loads((folder / "eval.json").read_text())
    assert scores["add4_problems"] == 1024
    assert 0.80 <= scores["add4_exact_match"] <= 0.95
    # It learned to route: the top-1 expert alone loses accuracy, no expert is starved.
    assert scores["add4_exact_match_top1"] < scores["add4_exact_match"]
    assert scores["router_load_max_over_mean"] < 8 and scores["router_experts_unused"] <= 16
    card = (folder / "MODEL_CARD.md").read_text()
    assert f"**{scores['add4_exact_match']:.1%} at top-8**" in card
    training = json.loads((folder / "training.json").read_text())
    assert training["spec"]["tasks"] == ["add3", "add4"]
    assert training["selected_step"] in {entry["step"] for entry in training["log"]}


def test_production_ratio_model_answers_hard_problems() -> None:
    torch.set_num_threads(2)
    model, tok = load_reference(_folder(HARD))
    problems = TASKS["add4"].heldout_problems(32)
    answers = generate_answers(model, tok, problems, batch_size=32)
    correct = sum(parse_answer(t) == a + b for t, (a, b) in zip(answers, problems, strict=True))
    assert 20 <= correct <= 32, (correct, answers[:8])


def _one_line_naming(exc: pytest.ExceptionInfo, path: Path) -> None:
    message = str(exc.value)
    assert "\n" not in message and str(path) in message


def test_load_reference_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as exc:
        load_reference(tmp_path / "nope")
    _one_line_naming(exc, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"config\.json") as exc:
        load_reference(tmp_path / "empty")
    _one_line_naming(exc, tmp_path / "empty")


@pytest.mark.parametrize("damage", ["config", "weights_truncated", "weights_missing", "tokenizer"])
def test_load_reference_corrupt_folder(tmp_path: Path, damage: str) -> None:
    folder = tmp_path / "broken"
    shutil.copytree(_folder("mixtral-mini"), folder)
    if damage == "config":
        (folder / "config.json").write_text("{not json")
    elif damage == "weights_truncated":
        (folder / "model.safetensors").write_bytes(b"\xff" * 64)
    elif damage == "weights_missing":
        (folder / "model.safetensors").unlink()
    else:
        (folder / "tokenizer.json").unlink()
    expected = FileNotFoundError if damage in ("weights_missing", "tokenizer") else ValueError
    with pytest.raises(expected) as exc:
        load_reference(folder)
    _one_line_naming(exc, folder)
    if expected is ValueError:
        assert isinstance(exc.value, ReferenceModelError)


def test_evaluate_cli_one_line_error(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "lynx.reference.evaluate", "--model",
                           str(tmp_path / "missing")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1] == (f"python -m lynx.reference.evaluate: error: reference model folder "
                         f"{tmp_path / 'missing'} does not exist")
    assert "Traceback" not in proc.stderr
