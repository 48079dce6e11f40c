"""Held-out scores of the reference models with transformers: ``python -m lynx.reference.evaluate``.

* Arithmetic: exact match on the 1,024 held-out 3-digit problems under real batched greedy
  ``generate`` (left padding), at the trained top-k and at top-1 (``num_experts_per_tok=1``);
  the same for every further task the model was trained for (``training.json``'s ``spec.tasks``,
  e.g. ``add4`` for ``qwen3-moe-128``: keys ``add4_exact_match``, ``add4_exact_match_top1``).
* Routing: how evenly the router spreads its top-k choices over the experts (``router_*``).
* Code: perplexity and next-token accuracy on 200 seeded windows of 256 tokens from the held-out
  stdlib files.

Writes ``models/<name>/eval.json`` and renders ``MODEL_CARD.md`` from it and ``training.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lynx.reference.data import IGNORE, ArithmeticPacker
from lynx.reference.specs import CODE_LEN
from lynx.reference.tasks import (
    HELDOUT_SIZE,
    TASKS,
    arithmetic_prompt,
    heldout_problems,
    parse_answer,
)

MAX_NEW_TOKENS = 6  # up to 5 answer digits (4-digit operands) + end token
CODE_WINDOWS = 200
CODE_SEED = 7


@torch.no_grad()
def teacher_forced_exact_match(model: PreTrainedModel, packer: ArithmeticPacker,
                               problems: list[tuple[int, int]]) -> float:
    """Fraction of problems whose every answer token (and end token) is the argmax given the
    correct prefix -- the same as greedy exact match, at one forward pass."""
    encoded = [packer.problem(a, b) for a, b in problems]
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), width), packer.pad, dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE, dtype=torch.long)
    for row, (p_ids, p_labels) in enumerate(encoded):
        ids[row, : len(p_ids)] = torch.tensor(p_ids)
        labels[row, : len(p_labels)] = torch.tensor(p_labels)
    pred = model(input_ids=ids).logits[:, :-1].argmax(-1)
    target = labels[:, 1:]
    ok = (pred == target) | (target == IGNORE)
    return ok.all(dim=1).float().mean().item()


@torch.no_grad()
def generate_answers(model: PreTrainedModel, tok: PreTrainedTokenizerBase,
                     problems: list[tuple[int, int]], batch_size: int = 128) -> list[str]:
    """Batched greedy completions (left padding) of the arithmetic prompts."""
    tok.padding_side = "left"
    out: list[str] = []
    for start in range(0, len(problems), batch_size):
        prompts = [arithmetic_prompt(a, b) for a, b in problems[start:start + batch_size]]
        batch = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        generated = model.generate(
            **batch, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        new_tokens = generated[:, batch["input_ids"].shape[1]:]
        out.extend(tok.batch_decode(new_tokens, skip_special_tokens=True))
    return out


def arithmetic_exact_match(model: PreTrainedModel, tok: PreTrainedTokenizerBase,
                           problems: list[tuple[int, int]]) -> float:
    answers = generate_answers(model, tok, problems)
    correct = sum(parse_answer(text) == a + b for text, (a, b) in zip(answers, problems,
                                                                      strict=True))
    return correct / len(problems)


@torch.no_grad()
def code_metrics(model: PreTrainedModel, tok: PreTrainedTokenizerBase,
                 n_windows: int = CODE_WINDOWS, length: int = CODE_LEN,
                 seed: int = CODE_SEED) -> dict[str, float]:
    """Perplexity and next-token accuracy on seeded windows of the held-out stdlib files."""
    from lynx.reference.data import code_stream, code_windows

    windows = code_windows(code_stream(tok, "heldout"), n_windows,
                           length, torch.Generator().manual_seed(seed))
    nll, correct, count = 0.0, 0, 0
    for chunk in windows.split(20):
        logits = model(input_ids=chunk).logits[:, :-1].float()
        target = chunk[:, 1:]
        nll += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum").item()
        correct += (logits.argmax(-1) == target).sum().item()
        count += target.numel()
    return {"code_perplexity": round(math.exp(nll / count), 3),
            "code_next_token_accuracy": round(correct / count, 4),
            "code_windows": n_windows, "code_window_tokens": length, "code_seed": seed}


@torch.no_grad()
def router_load(model: PreTrainedModel, tok: PreTrainedTokenizerBase,
                n_windows: int = 20, seed: int = CODE_SEED) -> dict[str, float]:
    """How evenly the top-k choices spread over the experts, on held-out code windows plus
    held-out arithmetic prompts: per layer, the busiest expert's share over the mean share, the
    coefficient of variation of the shares, and the experts never chosen (summed over layers)."""
    from lynx.reference.data import code_stream, code_windows

    windows = code_windows(code_stream(tok, "heldout"), n_windows, CODE_LEN,
                           torch.Generator().manual_seed(seed))
    prompts = [arithmetic_prompt(a, b) + str(a + b)[::-1] for a, b in heldout_problems(256)]
    batch = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    top_k = int(model.config.num_experts_per_tok)
    counts: torch.Tensor | None = None
    for ids, mask in ((windows, torch.ones_like(windows)),
                      (batch["input_ids"], batch["attention_mask"])):
        logits = model(input_ids=ids, attention_mask=mask, output_router_logits=True).router_logits
        keep = mask.reshape(-1).bool()
        layer_counts = torch.stack([
            torch.bincount(layer.float().topk(top_k, dim=-1).indices[keep].reshape(-1),
                           minlength=layer.shape[-1]) for layer in logits])
        counts = layer_counts if counts is None else counts + layer_counts
    assert counts is not None
    share = counts.float() / counts.sum(dim=1, keepdim=True)
    mean = 1.0 / share.shape[1]
    return {"router_load_max_over_mean": round((share.max(dim=1).values / mean).max().item(), 2),
            "router_load_cv": round((share.std(dim=1) / mean).mean().item(), 3),
            "router_experts_unused": int((counts == 0).sum().item()),
            "router_tokens": int(counts[0].sum().item()) // top_k}


def model_tasks(folder: Path) -> list[str]:
    """The named tasks a checkpoint was trained for (``training.json``; ``add3`` by default)."""
    training = folder / "training.json"
    if not training.is_file():
        return ["add3"]
    return list(json.loads(training.read_text()).get("spec", {}).get("tasks", ["add3"]))


def evaluate_folder(folder: Path, n_problems: int = HELDOUT_SIZE,
                    n_windows: int = CODE_WINDOWS) -> dict:
    """Score one checkpoint folder (the dict written to ``eval.json``)."""
    from lynx.reference.loading import load_reference

    t0 = time.time()
    problems = heldout_problems(n_problems)
    extra = {t: TASKS[t].heldout_problems(n_problems) for t in model_tasks(folder) if t != "add3"}
    model, tok = load_reference(folder)
    top_k = int(model.config.num_experts_per_tok)
    scores: dict = {"dtype": "bfloat16", "trained_top_k": top_k,
                    "arithmetic_problems": len(problems)}
    scores["arithmetic_exact_match"] = round(arithmetic_exact_match(model, tok, problems), 4)
    for task, task_problems in extra.items():
        scores[f"{task}_problems"] = len(task_problems)
        scores[f"{task}_exact_match"] = round(arithmetic_exact_match(model, tok, task_problems), 4)
    scores.update(code_metrics(model, tok, n_windows))
    scores.update(router_load(model, tok))
    del model
    model_top1, tok = load_reference(folder, top_k=1)
    scores["arithmetic_exact_match_top1"] = round(
        arithmetic_exact_match(model_top1, tok, problems), 4)
    for task, task_problems in extra.items():
        scores[f"{task}_exact_match_top1"] = round(
            arithmetic_exact_match(model_top1, tok, task_problems), 4)
    scores["eval_wall_time_s"] = round(time.time() - t0, 1)
    return scores


def main(argv: list[str] | None = None) -> int:
    from lynx.reference.card import write_card
    from lynx.reference.loading import ReferenceModelError
    from lynx.reference.specs import SPECS
    from lynx.reference.train import MODELS_DIR

    parser = argparse.ArgumentParser(prog="python -m lynx.reference.evaluate",
                                     description=__doc__)
    parser.add_argument("--model", default="all",
                        help="a reference model name, 'all', or a checkpoint folder")
    parser.add_argument("--problems", type=int, default=HELDOUT_SIZE)
    parser.add_argument("--windows", type=int, default=CODE_WINDOWS)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.model == "all":
        folders = [MODELS_DIR / name for name in SPECS]
    elif args.model in SPECS:
        folders = [MODELS_DIR / args.model]
    else:
        folders = [Path(args.model)]
    for folder in folders:
        try:
            scores = evaluate_folder(folder, args.problems, args.windows)
        except (FileNotFoundError, ReferenceModelError) as exc:
            print(f"{parser.prog}: error: {exc}", file=sys.stderr)
            return 2
        (folder / "eval.json").write_text(json.dumps(scores, indent=2) + "\n")
        write_card(folder)
        print(f"{folder.name}: {json.dumps(scores)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
