"""Which latency misses come from steps with prefill rows: client token times matched to the
server's forward steps (`lynx.sglang_plugin.step_trace`, ``LYNX_STEP_TRACE``). Pure.

Both sides read CLOCK_MONOTONIC (``time.perf_counter`` on Linux), so a token gap (t - g, t]
seen by the client contains the server steps that ended inside it (the trace's step times are
the host's: exact where a forward is synchronous, as on the CPU engine, which runs without
SGLang's overlap scheduler). The *prefill time* of a gap: the whole of every pure prefill step
in it (the decode rows waited for it), and the excess of every mixed step over the median
pure decode step of its decode batch-size bucket (decode rows ride along in a mixed step;
only its prefill part is extra; the median over all decode steps where its bucket has none,
0 where the trace has none). A miss *comes from prefill* when removing that time would meet
the target:
- an ITL miss: a gap above the target whose gap minus its prefill time is within it;
- a TPOT miss: a request above the target whose TPOT, with the prefill time inside its
  decode window (first token to last) removed, is within it.
These are the misses prefill puts over the target, which pruning decode steps does not fix;
a miss that decode steps alone put over it counts as decode-bound even where prefill added to
it. One replica's trace: under DP each replica has its own file and its own requests.
"""

from __future__ import annotations

import bisect
import json
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from lynx.sglang_plugin.step_state import batch_slot


class Timing(Protocol):
    """What `benchmark.loadgen.RequestTiming` provides (perf_counter seconds)."""

    ok: bool
    start_s: float
    ttft_s: float
    e2e_s: float
    tokens: int
    itl_s: list[float]
    itl_at_s: list[float]


@dataclass(frozen=True)
class Step:
    end_s: float
    ms: float
    mode: str
    decode_rows: int = 0
    prefill_tokens: int = 0


def load_steps(path: Path) -> list[Step]:
    """The step trace's lines (a torn last line, from a server still writing, is skipped)."""
    steps = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            raw = json.loads(line)
        except json.JSONDecodeError:
            continue
        steps.append(Step(float(raw["end_s"]), float(raw["ms"]), str(raw["mode"]),
                          int(raw.get("decode_rows", 0)), int(raw.get("prefill_tokens", 0))))
    return sorted(steps, key=lambda s: s.end_s)


class PrefillTime:
    """Prefill time [s] inside any interval, from a step trace (module docstring)."""

    def __init__(self, steps: Iterable[Step]) -> None:
        steps = list(steps)
        decode = [s.ms for s in steps if s.mode == "decode"]
        self.decode_median_ms = statistics.median(decode) if decode else 0.0
        by_bucket: dict[int, list[float]] = {}
        for s in steps:
            if s.mode == "decode":
                by_bucket.setdefault(batch_slot(s.decode_rows), []).append(s.ms)
        medians = {k: statistics.median(v) for k, v in by_bucket.items()}
        spans = []
        for s in steps:
            if s.mode == "prefill":
                extra = s.ms
            elif s.mode == "mixed":
                base = medians.get(batch_slot(s.decode_rows), self.decode_median_ms)
                extra = max(0.0, s.ms - base)
            else:
                continue
            spans.append((s.end_s - s.ms / 1e3, s.end_s, extra / 1e3))
        self.spans = spans  # (start, end, prefill seconds), sorted by end (steps never overlap)
        self._ends = [e for _, e, _ in spans]
        self.steps = len(steps)
        prefill = [s.ms for s in steps if s.mode == "prefill"]
        self.prefill_median_ms = statistics.median(prefill) if prefill else 0.0
        self.prefill_steps = len(prefill)
        self.mixed_steps = sum(1 for s in steps if s.mode == "mixed")

    def within(self, lo: float, hi: float) -> float:
        """Prefill seconds of the steps that end inside (lo, hi] (the client saw their
        tokens, or waited for them, in that interval)."""
        i = bisect.bisect_right(self._ends, lo)
        total = 0.0
        while i < len(self.spans) and self._ends[i] <= hi:
            total += self.spans[i][2]
            i += 1
        return total


def attribute(timings: Iterable[Timing], prefill: PrefillTime, tpot_ms: float,
              itl_ms: float) -> dict[str, Any]:
    """Misses of a per-request TPOT target and a per-token ITL target [ms], and the share of
    each that comes from prefill (module docstring). Raises ValueError on no finished request."""
    done = [t for t in timings if t.ok and t.tokens >= 2]
    if not done:
        raise ValueError("attribute: no finished request with two tokens")
    tpot_miss = tpot_prefill = gaps = itl_miss = itl_prefill = with_prefill = 0
    for t in done:
        first, last = t.start_s + t.ttft_s, t.start_s + t.e2e_s
        tpot = (last - first) / (t.tokens - 1) * 1e3
        if tpot > tpot_ms:
            tpot_miss += 1
            without = (last - first - prefill.within(first, last)) / (t.tokens - 1) * 1e3
            tpot_prefill += without <= tpot_ms
        for gap, at in zip(t.itl_s, t.itl_at_s, strict=True):
            gaps += 1
            inside = prefill.within(at - gap, at)
            with_prefill += inside > 0
            if gap * 1e3 > itl_ms:
                itl_miss += 1
                itl_prefill += (gap - inside) * 1e3 <= itl_ms
    return {"requests": len(done), "tpot_target_ms": tpot_ms, "tpot_misses": tpot_miss,
            "tpot_miss_share_prefill": round(tpot_prefill / tpot_miss, 4) if tpot_miss else None,
            "itl_target_ms": itl_ms, "gaps": gaps, "itl_misses": itl_miss,
            "itl_miss_share_prefill": round(itl_prefill / itl_miss, 4) if itl_miss else None,
            "gaps_with_prefill": with_prefill, "steps": prefill.steps,
            "prefill_steps": prefill.prefill_steps,
            "prefill_step_median_ms": round(prefill.prefill_median_ms, 3),
            "mixed_steps": prefill.mixed_steps,
            "decode_step_median_ms": round(prefill.decode_median_ms, 3)}
