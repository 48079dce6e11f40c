"""The runtime compiles a policy's selection graphs between steps, never inside a forward:
the start-up policy's before serving, a controller's policy when it arrives."""

from __future__ import annotations

import torch
from topk_harness import make_runtime

from lynx.selection import RouterSpec
from lynx.selection.compiled import CompiledSelection, GraphKey
from lynx.sglang_plugin.controller_glue import PolicyMessage
from lynx.sglang_plugin.step_state import StepLayout
from lynx_protocol.policy import PolicySpec

ROUTER = RouterSpec(top_k=4)


def test_a_controller_policy_is_compiled_on_arrival_and_serves_from_its_graph() -> None:
    runtime = make_runtime(PolicySpec(name="off"), experts=32, top_k=4, layers=1)
    runtime.compiled = CompiledSelection()
    runtime._graph_keys = [GraphKey("", ROUTER, 32, torch.float32, False, False, True)]
    runtime.compile_selection("off")
    assert runtime.compiled.graphs == {}  # policy off selects nothing: nothing to compile

    message = PolicyMessage(PolicySpec(name="coverage", coverage=0.8), 2, "test")
    args, _ = runtime.before_process_input_requests(object(), [message, "req"])
    assert args[1] == ["req"]  # the message is consumed, requests pass on
    assert list(runtime.compiled.graphs) == [GraphKey("coverage", ROUTER, 32, torch.float32,
                                                      False, False, True)]
    state = runtime.state
    assert state is not None and state.begin_step(StepLayout("decode", 16, 0))

    calls: list[int] = []  # count calls into the compiled graph
    runtime.compiled.graphs = {key: (lambda *a, g=g: calls.append(1) or g(*a))
                               for key, g in runtime.compiled.graphs.items()}
    from lynx.sglang_plugin.formats import LayerPlan

    logits = torch.randn(16, 32)
    own_ids = logits.topk(4).indices.to(torch.int32)  # SGLang's STANDARD output, judged on
    selection = runtime.select(state, logits, LayerPlan("standard", router=ROUTER),
                               type("Config", (), {"correction_bias": None}), 0,
                               stock_ids=own_ids)
    assert calls == [1]  # served from the graph compiled on arrival
    assert selection.apply_rows.all() and int(selection.keep.sum()) < 32
