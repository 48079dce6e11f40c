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

from benchmark.common import Variant, selection_knobs
from lynx.reference.tasks import arithmetic_prompt, heldout_problems, parse_answer
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


class SelectionHook:
    """Forward hook on a transformers MoE router: batch-aware selection per position."""

    def __init__(self, variant: Variant, batch: int, layer: int, num_experts: int, top_k: int,
                 renormalize: bool) -> None:
        from lynx.selection import RouterSpec

        self.variant, self.batch = variant, batch
        self.router = RouterSpec(top_k=top_k, renormalize=renormalize)
        self.knobs = selection_knobs(variant, batch, layer, num_experts)
        self.rows = 0
        self.top1_kept = 0

    def __call__(self, module: Any, inputs: Any, output: Any) -> Any:
        from lynx.selection import select_layer_step

        if not bool(self.knobs.enabled):
            return output
        router_logits, scores, _ = output
        z = router_logits.float()
        experts = z.shape[-1]
        per_pos = z.view(self.batch, -1, experts)  # [batch, positions, E]
        rows = torch.ones(self.batch, dtype=torch.bool)
        steps = [select_layer_step(self.variant.policy, per_pos[:, t], self.router, self.knobs,
                                   rows, rows) for t in range(per_pos.shape[1])]
        # [batch, positions, K] -> rows ordered like router_logits (batch-major)
        weights = torch.stack([s.topk_weights for s in steps], dim=1).reshape(-1, self.router.top_k)
        ids = torch.stack([s.topk_ids for s in steps], dim=1).reshape(-1, self.router.top_k)
        stock_top1 = z.argmax(-1, keepdim=True)
        self.rows += stock_top1.numel()
        self.top1_kept += int((ids == stock_top1).any(-1).sum())
        return router_logits, weights.to(scores.dtype), ids


@contextmanager
def selection_hooks(model: Any, variant: Variant, batch: int,
                    hook_factory: Callable[..., SelectionHook] | None = None
                    ) -> Iterator[list[SelectionHook]]:
    config = model.config
    top_k = int(config.num_experts_per_tok)
    renormalize = bool(getattr(config, "norm_topk_prob", True))
    routers = [m for name, m in model.named_modules()
               if name.endswith("mlp.gate") and hasattr(m, "top_k")]
    experts = int(getattr(config, "num_local_experts", None) or config.num_experts)
    factory = hook_factory or SelectionHook
    hooks = [factory(variant, batch, i, experts, top_k, renormalize) for i in range(len(routers))]
    handles = [r.register_forward_hook(h) for r, h in zip(routers, hooks, strict=True)]
    try:
        yield hooks
    finally:
        for handle in handles:
            handle.remove()


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
            logits = model(input_ids=chunk).logits[:, :-1].float()
            target = chunk[:, 1:]
            nll += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum").item()
            count += target.numel()
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
