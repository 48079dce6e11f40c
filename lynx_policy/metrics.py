"""The controller's own Prometheus metrics (``lynx_controller_*``), in a private registry.

A private `CollectorRegistry` per controller keeps several controllers in one process (tests)
apart and keeps Python's default process metrics out of the way.
"""

from __future__ import annotations

from collections import deque

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from lynx_policy.config import MODES, SloTarget
from lynx_policy.decide import DIRECTIONS, UNFIXABLE
from lynx_protocol.messages import REJECT_REASONS, TO_CONTROLLER

SLO_ATTAINMENT_TICKS = 120
"""Ticks (with latency data) the SLO attainment ratio is computed over."""


def replace_series(gauge: Gauge, values: dict[tuple[str, ...], float]) -> None:
    """Make ``values`` (label values in the gauge's label order -> value) the gauge's only
    series: set them first, then remove the others, so a scrape in between never sees the
    current series missing (``clear()`` then ``set`` would leave that gap)."""
    values = {tuple(str(v) for v in labels): value for labels, value in values.items()}
    for labels, value in values.items():
        gauge.labels(*labels).set(value)
    # A sample's labels are in the gauge's label order, the order `labels` and `remove` take.
    present = {tuple(sample.labels.values())
               for metric in gauge.collect() for sample in metric.samples}
    for stale in present - values.keys():
        gauge.remove(*stale)


def target_labels(target: SloTarget) -> tuple[str, str]:
    """``(metric, quantile)`` label values of an SLO target's series."""
    return target.metric, f"{target.quantile:g}"


class ControllerMetrics:
    def __init__(self) -> None:
        disable_created_metrics()  # the controller process only; keeps /metrics readable
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.mode = Gauge("lynx_controller_mode", "1 for the controller's current mode",
                          ["mode"], registry=r)
        self.policy_version = Gauge("lynx_controller_policy_version",
                                    "Version of the policy the controller sends", registry=r)
        self.decisions = Counter("lynx_controller_decisions", "Control decisions by direction",
                                 ["direction"], registry=r)
        self.unfixable_holds = Counter(
            "lynx_controller_unfixable_holds",
            "Adaptive ticks that held with the SLO missed because pruning cannot fix the miss: "
            "cannot_close_gap (even the lowest usable rung is predicted above the target) or "
            "prefill_stalls (the misses come from prefill/mixed steps)", ["cause"], registry=r)
        self.slo_attainment = Gauge(
            "lynx_controller_slo_attainment_ratio",
            f"Share of the last {SLO_ATTAINMENT_TICKS} ticks with data where every SLO was met",
            registry=r)
        self.latency = Gauge("lynx_controller_observed_latency_seconds",
                             "Latest observed latency quantile per SLO target",
                             ["metric", "quantile"], registry=r)
        self.slo_target = Gauge("lynx_controller_slo_target_seconds", "SLO target per metric",
                                ["metric", "quantile"], registry=r)
        self.replicas_connected = Gauge("lynx_controller_replicas_connected",
                                        "Replicas heard from within link.replica_stale_s",
                                        registry=r)
        self.messages_received = Counter("lynx_controller_messages_received",
                                         "Valid messages from runtimes by type", ["type"],
                                         registry=r)
        self.messages_rejected = Counter("lynx_controller_messages_rejected",
                                         "Messages from runtimes rejected, by reason",
                                         ["reason"], registry=r)
        self.replicas_behind = Gauge(
            "lynx_controller_replicas_behind", "Connected replicas that refused, or have not "
            "acknowledged within link.ack_timeout_s, the current policy version", registry=r)
        self.auth_denied = Counter(
            "lynx_controller_auth_denied", "Link handshakes refused, by reason: wrong_key (a "
            "CURVE key not allowed), no_curve (a peer without CURVE), protocol (another "
            "handshake error), aborted (the peer went away mid-handshake: a peer without CURVE "
            "that saw the mismatch first, a scanner, a network fault)", ["reason"], registry=r)
        for reason in ("wrong_key", "no_curve", "protocol", "aborted"):
            self.auth_denied.labels(reason=reason)
        self.registrations_refused = Counter(
            "lynx_controller_registrations_refused",
            "Register messages refused because link.max_replicas replicas are known", registry=r)
        self.shadow_refused = Counter(
            "lynx_controller_shadow_refused",
            "ShadowStats not added (another model shape, budget grid or sampling than the "
            "statistics held, or layers/budgets that do not fit the replica)", registry=r)
        self.shadow_steps = Gauge(
            "lynx_controller_shadow_steps",
            "Measured decode steps in the fleet's shadow statistics, per decode batch bucket "
            "(max_batch: inclusive upper edge, 'inf' above the last)", ["max_batch"], registry=r)
        self.updates_sent = Counter("lynx_controller_policy_updates_sent",
                                    "PolicyUpdate messages handed to ZMQ", registry=r)
        self.updates_dropped = Counter("lynx_controller_policy_updates_dropped",
                                       "PolicyUpdate/Ack sends dropped (peer gone or queue full)",
                                       registry=r)
        self.loop_duration = Histogram(
            "lynx_controller_loop_duration_seconds", "Duration of one observe-decide-act tick",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=r)
        self.loop_degraded = Gauge("lynx_controller_loop_degraded",
                                   "1 while control-loop ticks fail (backing off)", registry=r)
        self.budget = Gauge("lynx_controller_budget_experts",
                            "Mean expert budget over layers per batch-size bucket",
                            ["max_batch"], registry=r)
        self.model_ready = Gauge("lynx_controller_model_ready",
                                 "1 while the latency model of the connected replicas plans "
                                 "the budgets (0: reactive rules)", registry=r)
        self.model_rmse = Gauge("lynx_controller_model_error_ratio",
                                "Latency model fit error: RMSE / mean step latency, worst "
                                "replica", registry=r)
        self.step_observed = Gauge(
            "lynx_controller_step_latency_observed_seconds", "Mean pure decode step latency "
            "the replicas reported, per runtime batch-size bucket (last stats window)",
            ["max_batch"], registry=r)
        self.step_predicted = Gauge(
            "lynx_controller_step_latency_predicted_seconds", "Latency model's prediction for "
            "the same steps (same batch and experts kept)", ["max_batch"], registry=r)
        self.correction = Gauge("lynx_controller_latency_correction",
                                "Observed client latency quantile / predicted step quantile "
                                "(the model planner's correction factor)",
                                ["metric", "quantile"], registry=r)
        self.mass_kept = Gauge("lynx_controller_expected_mass_kept_ratio",
                               "Expected routing mass kept by the applied table over the "
                               "recent batch mix (1: no pruning; NaN: not measured yet)",
                               registry=r)
        self.replica_key_refusals = Counter(
            "lynx_controller_replica_key_refusals", "Register/heartbeat/statistics messages "
            "refused: the replica id is bound to another allowed CURVE key", registry=r)
        self.admin_rejections = Counter(
            "lynx_controller_admin_rejections", "Admin API requests refused before the route: "
            "unauthenticated, forbidden, throttled (every one; the audit log samples them)",
            ["reason"], registry=r)
        for reason in ("unauthenticated", "forbidden", "throttled"):
            self.admin_rejections.labels(reason=reason)
        self.quality_cost = Gauge(
            "lynx_controller_expected_quality_cost", "Expected quality cost of the applied "
            "table over the recent batch mix, from the ladder's measured rung costs of its kind "
            "(ppl_rise: held-out perplexity rise as a fraction; mass_lost: 1 - routing mass "
            "kept, a shadow-built ladder's proxy; 0: no pruning; NaN: not a ladder's rung)",
            ["kind"], registry=r)
        self.quality_cost.labels(kind="ppl_rise").set(0.0)
        self.model_ready.set(0)
        self.model_rmse.set(float("nan"))
        self.mass_kept.set(1.0)
        for mode in MODES:
            self.mode.labels(mode=mode)
        for direction in DIRECTIONS:
            self.decisions.labels(direction=direction)
        for cause in UNFIXABLE:
            self.unfixable_holds.labels(cause=cause)
        for reason in REJECT_REASONS:
            self.messages_rejected.labels(reason=reason)
        for kind in sorted(TO_CONTROLLER):
            self.messages_received.labels(type=kind)
        self.slo_attainment.set(float("nan"))  # no tick with data yet
        self._attainment: deque[bool] = deque(maxlen=SLO_ATTAINMENT_TICKS)

    def set_mode(self, mode: str) -> None:
        for name in MODES:
            self.mode.labels(mode=name).set(1.0 if name == mode else 0.0)

    def set_budgets(self, rows: list[tuple[int, float]]) -> None:
        replace_series(self.budget, {(str(b),): mean for b, mean in rows})

    def set_step_latencies(self, rows: dict[int, tuple[float, float | None]]) -> None:
        """Per runtime bucket: (observed, predicted or None) mean step latency [ms]."""
        replace_series(self.step_observed, {
            (str(b),): observed / 1000.0 for b, (observed, _) in sorted(rows.items())})
        replace_series(self.step_predicted, {
            (str(b),): float("nan") if predicted is None else predicted / 1000.0
            for b, (_, predicted) in sorted(rows.items())})

    def record_attainment(self, met: bool) -> None:
        self._attainment.append(met)
        self.slo_attainment.set(sum(self._attainment) / len(self._attainment))

    def render(self) -> bytes:
        return generate_latest(self.registry)
