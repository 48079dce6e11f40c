"""Calibration on the user's own text (`lynx.calibrate.corpus`, ``lynx-serve calibrate
--corpus``): every corpus format, the one-line errors (exit code 2 before any model loads),
the calibration / held-out split, and a ladder of a real checkpoint calibrated on a corpus."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import reference_model

from lynx.calibrate.corpus import (
    CorpusError,
    corpus_windows,
    read_documents,
    token_streams,
)

DOCS = [f"def f{i}(x):\n    return x * {i} + {i * i}\n" for i in range(12)]


def _tokenizer():  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(reference_model("qwen3-moe-mini"))


def test_every_format_reads_the_same_documents(tmp_path: Path) -> None:
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    for i, doc in enumerate(DOCS):  # sorted by path: zero-padded names keep the order
        (folder / ("sub" if i % 2 else "") / f"{i:02d}.py").write_text(doc)
    (folder / ".hidden").write_text("not a document")
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "00.pyc").write_bytes(b"\xff\xfe\x00 compiled")
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": d, "id": i}) for i, d in enumerate(DOCS))
                     + "\n\n")
    single = tmp_path / "one.txt"
    single.write_text(DOCS[0])
    skipped: list[Path] = []
    assert sorted(read_documents(str(folder), skipped=skipped)) == sorted(DOCS)
    assert skipped == [folder / "__pycache__" / "00.pyc"]  # listed, not silently dropped
    assert read_documents(str(jsonl), text_field="body") == DOCS
    assert read_documents(str(single)) == [DOCS[0]]
    data = tmp_path / "dataset"
    data.mkdir()
    (data / "train.jsonl").write_text(jsonl.read_text())
    assert read_documents(f"hf:{data}", text_field="body") == DOCS  # a local dataset folder


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: str(p / "nope"), "nope: no such file or directory"),
    (lambda p: _write(p / "empty.txt", "  \n"), "the corpus holds no text"),
    (lambda p: str(p), "the corpus holds no text"),  # an empty folder
    (lambda p: _write(p / "a.jsonl", '{"text": "ok"}\n{"txt": "typo"}\n'),
     "a.jsonl:2: no string field 'text' (use --text-field)"),
    (lambda p: _write(p / "b.jsonl", '{"text": "ok"}\nnot json\n'), "b.jsonl:2: not JSON"),
    (lambda p: _write(p / "c.jsonl", '["text"]\n'), "c.jsonl:1: no string field 'text'"),
    (lambda p: _write_bytes(p / "d.bin", b"\xff\xfe\x00binary"), "d.bin: not UTF-8 text"),
    (lambda p: "hf:no-such-dataset-here", "hf:no-such-dataset-here: not in the local dataset"),
])
def test_bad_corpora_are_one_line_errors(tmp_path: Path, make, message: str) -> None:
    with pytest.raises(CorpusError) as info:
        read_documents(make(tmp_path))
    assert message in str(info.value) and "\n" not in str(info.value)


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _write_bytes(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def test_calibration_and_heldout_never_share_a_document() -> None:
    tok = _tokenizer()
    train, held = token_streams(DOCS, tok)
    eos = tok.eos_token_id
    expected_held = [d for i, d in enumerate(DOCS) if i % 5 == 4]  # documents 4 and 9
    decoded = tok.decode([t for t in held.tolist() if t != eos])
    assert all(d in decoded for d in expected_held)
    assert not any(d in tok.decode([t for t in train.tolist() if t != eos])
                   for d in expected_held)
    assert int((held == eos).sum()) == 2 and int((train == eos).sum()) == 10
    few_train, few_held = token_streams(DOCS[:2], tok)  # < 5 documents: the last fifth
    whole = few_train.numel() + few_held.numel()
    assert few_held.numel() == whole // 5 and few_train.dtype == torch.int64
    with pytest.raises(CorpusError, match=r"the heldout x has \d+ tokens; a window needs 4097"):
        corpus_windows(few_held, 4, 4096, torch.Generator(), "the heldout x")


def test_the_cli_refuses_a_bad_corpus_before_loading_the_model(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"content": "x"}\n')
    done = subprocess.run([sys.executable, "-m", "lynx.serving.cli", "calibrate",
                           "qwen3-moe-mini", "--ladder", "--batches", "4", "--windows", "4",
                           "--heldout-windows", "4", "--corpus", str(bad)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"lynx-serve: error: calibrate: --corpus {bad}:1: no string field 'text' "
        "(use --text-field)"]


@pytest.mark.slow  # two ladder calibrations of a real checkpoint
def test_a_ladder_calibrated_on_a_corpus_measures_its_costs_on_its_heldout_part(
        tmp_path: Path) -> None:
    from lynx.calibrate.ladder import build_ladder
    from lynx_protocol.ladder import PPL_RISE, encode_ladder

    source = Path(json.__file__).parent  # real text nobody trained on: the json package
    docs = read_documents(str(source))
    kwargs = {"means": [16], "batches": (4,), "windows": 4, "window_len": 24,
              "heldout_windows": 4, "seed": 3, "max_ppl_rise": 5.0}
    folder = reference_model("qwen3-moe-mini")
    ours, report = build_ladder(folder, documents=docs, **kwargs)
    theirs, _ = build_ladder(folder, **kwargs)
    (table,) = ours.rungs[-1].tables
    assert f"heldout part of the corpus ({len(docs)} documents)" in table.costs[0].source
    assert table.cost(PPL_RISE) is not None
    assert encode_ladder(ours) != encode_ladder(theirs)  # other text, other measurements
    assert report["per_batch"]
