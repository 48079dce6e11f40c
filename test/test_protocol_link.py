"""RuntimeLink against a bare ZMQ ROUTER played by the test (real ipc sockets, no mocks).

Time is split in two: message delivery is real (short real waits), while the link's notion
of time (staleness, heartbeats) is driven by explicit ``now`` values so the state machine is
tested deterministically.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zmq

from lynx_protocol.endpoints import EndpointError, default_endpoint, tcp_endpoint
from lynx_protocol.link import LinkSettings, LinkTransition, RuntimeLink
from lynx_protocol.messages import (
    TO_CONTROLLER,
    Ack,
    Heartbeat,
    Message,
    PolicyUpdate,
    Register,
    StepStats,
    decode,
    encode,
)
from lynx_protocol.policy import BudgetBucket, PolicySpec

REGISTER = Register(replica_id="r0", model="m", num_layers=2, num_experts=8, top_k=2,
                    policies=["off", "budget"])


def budget(version: int, experts: int = 4, controller_id: str = "lineage-a") -> PolicyUpdate:
    policy = PolicySpec(name="budget", budgets=[BudgetBucket(max_batch=64, all_layers=experts)])
    return PolicyUpdate(version=version, policy=policy, controller_id=controller_id)


class FakeController:
    def __init__(self, endpoint: str) -> None:
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(endpoint)
        self.peer: bytes | None = None

    def receive(self, timeout_s: float = 2.0) -> Message:
        if not self.socket.poll(int(timeout_s * 1000)):
            raise TimeoutError("nothing from the link")
        peer, payload = self.socket.recv_multipart()
        self.peer = peer
        return decode(payload, accept=TO_CONTROLLER)

    def receive_all(self, settle_s: float = 0.1) -> list[Message]:
        out: list[Message] = []
        while self.socket.poll(int(settle_s * 1000)):
            peer, payload = self.socket.recv_multipart()
            self.peer = peer
            out.append(decode(payload, accept=TO_CONTROLLER))
        return out

    def receive_until(self, done: Callable[[Message], bool], timeout_s: float = 5.0) -> Message:
        """Receive until a message satisfies ``done`` (a busy machine may delay delivery)."""
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            msg = self.receive(left)
            if done(msg):
                return msg
        raise TimeoutError("no matching message from the link")

    def send(self, *messages: Message | bytes) -> None:
        assert self.peer is not None
        for msg in messages:
            payload = msg if isinstance(msg, bytes) else encode(msg)
            self.socket.send_multipart([self.peer, payload])

    def close(self) -> None:
        self.socket.close(0)
        self.context.term()


@pytest.fixture
def endpoint(tmp_path: Path) -> str:
    return f"ipc://{tmp_path}/ctl.sock"


@pytest.fixture
def controller(endpoint: str) -> Iterator[FakeController]:
    fake = FakeController(endpoint)
    yield fake
    fake.close()


def make_link(endpoint: str, **settings: float) -> tuple[RuntimeLink, list[LinkTransition]]:
    seen: list[LinkTransition] = []
    link = RuntimeLink(REGISTER, LinkSettings(endpoint=endpoint, **settings),
                       on_transition=seen.append)
    return link, seen


def poll_until(link: RuntimeLink, now: float, done: Callable[[PolicyUpdate | None], bool],
               timeout_s: float = 2.0) -> PolicyUpdate | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        update = link.poll_update(now)
        if done(update):
            return update
        time.sleep(0.005)
    raise TimeoutError("condition not reached")


def supersede(link: RuntimeLink, now: float, superseded: int) -> None:
    """Poll until ``superseded`` updates were dropped as old or repeated; none is delivered."""
    def dropped(update: PolicyUpdate | None) -> bool:
        assert update is None, f"delivered {update}"
        return link.counters.updates_superseded >= superseded

    poll_until(link, now, dropped)
    assert link.counters.updates_superseded == superseded


def sends_without_blocking(link: RuntimeLink, msg: Message, n: int,
                           now: float | None = None) -> list[bool]:
    """``n`` sends of ``msg``; their results. Each send must return at once: a blocking send
    (nobody reads) would hang for good, a send with a timeout would take milliseconds. Runs
    in a thread with a generous bound, and checks the median send, which CPU load on a busy
    machine barely moves (dropped sends take microseconds)."""
    results: list[bool] = []
    took: list[float] = []
    errors: list[BaseException] = []

    def send_all() -> None:
        try:
            for _ in range(n):
                started = time.perf_counter()
                results.append(link.send(msg, now))
                took.append(time.perf_counter() - started)
        except BaseException as exc:  # re-raised in the test's thread
            errors.append(exc)

    sender = threading.Thread(target=send_all, daemon=True)
    sender.start()
    sender.join(120)
    assert not sender.is_alive(), "a send blocked"
    if errors:
        raise errors[0]
    assert len(results) == n
    assert statistics.median(took) < 0.002, f"median send {statistics.median(took) * 1e3:.2f} ms"
    return results


def connect(link: RuntimeLink, controller: FakeController, now: float = 0.0) -> float:
    """Poll until the Register got through (the first one is dropped while ZMQ connects)."""
    deadline = time.monotonic() + 3.0
    while not controller.socket.poll(10):
        assert time.monotonic() < deadline, "Register never arrived"
        link.poll_update(now)
        now += 0.1
    assert controller.receive() == REGISTER
    controller.send(Ack(registered=True, policy_version=0, controller_id="lineage-a"))
    poll_until(link, now, lambda _: link.state == "connected")
    return now


def test_registers_then_heartbeats_and_delivers_the_newest_update(
        endpoint: str, controller: FakeController) -> None:
    link, transitions = make_link(endpoint, heartbeat_s=1.0, staleness_s=5.0)
    with link:
        assert link.state == "connecting"
        connect(link, controller)
        assert [(t.old, t.new) for t in transitions] == [("connecting", "connected")]
        assert link.take_transitions() == transitions and link.take_transitions() == []

        controller.send(budget(1), budget(3), budget(2))
        time.sleep(1.0)  # all three are queued before the next poll
        update = link.poll_update(0.5)
        assert update is not None and update.version == 3
        before = link.counters.updates_superseded
        controller.send(budget(2), budget(3))  # older and repeated versions are dropped
        supersede(link, 0.6, before + 2)

        link.mark_applied(3)
        link.poll_update(1.0)  # heartbeat due
        heartbeat = controller.receive()
        assert heartbeat == Heartbeat(replica_id="r0", applied_policy_version=3)


def test_update_that_does_not_fit_the_model_is_refused_and_reported(
        endpoint: str, controller: FakeController) -> None:
    link, _ = make_link(endpoint, heartbeat_s=1.0)
    with link:
        connect(link, controller)
        wrong_layers = PolicyUpdate(version=5, controller_id="lineage-a", policy=PolicySpec(
            name="budget", budgets=[BudgetBucket(max_batch=8, per_layer=[2, 2, 2])]))
        unsupported = PolicyUpdate(version=6, controller_id="lineage-a",
                                   policy=PolicySpec(name="piggyback"))
        controller.send(wrong_layers)
        poll_until(link, 0.1, lambda _: link.counters.updates_refused == 1)
        controller.send(unsupported)
        poll_until(link, 0.2, lambda _: link.counters.updates_refused == 2)
        link.poll_update(1.5)
        heartbeat = controller.receive()
        assert isinstance(heartbeat, Heartbeat)
        assert heartbeat.rejected_policy_version == 6
        assert "does not support policy 'piggyback'" in heartbeat.rejected_reason


def test_garbage_from_the_controller_is_counted_not_raised(
        endpoint: str, controller: FakeController) -> None:
    link, _ = make_link(endpoint)
    with link:
        connect(link, controller)
        controller.send(b"\xc1garbage", encode(REGISTER), b"", budget(1))
        update = poll_until(link, 0.1, lambda u: u is not None)
        assert update is not None and update.version == 1
        assert link.counters.rejected == {"malformed": 1, "wrong_direction": 1, "truncated": 1}


def test_staleness_fallback_recovery_and_redelivery(
        endpoint: str, controller: FakeController) -> None:
    link, transitions = make_link(endpoint, heartbeat_s=1.0, staleness_s=3.0)
    with link:
        connect(link, controller)
        controller.send(budget(4))
        assert poll_until(link, 0.1, lambda u: u is not None).version == 4  # type: ignore
        controller.receive_all()
        # Controller goes silent: heartbeats at t=1, 2, 3, 4 go unanswered.
        for now in (1.0, 2.0, 3.0, 4.0):
            assert link.poll_update(now) is None
        assert link.state == "connected"  # 3.0 s since the first unanswered message, not more
        assert link.controller_stale(4.1)
        assert link.state == "stale" and not link.registered
        assert [(t.old, t.new) for t in transitions][-1] == ("connected", "stale")
        # While stale the link re-sends Register (not Heartbeat) until the controller answers.
        link.poll_update(5.0)
        controller.receive_until(lambda m: isinstance(m, Register))
        # The controller comes back and re-sends the same version: delivered again, once.
        controller.send(Ack(registered=True, policy_version=4, controller_id="lineage-a"),
                        budget(4))
        update = poll_until(link, 5.1, lambda u: u is not None)
        assert update is not None and update.version == 4
        assert link.state == "connected"
        assert [(t.old, t.new) for t in transitions][-1] == ("stale", "connected")
        before = link.counters.updates_superseded
        controller.send(budget(4))
        supersede(link, 5.2, before + 1)


def test_a_long_gap_between_polls_is_not_staleness(
        endpoint: str, controller: FakeController) -> None:
    link, _ = make_link(endpoint, heartbeat_s=1.0, staleness_s=3.0)
    with link:
        connect(link, controller)
        link.poll_update(1.0)
        controller.receive()
        controller.send(Ack(registered=True, policy_version=0, controller_id="lineage-a"))
        poll_until(link, 1.1, lambda _: link.counters.received >= 2)
        # A 100 s forward pass: nothing was asked meanwhile, so nothing went unanswered.
        assert not link.controller_stale(100.0)
        link.poll_update(100.0)
        assert not link.controller_stale(102.0)
        assert link.controller_stale(103.5)


def test_controller_restart_with_lost_state_resets_the_version_floor(
        endpoint: str, controller: FakeController) -> None:
    link, _ = make_link(endpoint)
    with link:
        connect(link, controller)
        controller.send(budget(40))
        assert poll_until(link, 0.1, lambda u: u is not None).version == 40  # type: ignore
        controller.send(budget(2, controller_id="lineage-b"))
        update = poll_until(link, 0.2, lambda u: u is not None)
        assert update is not None and (update.version, update.controller_id) == (2, "lineage-b")


def test_unknown_to_the_controller_triggers_immediate_reregistration(
        endpoint: str, controller: FakeController) -> None:
    link, _ = make_link(endpoint, heartbeat_s=10.0, staleness_s=30.0)
    with link:
        connect(link, controller)
        assert link.registered
        controller.send(Ack(registered=False, policy_version=0, controller_id="lineage-b"))
        poll_until(link, 0.2, lambda _: not link.registered)
        controller.receive_until(lambda m: m == REGISTER)


def test_send_never_blocks_without_a_controller(tmp_path: Path) -> None:
    link, transitions = make_link(f"ipc://{tmp_path}/nobody.sock", staleness_s=2.0,
                                  heartbeat_s=0.5)
    with link:
        stats = StepStats(replica_id="r0", seq=0, window_s=1.0, batch_size_edges=[8],
                          batch_size_counts=[1, 0], decode_steps=1, prefill_steps=0,
                          mixed_steps=0, experts_kept_mean=[1.0, 1.0],
                          stock_union_mean=[2.0, 2.0], routing_mass_kept=1.0,
                          step_latency_p50_ms=1.0, step_latency_p99_ms=1.0,
                          applied_policy_version=0)
        results = sends_without_blocking(link, stats, 5000, now=0.0)
        assert not any(results) and link.counters.dropped == 5000
        assert link.poll_update(1.0) is None and link.state == "connecting"
        assert link.controller_stale(2.5)
        assert [(t.old, t.new) for t in transitions] == [("connecting", "stale")]


def test_send_drops_when_the_controller_does_not_read(
        endpoint: str, controller: FakeController) -> None:
    link, _ = make_link(endpoint, send_queue=8)
    with link:
        connect(link, controller)
        big = Register(replica_id="r0", model="x" * 500, num_layers=2, num_experts=8, top_k=2,
                       policies=["off"])
        results = sends_without_blocking(link, big, 20000)
        assert link.counters.dropped > 0 and sum(results) + link.counters.dropped == 20000


def test_endpoints() -> None:
    assert default_endpoint() == "ipc:///tmp/lynx-default.sock"
    assert default_endpoint("olmoe") == "ipc:///tmp/lynx-olmoe.sock"
    assert tcp_endpoint("controller") == "tcp://controller:5790"
    for bad in ("tcp://host", "ipc://relative.sock", "http://x:1", "tcp://h:99999",
                "ipc:///" + "a" * 200):
        with pytest.raises(EndpointError):
            LinkSettings(endpoint=bad)
    with pytest.raises(ValueError):
        LinkSettings(endpoint=default_endpoint(), heartbeat_s=5.0, staleness_s=2.0)
