"""The arithmetic task shared by training, evaluation, serving tests and benchmarks (no torch).

A problem ``a+b`` is written as the prompt ``"123+456="``; the answer is the sum's decimal digits
least-significant first (``"975"`` for 579), followed by the tokenizer's end-of-text token.

The held-out set is disjoint from training by construction: a pair ``(a, b)`` is *held out* when a
hash of ``"a+b"`` falls in one bucket of 16; the training sampler rejects every such pair, and the
held-out problems are drawn only from 3-digit pairs inside that bucket.

Named tasks (:data:`TASKS`) share that split and differ only in the operand width of their
held-out problems: ``add3`` (the set above, every reference model) and the harder ``add4``
(4-digit operands, longer carry chains; trained and scored by ``qwen3-moe-128``). Each task also
has a seeded *validation* set from the same bucket, disjoint from its held-out set, used to probe
(and select) checkpoints during training without looking at the held-out problems.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

HELDOUT_BUCKETS = 16
HELDOUT_SEED = 20_240_611
HELDOUT_SIZE = 1024
_LEADING_DIGITS = re.compile(r"\s*(\d+)")


def arithmetic_prompt(a: int, b: int) -> str:
    """The prompt the model completes, e.g. ``arithmetic_prompt(123, 456) == "123+456="``."""
    return f"{a}+{b}="


def answer_text(a: int, b: int) -> str:
    """The expected completion (without the end token): the sum's digits reversed."""
    return str(a + b)[::-1]


def parse_answer(text: str) -> int | None:
    """Read a completion back as an integer: its leading digits, least-significant first."""
    match = _LEADING_DIGITS.match(text)
    if match is None:
        return None
    return int(match.group(1)[::-1])


def is_heldout_pair(a: int, b: int) -> bool:
    """True for the pairs reserved for evaluation (never sampled for training)."""
    digest = hashlib.blake2b(f"{a}+{b}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % HELDOUT_BUCKETS == 0


def _draw_heldout(digits: int, seed: int, n: int,
                  exclude: frozenset[tuple[int, int]] = frozenset()) -> list[tuple[int, int]]:
    """``n`` distinct held-out pairs of ``digits``-digit operands, in a seeded order."""
    low, high = 10 ** (digits - 1), 10**digits - 1
    rng = random.Random(seed)
    seen: set[tuple[int, int]] = set()
    problems: list[tuple[int, int]] = []
    while len(problems) < n:
        pair = (rng.randint(low, high), rng.randint(low, high))
        if pair not in seen and pair not in exclude and is_heldout_pair(*pair):
            seen.add(pair)
            problems.append(pair)
    return problems


def heldout_problems(n: int = HELDOUT_SIZE) -> list[tuple[int, int]]:
    """The first ``n`` held-out 3-digit problems (a fixed, seeded order: a prefix is stable)."""
    return TASKS["add3"].heldout_problems(n)


@dataclass(frozen=True)
class AdditionTask:
    """A held-out addition task: ``digits``-digit operand pairs from the held-out hash bucket."""

    name: str
    digits: int
    seed: int

    def heldout_problems(self, n: int = HELDOUT_SIZE) -> list[tuple[int, int]]:
        """The first ``n`` of the task's held-out problems (seeded; a prefix is stable)."""
        if not 0 <= n <= HELDOUT_SIZE:
            raise ValueError(f"n must be in [0, {HELDOUT_SIZE}], got {n}")
        return _draw_heldout(self.digits, self.seed, n)

    def validation_problems(self, n: int = 256) -> list[tuple[int, int]]:
        """``n`` problems from the held-out bucket, disjoint from the task's held-out set (for
        probing checkpoints during training)."""
        exclude = frozenset(self.heldout_problems(HELDOUT_SIZE))
        return _draw_heldout(self.digits, self.seed + 1, n, exclude)


TASKS: dict[str, AdditionTask] = {
    "add3": AdditionTask("add3", 3, HELDOUT_SEED),
    "add4": AdditionTask("add4", 4, HELDOUT_SEED + 4),
}
"""The named arithmetic tasks; ``add3`` is the original held-out set (``heldout_problems``)."""


def sample_operand(rng: random.Random, digit_weights: Sequence[float]) -> int:
    """An operand whose digit count d (1-based) is drawn with weight ``digit_weights[d - 1]``."""
    digits = rng.choices(range(1, len(digit_weights) + 1), weights=digit_weights)[0]
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(low, 10**digits - 1)


def sample_training_pair(rng: random.Random, digit_weights: Sequence[float]) -> tuple[int, int]:
    """A training problem under the curriculum weights, never a held-out pair."""
    while True:
        a, b = sample_operand(rng, digit_weights), sample_operand(rng, digit_weights)
        if not is_heldout_pair(a, b):
            return a, b
