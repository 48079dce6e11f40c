"""Render ``MODEL_CARD.md`` of a reference checkpoint from training.json, eval.json, config.json."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from lynx.reference.data import STDLIB_HELDOUT_BUCKETS, VOCAB_SIZE
from lynx.reference.tasks import HELDOUT_BUCKETS, HELDOUT_SIZE, TASKS

NORM_NOTE = {
    True: "`norm_topk_prob=true`: the top-k routing weights are renormalised to sum to 1 "
          "(so top-1 gives its expert weight 1.0).",
    False: "`norm_topk_prob=false`: raw softmax probabilities of the top-k experts are used.",
}


def _stage_rows(stages: list[dict]) -> list[str]:
    widths = "/".join(str(d + 1) for d in range(max(len(s["digit_weights"]) for s in stages)))
    rows = [f"| stage | steps | peak lr | warmup | operand digits {widths} | arithmetic rows x 64 "
            "| code windows x 256 (loss weight) |", "|---|---|---|---|---|---|---|"]
    for s in stages:
        weights = "/".join(f"{w:.2f}" for w in s["digit_weights"])
        rows.append(f"| {s['name']} | {s['steps']} | {s['lr']:g} | {s['warmup']} | {weights} | "
                    f"{s['arith_rows']} | {s['code_rows']} ({s['code_weight']:g}) |")
    return rows


def _fastest_rate(log: list[dict]) -> float | None:
    """Steps per second over the fastest logged interval (the machine is shared and noisy)."""
    rates = [(b["step"] - a["step"]) / (b["elapsed_s"] - a["elapsed_s"])
             for a, b in itertools.pairwise(log) if b["elapsed_s"] > a["elapsed_s"]]
    return max(rates) if rates else None


def _task_lines(scores: dict) -> list[str]:
    """One held-out line per further task in ``eval.json`` (e.g. ``add4``)."""
    lines = []
    for name, task in TASKS.items():
        if f"{name}_exact_match" not in scores:
            continue
        lines.append(
            f"- Harder task `{name}` ({task.digits}-digit + {task.digits}-digit), "
            f"{scores[f'{name}_problems']} held-out problems, same decoding: "
            f"**{scores[f'{name}_exact_match']:.1%} at top-{scores['trained_top_k']}**, "
            f"{scores[f'{name}_exact_match_top1']:.1%} at top-1.")
    return lines


def _router_lines(scores: dict) -> list[str]:
    if "router_load_cv" not in scores:
        return []
    return [f"- Router load ({scores['router_tokens']:,} held-out code and arithmetic tokens, "
            f"top-{scores['trained_top_k']} choices): busiest expert "
            f"{scores['router_load_max_over_mean']:.2f}x the mean share, coefficient of variation "
            f"{scores['router_load_cv']:.2f} (mean over layers), "
            f"{scores['router_experts_unused']} experts never chosen (all layers)."]


def _selection_lines(training: dict) -> list[str]:
    selection = training["spec"].get("selection")
    lines = []
    if training.get("interrupted"):
        lines.append(f"- **Interrupted** after {training['steps_run']} of {training['steps']} "
                     "planned steps (out of time on a busy shared machine); the weights come from "
                     "the run's snapshots (`--snapshot-dir`), so the learning rate had not "
                     "decayed fully.")
    if not selection:
        return lines
    task, selected = selection["task"], training.get("selected_step", training["steps"])
    entry = next((e for e in training["log"] if e["step"] == selected), {})
    kept = (f"the checkpoint of step {selected} was kept" if selected != training["steps"]
            else "the final checkpoint was kept")
    return [*lines, f"- Checkpoint selection: when the final teacher-forced exact match on the "
            f"`{task}` validation set (256 problems from the held-out bucket, disjoint from the "
            f"evaluated ones) is above {selection['high']:.0%}, the latest logged checkpoint in "
            f"[{selection['low']:.0%}, {selection['high']:.0%}] is kept, so the task stays off "
            f"its ceiling; {kept} (validation "
            f"{entry.get(f'validation_{task}_exact_match', float('nan')):.1%})."]


def _init_lines(training: dict) -> list[str]:
    source = training["spec"].get("init_from")
    if not source:
        return []
    return [f"Initialised by sparse upcycling of the trained `{source}` "
            "(`lynx.reference.upcycle`): each source expert's FFN neurons are cut into segments, "
            "each segment copied, router rows and weights copied with 1% noise, down projections "
            "scaled by the number of segments; attention, embeddings, norms and head copied. "
            "Then fine-tuned as below.", ""]


def _task_data_lines(scores: dict) -> list[str]:
    return [f"- **Harder task `{name}`**: the same format and hash split; its "
            f"{scores[f'{name}_problems']} held-out problems are seeded {task.digits}-digit pairs "
            f"from the held-out bucket (`lynx.reference.tasks.TASKS['{name}']`); training samples "
            f"1- to {task.digits}-digit operands under the curriculum weights below."
            for name, task in TASKS.items() if f"{name}_exact_match" in scores]


def render_card(folder: Path) -> str:
    """The Markdown model card of a checkpoint folder."""
    training = json.loads((folder / "training.json").read_text())
    scores = json.loads((folder / "eval.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    experts = config.get("num_local_experts") or config.get("num_experts")
    expert_ffn = config.get("moe_intermediate_size") or config.get("intermediate_size")
    top_k = config["num_experts_per_tok"]
    size_mb = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 1e6
    last = training["log"][-1] if training["log"] else {}
    lines = [
        f"# {training['name']}",
        "",
        f"A small `{config['architectures'][0]}` "
        + (f"upcycled from `{training['spec']['init_from']}` and fine-tuned"
           if training["spec"].get("init_from") else "trained from scratch")
        + " on this project's CPU (lynx reference model, for batch-aware expert selection "
        "experiments; not a useful LM).",
        "",
        "## Architecture",
        f"- {config['num_hidden_layers']} layers, hidden size {config['hidden_size']}, "
        f"{config['num_attention_heads']} attention heads ({config['num_key_value_heads']} KV), "
        f"{experts} experts per layer, top-{top_k}, expert FFN size {expert_ffn}.",
        f"- {training['parameters']:,} parameters; bf16 safetensors, {size_mb:.1f} MB; "
        f"vocabulary {config['vocab_size']}; `max_position_embeddings` "
        f"{config['max_position_embeddings']}.",
        "- Router load-balancing loss on during training (`output_router_logits=true`, "
        f"`router_aux_loss_coef={config['router_aux_loss_coef']}`).",
    ]
    if "norm_topk_prob" in config:
        lines.append(f"- {NORM_NOTE[bool(config['norm_topk_prob'])]}")
    lines += [
        "",
        "## Data",
        "- **Arithmetic**: prompt `a+b=`, answer = the digits of a+b least-significant first, then "
        "`<|endoftext|>` (e.g. `123+456=` -> `975`). Problems are packed into 64-token rows; only "
        "answer tokens carry a loss. A pair is held out when a blake2b hash of `a+b` falls in 1 of "
        f"{HELDOUT_BUCKETS} buckets; training never samples such pairs; the {HELDOUT_SIZE} "
        "held-out problems are seeded 3-digit pairs (100-999) from that bucket "
        "(`lynx.reference.tasks.heldout_problems`).",
        *_task_data_lines(scores),
        "- **Code**: the `*.py` files of the Python standard library (site-packages excluded), "
        f"split by file: held out when the SHA-256 of the relative path is 0 mod "
        f"{STDLIB_HELDOUT_BUCKETS}. Random 256-token windows.",
        f"- **Tokenizer**: byte-level BPE, vocabulary {VOCAB_SIZE}, trained on the training "
        "split, digits pre-split (one token per digit).",
        "",
        "## Training (curriculum and stages)",
        *_init_lines(training),
        "Every step is one arithmetic micro-batch plus one code micro-batch; each stage restarts "
        "AdamW (betas 0.9/0.98, weight decay 0.01, grad clip 1.0) with linear warmup then cosine "
        "decay to 10% of the peak learning rate. Weights trained in fp32, saved in bf16.",
        "",
        *_stage_rows(training["spec"]["stages"]),
        "",
        f"- Steps: {training['steps']}; seed: {training['spec']['seed']}; wall time: "
        f"{training['wall_time_s']:.0f} s on 2 CPU cores ({training['torch_threads']} torch "
        f"thread{'s' if training['torch_threads'] != 1 else ''}, shared machine).",
        *([f"- Fastest logged interval: {rate:.2f} steps/s, i.e. about "
            f"{training['steps'] / rate / 60:.0f} min for all steps on a quiet machine (the "
            "wall time above includes time shared with other jobs on the same 2 cores)."]
          if (rate := _fastest_rate(training["log"])) else []),
        f"- Final arithmetic loss {last.get('arith_loss')}, code loss {last.get('code_loss')}, "
        f"teacher-forced exact match on 256 held-out problems {last.get('probe_exact_match')}.",
        *_selection_lines(training),
        "",
        "## Held-out scores (transformers, bf16, `eval.json`)",
        f"- Arithmetic exact match, batched greedy `generate` (left padding), "
        f"{scores['arithmetic_problems']} held-out 3-digit problems: "
        f"**{scores['arithmetic_exact_match']:.1%} at top-{scores['trained_top_k']}** "
        f"(trained), {scores['arithmetic_exact_match_top1']:.1%} at top-1.",
        f"- Code, {scores['code_windows']} windows x {scores['code_window_tokens']} tokens of "
        f"held-out stdlib files (seed {scores['code_seed']}): perplexity "
        f"{scores['code_perplexity']:.2f}, next-token accuracy "
        f"{scores['code_next_token_accuracy']:.1%}.",
        *_task_lines(scores),
        *_router_lines(scores),
        "",
        "Reproduce: `python -m lynx.reference.train --model {0}` then "
        "`python -m lynx.reference.evaluate --model {0}` (`make models` does all models)."
        .format(training["name"]),
        "",
    ]
    return "\n".join(lines)


def write_card(folder: Path) -> Path:
    """Render and write ``MODEL_CARD.md``; return its path."""
    path = folder / "MODEL_CARD.md"
    path.write_text(render_card(folder))
    return path
