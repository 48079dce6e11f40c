"""Shadow mode (``LYNX_SHADOW=<file>``): serve stock and measure, per MoE layer and decode
batch bucket, what the ``budget`` policy would keep at each candidate budget
(`lynx.selection.shadow`): experts computed, routing mass kept, rows whose top-1 is kept.

The TopK hook adds each decode step's statistics into a device accumulator (no host sync);
once per ``LYNX_STATS_INTERVAL_S`` the recorder reads it and rewrites the file atomically
with the sums since start-up (format `SHADOW_FORMAT`, below). TP ranks see the same rows, so
only TP rank 0 writes; under DP each DP rank writes ``<file>.dp<rank>``. With a controller
link, the link's owner also sends the sums since its previous send as `ShadowStats`, one
message per bucket, at most once per ``LYNX_STATS_INTERVAL_S`` (`deltas`); ``LYNX_SHADOW=1``
sends them without a file.

Measuring costs about 0.6 ms per layer-step in eager torch on this CPU (~100 small ops), so
by default one decode step in ``LYNX_SHADOW_EVERY`` (16) is measured: the sums are a
systematic sample of the steps, which ratios (mass kept, experts per step) do not mind.

File (JSON): ``format``, ``model`` {num_layers, num_experts, top_k}, ``budgets`` [M],
``every`` (one decode step measured in this many),
``batch_buckets`` (decode rows, inclusive upper edges; one more bucket above the last),
``fields`` {base, per_budget}, ``buckets``: one entry per bucket that saw a decode step,
``{"max_batch": edge or null, "layers": [[base..., per_budget for budget 0..., ...], ...]}``,
sums over the bucket's decode layer-steps.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from lynx.selection.keep_rules import batch_totals
from lynx.selection.routers import RouterSpec, engine_routing, stock_routing
from lynx.selection.shadow import (
    shadow_budgets,
    shadow_statistics,
    shadow_width,
)
from lynx.sglang_plugin.eplb import call_dispatch_info
from lynx.sglang_plugin.formats import LayerPlan, standard_routed
from lynx.sglang_plugin.step_state import BATCH_BUCKETS, RuntimeState
from lynx_protocol.shadow import SHADOW_FORMAT, shadow_document

__all__ = ["SHADOW_FORMAT", "ShadowRecorder"]
logger = logging.getLogger("lynx.plugin")


class ShadowRecorder:
    """Device accumulator [decode buckets, layers, `shadow_width`] and its file."""

    def __init__(self, state: RuntimeState, path: Path | None, interval_s: float,
                 write: bool = True) -> None:
        self.state = state
        self.path = path  # None: no file (LYNX_SHADOW=1, the controller link only)
        self.interval_s = interval_s
        self.write = write  # TP rank 0 only
        self.budgets = shadow_budgets(state.num_experts, state.top_k)
        self._budgets = torch.tensor(self.budgets, dtype=torch.int64, device=state.device)
        slots = len(BATCH_BUCKETS) + 1
        self.accumulator = torch.zeros(slots, state.num_layers, shadow_width(len(self.budgets)),
                                       dtype=torch.float64, device=state.device)
        self._last_write = self._last_sent = time.monotonic()
        self._sent = torch.zeros(self.accumulator.shape, dtype=torch.float64)  # host copy
        self._failed = False

    def observe(self, layer: int, logits: torch.Tensor, router: RouterSpec,
                correction_bias: torch.Tensor | None, stock_ids: torch.Tensor | None,
                gate: torch.Tensor | None = None) -> None:
        """Add one decode layer-step: ``logits`` [T,E], ``stock_ids`` [T,K] (the engine's
        own top-K, STANDARD outputs) or None (the library's stock routing). Rows are the
        step's valid decode rows, read from the device knobs (graph-safe); ``gate`` (0-dim
        bool): counted only where True (a captured graph: the steps served unpruned)."""
        knobs = self.state.knobs
        index = torch.arange(logits.shape[0], device=logits.device)
        finite = torch.isfinite(logits).all(dim=-1)
        decode = knobs.stat_slot[0] <= len(BATCH_BUCKETS)  # not a mixed or verify step
        rows = (index < knobs.n_valid) & (index >= knobs.prunable_start) & finite & decode
        if gate is not None:
            rows = rows & gate
        z = torch.where(rows[:, None], logits.float(), 0.0)
        stock = (stock_routing(z, router, correction_bias) if stock_ids is None
                 else engine_routing(z, router, correction_bias, stock_ids))
        vector = shadow_statistics(batch_totals(stock, rows), rows, router, self._budgets)
        slot = knobs.stat_slot.clamp_max(len(BATCH_BUCKETS))  # other steps add zeros
        self.accumulator[:, layer].index_add_(0, slot, vector.to(torch.float64)[None])

    def observe_call(self, topk: Any, plan: LayerPlan, router_logits: torch.Tensor,
                     output: Any, kwargs: dict[str, Any]) -> None:
        """Measure one stock ``TopK`` call (its ``output`` already served): from SGLang's own
        top-K where the output carries it (STANDARD, logical ids), else from the library's
        stock routing of the logits (also under EPLB, whose ids are physical: as a captured
        graph measures). Layers Lynx passes through, and calls with a per-call bias, are not
        measured."""
        if plan.mode == "pass" or plan.router is None or kwargs.get(
                "dynamic_expert_bias") is not None:
            return
        router = plan.router
        ids = None
        if call_dispatch_info(topk, kwargs) is None and standard_routed(  # logical ids
                output, router):
            ids = output.topk_ids[:, : router.top_k]
        bias = topk.topk_config.correction_bias if router.has_correction_bias else None
        self.observe(int(topk.layer_id), router_logits, router, bias, ids)

    def maybe_write(self) -> None:
        """Rewrite the file if the interval has passed (between steps)."""
        if (self.write and self.path is not None
                and time.monotonic() - self._last_write >= self.interval_s):
            self.write_now()

    def write_now(self) -> None:
        """Read the accumulator (one host sync) and replace the file atomically; a write that
        fails is logged once and retried next interval, never raised into the scheduler."""
        self._last_write = time.monotonic()
        if self.path is None:
            return
        try:
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(self.snapshot()))
            os.replace(tmp, self.path)
            self._failed = False
        except OSError as exc:
            if not self._failed:
                logger.warning("Lynx: cannot write shadow statistics to %s: %s", self.path, exc)
            self._failed = True

    def deltas(self, force: bool = False) -> list[tuple[int, list[list[float]]]]:
        """The sums since the previous call, per bucket that measured a step since: (its
        upper edge, 0 above the last; [L][W] sums); [] until ``interval_s`` has passed since
        the previous call (``force``: now). One host sync; between steps only."""
        if not force and time.monotonic() - self._last_sent < self.interval_s:
            return []
        self._last_sent = time.monotonic()
        now = self.accumulator.to("cpu", copy=True)  # on a CPU device .to() would alias
        delta, self._sent = now - self._sent, now
        out = []
        for slot in range(delta.shape[0]):
            if float(delta[slot, :, 0].sum()) > 0.0:
                edge = BATCH_BUCKETS[slot] if slot < len(BATCH_BUCKETS) else 0
                out.append((edge, delta[slot].clamp_min(0.0).tolist()))
        return out

    def snapshot(self) -> dict[str, Any]:
        """The file's content (see the module doc)."""
        sums = self.accumulator.to("cpu")
        buckets = {}
        for slot in range(sums.shape[0]):
            if float(sums[slot, :, 0].sum()) == 0.0:
                continue
            edge = BATCH_BUCKETS[slot] if slot < len(BATCH_BUCKETS) else None
            buckets[edge] = [[round(v, 6) for v in row] for row in sums[slot].tolist()]
        state = self.state
        return shadow_document({"num_layers": state.num_layers, "num_experts": state.num_experts,
                                "top_k": state.top_k}, self.budgets, list(BATCH_BUCKETS),
                               state.shadow_every, buckets)
