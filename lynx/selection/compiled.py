"""`select_layer_step` compiled once per key on the CPU (Inductor); eager where it cannot be.

Shape legend: T rows of the step, E experts, K top_k.

Dozens of small eager torch ops cost ~1 ms per layer-step on a CPU, several percent of an MoE
layer; one Inductor graph of the same step costs ~0.15 ms (E=128, K=8, T=32). The graph is
traced with symbolic shapes, so one graph serves every row count; it is specialised to the
Python constants, so it is compiled once per `GraphKey` (policy name, `RouterSpec`, E, logits
dtype, with/without correction bias and row weights) and reused by every layer and step with
that key.

Compiling takes seconds (a few with Inductor's on-disk cache warm), so an engine compiles its
known keys once before serving (`CompiledSelection.warm_up`); a key first seen while serving
(a policy switched to at run time) is compiled on that call, a one-off stall. Not on another
thread: tracing patches ``torch.nn.Module.__call__`` process-wide, which would break a model
forward running concurrently.
Expert ids, keep sets and routed rows are bit for bit the eager specification's (tested);
weights and statistics agree to float rounding (Inductor may re-associate sums).

Inductor on the CPU compiles C++: where no C++ compiler is present (a slim image), or a
compile fails, the step stays eager and one warning is logged. CUDA tensors are never
compiled here (they take the Triton kernels and SGLang's CUDA graphs).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import NamedTuple

import torch

from lynx.selection.policies import SelectionKnobs, make_knobs
from lynx.selection.routers import RouterSpec
from lynx.selection.step import LayerSelection, select_layer_step

logger = logging.getLogger("lynx.selection")


class GraphKey(NamedTuple):
    policy: str
    router: RouterSpec
    experts: int
    dtype: torch.dtype  # of the logits
    has_bias: bool
    has_row_weight: bool


def cxx_compiler() -> str | None:
    """The C++ compiler Inductor would use, or None when there is none."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        return get_cpp_compiler()
    except Exception:  # InvalidCxxCompiler, or an Inductor without the helper
        return None


class _StepModule(torch.nn.Module):
    """The step with flat tensor inputs (what `make_fx` traces)."""

    def __init__(self, key: GraphKey) -> None:
        super().__init__()
        self.key = key

    def forward(self, logits: torch.Tensor, row_valid: torch.Tensor, row_prunable: torch.Tensor,
                *rest: torch.Tensor) -> tuple[torch.Tensor, ...]:
        knobs = SelectionKnobs(*rest[: len(SelectionKnobs._fields)])
        extra = list(rest[len(SelectionKnobs._fields):])
        bias = extra.pop(0) if self.key.has_bias else None
        weight = extra.pop(0) if self.key.has_row_weight else None
        return tuple(select_layer_step(self.key.policy, logits, self.key.router, knobs,
                                       row_valid, row_prunable, bias, row_weight=weight))


def _example_inputs(key: GraphKey) -> tuple[torch.Tensor, ...]:
    # T = E + 1: symbolic tracing gives equal example sizes one symbol ("duck sizing"), which
    # would tie the row count to the expert count; T >= 2 avoids the 0/1 specialisation.
    rows = key.experts + 1
    # Distinct tensors throughout (make_knobs allocates each knob on its own): the tracer
    # would fold aliased example inputs into one.
    knobs = make_knobs()
    extra = ([torch.zeros(key.experts)] if key.has_bias else []) + (
        [torch.ones(rows)] if key.has_row_weight else [])
    return (torch.zeros(rows, key.experts, dtype=key.dtype), torch.zeros(rows, dtype=torch.bool),
            torch.zeros(rows, dtype=torch.bool), *knobs, *extra)


def compile_step(key: GraphKey) -> Callable[..., tuple[torch.Tensor, ...]]:
    """One Inductor graph of the step for ``key``, any T >= 1 (seconds; raises whatever
    tracing or Inductor raise). Traced with symbolic shapes into a plain FX graph, so
    Inductor's on-disk cache serves the next process; the C++ wrapper keeps the per-call
    Python cost small (no Dynamo guards: the key is the guard)."""
    import torch._inductor.config as inductor_config
    from torch.fx.experimental.proxy_tensor import make_fx

    example = _example_inputs(key)
    with torch.no_grad():
        graph = make_fx(_StepModule(key), tracing_mode="symbolic")(*example)
        with inductor_config.patch(cpp_wrapper=True, compile_threads=1):
            return torch._inductor.compile(graph, list(example))


class CompiledSelection:
    """Drop-in for `select_layer_step` that runs one compiled graph per `GraphKey`.

    ``enabled``: False = always eager (also when no C++ compiler is found)."""

    def __init__(self, *, enabled: bool = True) -> None:
        self.graphs: dict[GraphKey, Callable[..., tuple[torch.Tensor, ...]]] = {}
        self.failed: dict[GraphKey, str] = {}
        self.compiler = cxx_compiler() if enabled else None
        self.enabled = enabled and self.compiler is not None
        if enabled and self.compiler is None:
            logger.warning("Lynx: no C++ compiler found for Inductor; the selection step runs "
                           "eagerly (slower on the CPU). Install g++ to compile it.")

    def __call__(self, policy: str, logits: torch.Tensor, router: RouterSpec,
                 knobs: SelectionKnobs, row_valid: torch.Tensor, row_prunable: torch.Tensor,
                 correction_bias: torch.Tensor | None = None, *,
                 row_weight: torch.Tensor | None = None) -> LayerSelection:
        """Same contract and results as `select_layer_step` (see the module doc)."""
        rows, experts = logits.shape
        graph = None
        key = GraphKey(policy, router, experts, logits.dtype, correction_bias is not None,
                       row_weight is not None)
        # Inside someone else's trace (torch.compile of the model, a graph capture) the
        # eager specification is what gets traced.
        if (self.enabled and not logits.is_cuda and rows > 0
                and not torch.compiler.is_compiling()):
            graph = self.graphs.get(key)
            if graph is None and key not in self.failed:
                graph = self.compile(key)
        if graph is not None:
            # The graph assumes the example's contiguous strides.
            inputs = [logits.contiguous(), row_valid, row_prunable, *knobs]
            if correction_bias is not None:
                inputs.append(correction_bias.float().reshape(-1))
            if row_weight is not None:
                inputs.append(row_weight.float())
            try:
                return LayerSelection(*graph(*inputs))
            except Exception as error:  # never take the forward down: eager from now on
                self._give_up(key, error, "running the compiled selection step")
        return select_layer_step(policy, logits, router, knobs, row_valid, row_prunable,
                                 correction_bias, row_weight=row_weight)

    def _give_up(self, key: GraphKey, error: Exception, doing: str) -> None:
        """Eager for ``key`` from now on; the first failure of all is logged."""
        self.graphs.pop(key, None)
        if not self.failed:
            logger.warning("Lynx: %s failed (%s: %s); it runs eagerly", doing,
                           type(error).__name__, error)
        self.failed[key] = f"{type(error).__name__}: {error}"

    def warm_up(self, keys: list[GraphKey]) -> None:
        """Compile ``keys`` now (before serving); failures are logged once, then eager."""
        if self.enabled:
            for key in keys:
                if key not in self.graphs and key not in self.failed:
                    self.compile(key)

    def counts(self) -> dict[str, int]:
        """Graphs by state: ``ready``, ``failed`` (both 0 when compiling is off)."""
        return {"ready": len(self.graphs), "failed": len(self.failed)}

    def compile(self, key: GraphKey) -> Callable[..., tuple[torch.Tensor, ...]] | None:
        """``key``'s graph, compiled now; None (and eager for the key) if that fails."""
        start = time.monotonic()
        try:
            graph = compile_step(key)
        except Exception as error:  # keep serving eagerly; say why once
            self._give_up(key, error, "compiling the selection step")
            return None
        self.graphs[key] = graph
        logger.info("Lynx: selection step compiled for policy %s, E=%d, %s logits in %.1f s",
                    key.policy, key.experts, key.dtype, time.monotonic() - start)
        return graph
