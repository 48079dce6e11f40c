"""`select_layer_step` compiled once per key on the CPU (AOTInductor); eager where it cannot be.

Shape legend: T rows of the step, E experts, K top_k.

Dozens of small eager torch ops cost ~1 ms per layer-step on a CPU, several percent of an MoE
layer; one compiled graph of the same step costs ~0.13 ms (E=128, K=8, T=16). The step is
exported (`torch.export`, T dynamic in [2, `MAX_ROWS`]) and compiled by AOTInductor into a
package whose C++ runner is called directly: no Python wrappers per call (measured against
`torch._inductor.compile` with its C++ wrapper: 125 vs 169 us at T=16, 251 vs 317 us at T=64,
E=128). A one-row step runs on the graph with one padding row added (a padding row neither
votes nor is pruned); a step above `MAX_ROWS` rows runs eagerly. The graph is specialised to
the Python constants, so it is compiled once per `GraphKey` (policy name, `RouterSpec`, E,
logits dtype, with/without correction bias, row weights and the engine's own top-K ids) and
reused by every layer and step with that key.

Compiling takes ~20-30 s on this 2-core machine, so packages are kept on disk
(``cache_dir``; the plugin's ``LYNX_COMPILE_CACHE``) under a name hashing the key, the torch
version, the CPU's vector ISA and the source of `lynx.selection`: the next process loads one
in milliseconds. An engine compiles or loads its known keys before serving
(`CompiledSelection.warm_up`); a policy switched to at run time is prefetched: a worker process
compiles it while the step runs eagerly (`CompiledSelection.prefetch`, `compile_worker`; not a
thread: exporting patches ``torch.nn.Module.__call__`` process-wide). A key never warmed up
nor prefetched is compiled on its first call, a one-off stall.
Expert ids, keep sets and routed rows are bit for bit the eager specification's (tested);
weights and statistics agree to float rounding (Inductor may re-associate sums).

Inductor on the CPU compiles C++: where no C++ compiler is present (a slim image), or a
compile fails, the step stays eager and one warning is logged. CUDA tensors are never
compiled here (they take the Triton kernels and SGLang's CUDA graphs).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

from lynx.selection.compile_worker import BackgroundCompiles
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
    has_stock_ids: bool = False  # the engine's own top-K ids are an input (STANDARD format)


def cxx_compiler() -> str | None:
    """The C++ compiler Inductor would use, or None when there is none."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        return get_cpp_compiler()
    except Exception:  # InvalidCxxCompiler, or an Inductor without the helper
        return None


class _StepModule(torch.nn.Module):
    """The step with flat tensor inputs (what `torch.export` traces)."""

    def __init__(self, key: GraphKey) -> None:
        super().__init__()
        self.key = key

    def forward(self, logits: torch.Tensor, row_valid: torch.Tensor, row_prunable: torch.Tensor,
                *rest: torch.Tensor) -> tuple[torch.Tensor, ...]:
        knobs = SelectionKnobs(*rest[: len(SelectionKnobs._fields)])
        extra = list(rest[len(SelectionKnobs._fields):])
        bias = extra.pop(0) if self.key.has_bias else None
        weight = extra.pop(0) if self.key.has_row_weight else None
        ids = extra.pop(0) if self.key.has_stock_ids else None
        return tuple(select_layer_step(self.key.policy, logits, self.key.router, knobs,
                                       row_valid, row_prunable, bias, row_weight=weight,
                                       stock_ids=ids))


PER_STEP = frozenset({"keep", "stats"})  # `LayerSelection` fields without a row dimension
MAX_ROWS = 1 << 16
"""Most rows a compiled graph serves (the export's bound on T); larger steps run eagerly."""


def _example_inputs(key: GraphKey) -> tuple[torch.Tensor, ...]:
    # T = E + 1: the exporter would tie equal example sizes to one symbol ("duck sizing"),
    # the row count to the expert count; T >= 2 avoids the 0/1 specialisation.
    rows = key.experts + 1
    # Distinct tensors throughout (make_knobs allocates each knob on its own): the tracer
    # would fold aliased example inputs into one.
    knobs = make_knobs()
    extra = ([torch.zeros(key.experts)] if key.has_bias else []) + (
        [torch.ones(rows)] if key.has_row_weight else []) + (
        [torch.zeros(rows, key.router.top_k, dtype=torch.int64)] if key.has_stock_ids else [])
    return (torch.zeros(rows, key.experts, dtype=key.dtype), torch.zeros(rows, dtype=torch.bool),
            torch.zeros(rows, dtype=torch.bool), *knobs, *extra)


def package_name(key: GraphKey) -> str:
    """File name of ``key``'s package: the key, torch's version, the CPU's vector ISA (the
    code is built for it) and the source of `lynx.selection`, hashed."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    digest = hashlib.sha256(repr((
        key.policy, key.router, key.experts, str(key.dtype), key.has_bias, key.has_row_weight,
        key.has_stock_ids,
        torch.__version__, str(pick_vec_isa()), platform.machine(), MAX_ROWS)).encode())
    for source in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(source.read_bytes())
    return f"{key.policy}-E{key.experts}-{digest.hexdigest()[:20]}.pt2"


def export_package(key: GraphKey, path: Path) -> None:
    """Export the step for ``key`` (T dynamic in [2, `MAX_ROWS`]) and compile it into an
    AOTInductor package at ``path`` (tens of seconds; raises whatever export or Inductor
    raise)."""
    import torch._inductor.config as inductor_config

    example = _example_inputs(key)
    rows = torch.export.Dim("T", min=2, max=MAX_ROWS)
    knobs = (None,) * len(SelectionKnobs._fields)
    extra = ((None,) if key.has_bias else ()) + (({0: rows},) if key.has_row_weight else ()) + (
        ({0: rows},) if key.has_stock_ids else ())
    with torch.no_grad():
        program = torch.export.export(
            _StepModule(key), example, strict=False,
            dynamic_shapes=({0: rows}, {0: rows}, {0: rows}, (*knobs, *extra)))
        with inductor_config.patch(compile_threads=1):
            torch._inductor.aoti_compile_and_package(program, package_path=str(path))


class StepRunner:
    """A loaded package's C++ runner, called with the step's flat inputs."""

    def __init__(self, path: Path, key: GraphKey) -> None:
        self.runner = torch._inductor.aoti_load_package(str(path)).loader
        self.key = key

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if inputs[0].shape[0] != 1:
            return tuple(self.runner.run(list(inputs)))
        # One row: add a padding row (invalid, not prunable; row weight 0), drop its outputs.
        logits, valid, prunable, *rest = inputs
        padded = [logits.repeat(2, 1), torch.cat([valid, valid.new_zeros(1)]),
                  torch.cat([prunable, prunable.new_zeros(1)]), *rest]
        per_row = int(self.key.has_row_weight) + int(self.key.has_stock_ids)
        for i in range(len(padded) - per_row, len(padded)):  # row weight 0, ids repeated
            tail = padded[i].new_zeros(1) if padded[i].dim() == 1 else padded[i]
            padded[i] = torch.cat([padded[i], tail])
        outputs = LayerSelection(*self.runner.run(padded))
        return tuple(value if name in PER_STEP else value[:1]
                     for name, value in zip(LayerSelection._fields, outputs, strict=True))


def compile_step(key: GraphKey, cache_dir: Path | None = None
                 ) -> Callable[..., tuple[torch.Tensor, ...]]:
    """``key``'s step as a callable over flat inputs, any 1 <= T <= `MAX_ROWS`: loaded from
    ``cache_dir`` if a package is there, else compiled (and stored there, atomically).
    Raises whatever export, Inductor or the package loader raise."""
    if cache_dir is not None:
        path = cache_dir / package_name(key)
        if path.is_file():
            try:
                return StepRunner(path, key)
            except Exception as error:  # a damaged or foreign file: compile it afresh
                logger.warning("Lynx: cached selection package %s unusable (%s); recompiling",
                               path, error)
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            handle, partial = tempfile.mkstemp(suffix=".pt2", dir=cache_dir)
        except OSError as error:
            logger.warning("Lynx: compile cache %s not writable (%s); compiling without it",
                           cache_dir, error)
        else:
            os.close(handle)
            try:
                export_package(key, Path(partial))
                Path(partial).chmod(0o644)  # mkstemp's 0600: other local users may load it
                os.replace(partial, path)
            finally:
                Path(partial).unlink(missing_ok=True)
            return StepRunner(path, key)
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "step.pt2"
        export_package(key, path)
        return StepRunner(path, key)


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/lynx/selection`` (``~/.cache/lynx/selection``)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lynx" / "selection"


class CompiledSelection:
    """Drop-in for `select_layer_step` that runs one compiled graph per `GraphKey`.

    ``enabled``: False = always eager (also when no C++ compiler is found). ``cache_dir``:
    where compiled packages are kept between processes (None: `default_cache_dir`)."""

    def __init__(self, *, enabled: bool = True, cache_dir: Path | None = None) -> None:
        self.cache_dir = cache_dir if cache_dir is not None else default_cache_dir()
        self.graphs: dict[GraphKey, Callable[..., tuple[torch.Tensor, ...]]] = {}
        self.failed: dict[GraphKey, str] = {}
        self.background = BackgroundCompiles(self.cache_dir)  # `prefetch`ed keys compiling
        self.compiler = cxx_compiler() if enabled else None
        self.enabled = enabled and self.compiler is not None
        if enabled and self.compiler is None:
            logger.warning("Lynx: no C++ compiler found for Inductor; the selection step runs "
                           "eagerly (slower on the CPU). Install g++ to compile it.")

    def __call__(self, policy: str, logits: torch.Tensor, router: RouterSpec,
                 knobs: SelectionKnobs, row_valid: torch.Tensor, row_prunable: torch.Tensor,
                 correction_bias: torch.Tensor | None = None, *,
                 row_weight: torch.Tensor | None = None,
                 stock_ids: torch.Tensor | None = None) -> LayerSelection:
        """Same contract and results as `select_layer_step` (see the module doc)."""
        rows, experts = logits.shape
        graph = None
        key = GraphKey(policy, router, experts, logits.dtype, correction_bias is not None,
                       row_weight is not None, stock_ids is not None)
        # Inside someone else's trace (torch.compile of the model, a graph capture) the
        # eager specification is what gets traced.
        if (self.enabled and not logits.is_cuda and 0 < rows <= MAX_ROWS
                and not torch.compiler.is_compiling()):
            if key in self.background.running:
                self.collect(key)
            graph = self.graphs.get(key)
            if (graph is None and key not in self.failed
                    and key not in self.background.running):
                graph = self.compile(key)
        if graph is not None:
            # The graph assumes the example's contiguous strides.
            inputs = [logits.contiguous(), row_valid, row_prunable, *knobs]
            if correction_bias is not None:
                inputs.append(correction_bias.float().reshape(-1))
            if row_weight is not None:
                inputs.append(row_weight.float())
            if stock_ids is not None:
                inputs.append(stock_ids.long().contiguous())
            try:
                return LayerSelection(*graph(*inputs))
            except Exception as error:  # never take the forward down: eager from now on
                self._give_up(key, error, "running the compiled selection step")
        return select_layer_step(policy, logits, router, knobs, row_valid, row_prunable,
                                 correction_bias, row_weight=row_weight, stock_ids=stock_ids)

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

    def prefetch(self, keys: list[GraphKey]) -> None:
        """Make ``keys`` ready without stalling the caller: a cached package is loaded now
        (milliseconds), a missing one compiled by a worker process (`compile_worker`) while
        the step runs eagerly; the first step after the worker is done loads it."""
        if not self.enabled:
            return
        writable = os.access(self.cache_dir if self.cache_dir.exists()
                             else self.cache_dir.parent, os.W_OK)
        for key in keys:
            if key in self.graphs or key in self.failed:
                continue
            if not writable or (self.cache_dir / package_name(key)).is_file():
                self.compile(key)  # a cached package loads in milliseconds; no cache: here
            else:
                self.background.start(key)

    def collect(self, only: GraphKey | None = None) -> None:
        """Load the packages whose worker has finished (milliseconds each; a failed worker's
        key runs eagerly from now on), without waiting for the others. The engine calls it
        every scheduler iteration while workers run, so readiness needs no decode traffic."""
        for key in [only] if only is not None else list(self.background.running):
            done, error = self.background.finished(key)
            if done and error:
                self._give_up(key, RuntimeError(error), "compiling the selection step")
            elif done:
                self.compile(key)  # loads the worker's package from the cache

    def counts(self) -> dict[str, int]:
        """Graphs by state: ``ready``, ``failed`` (both 0 when compiling is off)."""
        return {"ready": len(self.graphs), "failed": len(self.failed)}

    def compile(self, key: GraphKey) -> Callable[..., tuple[torch.Tensor, ...]] | None:
        """``key``'s graph, compiled now; None (and eager for the key) if that fails."""
        start = time.monotonic()
        try:
            graph = compile_step(key, self.cache_dir)
        except Exception as error:  # keep serving eagerly; say why once
            self._give_up(key, error, "compiling the selection step")
            return None
        self.graphs[key] = graph
        logger.info("Lynx: selection step ready (compiled or loaded from %s) for policy %s, "
                    "E=%d, %s logits in %.1f s", self.cache_dir,
                    key.policy, key.experts, key.dtype, time.monotonic() - start)
        return graph
