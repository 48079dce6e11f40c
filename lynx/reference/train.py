"""Train the reference MoE models on CPU: ``python -m lynx.reference.train --model all``.

Each model trains in stages (see :mod:`lynx.reference.specs`); every stage restarts AdamW with
warmup + cosine. A step is two micro-batches: packed arithmetic rows and stdlib code windows; the
loss of each includes the router load-balancing loss (``output_router_logits=True``). The result
is saved in bf16 safetensors with the tokenizer under ``models/<name>/`` with ``training.json``
(a spec with ``init_from`` starts from an upcycled copy of that trained model, and one with a
``selection`` may keep an earlier probed checkpoint, see :class:`~lynx.reference.specs.Selection`);
``python -m lynx.reference.evaluate`` then scores it and writes ``eval.json`` and the model card.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, PreTrainedModel

from lynx.reference.data import (
    EOS,
    PAD,
    REPO_ROOT,
    ArithmeticPacker,
    code_stream,
    code_windows,
    get_tokenizer,
)
from lynx.reference.evaluate import teacher_forced_exact_match
from lynx.reference.specs import ARITH_LEN, CODE_LEN, SPECS, ModelSpec, Stage
from lynx.reference.tasks import TASKS, heldout_problems

MODELS_DIR = REPO_ROOT / "models"


def lr_at(step: int, stage: Stage) -> float:
    if step < stage.warmup:
        return stage.lr * (step + 1) / stage.warmup
    progress = (step - stage.warmup) / max(1, stage.steps - stage.warmup)
    return stage.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def build_model(spec: ModelSpec, vocab_size: int, eos_id: int, pad_id: int) -> PreTrainedModel:
    config = spec.build_config(vocab_size, eos_id, pad_id)
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(config)
    try:
        model.set_experts_implementation("grouped_mm")  # 1.2-6x faster than eager on this CPU
    except (ValueError, ImportError):
        model.set_experts_implementation("eager")
    return model


def upcycle_from(model: PreTrainedModel, folder: Path, seed: int) -> None:
    """Initialise ``model`` from the trained checkpoint in ``folder`` (see upcycle.py)."""
    from lynx.reference.loading import load_reference
    from lynx.reference.upcycle import upcycle_state

    source, _ = load_reference(folder, dtype=torch.float32)
    model.load_state_dict(upcycle_state(source.state_dict(), model.state_dict(), seed=seed))


def train_model(spec: ModelSpec, out_dir: Path, eval_every: int = 200,
                quiet: bool = False, snapshot_dir: Path | None = None) -> dict:
    """Train one model, save it to ``out_dir`` (bf16), return the training record.

    With ``snapshot_dir``, every evaluation also writes the fp32 weights (``latest.pt``, and
    ``kept.pt`` for the checkpoint kept by the selection) and the log so far (``log.json``), so
    an interrupted run (e.g. on a busy shared machine) leaves usable weights behind."""
    t0 = time.time()
    tok = get_tokenizer()
    eos_id, pad_id = tok.convert_tokens_to_ids(EOS), tok.convert_tokens_to_ids(PAD)
    packer = ArithmeticPacker(tok)
    stream = code_stream(tok, "train")
    model = build_model(spec, len(tok), eos_id, pad_id)
    if spec.init_from is not None:  # the source trained next to it (--model all), else models/
        source = out_dir.parent / spec.init_from
        upcycle_from(model, source if (source / "config.json").is_file()
                     else MODELS_DIR / spec.init_from, spec.seed)
    n_params = sum(p.numel() for p in model.parameters())
    rng = random.Random(spec.seed)
    gen = torch.Generator().manual_seed(spec.seed)
    probe = heldout_problems(256)
    validation = {t: TASKS[t].validation_problems(256) for t in spec.tasks if t != "add3"}
    kept: dict | None = None  # latest checkpoint inside the selection band: step, state
    log: list[dict] = []
    total_steps = sum(s.steps for s in spec.stages)
    bar = tqdm(total=total_steps, desc=spec.name, disable=quiet, dynamic_ncols=True)
    global_step = 0
    for stage in spec.stages:
        optimizer = torch.optim.AdamW(model.parameters(), lr=stage.lr, betas=(0.9, 0.98),
                                      weight_decay=0.01)
        model.train()
        for step in range(stage.steps):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, stage)
            ids, labels = packer.rows(rng, stage.arith_rows, ARITH_LEN, stage.digit_weights)
            arith = model(input_ids=ids, labels=labels)
            loss = arith.loss
            code_loss = torch.zeros(())
            if stage.code_rows:
                windows = code_windows(stream, stage.code_rows, CODE_LEN, gen)
                code = model(input_ids=windows, labels=windows)
                code_loss = code.loss
                loss = loss + stage.code_weight * code_loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            global_step += 1
            bar.update(1)
            bar.set_postfix(stage=stage.name[:5], arith=f"{arith.loss.item():.3f}",
                            code=f"{code_loss.item():.3f}")
            last = step == stage.steps - 1
            if (eval_every and global_step % eval_every == 0) or last:
                model.eval()
                acc = teacher_forced_exact_match(model, packer, probe)
                entry = {"step": global_step, "stage": stage.name,
                         "arith_loss": round(arith.loss.item(), 4),
                         "code_loss": round(code_loss.item(), 4),
                         "probe_exact_match": round(acc, 4)}
                for task, problems in validation.items():
                    entry[f"validation_{task}_exact_match"] = round(
                        teacher_forced_exact_match(model, packer, problems), 4)
                model.train()
                entry["elapsed_s"] = round(time.time() - t0, 1)
                log.append(entry)
                kept = _keep_if_in_band(spec, model, entry, kept)
                if snapshot_dir is not None:
                    _snapshot(snapshot_dir, model, log, kept)
                bar.write(json.dumps(entry))
    bar.close()
    selected_step = _select(spec, model, log, kept)
    wall = time.time() - t0
    record = {"name": spec.name, "parameters": n_params, "steps": total_steps,
              "wall_time_s": round(wall, 1), "torch_threads": torch.get_num_threads(),
              "spec": spec.describe(), "arith_row_tokens": ARITH_LEN,
              "code_window_tokens": CODE_LEN, "selected_step": selected_step, "log": log}
    save_model(model, tok, out_dir, record)
    return record


def _keep_if_in_band(spec: ModelSpec, model: PreTrainedModel, entry: dict,
                     kept: dict | None) -> dict | None:
    """Copy the weights when the selection task's validation score is inside the band."""
    if spec.selection is None:
        return kept
    score = entry[f"validation_{spec.selection.task}_exact_match"]
    if spec.selection.low <= score <= spec.selection.high:
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return {"step": entry["step"], "state": state}
    return kept


def _snapshot(folder: Path, model: PreTrainedModel, log: list[dict], kept: dict | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / "latest.pt")
    if kept is not None and kept["step"] == log[-1]["step"]:
        torch.save(kept["state"], folder / "kept.pt")
    (folder / "log.json").write_text(json.dumps(log, indent=1) + "\n")


def _select(spec: ModelSpec, model: PreTrainedModel, log: list[dict],
            kept: dict | None) -> int:
    """Apply the spec's checkpoint selection (see :class:`Selection`); return the kept step."""
    final = log[-1]["step"]
    if spec.selection is None or kept is None:
        return final
    if log[-1][f"validation_{spec.selection.task}_exact_match"] <= spec.selection.high:
        return final
    model.load_state_dict(kept["state"])
    return kept["step"]


def save_model(model: PreTrainedModel, tok, out_dir: Path, record: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.to(torch.bfloat16)
    model.config.dtype = "bfloat16"
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    (out_dir / "training.json").write_text(json.dumps(record, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lynx.reference.train", description=__doc__)
    parser.add_argument("--model", default="all", choices=[*SPECS, "all"])
    parser.add_argument("--out", type=Path, default=MODELS_DIR,
                        help="parent folder; each model goes to <out>/<name>")
    parser.add_argument("--steps-scale", type=float, default=1.0,
                        help="multiply every stage's steps (smoke tests: e.g. 0.01)")
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--snapshot-dir", type=Path, default=None,
                        help="write fp32 weights and the log at every evaluation (per model)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = list(SPECS) if args.model == "all" else [args.model]
    for name in names:
        spec = SPECS[name]
        if args.steps_scale != 1.0:
            stages = tuple(replace(s, steps=max(1, round(s.steps * args.steps_scale)),
                                   warmup=max(1, round(s.warmup * args.steps_scale)))
                           for s in spec.stages)
            spec = replace(spec, stages=stages)
        snapshots = args.snapshot_dir / name if args.snapshot_dir else None
        record = train_model(spec, args.out / name, args.eval_every, args.quiet, snapshots)
        print(f"{name}: {record['steps']} steps in {record['wall_time_s']:.0f}s -> "
              f"{args.out / name}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
