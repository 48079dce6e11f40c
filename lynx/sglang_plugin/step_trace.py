"""Benchmark instrument: one line per forward step, to attribute latency misses to steps.

``LYNX_STEP_TRACE=<file>`` makes TP rank 0 of each DP replica append a JSON line per forward
step (idle steps left out) to ``<file>`` (``<file>.dp<rank>`` when ``dp_size > 1``):

    {"end_s": 1234.567891, "ms": 58.2, "mode": "decode", "decode_rows": 24,
     "prefill_tokens": 0, "pruned": true}

``end_s`` is ``time.perf_counter()`` when the forward returned: CLOCK_MONOTONIC on Linux, the
same clock in every process of the machine, so a client's token arrival times can be matched
to the steps that produced them (`benchmark.prefill_share`). Times are the host's, with no
device sync: exact where a forward is synchronous (the CPU engine, which SGLang runs without
its overlap scheduler); on a GPU they are launch times unless the step syncs.
``prefill_tokens`` counts the rows of a prefill or mixed step that are not decode rows (extend
tokens). Off by default; a
line costs one line-buffered write (a few microseconds against steps of milliseconds), so a
reader sees every finished step at once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO

from lynx.sglang_plugin.step_state import StepLayout


class StepTrace:
    """Appends one JSON line per non-idle forward step to ``path`` (module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[str] | None = None

    def record(self, end_s: float, seconds: float, layout: StepLayout, pruned: bool) -> None:
        """One step: ``end_s`` perf_counter at its end [s], ``seconds`` its wall time [s]."""
        if layout.mode == "idle":
            return
        if self._file is None:
            self._file = self.path.open("a", encoding="utf-8", buffering=1)
        self._file.write(json.dumps({
            "end_s": round(end_s, 6), "ms": round(seconds * 1e3, 3), "mode": layout.mode,
            "decode_rows": layout.n_decode_rows if layout.mode in ("decode", "mixed") else 0,
            "prefill_tokens": layout.prunable_start if layout.mode in ("prefill", "mixed")
            else 0, "pruned": bool(pruned)}) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
