"""The plugin under CUDA graphs: a captured TopK hook bakes Python constants in, so the policy
is picked on the device (``by_code`` reading ``knobs.policy_code``). One compiled (fullgraph)
trace of `LynxRuntime.select` follows budget -> piggyback -> affinity -> off switches made by
`RuntimeState.stage_policy`, each matching the eager named policy exactly, for a plain and a
grouped correction-bias router. (Routing conformance per router kind and TopK format: the
test_conformance_* files.)

Shape legend: T rows, E experts, K top_k."""

from __future__ import annotations

import pytest
import torch
from topk_harness import make_runtime, policy_spec

from lynx.selection import RouterSpec
from lynx.sglang_plugin.formats import LayerPlan
from lynx.sglang_plugin.step_state import RuntimeState, StepLayout
from lynx_protocol.policy import PolicySpec

T, E, K = 32, 16, 4
ROUTERS = {
    "softmax": RouterSpec(top_k=K),
    "sigmoid-bias": RouterSpec(top_k=K, scoring="sigmoid", num_expert_group=4, topk_group=2,
                               has_correction_bias=True),
}


class _Config:
    correction_bias = torch.linspace(-0.2, 0.2, E)


@pytest.mark.parametrize("kind", list(ROUTERS))
def test_policy_switch_reaches_a_captured_step_without_recapture(kind: str) -> None:
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    plan = LayerPlan("standard", router=ROUTERS[kind])
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(T, E, generator=gen) * 1.5 + torch.randn(E, generator=gen)[None]
    budget = policy_spec("budget", budget=6)
    captured = make_runtime(budget, E, K, layers=1)
    assert captured.state is not None
    captured.state.graph_safe = True
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(
        lambda z: captured.select(captured.state, z, plan, _Config, 0),  # type: ignore[arg-type]
        fullgraph=True, backend=counter)
    policies = [budget, PolicySpec(name="piggyback", k0=1), PolicySpec(name="affinity"),
                PolicySpec(name="off")]
    seen = []
    for version, policy in enumerate(policies, start=1):
        captured.state.stage_policy(policy, version)
        captured.state.begin_step(StepLayout("decode", T, 0))
        eager = make_runtime(policy, E, K, layers=1)
        eager_state: RuntimeState = eager.state  # type: ignore[assignment]
        eager_state.begin_step(StepLayout("decode", T, 0))
        got = compiled(logits)
        want = eager.select(eager_state, logits, plan, _Config, 0)
        for name in ("keep", "apply_rows", "topk_ids", "topk_weights", "stats"):
            assert torch.equal(getattr(got, name), getattr(want, name)), (policy.name, name)
        seen.append(int(got.keep.sum()))
    assert counter.frame_count == 1  # one trace served every policy
    assert len(set(seen[:3])) > 1 and seen[3] == E  # the policies really differ; off keeps all
