"""The trace recipe (`benchmark.trace_replay.scale_trace`): at every offered load the
excerpt's per-minute rate shape survives thinning or repetition, and token lengths fit the
model's context with prompts capped."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmark.trace_replay import ATTRIBUTION, TRACE, load_trace, scale_trace

TRACE_ROWS = load_trace()


@settings(max_examples=40, deadline=None)
@given(start_min=st.integers(0, 45), minutes=st.integers(2, 12),
       time_scale=st.sampled_from([1.0, 2.0, 4.0, 8.0]), load=st.sampled_from([0.7, 1.0, 1.3]),
       capacity=st.floats(0.5, 12.0), max_context=st.integers(256, 4096),
       prompt_cap=st.integers(8, 512), max_output=st.integers(16, 1024),
       prompt_scale=st.floats(0.01, 1.0))
def test_the_rate_shape_is_kept_and_tokens_fit(start_min, minutes, time_scale, load, capacity,
                                               max_context, prompt_cap, max_output,
                                               prompt_scale) -> None:
    start, duration = 60.0 * start_min, 60.0 * minutes
    max_prompt = min(prompt_cap, max_context - 1)
    schedule = scale_trace(TRACE_ROWS, start_s=start, duration_s=duration,
                           time_scale=time_scale, offered_rps=load * capacity,
                           max_context=max_context, max_prompt=max_prompt,
                           max_output=max_output, prompt_scale=prompt_scale)
    excerpt = [r for r in TRACE_ROWS if start <= r.at_s < start + duration]
    wanted = load * capacity * duration / time_scale
    assert abs(len(schedule) - wanted) <= 1  # the offered load, to one request
    p = wanted / len(excerpt)
    minute = 60.0 / time_scale  # one trace minute in replay time
    for m in range(minutes):  # every trace minute keeps its share, to one request
        original = sum(1 for r in excerpt if m * 60 <= r.at_s - start < (m + 1) * 60)
        replayed = sum(1 for r in schedule if m * minute <= r.at_s < (m + 1) * minute)
        assert abs(replayed - original * p) <= 1.0 + 1e-6, (m, replayed, original * p)
    for r in schedule:
        assert 1 <= r.prompt_tokens <= max_prompt and 1 <= r.output_tokens <= max_output
        assert r.prompt_tokens + r.output_tokens <= max_context
    assert all(a.at_s <= b.at_s for a, b in itertools.pairwise(schedule))


def test_the_trace_is_the_one_the_readme_describes_and_bad_input_is_refused(tmp_path) -> None:
    assert len(TRACE_ROWS) == 19_366 and math.isclose(TRACE_ROWS[-1].at_s / 60, 58.4,
                                                      abs_tol=0.05)
    assert "CC-BY 4.0" in ATTRIBUTION and TRACE.name.startswith("azure_llm_inference_2023")
    with pytest.raises(ValueError, match="no trace requests"):
        scale_trace(TRACE_ROWS, start_s=10_000, duration_s=60, time_scale=1, offered_rps=1,
                    max_context=512, max_prompt=64, max_output=64)
    with pytest.raises(ValueError, match="bad token bounds"):
        scale_trace(TRACE_ROWS, start_s=0, duration_s=60, time_scale=1, offered_rps=1,
                    max_context=64, max_prompt=64, max_output=64)
    bad = tmp_path / "bad.csv"
    bad.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,x,3\n")
    with pytest.raises(ValueError, match=r"bad\.csv:2: not a trace row"):
        load_trace(bad)
