"""The runtime end of the controller link, riding SGLang's own request path.

On the scheduler that owns the tokenizer socket (TP rank 0), an AFTER hook on
``SchedulerRequestReceiver._pull_raw_reqs`` polls the controller without blocking (that method
runs every scheduler iteration, and at least once a second when idle with ``--sleep-on-idle``)
and appends a `PolicyMessage` to the received requests. SGLang broadcasts that list to every TP
rank; a BEFORE hook on ``Scheduler.process_input_requests`` takes the messages out again on
every rank and stages the policy, so all ranks switch at the same step boundary. The forward
path never waits on the controller. The hooks themselves are methods of
`lynx.sglang_plugin.runtime.LynxRuntime`; this module holds the link's state.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lynx.sglang_plugin.exporter import WindowSummary
from lynx.sglang_plugin.step_state import BATCH_BUCKETS
from lynx_protocol.policy import POLICY_NAMES, PolicySpec

if TYPE_CHECKING:
    from lynx.sglang_plugin.runtime import LynxRuntime

logger = logging.getLogger("lynx.plugin")

SAFE_POLICY_VERSION = 0


@dataclass(frozen=True)
class PolicyMessage:
    """A policy to stage on every TP rank (picklable; travels with SGLang's request broadcast)."""

    policy: PolicySpec
    version: int
    reason: str


class ControllerGlue:
    """The runtime's end of the controller link (one per scheduler process)."""

    def __init__(self, runtime: LynxRuntime, model: str) -> None:
        config = runtime.config
        assert config.controller is not None
        self.runtime = runtime
        self.endpoint = config.controller
        self.replica_id = runtime.ranks.replica_id(config.replica_id)  # one per DP rank
        self.stale_after_s = config.stale_after_s
        self.safe_policy = config.safe_policy
        self.model = model
        self.link: Any = None
        self._stats_seq = 0
        self._last_window: WindowSummary | None = None

    def _ensure_link(self) -> Any:
        if self.link is None:
            from lynx_protocol.link import LinkSettings, RuntimeLink
            from lynx_protocol.messages import Register

            state = self.runtime.state
            assert state is not None
            metrics_port = os.environ.get("LYNX_METRICS_URL", "")
            registration = Register(
                replica_id=self.replica_id, model=self.model, num_layers=state.num_layers,
                num_experts=state.num_experts, top_k=state.top_k,
                policies=list(POLICY_NAMES), pid=os.getpid(), metrics_url=metrics_port,
            )
            heartbeat = min(1.0, self.stale_after_s / 4)
            config = self.runtime.config
            if self.endpoint.startswith("tcp://") and not config.curve_client_key:
                logger.warning("Lynx: controller link %s is plain-text TCP (LYNX_PLAINTEXT_TCP): "
                               "unauthenticated and unencrypted", self.endpoint)
            self.link = RuntimeLink(registration, LinkSettings(
                endpoint=self.endpoint, staleness_s=self.stale_after_s, heartbeat_s=heartbeat,
                curve_client_secret=config.curve_client_key,
                curve_server_public=config.curve_server_key,
                plaintext_tcp=config.plaintext_tcp))
        return self.link

    def poll(self) -> list[PolicyMessage]:
        """Non-blocking: what the controller said since the last call, as messages to stage."""
        state = self.runtime.state
        if state is None:
            return []
        link = self._ensure_link()
        out: list[PolicyMessage] = []
        update = link.poll_update()
        for transition in link.take_transitions():
            self._on_transition(transition, out)
        if update is not None:  # validated by the link (the runtime's trust boundary)
            out.append(PolicyMessage(update.policy, update.version, "controller"))
            link.mark_acknowledged(update.version)  # applied at the next forward step
        link.mark_applied(state.policy_version)
        self._send_stats(link)
        try:  # the update above is acknowledged already: never lose it to a statistic
            self._send_shadow(link)
        except Exception:
            logger.exception("Lynx: sending shadow statistics failed; serving goes on")
        return out

    def _send_shadow(self, link: Any) -> None:
        """Shadow mode: the sums since the last send, one `ShadowStats` per bucket."""
        recorder = self.runtime.shadow
        if recorder is None:
            return
        from lynx_protocol.messages import ShadowStats

        for edge, layers in recorder.deltas():
            link.send(ShadowStats(replica_id=self.replica_id, max_batch=edge,
                                  batch_buckets=list(BATCH_BUCKETS), budgets=recorder.budgets,
                                  every=recorder.state.shadow_every, layers=layers))

    def _on_transition(self, transition: Any, out: list[PolicyMessage]) -> None:
        exporter = self.runtime.exporter
        connected = transition.new == "connected"
        if exporter is not None and exporter.export:
            exporter.metrics.controller_connected.set(1 if connected else 0)
        if transition.new == "stale":
            if self.safe_policy is None:
                logger.warning("Lynx: controller %s silent for %.0fs (%s); keeping the last "
                               "good policy", self.endpoint, self.stale_after_s, transition.reason)
            else:
                logger.warning("Lynx: controller %s silent for %.0fs (%s); applying the safe "
                               "policy %r", self.endpoint, self.stale_after_s, transition.reason,
                               self.safe_policy.name)
                out.append(PolicyMessage(self.safe_policy, SAFE_POLICY_VERSION, "stale"))
                self.link.mark_acknowledged(SAFE_POLICY_VERSION)
        elif connected:
            logger.warning("Lynx: controller %s is back (%s)", self.endpoint, transition.reason)

    def _send_stats(self, link: Any) -> None:
        exporter = self.runtime.exporter
        state = self.runtime.state
        if exporter is None or state is None or exporter.last_window is self._last_window:
            return
        window = exporter.last_window
        self._last_window = window
        if window.window_s <= 0:
            return
        from lynx_protocol.messages import DecodeBucket, StepStats

        # one count per edge, then the steps above the last edge (`batch_slot` indices)
        counts = [window.batch_hist.get(slot, 0) for slot in range(len(BATCH_BUCKETS) + 1)]
        step_ms = sorted(window.step_ms) or [0.0]
        self._stats_seq += 1
        link.send(StepStats(
            replica_id=self.replica_id, seq=self._stats_seq, window_s=window.window_s,
            batch_size_edges=list(BATCH_BUCKETS), batch_size_counts=counts,
            decode_steps=window.steps.get("decode", 0),
            prefill_steps=window.steps.get("prefill", 0),
            mixed_steps=window.steps.get("mixed", 0),
            experts_kept_mean=window.experts_kept, stock_union_mean=window.stock_union,
            routing_mass_kept=min(max(window.mass_kept, 0.0), 1.0),
            step_latency_p50_ms=step_ms[len(step_ms) // 2],
            step_latency_p99_ms=step_ms[min(len(step_ms) - 1, int(len(step_ms) * 0.99))],
            applied_policy_version=state.policy_version,
            acknowledged_policy_version=link.acknowledged_version,
            decode_buckets=[DecodeBucket(**bucket) for bucket in window.decode_buckets],
            prefill_latency_sum_ms=window.mode_ms.get("prefill", 0.0),
            mixed_latency_sum_ms=window.mode_ms.get("mixed", 0.0),
        ))
