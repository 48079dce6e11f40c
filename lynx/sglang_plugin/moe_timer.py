"""Benchmark instrument: wall time of the MoE blocks inside a serving process, by step mode.

``LYNX_TIME_MOE=1`` registers forward pre/post hooks on every module that owns one of
SGLang's ``TopK`` modules (the MoE block: router, top-k, experts, and the shared expert where
the block has one), and exports ``lynx_moe_seconds_total{mode}`` and
``lynx_moe_calls_total{mode}`` (mode: the step's `StepLayout.mode`). This gives the MoE share
of a step (f) and the in-server MoE speedup of a policy, from the same runs as the latency.
Those block times include the combine all-reduce under TP/EP, so every rank's converges to
the slowest's. Each rank therefore also times its own expert computation, before the combine
(each ``FusedMoE``'s ``run_moe_core``), and exports it from every rank:
``lynx_moe_expert_seconds_total{mode, tp_rank}``. Under EP the slowest rank's series is what
the step waits for.
On CUDA each hook synchronises the device (exact times, slower steps): a benchmark tool, off
by default.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch


class MoeTimer:
    """Times every MoE block forward of ``model``; ``mode_of()`` names the running step."""

    def __init__(self, model: torch.nn.Module, mode_of: Callable[[], str],
                 export: bool = True, tp_rank: int = 0) -> None:
        from sglang.srt.layers.moe.topk import TopK

        self.mode_of = mode_of
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._start: dict[int, float] = {}
        self._metrics: tuple[Any, Any] | None = None
        self.export = export
        self.blocks = [m for m in model.modules()
                       if any(isinstance(child, TopK) for child in m.children())]
        for block in self.blocks:
            block.register_forward_pre_hook(self._before)
            block.register_forward_hook(self._after)
        self.tp_rank = str(tp_rank)
        self._expert_metric: Any = None
        for module in model.modules():  # the experts' own compute, before the combine
            core = getattr(module, "run_moe_core", None)
            if callable(core):
                module.run_moe_core = self._timed_core(module, core)  # type: ignore[method-assign]

    def _timed_core(self, module: torch.nn.Module, core: Callable[..., Any]) -> Callable[..., Any]:
        def run_moe_core(*args: Any, **kwargs: Any) -> Any:
            self._sync(module)
            start = time.perf_counter()
            out = core(*args, **kwargs)
            self._sync(module)
            self.expert_metric.labels(mode=self.mode_of(), tp_rank=self.tp_rank).inc(
                time.perf_counter() - start)
            return out
        return run_moe_core

    @property
    def expert_metric(self) -> Any:
        if self._expert_metric is None:  # every rank exports its own
            from prometheus_client import Counter

            self._expert_metric = Counter(
                "lynx_moe_expert_seconds", "Wall time of this rank's expert computation, "
                "before the combine (LYNX_TIME_MOE=1)", ["mode", "tp_rank"])
        return self._expert_metric

    def _sync(self, module: torch.nn.Module) -> None:
        param = next(module.parameters(), None)
        if param is not None and param.is_cuda:
            torch.cuda.synchronize(param.device)

    def _before(self, module: torch.nn.Module, args: Any) -> None:
        self._sync(module)
        self._start[id(module)] = time.perf_counter()

    def _after(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        self._sync(module)
        start = self._start.pop(id(module), None)
        if start is None:
            return
        seconds = time.perf_counter() - start
        mode = self.mode_of()
        self.seconds[mode] = self.seconds.get(mode, 0.0) + seconds
        self.calls[mode] = self.calls.get(mode, 0) + 1
        if self.export:
            total, calls = self.metrics
            total.labels(mode=mode).inc(seconds)
            calls.labels(mode=mode).inc()

    @property
    def metrics(self) -> tuple[Any, Any]:
        if self._metrics is None:  # lazily: PROMETHEUS_MULTIPROC_DIR is set by then
            from prometheus_client import Counter

            self._metrics = (
                Counter("lynx_moe_seconds", "Wall time in MoE blocks (LYNX_TIME_MOE=1)",
                        ["mode"]),
                Counter("lynx_moe_calls", "MoE block forwards timed (LYNX_TIME_MOE=1)",
                        ["mode"]))
        return self._metrics
