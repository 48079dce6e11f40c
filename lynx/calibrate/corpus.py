"""Calibration corpora: the user's own text as token windows (``lynx-serve calibrate --corpus``).

A corpus spec is one of:
- a text file: one document (any extension but ``.jsonl``);
- a directory: every non-hidden regular file under it that is UTF-8 text, sorted, one
  document each (the others, e.g. ``__pycache__``, are skipped and listed to the caller);
- a ``.jsonl`` file: one JSON object per line, its text in ``text_field`` (default ``text``);
- ``hf:NAME`` or ``hf:NAME:SPLIT``: a Hugging Face dataset from the local cache only
  (``HF_DATASETS_OFFLINE=1``; default split ``train``), its ``text_field`` column.

Documents are tokenized with the checkpoint's own tokenizer and joined with its end token into
one stream. Calibration (the per-layer sensitivities) and the held-out measurement of a
ladder's costs never share text: every fifth document (index 4, 9, ...) is held out; a corpus
of fewer than five documents holds out the last fifth of its token stream instead.

Bad input raises `CorpusError` with one line naming the file, line or field: a missing path,
an empty corpus, a line that is not a JSON object, a missing or non-string field, a file that
is not UTF-8 text, a dataset not in the local cache, or too few tokens for one window.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

HELDOUT_EVERY = 5  # every fifth document is held out


class CorpusError(ValueError):
    """A corpus that cannot be read or is too small (one line)."""


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CorpusError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise CorpusError(f"{path}: cannot read: {exc.strerror}") from None


def _jsonl(path: Path, field: str) -> list[str]:
    docs = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record: Any = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CorpusError(f"{path}:{number}: not JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise CorpusError(f"{path}:{number}: no string field {field!r} (use --text-field)")
        docs.append(record[field])
    return docs


def _hf_dataset(spec: str, field: str) -> list[str]:
    name, _, split = spec.partition(":")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the local cache, never the hub
    try:
        import datasets
    except ImportError:
        raise CorpusError(f"hf:{spec}: the datasets package is not installed") from None
    try:
        data = datasets.load_dataset(name, split=split or "train")
    except Exception as exc:  # datasets raises many kinds: one line for each
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CorpusError(f"hf:{spec}: not in the local dataset cache ({first})") from None
    if field not in data.column_names:
        raise CorpusError(f"hf:{spec}: no column {field!r} (columns: "
                          f"{', '.join(data.column_names)}; use --text-field)")
    return [text for text in data[field] if isinstance(text, str)]


def read_documents(spec: str, text_field: str = "text", skipped: list[Path] | None = None
                   ) -> list[str]:
    """The documents of a corpus spec (see the module doc), in a fixed order; a directory's
    files that are not UTF-8 text are appended to ``skipped``. Raises `CorpusError` for a
    missing path, unreadable input or a corpus with no text."""
    if spec.startswith("hf:"):
        docs = _hf_dataset(spec[3:], text_field)
    else:
        path = Path(spec)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and not any(
                part.startswith(".") for part in p.relative_to(path).parts))
            docs = []
            for file in files:
                try:
                    docs.append(_read_text(file))
                except CorpusError:
                    if skipped is not None:
                        skipped.append(file)
        elif path.is_file():
            docs = _jsonl(path, text_field) if path.suffix == ".jsonl" else [_read_text(path)]
        else:
            raise CorpusError(f"{spec}: no such file or directory")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise CorpusError(f"{spec}: the corpus holds no text")
    return docs


def token_streams(docs: list[str], tok: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration, held-out) int64 token streams [N], [M] of ``docs`` under the
    checkpoint's tokenizer ``tok``, each document followed by its end token."""
    from lynx.reference.data import joined_ids

    def stream(texts: list[str]) -> torch.Tensor:
        return torch.tensor(joined_ids(tok, texts, tok.eos_token_id), dtype=torch.int64)

    if len(docs) >= HELDOUT_EVERY:
        held = [d for i, d in enumerate(docs) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
        kept = [d for i, d in enumerate(docs) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1]
        return stream(kept), stream(held)
    whole = stream(docs)
    cut = whole.numel() - whole.numel() // HELDOUT_EVERY
    return whole[:cut], whole[cut:]


def corpus_windows(stream: torch.Tensor, n: int, length: int, gen: torch.Generator,
                   what: str) -> torch.Tensor:
    """``n`` random windows [n, length] of ``stream``; `CorpusError` (naming ``what``, e.g.
    "the held-out part of the corpus") when it holds fewer than ``length + 1`` tokens."""
    from lynx.reference.data import code_windows

    if stream.numel() <= length:
        raise CorpusError(f"{what} has {stream.numel()} tokens; a window needs {length + 1} "
                          "(add text or lower --window-len)")
    return code_windows(stream, n, length, gen)


def calibration_streams(tok: Any, documents: list[str] | None
                        ) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(calibration, held-out) streams and what they are: the user's ``documents``, or the
    reference models' own code splits (train / heldout) without them."""
    if documents is None:
        from lynx.reference.data import code_stream

        return code_stream(tok, "train"), code_stream(tok, "heldout"), "code split"
    train, held = token_streams(documents, tok)
    return train, held, f"part of the corpus ({len(documents)} documents)"
