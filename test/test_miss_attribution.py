"""Attributing latency misses to steps with prefill rows: the plugin's step trace
(`lynx.sglang_plugin.step_trace`) and the benchmark's pure attribution
(`benchmark.miss_attribution`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from benchmark.miss_attribution import PrefillTime, Step, attribute, load_steps
from lynx.sglang_plugin.config import load_config
from lynx.sglang_plugin.ranks import ParallelRanks
from lynx.sglang_plugin.step_state import StepLayout
from lynx.sglang_plugin.step_trace import StepTrace


@dataclass
class Timing:
    ok: bool
    start_s: float
    ttft_s: float
    e2e_s: float
    tokens: int
    itl_s: list[float] = field(default_factory=list)
    itl_at_s: list[float] = field(default_factory=list)


def request(start: float, first: float, gaps: list[float]) -> Timing:
    """A request sent at ``start`` whose first token came at ``first`` and then one token per
    gap [s]."""
    at, ats = first, []
    for g in gaps:
        at += g
        ats.append(at)
    return Timing(True, start, first - start, at - start, len(gaps) + 1, list(gaps), ats)


def test_the_trace_records_every_non_idle_step_with_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "steps.jsonl"
    trace = StepTrace(path)
    trace.record(10.0, 0.05, StepLayout("decode", 24, 0), pruned=True)
    trace.record(10.2, 0.08, StepLayout("mixed", 70, 64), pruned=False)  # 64 prefill, 6 decode
    trace.record(10.3, 0.02, StepLayout("idle", 0, 0), pruned=False)
    trace.record(10.4, 0.09, StepLayout("prefill", 64, 64), pruned=False)
    lines = [json.loads(x) for x in path.read_text().splitlines()]  # readable before close
    assert [(x["mode"], x["decode_rows"], x["prefill_tokens"], x["pruned"]) for x in lines] \
        == [("decode", 24, 0, True), ("mixed", 6, 64, False), ("prefill", 0, 64, False)]
    assert lines[0]["ms"] == 50.0 and lines[1]["end_s"] == 10.2
    trace.close()
    assert [s.mode for s in load_steps(path)] == ["decode", "mixed", "prefill"]
    assert ParallelRanks(0, 1, 1, 2).replica_file(path).name == "steps.jsonl.dp1"
    assert ParallelRanks(0, 1, 0, 1).replica_file(path) == path
    env = {"LYNX_ENABLED": "1", "LYNX_STEP_TRACE": str(path)}
    assert load_config(env).step_trace == path
    assert load_config({"LYNX_ENABLED": "1"}).step_trace is None


def test_a_torn_last_line_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "steps.jsonl"
    path.write_text('{"end_s": 1.0, "ms": 5.0, "mode": "decode"}\n{"end_s": 2.0, "ms"')
    assert load_steps(path) == [Step(1.0, 5.0, "decode")]


def test_prefill_time_counts_prefill_steps_whole_and_mixed_steps_above_a_decode_step() -> None:
    steps = [Step(1.00, 50.0, "decode"), Step(1.05, 50.0, "decode"), Step(1.15, 100.0, "prefill"),
             Step(1.20, 50.0, "decode"), Step(1.28, 80.0, "mixed"), Step(1.33, 50.0, "decode")]
    prefill = PrefillTime(steps)
    assert prefill.decode_median_ms == 50.0
    assert prefill.within(1.05, 1.15) == pytest.approx(0.100)  # the prefill step ends inside
    assert prefill.within(1.15, 1.33) == pytest.approx(0.030)  # the mixed step's excess only
    assert prefill.within(0.0, 2.0) == pytest.approx(0.130)
    assert prefill.within(1.16, 1.27) == 0.0
    # a mixed step is measured against decode steps of its own batch size
    sized = PrefillTime([Step(1.0, 30.0, "decode", 4), Step(1.1, 30.0, "decode", 4),
                         Step(1.2, 60.0, "decode", 32), Step(1.3, 70.0, "mixed", 32, 16)])
    assert sized.within(1.25, 1.3) == pytest.approx(0.010)  # 70 - 60, not 70 - 30


def test_a_miss_comes_from_prefill_only_when_the_prefill_time_puts_it_over() -> None:
    # decode steps of 50 ms every 50 ms, one 100 ms prefill step ending at 1.25 s
    steps = [Step(1.0 + 0.05 * i, 50.0, "decode") for i in range(5)] + [
        Step(1.25, 100.0, "prefill")] + [Step(1.30 + 0.05 * i, 50.0, "decode") for i in range(6)]
    prefill = PrefillTime(steps)
    waited = request(0.9, 1.0, [0.05, 0.05, 0.05, 0.15, 0.05, 0.05])  # its gap held the prefill
    slow = request(0.9, 1.0, [0.09, 0.09, 0.09, 0.09])  # slow decode, no prefill inside gaps...
    result = attribute([waited, slow], prefill, tpot_ms=60.0, itl_ms=60.0)
    # waited: TPOT 66.7 ms, 50 without the prefill -> from prefill; its one long gap too.
    # slow: TPOT 90 ms; minus the 100 ms prefill inside its window (1.0-1.36) = 65 > 60 -> not
    assert result["tpot_misses"] == 2 and result["tpot_miss_share_prefill"] == 0.5
    assert result["itl_misses"] == 5  # waited's 150 ms gap and slow's four 90 ms gaps
    # slow's gap (1.18, 1.27] holds the prefill step: 90 - 100 <= 60 -> counted; the rest not
    assert result["itl_miss_share_prefill"] == pytest.approx(2 / 5)
    assert result["gaps_with_prefill"] == 2 and result["prefill_step_median_ms"] == 100.0
    none = attribute([request(0.9, 1.0, [0.05] * 3)], prefill, tpot_ms=60.0, itl_ms=60.0)
    assert none["tpot_miss_share_prefill"] is None and none["itl_misses"] == 0
    with pytest.raises(ValueError, match="no finished request"):
        attribute([Timing(False, 0, 0, 0, 0)], prefill, 60.0, 60.0)


class _Mode:
    def __init__(self, name: str) -> None:
        self.name = name

    def __getattr__(self, attr: str):
        return lambda: attr == f"is_{self.name}"


def test_a_one_token_prefill_chunk_before_the_decode_rows_stays_a_prefill_row() -> None:
    """A mixed step: prompts chunked to (16, 1), then 3 running decode requests (one token
    each). Only SGLang's count of the requests it mixed in separates the one-token chunk from
    the decode rows; without it (a ForwardBatch built elsewhere) the trailing-ones rule."""
    from types import SimpleNamespace

    from lynx.sglang_plugin.step_state import (
        MIXED_DECODE_ROWS,
        around_forward_batch_init,
        layout_from_forward_batch,
    )

    def batch(**extra: int) -> SimpleNamespace:
        return SimpleNamespace(forward_mode=_Mode("mixed"), extend_seq_lens_cpu=[16, 1, 1, 1, 1],
                               **extra)

    guessed = layout_from_forward_batch(batch())
    assert (guessed.n_decode_rows, guessed.prunable_start) == (4, 16)  # the fallback's guess
    told = layout_from_forward_batch(batch(**{MIXED_DECODE_ROWS: 3}))
    assert (told.n_valid, told.n_decode_rows, told.prunable_start) == (20, 3, 17)
    # the hook reads SGLang's decoding_reqs off the batch it builds the ForwardBatch from
    running = [object() for _ in range(3)]
    prompts = [object(), object()]
    built = around_forward_batch_init(
        lambda cls, b: batch(), None, SimpleNamespace(reqs=prompts + running,
                                                      decoding_reqs=running))
    assert getattr(built, MIXED_DECODE_ROWS) == 3
    plain = around_forward_batch_init(
        lambda cls, b: batch(), None, SimpleNamespace(reqs=prompts, decoding_reqs=None))
    assert not hasattr(plain, MIXED_DECODE_ROWS)
    # a copy of a mixed batch holding other rows (SGLang's encoder-SWA replay): nothing
    # is a decode row, so nothing is pruned
    replayed = around_forward_batch_init(
        lambda cls, b: batch(), None, SimpleNamespace(reqs=prompts + [object()] * 3,
                                                      decoding_reqs=running))
    assert getattr(replayed, MIXED_DECODE_ROWS) == 0
    assert layout_from_forward_batch(batch(**{MIXED_DECODE_ROWS: 0})).n_decode_rows == 0


def test_the_benchmark_pools_misses_over_repetitions_and_states_the_split() -> None:
    from benchmark.prefill_share import markdown, summarize

    def row(schedule: str, mode: str, rep: int, misses: int, share: float | None) -> dict:
        return {"schedule": schedule, "mode": mode, "rep": rep, "p90_tpot_ms": 60.0 + rep,
                "p90_itl_ms": 70.0, "p99_itl_ms": 90.0, "attainment": 0.8,
                "decode_step_median_ms": 50.0, "tpot_misses": misses,
                "tpot_miss_share_prefill": share, "itl_misses": 0,
                "itl_miss_share_prefill": None, "prefill_steps": 80, "mixed_steps": 0}

    rows = [row(s, m, rep, misses, share) for s in ("default", "mixed")
            for m in ("off", "static:m40")
            for rep, misses, share in ((0, 10, 0.5), (1, 30, 0.1))]
    summary = summarize(rows)
    assert len(summary) == 4 and summary[0]["reps"] == 2
    assert summary[0]["tpot_miss_share_prefill"] == 0.2  # (5 + 3) / 40, not the mean 0.3
    assert summary[0]["itl_miss_share_prefill"] is None  # no miss: no share
    assert summary[0]["p90_tpot_ms"] == 60.5
    text = markdown({"served": "m", "requests": 90, "offered_rps": 1.5, "target_ms": 63.1,
                     "reps": 2, "rung": "m40", "summary": summary,
                     "flags": {"mixed": ["--enable-mixed-chunk"]}})
    assert "0.2 of `off`'s TPOT misses" in text and text.count("\n| ") == 5
