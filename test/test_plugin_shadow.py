"""Shadow mode through the plugin's TopK hook on SGLang's real ``TopK``: the served output is
SGLang's own bit for bit, and what the recorder accumulates equals an offline replay of the
same router logits through the library, per layer and decode batch bucket; prefill, mixed and
padding rows are never measured; the file is the documented format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conformance_configs import BY_NAME, draw_inputs
from topk_harness import build_topk, call, make_runtime, sglang_topology, standard
from topk_harness import stock as stock_call

from lynx.selection import torch_batch_routing
from lynx.selection.shadow import shadow_budgets, shadow_statistics
from lynx.sglang_plugin.config import LynxConfigError, load_config
from lynx.sglang_plugin.shadow import SHADOW_FORMAT, ShadowRecorder
from lynx.sglang_plugin.step_state import BATCH_BUCKETS, StepLayout, batch_slot
from lynx_protocol.policy import PolicySpec

pytest.importorskip("sglang.srt.layers.moe.topk")


def topk_for(name: str, bias: torch.Tensor | None) -> object:
    model = BY_NAME[name]
    kwargs: dict = {"renormalize": model.renormalize, "scoring_func": model.scoring,
                    "correction_bias": bias, "routed_scaling_factor": model.routed_scaling_factor}
    if model.grouped:
        kwargs.update(use_grouped_topk=True, num_expert_group=model.groups,
                      topk_group=model.topk_group)
    return build_topk(experts=model.experts, top_k=model.top_k, **kwargs)


@pytest.mark.parametrize("name", ["Qwen3-30B-A3B", "DeepSeek-V3", "Mixtral-8x7B"])
def test_shadow_serves_stock_and_records_the_library_replay(name: str, tmp_path: Path) -> None:
    model = BY_NAME[name]
    e, k = model.experts, model.top_k
    with sglang_topology():
        runtime = make_runtime(PolicySpec(name="off"), e, k, layers=1)
        state = runtime.state
        assert state is not None
        state.shadow = True
        runtime.shadow = ShadowRecorder(state, tmp_path / "shadow.json", 3600.0)
        budgets = torch.tensor(shadow_budgets(e, k))
        want = torch.zeros(len(BATCH_BUCKETS) + 1, runtime.shadow.accumulator.shape[-1],
                           dtype=torch.float64)
        steps = [("decode", 24, 0), ("decode", 5, 0), ("prefill", 40, 40), ("mixed", 12, 9),
                 ("decode", 24, 0)]
        for seed, (mode, rows, start) in enumerate(steps):
            logits, bias = draw_inputs(model, rows + 2, seed)  # +2 padding rows
            logits[rows:] = float("nan")
            topk = topk_for(name, bias)
            served = standard(call(runtime, topk, logits, StepLayout(mode, rows, start)))
            stock = standard(stock_call(topk, logits))
            assert torch.equal(served.topk_ids, stock.topk_ids)  # bit for bit (NaN padding)
            torch.testing.assert_close(served.topk_weights, stock.topk_weights, rtol=0, atol=0,
                                       equal_nan=True)
            if mode == "decode":  # replay: the same logits and rows through the library
                measured = torch.arange(rows + 2) < rows
                z = torch.where(measured[:, None], logits, 0.0)
                batch = torch_batch_routing(z, model.spec(), bias, measured)
                want[batch_slot(rows)] += shadow_statistics(batch, measured, model.spec(),
                                                            budgets).double()
        got = runtime.shadow.accumulator[:, 0]
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-4), name
        assert float(got[batch_slot(24), 1]) == 48  # rows of the two decode steps at 24
        runtime.shadow.write_now()
    written = json.loads((tmp_path / "shadow.json").read_text())
    assert written["format"] == SHADOW_FORMAT and written["budgets"] == budgets.tolist()
    assert written["model"] == {"num_layers": 1, "num_experts": e, "top_k": k}
    assert [b["max_batch"] for b in written["buckets"]] == [8, 32]  # 5 rows, 24 rows
    assert written["buckets"][1]["layers"][0] == pytest.approx(
        got[batch_slot(24)].tolist(), rel=1e-5)


def test_shadow_config_refuses_a_bad_path_or_sampling_rate(tmp_path: Path) -> None:
    config = load_config({"LYNX_ENABLED": "1", "LYNX_SHADOW": str(tmp_path / "s.json")})
    assert config.shadow == tmp_path / "s.json" and config.shadow_every == 16
    for bad in (tmp_path, tmp_path / "missing" / "s.json"):
        with pytest.raises(LynxConfigError, match="LYNX_SHADOW"):
            load_config({"LYNX_ENABLED": "1", "LYNX_SHADOW": str(bad)})
    # LYNX_SHADOW=1: the controller link only, which it needs; 0 is off (no file named "0")
    link = load_config({"LYNX_ENABLED": "1", "LYNX_SHADOW": "1",
                        "LYNX_CONTROLLER": f"ipc://{tmp_path}/c.sock"})
    assert link.shadow is None and link.shadow_link and link.shadow_on
    with pytest.raises(LynxConfigError, match="LYNX_SHADOW=1: sends shadow statistics"):
        load_config({"LYNX_ENABLED": "1", "LYNX_SHADOW": "1"})
    off = load_config({"LYNX_ENABLED": "1", "LYNX_SHADOW": "0"})
    assert off.shadow is None and not off.shadow_on
    for every in ("0", "-3", "x", "2.5", "\u00b2"):  # "²" passes str.isdigit
        with pytest.raises(LynxConfigError, match="LYNX_SHADOW_EVERY"):
            load_config({"LYNX_ENABLED": "1", "LYNX_SHADOW_EVERY": every})


def test_shadow_measures_one_decode_step_in_every(tmp_path: Path) -> None:
    """Sampling: with every = 4, the 4th and 8th decode steps are measured (forwards 5 and
    9: the prefill at forward 4 is not counted), and a schedule that alternates prefill and
    decode forwards still has half its decode steps measured at every = 2 (counting forwards
    measured none of them: a newcomer's aliasing find)."""
    model = BY_NAME["Mixtral-8x7B"]
    with sglang_topology():
        runtime = make_runtime(PolicySpec(name="off"), model.experts, model.top_k, layers=1)
        state = runtime.state
        assert state is not None
        state.shadow, state.shadow_every = True, 4
        runtime.shadow = ShadowRecorder(state, tmp_path / "shadow.json", 3600.0)
        topk = topk_for(model.name, None)
        measured = []
        for step in range(1, 10):
            mode = "prefill" if step == 4 else "decode"
            logits, _ = draw_inputs(model, 8, step)
            call(runtime, topk, logits, StepLayout(mode, 8, 8 if mode == "prefill" else 0))
            measured.append(state.shadow_step)
        assert measured == [step in (5, 9) for step in range(1, 10)]
        assert float(runtime.shadow.accumulator[:, 0, 0].sum()) == 2.0  # layer-steps
        assert runtime.shadow.snapshot()["every"] == 4
        state.shadow_every, state.decode_steps = 2, 0
        alternating = []
        for step in range(12):
            prefill = step % 2 == 0
            state.begin_step(StepLayout("prefill" if prefill else "decode", 8,
                                        8 if prefill else 0))
            alternating.append(state.shadow_step)
            state.step_active = False
        assert sum(alternating) == 3  # of 6 decode steps
