"""`select_layer_step` compiled ahead of use on the CPU (Inductor), eager until it is ready.

Shape legend: T rows of the step, E experts, K top_k.

Dozens of small eager torch ops cost ~1 ms per layer-step on a CPU, several percent of an MoE
layer; one Inductor graph of the same step costs ~0.15 ms (E=128, K=8, T=32). The graph is
traced with symbolic shapes, so one graph serves every row count; it is specialised to the
Python constants, so it is compiled once per `GraphKey` (policy name, `RouterSpec`, E, logits
dtype, with/without correction bias and row weights) and reused by every layer and step with
that key.

Compiling takes seconds, so it never runs on the serving path: a key seen for the first time
is queued for a background thread, and the step runs eagerly until its graph is ready.
Expert ids, keep sets and routed rows are bit for bit the eager specification's (tested);
weights and statistics agree to float rounding (Inductor may re-associate sums).

Inductor on the CPU compiles C++: where no C++ compiler is present (a slim image), or a
compile fails, the step stays eager and one warning is logged. CUDA tensors are never
compiled here (they take the Triton kernels and SGLang's CUDA graphs).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

import torch

from lynx.selection.policies import SelectionKnobs
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
    # Distinct tensors throughout: the tracer would fold aliased example inputs into one.
    knobs = (torch.tensor(True), torch.tensor(1, dtype=torch.int64), torch.tensor(3.0),
             torch.tensor(2.0), torch.tensor(1, dtype=torch.int64),
             torch.tensor(0, dtype=torch.int64), torch.tensor(0.9))
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
    """Drop-in for `select_layer_step` that runs compiled graphs once they are ready.

    ``enabled``: False = always eager. ``background``: compile on a daemon thread (False:
    compile synchronously on first use, for tests and benchmarks)."""

    def __init__(self, *, enabled: bool = True, background: bool = True) -> None:
        self.background = background
        self.graphs: dict[GraphKey, Callable[..., tuple[torch.Tensor, ...]]] = {}
        self.failed: dict[GraphKey, str] = {}
        self._queued: set[GraphKey] = set()
        self._queue: queue.Queue[GraphKey] = queue.Queue()
        self._thread: threading.Thread | None = None
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
            if graph is None and key not in self._queued:
                self.request(key)
                graph = self.graphs.get(key)  # present if compiled synchronously
        if graph is not None:
            inputs = [logits, row_valid, row_prunable, *knobs]
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

    def request(self, key: GraphKey) -> None:
        """Compile ``key``'s graph: queued for the background thread, or now."""
        self._queued.add(key)
        self._queue.put(key)
        if not self.background:
            self._drain()
        elif self._thread is None:
            self._thread = threading.Thread(target=self._drain, name="lynx-compile",
                                            daemon=True)
            self._thread.start()

    def counts(self) -> dict[str, int]:
        """Graphs by state: ``ready``, ``failed`` (both 0 when compiling is off)."""
        return {"ready": len(self.graphs), "failed": len(self.failed)}

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every queued graph is compiled or failed; False on timeout (s)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def _drain(self) -> None:
        while True:
            try:
                key = self._queue.get(block=self.background)
            except queue.Empty:
                return
            start = time.monotonic()
            try:
                self.graphs[key] = compile_step(key)
                logger.info("Lynx: selection step compiled for policy %s, E=%d, %s logits in "
                            "%.1f s", key.policy, key.experts, key.dtype, time.monotonic() - start)
            except Exception as error:  # keep serving eagerly; say why once
                self._give_up(key, error, "compiling the selection step")
            finally:
                self._queue.task_done()
