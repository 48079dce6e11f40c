"""Reference-model data: tokenizer, arithmetic prompts and splits, stdlib file split."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from lynx.reference.data import stdlib_files, stdlib_split
from lynx.reference.tasks import (
    HELDOUT_BUCKETS,
    TASKS,
    answer_text,
    arithmetic_prompt,
    heldout_problems,
    is_heldout_pair,
    parse_answer,
    sample_training_pair,
)

MODELS = Path(__file__).resolve().parents[1] / "models"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    folder = MODELS / "mixtral-mini"
    if not (folder / "tokenizer.json").is_file():
        pytest.fail(f"no committed tokenizer at {folder}: run `make models`")
    return AutoTokenizer.from_pretrained(folder)


def test_prompt_answer_and_parse_round_trip() -> None:
    assert arithmetic_prompt(123, 456) == "123+456="
    assert answer_text(123, 456) == "975"
    assert parse_answer("975") == 579
    assert parse_answer(" 0001<|endoftext|>") == 1000
    assert parse_answer("975\n42") == 579
    assert parse_answer("") is None and parse_answer("x12") is None
    for a, b in heldout_problems(50):
        assert parse_answer(answer_text(a, b)) == a + b


def test_tokenizer_round_trip_and_one_token_per_digit(tokenizer) -> None:
    for text in ["123+456=975", "def f(x):\n    return x ** 2  # ünïcode\n", "\t\r\n  9\n"]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
    for ch in "0123456789+=":
        assert len(tokenizer.encode(ch, add_special_tokens=False)) == 1
    for a, b in heldout_problems(20):
        prompt = arithmetic_prompt(a, b)
        tokens = tokenizer.tokenize(prompt + answer_text(a, b))
        assert tokens == list(prompt + answer_text(a, b))
    assert len(tokenizer) <= 1024
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


def test_all_models_share_the_tokenizer() -> None:
    from lynx.reference.specs import SPECS

    texts = {(MODELS / name / "tokenizer.json").read_text() for name in SPECS}
    assert len(texts) == 1


def test_heldout_arithmetic_is_disjoint_from_training() -> None:
    problems = heldout_problems(1024)
    assert len(set(problems)) == 1024
    assert heldout_problems(64) == problems[:64]  # prefix-stable, seeded
    assert all(100 <= a <= 999 and 100 <= b <= 999 for a, b in problems)
    assert all(is_heldout_pair(a, b) for a, b in problems)
    rng = random.Random(0)
    held = set(problems)
    training = [sample_training_pair(rng, (0.0, 0.0, 1.0)) for _ in range(20_000)]
    assert not held & set(training)
    assert not any(is_heldout_pair(a, b) for a, b in training)
    # The hash bucket holds about 1/16 of all pairs, so the sampler rejects only that share.
    share = sum(is_heldout_pair(a, b) for a in range(100, 400) for b in range(100, 200)) / 30_000
    assert abs(share - 1 / HELDOUT_BUCKETS) < 0.01
    with pytest.raises(ValueError):
        heldout_problems(5000)


def test_add3_task_is_the_original_heldout_set() -> None:
    assert TASKS["add3"].heldout_problems(1024) == heldout_problems(1024)
    assert heldout_problems(3) == [(722, 938), (985, 477), (337, 817)]  # pinned: never changes


def test_hard_task_heldout_is_disjoint_from_training_and_validation() -> None:
    task = TASKS["add4"]
    problems = task.heldout_problems(1024)
    assert len(set(problems)) == 1024
    assert task.heldout_problems(64) == problems[:64]  # prefix-stable, seeded
    assert all(1000 <= a <= 9999 and 1000 <= b <= 9999 for a, b in problems)
    assert all(is_heldout_pair(a, b) for a, b in problems)
    assert len(answer_text(9999, 9999)) + 1 <= 6  # answer digits + end token fit generation
    validation = task.validation_problems(256)
    assert len(set(validation)) == 256 and not set(validation) & set(problems)
    assert all(is_heldout_pair(a, b) for a, b in validation)
    rng = random.Random(0)
    training = [sample_training_pair(rng, (0.0, 0.0, 0.0, 1.0)) for _ in range(20_000)]
    assert all(1000 <= a <= 9999 and 1000 <= b <= 9999 for a, b in training)
    assert not (set(problems) | set(validation)) & set(training)
    assert not any(is_heldout_pair(a, b) for a, b in training)
    assert not set(problems) & set(heldout_problems(1024))
    with pytest.raises(ValueError):
        task.heldout_problems(1025)


def test_training_curriculum_mixes_operand_lengths() -> None:
    rng = random.Random(1)
    lengths = {len(str(a)) for a, _ in (sample_training_pair(rng, (1, 1, 1)) for _ in range(300))}
    assert lengths == {1, 2, 3}


def test_stdlib_split_is_by_file_and_disjoint() -> None:
    train, held = stdlib_files("train"), stdlib_files("heldout")
    assert len(train) > 500 and len(held) > 50
    assert not set(train) & set(held)
    assert not any("site-packages" in p.parts for p in train + held)
    assert 0.05 < len(held) / (len(train) + len(held)) < 0.15
    assert stdlib_split("json/decoder.py") == stdlib_split("json/decoder.py")
    assert stdlib_files("heldout") == held  # deterministic
    with pytest.raises(ValueError):
        stdlib_files("validation")
