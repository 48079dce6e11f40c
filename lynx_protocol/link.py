"""Runtime side of the controller link: used by the plugin on TP rank 0 of each scheduler.

Torch-free and thread-free. Every call is non-blocking: sends that would wait are dropped
and counted, receives take what has already arrived. Call `RuntimeLink.poll_update` once per
scheduler iteration; it drains the socket, keeps the link alive (Register/Heartbeat every
``heartbeat_s``) and returns the newest acceptable `PolicyUpdate`, if any.

States (`LinkState`):
- ``connecting``: nothing heard yet from the controller since start, still within staleness.
- ``connected``: the controller answered recently.
- ``stale``: the runtime has been talking for more than ``staleness_s`` without any valid
  answer (controller dead, wedged or unreachable). The plugin then applies its safe policy.

Staleness counts from the first unanswered message we sent, not from the last message heard,
so a scheduler that did not poll for a while (a long forward) does not flip to stale on its
own: evidence of a silent controller needs a question it did not answer.

Version rules: an update is delivered if its version is newer than the last one delivered
from the same controller lineage (``controller_id``), or equal to it after a stale period
(so the plugin re-applies it after having fallen back), or from a new lineage (the
controller lost its state). Updates that do not fit the registered model or name a policy
this runtime did not offer are refused and reported back in the next Heartbeat.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import zmq

from lynx_protocol.endpoints import LinkSettings as LinkSettings  # re-exported
from lynx_protocol.messages import (
    TO_RUNTIME,
    Ack,
    Heartbeat,
    Message,
    PolicyUpdate,
    ProtocolError,
    Register,
    decode,
    encode,
)
from lynx_protocol.policy import PolicyError, validate_for_replica
from lynx_protocol.security import KeyError_, set_client_keys

LinkState = Literal["connecting", "connected", "stale"]


@dataclass(frozen=True)
class LinkTransition:
    old: LinkState
    new: LinkState
    at: float
    """Monotonic time of the transition [s]."""
    reason: str


@dataclass
class LinkCounters:
    sent: int = 0
    dropped: int = 0
    """Messages not sent because the queue was full or no controller was connected."""
    received: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    """Undecodable messages from the controller, by `ProtocolError` reason."""
    updates_delivered: int = 0
    updates_superseded: int = 0
    """Older or repeated versions dropped."""
    updates_refused: int = 0
    """Updates that did not fit this runtime (see ``Heartbeat.rejected_reason``)."""
    reconnects: int = 0
    """Sockets replaced after the link went stale (CURVE: keys re-read)."""


class RuntimeLink:
    """DEALER socket to the controller's ROUTER; one per scheduler (TP rank 0)."""

    def __init__(
        self, registration: Register, settings: LinkSettings | None = None, *,
        on_transition: Callable[[LinkTransition], None] | None = None,
        clock: Callable[[], float] = time.monotonic, context: zmq.Context | None = None,
    ) -> None:
        self.registration = registration
        self.settings = settings or LinkSettings()
        self.counters = LinkCounters()
        self._on_transition = on_transition
        self._clock = clock
        self._owns_context = context is None
        self._context = context or zmq.Context(io_threads=1)
        self._socket = self._new_socket()
        self._state: LinkState = "connecting"
        self._transitions: list[LinkTransition] = []
        self._registered = False
        self._unanswered_since: float | None = None
        self._last_heard: float | None = None
        self._next_keepalive = float("-inf")  # Register on the first poll
        self._applied_version = 0
        self._acknowledged_version = 0
        self._controller_id: str | None = None
        self._delivered_version = 0
        self._redeliver = False
        self._refused: tuple[int, str] = (0, "")
        self.controller_policy_version = 0
        """Newest policy version the controller said it has (from Acks)."""

    # --- public API -------------------------------------------------------------------

    @property
    def state(self) -> LinkState:
        return self._state

    @property
    def registered(self) -> bool:
        return self._registered

    def poll_update(self, now: float | None = None) -> PolicyUpdate | None:
        """Drain what arrived, keep the link alive; return the newest deliverable update."""
        now = self._clock() if now is None else now
        newest = self._drain(now)
        self._refresh_state(now)
        if now >= self._next_keepalive:
            self._send_keepalive(now)
        if newest is None:
            return None
        self._delivered_version = newest.version
        self._redeliver = False
        self.counters.updates_delivered += 1
        return newest

    def send(self, msg: Message, now: float | None = None) -> bool:
        """Queue one message for the controller without blocking; False if it was dropped."""
        try:
            self._socket.send(encode(msg), zmq.NOBLOCK)
        except zmq.Again:
            self.counters.dropped += 1
            sent = False
        else:
            self.counters.sent += 1
            sent = True
        if self._unanswered_since is None:
            self._unanswered_since = self._clock() if now is None else now
        return sent

    def controller_stale(self, now: float | None = None) -> bool:
        """True when the link is ``stale`` at ``now`` (updates `state`)."""
        self._refresh_state(self._clock() if now is None else now)
        return self._state == "stale"

    def take_transitions(self) -> list[LinkTransition]:
        """State changes since the last call, oldest first (each one happens once)."""
        taken, self._transitions = self._transitions, []
        return taken

    @property
    def acknowledged_version(self) -> int:
        return self._acknowledged_version

    def mark_acknowledged(self, version: int) -> None:
        """The plugin validated and staged ``version`` (it applies at the next step)."""
        self._acknowledged_version = version

    def mark_applied(self, version: int) -> None:
        """The plugin reports the policy version used at a step (0: local/safe policy)."""
        self._applied_version = version

    def report_refused(self, version: int, reason: str) -> None:
        """The plugin refused an update it received; told to the controller in Heartbeats."""
        self._refused = (version, reason[:256])

    def close(self) -> None:
        self._socket.close(0)
        if self._owns_context:
            self._context.term()

    def __enter__(self) -> RuntimeLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals --------------------------------------------------------------------

    def _new_socket(self) -> zmq.Socket:
        """A connected DEALER (CURVE keys read from their files now: a rotated client key
        pair is picked up at the next reconnect). Raises `KeyError_` for unreadable keys."""
        socket = self._context.socket(zmq.DEALER)
        for option, value in (
            (zmq.LINGER, 0), (zmq.IMMEDIATE, 1), (zmq.SNDHWM, self.settings.send_queue),
            (zmq.RCVHWM, self.settings.receive_queue), (zmq.RECONNECT_IVL, 100),
            (zmq.RECONNECT_IVL_MAX, 2000),
            (zmq.MAXMSGSIZE, 4 * self.settings.max_message_bytes),
        ):
            socket.setsockopt(option, value)
        if self.settings.curve:
            set_client_keys(socket, Path(self.settings.curve_client_secret),
                            Path(self.settings.curve_server_public))
        socket.connect(self.settings.endpoint)
        return socket

    def _reconnect(self) -> None:
        """Replace the socket (after the link went stale): fresh keys, fresh handshake."""
        try:
            fresh = self._new_socket()
        except KeyError_ as exc:  # keep the old socket; say why once per reconnect
            logging.getLogger(__name__).warning("controller link: %s", exc)
            return
        self._socket.close(0)
        self._socket = fresh
        self.counters.reconnects += 1

    def _drain(self, now: float) -> PolicyUpdate | None:
        newest: PolicyUpdate | None = None
        for _ in range(self.settings.max_receive_per_poll):
            try:
                frames = self._socket.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                break
            if len(frames) != 1:
                self.counters.rejected["malformed"] += 1
                continue
            try:
                msg = decode(frames[0], accept=TO_RUNTIME,
                             max_bytes=self.settings.max_message_bytes)
            except ProtocolError as exc:
                self.counters.rejected[exc.reason] += 1
                continue
            self.counters.received += 1
            self._last_heard = now
            self._unanswered_since = None
            if isinstance(msg, Ack):
                self._on_ack(msg, now)
            elif isinstance(msg, PolicyUpdate) and self._acceptable(msg):
                if newest is not None:
                    self.counters.updates_superseded += 1
                    if msg.controller_id == newest.controller_id and (
                            msg.version < newest.version):
                        continue
                newest = msg
        return newest

    def _on_ack(self, ack: Ack, now: float) -> None:
        self.controller_policy_version = ack.policy_version
        if ack.registered:
            self._registered = True
        elif self._registered:  # the controller forgot us (restart): re-register right away
            self._registered = False
            self._next_keepalive = now

    def _acceptable(self, update: PolicyUpdate) -> bool:
        lineage_changed = (update.controller_id != self._controller_id
                           and self._controller_id is not None)
        if self._controller_id is None or lineage_changed:
            self._controller_id = update.controller_id
            self._delivered_version = 0
        newer = update.version > self._delivered_version
        repeat_after_stale = update.version == self._delivered_version and self._redeliver
        if not (newer or repeat_after_stale):
            self.counters.updates_superseded += 1
            return False
        reg = self.registration
        try:  # the runtime's trust boundary: the engine never sees an update that fails here
            validate_for_replica(update.policy, replica=reg.replica_id, policies=reg.policies,
                                 num_layers=reg.num_layers, num_experts=reg.num_experts,
                                 top_k=reg.top_k)
        except PolicyError as exc:
            self.counters.updates_refused += 1
            self._refused = (update.version, str(exc)[:256])
            logging.getLogger(__name__).warning("refused policy v%d from the controller: %s",
                                                update.version, exc)
            return False
        return True

    def _send_keepalive(self, now: float) -> None:
        if self._registered:
            version, reason = self._refused
            msg: Message = Heartbeat(
                replica_id=self.registration.replica_id,
                applied_policy_version=self._applied_version,
                acknowledged_policy_version=self._acknowledged_version,
                rejected_policy_version=version, rejected_reason=reason,
            )
        else:
            msg = self.registration
        sent = self.send(msg, now)
        # Not connected yet (or queue full): retry soon rather than a whole heartbeat later.
        retry_s = self.settings.heartbeat_s if sent else min(self.settings.heartbeat_s, 0.1)
        self._next_keepalive = now + retry_s

    def _refresh_state(self, now: float) -> None:
        silent = (self._unanswered_since is not None
                  and now - self._unanswered_since > self.settings.staleness_s)
        if silent:
            target: LinkState = "stale"
        elif self._last_heard is None:
            target = "connecting"
        else:
            target = "connected"
        if target == self._state or (target == "connecting" and self._state == "stale"):
            return
        reason = ("no answer for more than "
                  f"{self.settings.staleness_s:g}s" if target == "stale" else "controller answered")
        transition = LinkTransition(self._state, target, now, reason)
        self._state = target
        if target == "stale":
            self._registered = False
            self._redeliver = True
            if self.settings.curve:
                self._reconnect()
        self._transitions.append(transition)
        if self._on_transition is not None:
            self._on_transition(transition)
