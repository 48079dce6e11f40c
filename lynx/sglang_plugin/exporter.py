"""Step statistics: accumulated on the device by the TopK hook, exported to Prometheus on an
interval from the scheduler process (SGLang's multiprocess collector serves them on /metrics).

Reading the accumulator is the only host sync the plugin does, once per interval, after a step.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lynx.selection.statistics import STAT_FIELDS
from lynx.sglang_plugin.config import PluginConfig
from lynx.sglang_plugin.formats import PASS_THROUGH_REASONS
from lynx.sglang_plugin.idle_default import IdleDefaultWatch
from lynx.sglang_plugin.step_state import (
    BATCH_BUCKETS,
    STAT_SLOTS,
    RuntimeState,
    StepLayout,
    batch_slot,
)
from lynx_protocol.messages import LATENCY_EDGES_MS

_FIELD = {name: i for i, name in enumerate(STAT_FIELDS)}
logger = logging.getLogger("lynx.plugin")


@dataclass
class WindowSummary:
    """What the last export window saw (also what the controller link reports)."""

    window_s: float = 0.0
    steps: dict[str, int] = field(default_factory=dict)  # by mode
    pruned_steps: int = 0
    batch_hist: dict[int, int] = field(default_factory=dict)  # `batch_slot` -> steps
    experts_kept: list[float] = field(default_factory=list)  # per layer, mean over pruned steps
    stock_union: list[float] = field(default_factory=list)
    mass_kept: float = 1.0
    top1_kept: float = 1.0
    step_ms: list[float] = field(default_factory=list)
    decode_ms: dict[int, list[float]] = field(default_factory=dict)  # batch slot -> step times
    pruned_decode: dict[int, int] = field(default_factory=dict)  # batch slot -> pruned steps
    decode_rows: dict[int, int] = field(default_factory=dict)  # batch slot -> summed rows
    mode_ms: dict[str, float] = field(default_factory=dict)  # summed step time by mode
    decode_buckets: list[dict[str, Any]] = field(default_factory=list)  # see `bucket_summary`


class _Metrics:
    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.steps = Counter("lynx_steps", "Forward steps seen by Lynx", ["mode", "pruned"])
        self.layer_steps = Counter("lynx_layer_pruned_steps", "Pruned MoE layer-steps", ["layer"])
        self.kept_total = Counter("lynx_experts_kept", "Experts kept, summed over pruned "
                                  "layer-steps", ["layer"])
        self.union_total = Counter("lynx_experts_stock_union", "Experts the stock router would "
                                   "use, summed over pruned layer-steps", ["layer"])
        self.kept_mean = Gauge("lynx_experts_kept_mean", "Mean experts kept per pruned step, "
                               "last window", ["layer"], multiprocess_mode="livemostrecent")
        self.union_mean = Gauge("lynx_experts_stock_union_mean", "Mean stock expert union per "
                                "pruned step, last window", ["layer"],
                                multiprocess_mode="livemostrecent")
        self.mass_kept = Counter("lynx_routing_mass_kept", "Stock top-k routing mass that "
                                 "landed on kept experts (pruned rows)")
        self.mass_total = Counter("lynx_routing_mass", "Stock top-k routing mass of pruned rows")
        self.top1_kept = Counter("lynx_top1_kept_rows", "Pruned rows whose top-1 expert was kept")
        self.rows = Counter("lynx_pruned_rows", "Rows that went through expert selection")
        self.rerouted_rows = Counter(
            "lynx_rerouted_rows", "Pruned rows whose routing Lynx changed (their stock top-k "
            "held a dropped expert; every other row is SGLang's own), summed over layer-steps")
        self.nonfinite_rows = Counter(
            "lynx_nonfinite_router_rows", "Valid rows whose router logits held NaN/inf "
            "(routed stock, kept out of every statistic), summed over layer-steps")
        self.passed_through = Gauge(
            "lynx_layers_passed_through", "MoE layers whose TopK Lynx passes through unpruned",
            ["reason"], multiprocess_mode="livemostrecent")
        self.policy_version = Gauge("lynx_policy_version", "Version of the applied policy",
                                    multiprocess_mode="livemostrecent")
        self.policy_info = Gauge("lynx_policy_active", "1 for the applied policy name",
                                 ["policy"], multiprocess_mode="livemostrecent")
        self.step_seconds = Histogram(
            "lynx_step_duration_seconds", "Forward step wall time (host side)", ["mode", "pruned"],
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.2, 0.5, 1, 2, 5),
        )
        self.selection_graphs = Gauge(
            "lynx_selection_graphs", "Compiled selection-step graphs (CPU, AOTInductor) by state: "
            "ready, failed (then eager); none while LYNX_COMPILE=0 or no C++ compiler",
            ["state"], multiprocess_mode="livemostrecent")
        ep = "{} on an EP rank (TP+EP: experts it reads per MoE layer-step), mean over the " \
            "last window's pruned layer-steps; routing=stock: what the batch's stock top-k " \
            "needed, lynx: what ran"
        self.ep_rank_max = Gauge("lynx_ep_rank_experts_max", ep.format("Most active experts"),
                                 ["routing"], multiprocess_mode="livemostrecent")
        self.ep_rank_mean = Gauge("lynx_ep_rank_experts_mean", ep.format("Mean active experts"),
                                  ["routing"], multiprocess_mode="livemostrecent")
        self.ep_balancedness = Gauge(
            "lynx_ep_balancedness", "lynx_ep_rank_experts_mean / lynx_ep_rank_experts_max "
            "(1: every EP rank reads as many experts as the busiest; SGLang's "
            "eplb_balancedness convention)", ["routing"], multiprocess_mode="livemostrecent")
        pairs = "{} on an EP rank: (token, expert) pairs it computes per MoE layer-step, mean " \
            "over the last window's pruned layer-steps; routing=stock: the stock top-k's, " \
            "lynx: what ran"
        self.ep_pairs_max = Gauge("lynx_ep_rank_pairs_max", pairs.format("Most token pairs"),
                                  ["routing"], multiprocess_mode="livemostrecent")
        self.ep_pairs_mean = Gauge("lynx_ep_rank_pairs_mean", pairs.format("Mean token pairs"),
                                   ["routing"], multiprocess_mode="livemostrecent")
        self.default_idle = Gauge(
            "lynx_default_policy_cuts_nothing", "1 once the built-in default policy has cut "
            "under 1% of the stock experts over 200 pruned decode steps (calibrate this "
            "checkpoint)", multiprocess_mode="livemostrecent")
        self.controller_connected = Gauge(
            "lynx_controller_connected", "1 while the policy controller is heard from",
            multiprocess_mode="livemostrecent",
        )


class StatsExporter:
    def __init__(self, state: RuntimeState, config: PluginConfig, tp_rank: int = 0,
                 ep_ranks: int = 1) -> None:
        self.config = config
        self.export = tp_rank == 0
        self.ep_ranks = ep_ranks  # > 1: the EP balance gauges are exported
        # [slot, layer, field]: slot = decode batch-size bucket or mixed (`step_state`)
        self.accumulator = torch.zeros(STAT_SLOTS, state.num_layers, len(STAT_FIELDS),
                                       dtype=torch.float64, device=state.device)
        self._slot = state.knobs.stat_slot
        self._last = torch.zeros_like(self.accumulator, device="cpu")
        self._last_export = time.monotonic()
        self._pending = WindowSummary()
        self.last_window = WindowSummary()
        self._metrics: _Metrics | None = None
        self._policy_shown: tuple[str, int] | None = None
        self.passed_through: dict[str, int] = dict.fromkeys(PASS_THROUGH_REASONS, 0)
        self.selection_graphs: Callable[[], dict[str, int]] = dict  # state -> graphs
        self.idle_default: IdleDefaultWatch | None = None  # set when serving the default

    @property
    def metrics(self) -> _Metrics:
        if self._metrics is None:  # lazily: PROMETHEUS_MULTIPROC_DIR is set by then
            self._metrics = _Metrics()
            for reason, layers in self.passed_through.items():  # exported from the start
                self._metrics.passed_through.labels(reason=reason).set(layers)
        return self._metrics

    def set_passed_through(self, reason: str, layers: int) -> None:
        """Export how many MoE layers pass through unpruned for ``reason``."""
        self.passed_through[reason] = layers
        if self.export:
            self.metrics.passed_through.labels(reason=reason).set(layers)

    def layer_totals(self) -> torch.Tensor:
        """[layer, field] statistics accumulated so far, over every slot (syncs)."""
        return self.accumulator.sum(dim=0)

    def accumulate(self, layer: int, stats: torch.Tensor) -> None:
        """Add one layer-step's statistics into this step's slot (device-side index)."""
        self.accumulator[:, layer].index_add_(0, self._slot, stats.to(
            self.accumulator.dtype)[None])

    def before_step(self, state: RuntimeState) -> None:
        if time.monotonic() - self._last_export >= self.config.stats_interval_s:
            self.flush(state)

    def after_step(self, state: RuntimeState, layout: StepLayout, seconds: float) -> None:
        pruned = state.step_active
        window = self._pending
        window.steps[layout.mode] = window.steps.get(layout.mode, 0) + 1
        if layout.n_decode_rows:
            slot = batch_slot(layout.n_decode_rows)
            window.batch_hist[slot] = window.batch_hist.get(slot, 0) + 1
        window.pruned_steps += int(pruned)
        window.step_ms.append(seconds * 1e3)
        window.mode_ms[layout.mode] = window.mode_ms.get(layout.mode, 0.0) + seconds * 1e3
        if layout.mode == "decode":
            slot = batch_slot(layout.n_decode_rows)
            window.decode_ms.setdefault(slot, []).append(seconds * 1e3)
            window.pruned_decode[slot] = window.pruned_decode.get(slot, 0) + int(pruned)
            window.decode_rows[slot] = window.decode_rows.get(slot, 0) + layout.n_decode_rows
        if self.export and layout.mode != "idle":
            self.metrics.steps.labels(mode=layout.mode, pruned=str(pruned).lower()).inc()
            self.metrics.step_seconds.labels(mode=layout.mode, pruned=str(pruned).lower()
                                             ).observe(seconds)

    def flush(self, state: RuntimeState) -> WindowSummary:
        """Close the window: read the device accumulator once, update metrics and summary."""
        now = time.monotonic()
        current = self.accumulator.to("cpu", copy=True)
        by_slot = current - self._last  # [slot, layer, field]
        self._last = current
        delta = by_slot.sum(dim=0)  # [layer, field]
        window, self._pending = self._pending, WindowSummary()
        window.window_s = now - self._last_export
        self._last_export = now
        layer_steps = delta[:, _FIELD["layer_steps"]]
        seen = layer_steps > 0
        safe = layer_steps.clamp_min(1)
        window.experts_kept = torch.where(seen, delta[:, _FIELD["kept"]] / safe, 0).tolist()
        window.stock_union = torch.where(seen, delta[:, _FIELD["stock_union"]] / safe, 0).tolist()
        mass_total = float(delta[:, _FIELD["mass_total"]].sum())
        rows = float(delta[:, _FIELD["rows"]].sum())
        mass_kept = float(delta[:, _FIELD["mass_kept"]].sum())
        window.mass_kept = mass_kept / mass_total if mass_total else 1.0
        window.top1_kept = float(delta[:, _FIELD["top1_kept"]].sum()) / rows if rows else 1.0
        window.decode_buckets = bucket_summary(window, by_slot.sum(dim=1))
        self.last_window = window
        watch = self.idle_default
        if watch is not None and self.export:
            said = watch.observe(state.policy, layer_steps, delta[:, _FIELD["kept"]],
                                 delta[:, _FIELD["stock_union"]])
            if said:
                logger.warning(said)
            self.metrics.default_idle.set(int(watch.idle and state.policy == watch.default))
        if self.export:
            self._export(state, delta, seen, window)
        return window

    def _export(self, state: RuntimeState, delta: torch.Tensor, seen: torch.Tensor,
                window: WindowSummary) -> None:
        m = self.metrics
        for layer in torch.nonzero(seen).flatten().tolist():
            label = str(layer)
            d = delta[layer]
            m.layer_steps.labels(layer=label).inc(float(d[_FIELD["layer_steps"]]))
            m.kept_total.labels(layer=label).inc(float(d[_FIELD["kept"]]))
            m.union_total.labels(layer=label).inc(float(d[_FIELD["stock_union"]]))
            m.kept_mean.labels(layer=label).set(window.experts_kept[layer])
            m.union_mean.labels(layer=label).set(window.stock_union[layer])
        m.mass_kept.inc(float(delta[:, _FIELD["mass_kept"]].sum()))
        m.mass_total.inc(float(delta[:, _FIELD["mass_total"]].sum()))
        m.top1_kept.inc(float(delta[:, _FIELD["top1_kept"]].sum()))
        m.rows.inc(float(delta[:, _FIELD["rows"]].sum()))
        m.rerouted_rows.inc(float(delta[:, _FIELD["rerouted_rows"]].sum()))
        m.nonfinite_rows.inc(float(delta[:, _FIELD["nonfinite_rows"]].sum()))
        if self.ep_ranks > 1:
            self._export_ep(delta)
        for graph_state, count in self.selection_graphs().items():
            m.selection_graphs.labels(state=graph_state).set(count)
        shown = (state.policy.name, state.policy_version)
        if shown != self._policy_shown:
            if self._policy_shown is not None:
                m.policy_info.labels(policy=self._policy_shown[0]).set(0)
            m.policy_info.labels(policy=state.policy.name).set(1)
            m.policy_version.set(state.policy_version)
            self._policy_shown = shown

    def _export_ep(self, delta: torch.Tensor) -> None:
        """Busiest and mean EP rank's active experts and token pairs over the window's pruned
        layer-steps."""
        steps = float(delta[:, _FIELD["layer_steps"]].sum())
        if not steps:
            return
        m = self.metrics

        def per_step(field: str) -> float:
            return float(delta[:, _FIELD[field]].sum()) / steps

        pairs_mean = per_step("pairs") / self.ep_ranks  # every row routes K pairs either way
        for routing, busiest, total, pairs_max in (
                ("lynx", "rank_kept_max", "kept", "rank_pairs_max"),
                ("stock", "rank_union_max", "stock_union", "rank_stock_pairs_max")):
            most, mean = per_step(busiest), per_step(total) / self.ep_ranks
            m.ep_rank_max.labels(routing=routing).set(most)
            m.ep_rank_mean.labels(routing=routing).set(mean)
            m.ep_balancedness.labels(routing=routing).set(mean / most if most else 1.0)
            m.ep_pairs_max.labels(routing=routing).set(per_step(pairs_max))
            m.ep_pairs_mean.labels(routing=routing).set(pairs_mean)

    def snapshot(self) -> Any:
        return self.last_window


def bucket_summary(window: WindowSummary, per_slot: torch.Tensor) -> list[dict[str, Any]]:
    """Per decode batch-size bucket with steps in the window: step count, latency sum and
    histogram (`LATENCY_EDGES_MS`), and the pruned layer-steps' kept / union / mass kept
    (``per_slot`` [slot, field]: statistics summed over layers)."""
    out = []
    for slot, times in sorted(window.decode_ms.items()):
        stats = per_slot[slot]
        layer_steps = float(stats[_FIELD["layer_steps"]])
        mass_total = float(stats[_FIELD["mass_total"]])
        counts = [0] * (len(LATENCY_EDGES_MS) + 1)
        for ms in times:  # edges are inclusive upper bounds
            counts[bisect.bisect_left(LATENCY_EDGES_MS, ms)] += 1
        out.append({
            "max_batch": BATCH_BUCKETS[slot] if slot < len(BATCH_BUCKETS) else 0,
            "steps": len(times), "latency_sum_ms": sum(times), "latency_counts": counts,
            "pruned_steps": window.pruned_decode.get(slot, 0),
            "decode_rows_sum": window.decode_rows.get(slot, 0),
            "experts_kept_mean": float(stats[_FIELD["kept"]]) / layer_steps if layer_steps else 0.0,
            "stock_union_mean": (float(stats[_FIELD["stock_union"]]) / layer_steps
                                 if layer_steps else 0.0),
            "routing_mass_kept": min(max(float(stats[_FIELD["mass_kept"]]) / mass_total, 0.0), 1.0)
            if mass_total else 1.0,
        })
    return out
