"""SGLang's real ``TopK`` built on the CPU the way its model files build it, driven through
the plugin's `LynxRuntime` hook exactly as SGLang's HookRegistry wrapper calls it.

Shape legend: T rows, E experts, K routed top_k, S fused shared slots.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from lynx.sglang_plugin.config import PluginConfig
from lynx.sglang_plugin.exporter import StatsExporter
from lynx.sglang_plugin.runtime import LynxRuntime
from lynx.sglang_plugin.step_state import RuntimeState, StepLayout
from lynx_protocol.policy import BudgetBucket, PolicySpec


@contextmanager
def sglang_topology() -> Iterator[None]:
    """SGLang's own test topology (a published ServerArgs), needed to build ``TopK``."""
    from sglang.srt.runtime_context import get_parallel
    from sglang.test.test_utils import published_topology

    with published_topology(device="cpu"):
        get_parallel().override_permanently(tp_group=None)  # single process, no groups
        yield


def policy_spec(name: str, budget: int | None = None, k0: int = 1) -> PolicySpec:
    if name == "budget":
        assert budget is not None
        return PolicySpec(name="budget", budgets=[BudgetBucket(max_batch=100_000,
                                                               all_layers=budget)])
    if name == "piggyback":
        return PolicySpec(name="piggyback", k0=k0)
    return PolicySpec(name=name)


def make_runtime(policy: PolicySpec, experts: int, top_k: int, layers: int = 4, *,
                 compile: bool = False) -> LynxRuntime:
    """A runtime with its state and a (non-exporting) statistics exporter on the CPU; the
    eager selection step unless ``compile`` (then the server's AOTInductor step, packages in
    the default cache; the compiled step is checked against eager in test_selection_compiled)."""
    config = PluginConfig(enabled=True, policy=policy, controller=None, replica_id="test",
                          stale_after_s=10.0, safe_policy=None, stats_interval_s=3600.0,
                          compile=compile)
    runtime = LynxRuntime(config)
    runtime.state = RuntimeState(layers, experts, top_k, torch.device("cpu"), policy)
    runtime.exporter = StatsExporter(runtime.state, config, tp_rank=1)  # no Prometheus
    return runtime


def build_topk(*, experts: int, top_k: int, layer: int = 0, fmt: str = "STANDARD",
               shared: int = 0, runner: str | None = None, **kwargs: Any) -> Any:
    """``TopK(top_k=routed, ...)`` as a model file builds it; ``shared`` fused slots are what
    SGLang's shared-experts config adds (``top_k`` then counts them too)."""
    from sglang.srt.configs.shared_experts import SharedExpertsConfig
    from sglang.srt.layers.moe.topk import TopK, TopKOutputFormat
    from sglang.srt.layers.moe.utils import MoeRunnerBackend

    topk = TopK(top_k=top_k, layer_id=layer, output_format=TopKOutputFormat[fmt], **kwargs)
    if shared:
        topk.topk_config = dataclasses.replace(
            topk.topk_config, top_k=top_k + shared,
            shared_experts=SharedExpertsConfig(num_fused_shared_experts=shared))
    if runner is not None:
        topk.bind_runner_backend(MoeRunnerBackend(runner))
    topk.topk_config.torch_native = True  # BYPASSED.to_standard() on this CPU
    del experts
    return topk


def call(runtime: LynxRuntime, topk: Any, logits: torch.Tensor, layout: StepLayout,
         path: str = "native") -> Any:
    """One TopK call inside a step, through the hook (``path``: the TopK method wrapped)."""
    from sglang.srt.layers.moe.topk import TopK

    original = {"native": TopK.forward_native, "cuda": TopK.forward_cuda}[path]
    hidden = torch.zeros(logits.shape[0], 8)
    assert runtime.state is not None
    runtime.state.begin_step(layout)
    try:
        return runtime.around_topk_forward(original, topk, hidden, logits, path=path)
    finally:
        runtime.state.step_active = False


def stock(topk: Any, logits: torch.Tensor, path: str = "native") -> Any:
    from sglang.srt.layers.moe.topk import TopK

    original = {"native": TopK.forward_native, "cuda": TopK.forward_cuda}[path]
    return original(topk, torch.zeros(logits.shape[0], 8), logits)


def standard(output: Any) -> Any:
    return output.to_standard() if hasattr(output, "to_standard") else output
