"""Accuracy of a Lynx policy against stock routing.

* Arithmetic exact match through a live SGLang server: the held-out additions are sent in
  chunks of ``batch`` prompts per ``/generate`` call, so SGLang prefills and decodes them as
  one batch of ``batch`` rows (real batched greedy decoding, the rows finishing at their end
  tokens); the batch size is part of the result.
* Held-out code perplexity and next-token agreement with transformers on the checkpoint: the
  same selection (``lynx.selection.batch_keep_mask``) is applied to the router logits by a
  forward hook on every MoE router. ``batch`` windows are scored together and, at each
  position, the ``batch`` tokens at that position form one decode batch (every row prunable:
  slightly pessimistic -- a server never prunes prefill rows).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from benchmark.common import Variant
from lynx.calibrate import RouterHook, router_hooks, window_nll
from lynx.reference.tasks import arithmetic_prompt, heldout_problems, parse_answer
from lynx.selection import RouterSpec
from lynx.serving.client import generate_greedy

MAX_NEW_TOKENS = 6
CODE_SEED = 7


def exact_match_server(url: str, num_problems: int, batch: int) -> float:
    """Fraction of the first ``num_problems`` held-out additions answered exactly."""
    problems = heldout_problems(num_problems)
    correct = 0
    for start in range(0, len(problems), batch):
        chunk = problems[start:start + batch]
        prompts = [arithmetic_prompt(a, b) for a, b in chunk]
        completions, _ = generate_greedy(url, prompts, MAX_NEW_TOKENS, timeout_s=900)
        correct += sum(parse_answer(c.text) == a + b
                       for c, (a, b) in zip(completions, chunk, strict=True))
    return correct / len(problems)


class SelectionHook(RouterHook):
    """`lynx.calibrate.RouterHook` for a benchmark `Variant` (keeps ``variant`` for subclasses
    such as `benchmark.verify_steps.VerifyHook`)."""

    def __init__(self, variant: Variant, batch: int, layer: int, num_experts: int,
                 router: RouterSpec, correction_bias: torch.Tensor | None = None) -> None:
        super().__init__(variant.spec, batch, layer, num_experts, router, correction_bias)
        self.variant = variant


@contextmanager
def selection_hooks(model: Any, variant: Variant, batch: int,
                    hook_factory: Callable[..., SelectionHook] | None = None
                    ) -> Iterator[list[RouterHook]]:
    factory = hook_factory or SelectionHook

    def make(spec: Any, *args: Any) -> RouterHook:
        return factory(variant, *args)

    with router_hooks(model, variant.spec, batch, make) as hooks:
        yield hooks


def load_model(folder: Path) -> tuple[Any, Any]:
    from lynx.reference.loading import load_reference

    return load_reference(folder)


@torch.no_grad()
def code_scores(model: Any, tok: Any, variant: Variant, batch: int, windows: int,
                length: int, hook_factory: Callable[..., SelectionHook] | None = None
                ) -> dict[str, Any]:
    """Perplexity, next-token argmax per position and top-1-kept rate under ``variant``
    (``hook_factory``: another grouping of rows into steps than one decode step per position,
    e.g. `benchmark.verify_steps.VerifyHook`)."""
    from lynx.reference.data import code_stream, code_windows

    data = code_windows(code_stream(tok, "heldout"), windows - windows % batch, length,
                        torch.Generator().manual_seed(CODE_SEED))
    nll, count = 0.0, 0
    argmax: list[torch.Tensor] = []
    with selection_hooks(model, variant, batch, hook_factory) as hooks:
        for chunk in data.split(batch):
            chunk_nll, tokens, logits = window_nll(model, chunk)
            nll, count = nll + chunk_nll, count + tokens
            argmax.append(logits.argmax(-1))
    rows = sum(h.rows for h in hooks)
    top1 = sum(h.top1_kept for h in hooks)
    return {"ppl": math.exp(nll / count), "argmax": torch.cat(argmax),
            "targets": data[:, 1:], "top1_kept_rate": top1 / rows if rows else 1.0}


def compare_code(stock: dict[str, Any], lynx: dict[str, Any]) -> dict[str, float]:
    agree = (stock["argmax"] == lynx["argmax"]).float().mean().item()
    acc_stock = (stock["argmax"] == stock["targets"]).float().mean().item()
    acc_lynx = (lynx["argmax"] == lynx["targets"]).float().mean().item()
    return {"ppl_stock": stock["ppl"], "ppl_lynx": lynx["ppl"],
            "ppl_rise": lynx["ppl"] / stock["ppl"] - 1.0, "next_token_agreement": agree,
            "next_token_acc_stock": acc_stock, "next_token_acc_lynx": acc_lynx,
            "hook_top1_kept_rate": lynx["top1_kept_rate"]}
