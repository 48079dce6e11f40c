"""The runtime compiles a policy's selection graphs between steps, never inside a forward:
the start-up policy's before serving, a controller's policy when it arrives."""

from __future__ import annotations

from pathlib import Path

import torch
from topk_harness import make_runtime

from lynx.selection import RouterSpec
from lynx.selection.compiled import CompiledSelection, GraphKey
from lynx.sglang_plugin.controller_glue import PolicyMessage
from lynx.sglang_plugin.step_state import StepLayout
from lynx_policy.testing import wait_until
from lynx_protocol.policy import PolicySpec

ROUTER = RouterSpec(top_k=4)


def test_a_controller_policy_compiles_off_the_serving_thread_then_serves_from_its_graph(
        tmp_path: Path) -> None:
    """A policy that arrives while serving: the scheduler goes on (eager steps) while a worker
    process compiles its package; the first step after the worker finished loads it."""
    runtime = make_runtime(PolicySpec(name="off"), experts=32, top_k=4, layers=1)
    runtime.compiled = CompiledSelection(cache_dir=tmp_path / "cache")
    key = GraphKey("coverage", ROUTER, 32, torch.float32, False, False, True)
    runtime._graph_keys = [key._replace(policy="")]
    runtime.compile_selection("off")
    assert runtime.compiled.graphs == {}  # policy off selects nothing: nothing to compile

    message = PolicyMessage(PolicySpec(name="coverage", coverage=0.8), 2, "test")
    args, _ = runtime.before_process_input_requests(object(), [message, "req"])
    assert args[1] == ["req"]  # the message is consumed, requests pass on
    assert runtime.compiled.graphs == {} and key in runtime.compiled.background.running
    state = runtime.state
    assert state is not None and state.begin_step(StepLayout("decode", 16, 0))
    from lynx.sglang_plugin.formats import LayerPlan

    logits = torch.randn(16, 32)
    own_ids = logits.topk(4).indices.to(torch.int32)  # SGLang's STANDARD output, judged on
    plan, config = LayerPlan("standard", router=ROUTER), type("C", (), {"correction_bias": None})
    eager = runtime.select(state, logits, plan, config, 0, stock_ids=own_ids)  # not waiting
    wait_until("the worker's package is loaded", lambda: runtime.select(
        state, logits, plan, config, 0, stock_ids=own_ids) is not None
        and key in runtime.compiled.graphs, timeout_s=300)
    assert not runtime.compiled.failed and (tmp_path / "cache").is_dir()
    assert torch.equal(eager.keep, runtime.select(state, logits, plan, config, 0,
                                                  stock_ids=own_ids).keep)


def test_a_worker_that_fails_reports_its_error(tmp_path: Path) -> None:
    from lynx.selection.compile_worker import BackgroundCompiles

    compiles = BackgroundCompiles(tmp_path)
    bad = GraphKey("no-such-policy", ROUTER, 32, torch.float32, False, False, True)
    compiles.start(bad)
    done: list[tuple[bool, str]] = []
    wait_until("the worker exits", lambda: done.append(compiles.finished(bad)) or done[-1][0],
               timeout_s=120)
    assert "unknown selection policy" in done[-1][1] and bad not in compiles.running


def test_served_from_the_graph_compiled_before_serving() -> None:
    runtime = make_runtime(PolicySpec(name="off"), experts=32, top_k=4, layers=1)
    runtime.compiled = CompiledSelection()
    runtime._graph_keys = [GraphKey("", ROUTER, 32, torch.float32, False, False, True)]
    runtime.compile_selection("coverage")  # before serving: compiled (or loaded) now
    assert list(runtime.compiled.graphs) == [GraphKey("coverage", ROUTER, 32, torch.float32,
                                                      False, False, True)]
    state = runtime.state
    assert state is not None
    state.stage_policy(PolicySpec(name="coverage", coverage=0.8), 2)
    assert state.begin_step(StepLayout("decode", 16, 0))

    calls: list[int] = []  # count calls into the compiled graph
    runtime.compiled.graphs = {key: (lambda *a, g=g: calls.append(1) or g(*a))
                               for key, g in runtime.compiled.graphs.items()}
    from lynx.sglang_plugin.formats import LayerPlan

    logits = torch.randn(16, 32)
    own_ids = logits.topk(4).indices.to(torch.int32)  # SGLang's STANDARD output, judged on
    selection = runtime.select(state, logits, LayerPlan("standard", router=ROUTER),
                               type("Config", (), {"correction_bias": None}), 0,
                               stock_ids=own_ids)
    assert calls == [1]  # served from the graph compiled before serving
    assert selection.apply_rows.all() and int(selection.keep.sum()) < 32
