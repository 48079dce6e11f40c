"""Load a reference checkpoint with transformers, failing with one clear line on bad folders."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

REQUIRED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")


class ReferenceModelError(ValueError):
    """A reference checkpoint folder that cannot be loaded; the message is one line."""


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {text[0] if text else ''}"


def check_reference(path: str | Path) -> Path:
    """Validate a checkpoint folder; raise FileNotFoundError / ReferenceModelError naming it."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"reference model folder {folder} does not exist")
    for name in REQUIRED_FILES:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"reference model folder {folder} has no {name}")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        try:
            json.loads((folder / name).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ReferenceModelError(f"{folder / name}: corrupt JSON ({_one_line(exc)})") from None
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise FileNotFoundError(f"reference model folder {folder} has no *.safetensors weights")
    for weight in weights:
        size = weight.stat().st_size
        with weight.open("rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            try:
                if not 0 < header_len <= size - 8:
                    raise ValueError("header length out of range")
                json.loads(fh.read(header_len))
            except (ValueError, UnicodeDecodeError) as exc:
                raise ReferenceModelError(
                    f"{weight}: corrupt safetensors file ({_one_line(exc)})") from None
    return folder


def load_reference(path: str | Path, top_k: int | None = None,
                   dtype: torch.dtype = torch.bfloat16):
    """``(model, tokenizer)`` of a checkpoint folder, in eval mode.

    ``top_k`` overrides ``num_experts_per_tok`` (e.g. 1 to score the model at top-1 routing).
    Any failure is raised as FileNotFoundError or :class:`ReferenceModelError` with a one-line
    message naming the folder.
    """
    folder = check_reference(path)
    try:
        config = AutoConfig.from_pretrained(folder)
        if top_k is not None:
            config.num_experts_per_tok = top_k
        model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(
            folder, config=config, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ReferenceModelError(f"{folder}: cannot load ({_one_line(exc)})") from None
    model.eval()
    return model, tokenizer
