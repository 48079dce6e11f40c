"""The runtime says so, once, when the built-in default policy cuts (almost) nothing on the
served router (`lynx.sglang_plugin.idle_default`): decode steps through SGLang's own ``TopK``
with the default policy of a production-scale fine-grained router (Qwen3-235B: E128 top-8, at
8 rows the stock union never exceeds the default's 64) against a small coarse one (Mixtral:
E8 top-2, where the default's 4 experts do cut)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from topk_harness import build_topk, call, make_runtime, sglang_topology

from lynx.selection import STAT_FIELDS
from lynx.sglang_plugin.config import default_policy
from lynx.sglang_plugin.idle_default import MIN_STEPS, IdleDefaultWatch
from lynx.sglang_plugin.step_state import StepLayout
from lynx_protocol.policy import PolicySpec

pytest.importorskip("sglang.srt.layers.moe.topk")
FIELD = {name: i for i, name in enumerate(STAT_FIELDS)}


class _Gauge:
    value = -1.0

    def set(self, value: float) -> None:
        self.value = value


def serve_decode_steps(experts: int, top_k: int, rows: int, steps: int) -> Any:
    """The runtime after ``steps`` decode steps of ``rows`` rows through SGLang's TopK under
    the default policy, flushed every 50 steps as the exporter does."""
    policy = default_policy(experts, top_k)
    runtime = make_runtime(policy, experts, top_k, layers=1)
    exporter, state = runtime.exporter, runtime.state
    exporter.idle_default = IdleDefaultWatch(policy, 1)
    exporter.export = True  # as on TP rank 0, with the Prometheus side stubbed out
    exporter._metrics = type("M", (), {"default_idle": _Gauge()})()
    exporter._export = lambda *args: None
    gen = torch.Generator().manual_seed(5)
    with sglang_topology():
        topk = build_topk(experts=experts, top_k=top_k)
        for step in range(steps):
            logits = torch.randn(experts, generator=gen)[None, :] + torch.randn(
                rows, experts, generator=gen) * 1.5
            call(runtime, topk, logits, StepLayout("decode", rows, 0))
            if step % 50 == 49:
                exporter.flush(state)
    return runtime


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "lynx.plugin" and r.levelname == "WARNING"]


def test_a_default_that_cuts_nothing_is_said_once_with_how_to_calibrate(
        caplog: pytest.LogCaptureFixture) -> None:
    runtime = serve_decode_steps(128, 8, rows=8, steps=MIN_STEPS + 100)
    warnings = _warnings(caplog)
    assert len(warnings) == 1, warnings
    assert "cut 0.00% of the experts" in warnings[0]
    assert "lynx-serve calibrate <model> --ladder --corpus" in warnings[0]
    assert runtime.exporter.metrics.default_idle.value == 1
    # another policy applied (e.g. by the controller): the gauge says the default is gone
    runtime.state.policy = PolicySpec(name="off")
    runtime.exporter.flush(runtime.state)
    assert runtime.exporter.metrics.default_idle.value == 0


def test_a_default_that_cuts_is_never_reported(caplog: pytest.LogCaptureFixture) -> None:
    runtime = serve_decode_steps(8, 2, rows=8, steps=MIN_STEPS + 100)
    warnings = _warnings(caplog)
    totals = runtime.exporter.layer_totals()[0]
    assert totals[FIELD["kept"]] < totals[FIELD["stock_union"]]  # it did cut
    assert warnings == [] and runtime.exporter.metrics.default_idle.value == 0


def test_the_verdict_waits_for_enough_steps_and_ignores_other_policies() -> None:
    watch = IdleDefaultWatch(default_policy(128, 8), num_layers=2)
    one = torch.ones(2)
    for _ in range(MIN_STEPS - 1):  # 2 layer-steps per decode step: one step short
        assert watch.observe(watch.default, one, one * 40, one * 40) is None
    assert watch.observe(PolicySpec(name="off"), one, one * 40, one * 40) is None
    assert not watch.idle
    assert watch.observe(watch.default, one, one * 40, one * 40) is not None and watch.idle
    assert watch.observe(watch.default, one, one * 40, one * 40) is None  # said once
