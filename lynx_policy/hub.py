"""The controller's ZMQ ROUTER: receives runtime messages, keeps the replica registry, sends.

Every reply and update is sent non-blocking with ``ROUTER_MANDATORY``: a replica that went
away or stopped reading costs a dropped (counted) message, never a stalled controller.
Garbage on the socket is rejected with a reason (counted, logged rate-limited) and the
receive loop carries on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import zmq
import zmq.asyncio

from lynx_policy.config import LinkConfig
from lynx_policy.evidence import stall_counts
from lynx_policy.metrics import ControllerMetrics
from lynx_policy.model import batch_mix
from lynx_policy.owners import ReplicaOwners
from lynx_policy.replica import STATS_BYTES_PER_REPLICA, Replica, decoded_size
from lynx_policy.shadow_store import ShadowStore
from lynx_policy.throttle import RateLimitedLog
from lynx_protocol.messages import (
    TO_CONTROLLER,
    Ack,
    ControllerMessage,
    Heartbeat,
    PolicyUpdate,
    ProtocolError,
    Register,
    ShadowStats,
    StepStats,
    decode,
    encode,
)
from lynx_protocol.security import AllowedClients, restrict_ipc_path, set_server_keys

log = logging.getLogger(__name__)


class Hub:
    def __init__(self, config: LinkConfig, metrics: ControllerMetrics,
                 current_update: Callable[[], PolicyUpdate],
                 clock: Callable[[], float] = time.monotonic, state_dir: str = "",
                 shadow: ShadowStore | None = None) -> None:
        self.config = config
        self.shadow = shadow  # None: ShadowStats are received and dropped
        self.metrics = metrics
        self.current_update = current_update
        self.clock = clock
        self.replicas: dict[str, Replica] = {}
        self.received = 0
        self.rejected = 0
        self._reject_log = RateLimitedLog(log)
        self._context = zmq.asyncio.Context(io_threads=1)
        self._socket = self._context.socket(zmq.ROUTER)
        self.allowed: AllowedClients | None = None
        self._auth: Any = None
        if config.curve:  # ZAP before bind: no handshake is ever unchecked
            from zmq.auth.asyncio import AsyncioAuthenticator

            self.allowed = AllowedClients(Path(config.curve_clients_dir),
                                          on_denied=metrics.auth_denied.labels(
                                              reason="wrong_key").inc)
            self._auth = AsyncioAuthenticator(self._context)
            self._auth.start()
            self._auth.configure_curve_callback(domain="lynx",
                                                credentials_provider=self.allowed)
            set_server_keys(self._socket, Path(config.curve_server_secret))
        elif config.bind.startswith("tcp://"):
            log.warning("link %s is plain-text TCP (link.plaintext_tcp): any process that can "
                        "reach it can register replicas and read policies", config.bind)
        self.owners = (ReplicaOwners(state_dir, self.allowed.keys)  # CURVE: ids bound to keys
                       if state_dir and self.allowed is not None else None)
        for option, value in (
            (zmq.LINGER, 0), (zmq.ROUTER_MANDATORY, 1), (zmq.SNDHWM, config.send_queue),
            (zmq.RCVHWM, config.send_queue), (zmq.MAXMSGSIZE, 4 * config.max_message_bytes),
        ):
            self._socket.setsockopt(option, value)
        self._socket.bind(config.bind)
        restrict_ipc_path(config.bind)
        self._monitor: zmq.Socket | None = None
        if config.curve:  # handshakes refused before ZAP: a plain (sync) PAIR, drained by timer
            address = f"inproc://lynx-handshakes-{id(self)}"
            self._socket.monitor(address, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                                 | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
            self._monitor = zmq.Socket(self._context, zmq.PAIR)
            self._monitor.connect(address)

    async def watch_handshakes(self, every_s: float = 0.25) -> None:
        """CURVE links: count handshakes that failed before ZAP (a peer without CURVE is a
        mechanism mismatch, never seen by the allow-list; or, when it saw the mismatch first
        and reset the connection, an aborted handshake). Drained every ``every_s``."""
        while self._monitor is not None:
            self.count_refused_handshakes()
            await asyncio.sleep(every_s)

    def count_refused_handshakes(self) -> None:
        from zmq.utils.monitor import parse_monitor_message

        while self._monitor is not None:
            try:
                event = parse_monitor_message(self._monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                reason = "aborted"
            elif event["value"] == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
                reason = "no_curve"
            else:
                reason = "protocol"
            self.metrics.auth_denied.labels(reason=reason).inc()
            self._reject_log.warning(f"handshake {reason}", "link handshake refused (%s) from "
                                     "%s", reason, event.get("endpoint", b"?"))

    async def serve(self) -> None:
        """Receive forever; every message is handled before the next one is read."""
        while True:
            try:
                parts = await self._socket.recv_multipart(copy=False)
            except asyncio.CancelledError:
                raise
            except zmq.ZMQError as exc:
                if exc.errno == zmq.ETERM:
                    return
                log.error("ZMQ receive failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            try:
                peer = (_property(parts[-1], "Peer-Address")  # ipc:// has no IP address
                        if self.config.bind.startswith("tcp://") else "")
                self.handle([part.bytes for part in parts], _property(parts[-1], "User-Id"),
                            peer)
            except Exception:  # a bug in one handler must not end the receive loop
                log.exception("unexpected error while handling a runtime message")

    def handle(self, frames: list[bytes], key: str = "", peer: str = "") -> None:
        """One message; ``key``: the CURVE key (z85) ZMQ authenticated its sender with ("":
        no CURVE), which owns the replica ids it registers (`lynx_policy.owners`); ``peer``:
        the address it connected from ("" on ipc://)."""
        identity, payloads = frames[0], frames[1:]
        if len(payloads) != 1:
            self._reject("malformed", f"{len(payloads)} payload frames, expected 1")
            return
        try:
            msg = decode(payloads[0], accept=TO_CONTROLLER,
                         max_bytes=self.config.max_message_bytes)
        except ProtocolError as exc:
            self._reject(exc.reason, exc.detail)
            return
        now = self.clock()
        self.received += 1
        self.metrics.messages_received.labels(type=_TAGS[type(msg)]).inc()
        assert isinstance(msg, Register | StepStats | Heartbeat | ShadowStats)  # TO_CONTROLLER
        if self.owners is not None and not self.owners.check(
                msg.replica_id, key, registering=isinstance(msg, Register)):
            self.metrics.replica_key_refusals.inc()
            self._reject_log.warning("wrong_key", "refused a %s for replica %s: the id is bound "
                                     "to another allowed CURVE key", _TAGS[type(msg)],
                                     msg.replica_id)
            return
        if isinstance(msg, Register):
            self._on_register(identity, msg, now, peer)
            return
        replica = self.replicas.get(msg.replica_id)
        if replica is None:
            self._send(identity, Ack(registered=False, policy_version=self._version(),
                                     controller_id=self.current_update().controller_id))
            return
        replica.identity = identity
        replica.last_seen = now
        replica.messages += 1
        if isinstance(msg, ShadowStats):
            self._on_shadow(replica, msg)
            return
        replica.note_versions(msg.applied_policy_version, msg.acknowledged_policy_version)
        if isinstance(msg, Heartbeat):
            replica.refused_version = msg.rejected_policy_version
            replica.refused_reason = msg.rejected_reason
            update = self.current_update()
            self._send(identity, Ack(registered=True, policy_version=update.version,
                                     controller_id=update.controller_id))
            self._resend_if_lagging(replica, now)
        elif isinstance(msg, StepStats):
            if replica.recent_stats:
                previous = replica.recent_stats[-1][1]
                if msg.seq > previous.seq + 1:
                    replica.stats_gaps += msg.seq - previous.seq - 1
            replica.recent_stats.append((now, msg))
            replica.recent_mix.append((now, batch_mix((msg,))))
            replica.recent_stalls.append((now, stall_counts(msg)))
            replica.stats_bytes.append(decoded_size(msg))
            while len(replica.stats_bytes) > len(replica.recent_stats):  # deque maxlen dropped
                replica.stats_bytes.popleft()
            while (sum(replica.stats_bytes) > STATS_BYTES_PER_REPLICA
                   and len(replica.recent_stats) > 1):
                replica.recent_stats.popleft()
                replica.stats_bytes.popleft()

    def _on_register(self, identity: bytes, msg: Register, now: float, peer: str = "") -> None:
        previous = self.replicas.get(msg.replica_id)
        known = previous is not None
        if previous is not None and _shape(previous.registration) != _shape(msg):
            known = False  # a new registration under a known id: logged as such below
            log.info("replica %s re-registers with another model shape", msg.replica_id)
        if previous is None and len(self.replicas) >= self.config.max_replicas:
            self.metrics.registrations_refused.inc()
            self._reject_log.warning("max_replicas", "replica registrations refused: %d "
                                     "replicas known (link.max_replicas)", len(self.replicas))
            return
        self.replicas[msg.replica_id] = Replica(registration=msg, identity=identity,
                                                registered_at=time.time(), last_seen=now,
                                                messages=1, peer_address=peer)
        if not known:
            log.info("replica %s registered: model=%s layers=%d experts=%d top_k=%d tp=%d",
                     msg.replica_id, msg.model, msg.num_layers, msg.num_experts, msg.top_k,
                     msg.tp_size)
        update = self.current_update()
        self._send(identity, Ack(registered=True, policy_version=update.version,
                                 controller_id=update.controller_id))
        self._send_update(self.replicas[msg.replica_id], update, now)

    def _on_shadow(self, replica: Replica, msg: ShadowStats) -> None:
        if self.shadow is None:
            return
        why = self.shadow.add(replica.registration, msg)
        if why is not None:
            self.metrics.shadow_refused.inc()
            self._reject_log.warning("shadow", "shadow statistics from %s not added: %s",
                                     msg.replica_id, why)
            return
        edge = msg.max_batch or None
        self.metrics.shadow_steps.labels(max_batch=str(edge or "inf")).set(
            self.shadow.steps(edge))

    def _reject(self, reason: str, detail: str) -> None:
        self.rejected += 1
        self.metrics.messages_rejected.labels(reason=reason).inc()
        self._reject_log.warning(reason, "rejected runtime message (%s): %s", reason, detail)

    def _version(self) -> int:
        return self.current_update().version

    def _send(self, identity: bytes, msg: ControllerMessage) -> bool:
        # With NOBLOCK the future is already resolved: sent, or failed (EAGAIN, EHOSTUNREACH).
        future = cast(asyncio.Future, self._socket.send_multipart([identity, encode(msg)],
                                                                  flags=zmq.NOBLOCK))
        if future.done() and future.exception() is None:
            return True
        self.metrics.updates_dropped.inc()
        return False

    def _send_update(self, replica: Replica, update: PolicyUpdate, now: float) -> None:
        if self._send(replica.identity, update):
            self.metrics.updates_sent.inc()
        replica.last_sent_version = update.version
        replica.last_sent_at = now

    def _resend_if_lagging(self, replica: Replica, now: float) -> None:
        update = self.current_update()
        lagging = replica.acknowledged_version != update.version
        if not lagging:
            replica.behind_since = None
        elif replica.behind_since is None:
            replica.behind_since = now
        refused = replica.refused_version == update.version
        if lagging and not refused and now - replica.last_sent_at >= self.config.resend_s:
            self._send_update(replica, update, now)

    # --- used by the control loop and the admin API -------------------------------------

    def broadcast(self) -> int:
        """Send the current update to every connected replica; returns how many were sent."""
        now = self.clock()
        update = self.current_update()
        targets = self.connected(now)
        for replica in targets:
            self._send_update(replica, update, now)
        return len(targets)

    def connected(self, now: float | None = None) -> list[Replica]:
        now = self.clock() if now is None else now
        return [r for r in self.replicas.values()
                if now - r.last_seen <= self.config.replica_stale_s]

    def housekeeping(self) -> None:
        """Forget long-gone replicas and refresh the connected gauge."""
        now = self.clock()
        for replica_id, replica in list(self.replicas.items()):
            if now - replica.last_seen > self.config.replica_forget_s:
                log.info("forgetting replica %s (unheard for %.0fs)", replica_id,
                         now - replica.last_seen)
                del self.replicas[replica_id]
        self.metrics.replicas_connected.set(len(self.connected(now)))
        self.metrics.replicas_behind.set(len(self.behind(now)))

    def behind(self, now: float | None = None) -> list[Replica]:
        """Connected replicas that refused, or have not acknowledged within
        ``link.ack_timeout_s``, the current policy version."""
        now = self.clock() if now is None else now
        version = self.current_update().version
        return [r for r in self.connected(now)
                if r.status(now, version, self.config.ack_timeout_s) in ("behind", "refused")]

    def batch_steps(self, window_s: float) -> dict[int, int] | None:
        """Decode steps by batch-size bucket bound over connected replicas' recent stats."""
        now = self.clock()
        steps: dict[int, int] = {}
        for replica in self.connected(now):
            for at, stats in replica.recent_stats:
                if now - at > window_s:
                    continue
                bounds = [*stats.batch_size_edges, (stats.batch_size_edges or [0])[-1] + 1]
                for bound, count in zip(bounds, stats.batch_size_counts, strict=True):
                    if count:
                        steps[bound] = steps.get(bound, 0) + count
        return steps or None

    def num_experts(self) -> int | None:
        counts = [r.registration.num_experts for r in self.connected()]
        return min(counts) if counts else None

    def close(self) -> None:
        if self._auth is not None:
            self._auth.stop()
        if self._monitor is not None:
            self._socket.disable_monitor()
            self._monitor.close(0)
            self._monitor = None
        self._socket.close(0)
        self._context.term()


def _shape(reg: Register) -> tuple[object, ...]:
    return (reg.model, reg.num_layers, reg.num_experts, reg.top_k, tuple(reg.policies))


def _property(frame: zmq.Frame, name: str) -> str:
    """A ZMQ message property: ``User-Id`` (the CURVE key ZAP authenticated the sender with,
    z85) or ``Peer-Address`` (its IP); "" when the transport has none."""
    try:
        return str(frame.get(name) or "")
    except (zmq.ZMQError, AttributeError, TypeError):
        return ""


_TAGS: dict[type, str] = {Register: "register", StepStats: "step_stats", Heartbeat: "heartbeat",
                          ShadowStats: "shadow_stats"}
