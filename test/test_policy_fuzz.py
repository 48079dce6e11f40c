"""Garbage on the controller's ZMQ socket is rejected, counted and survived."""

from __future__ import annotations

import time
from collections.abc import Iterator

import msgspec
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lynx_policy.testing import ControllerProcess, wait_until
from lynx_protocol.messages import (
    PROTOCOL_VERSION,
    Ack,
    PolicyUpdate,
    Register,
    decode,
    encode,
)
from lynx_protocol.policy import PolicySpec

REGISTER = Register(replica_id="fuzz-survivor", model="m", num_layers=2, num_experts=8,
                    top_k=2, policies=["off", "budget"])
MAX_BYTES = 4096


@pytest.fixture(scope="module")
def controller(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControllerProcess]:
    overrides = {"link": {"max_message_bytes": MAX_BYTES}, "mode": "static"}
    with ControllerProcess.launch(tmp_path_factory.mktemp("fuzz"), overrides) as ctl:
        yield ctl


@pytest.fixture(scope="module")
def dealer(controller: ControllerProcess) -> Iterator[zmq.Socket]:
    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(controller.endpoint)
    yield socket
    socket.close(0)
    context.term()


def rejected(controller: ControllerProcess) -> dict[str, float]:
    reasons = ("oversized", "truncated", "malformed", "not_a_message", "unknown_version",
               "unknown_type", "wrong_direction", "invalid")
    return {r: controller.metric("lynx_controller_messages_rejected_total", {"reason": r})
            for r in reasons}


def test_each_kind_of_bad_message_is_counted_by_reason(controller: ControllerProcess,
                                                       dealer: zmq.Socket) -> None:
    good = msgspec.msgpack.decode(encode(REGISTER))
    cases = {
        "oversized": b"\x00" * (MAX_BYTES + 1),
        "truncated": encode(REGISTER)[:-4],
        "malformed": b"\xc1\xc1\xc1",
        "not_a_message": msgspec.msgpack.encode([1, 2, 3]),
        "unknown_version": msgspec.msgpack.encode({**good, "v": PROTOCOL_VERSION + 1}),
        "unknown_type": msgspec.msgpack.encode({**good, "type": "shutdown"}),
        "wrong_direction": encode(PolicyUpdate(version=9, policy=PolicySpec())),
        "invalid": msgspec.msgpack.encode({**good, "num_layers": -3}),
    }
    before = rejected(controller)
    for payload in cases.values():
        dealer.send(payload)
    dealer.send_multipart([b"two", b"frames"])  # malformed at the frame level
    expected = {reason: before[reason] + 1 for reason in cases}
    expected["malformed"] += 1
    wait_until(f"rejections counted by reason: {expected}",
               lambda: rejected(controller) == expected)
    # The log line follows the counter (another thread renders /metrics): wait for it too.
    wait_until("the unknown_version rejection logged",
               lambda: "rejected runtime message (unknown_version)" in controller.log_text())


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(st.binary(min_size=0, max_size=300) | st.builds(
    lambda d: msgspec.msgpack.encode(d),
    st.dictionaries(st.sampled_from(["v", "type", "replica_id", "seq", "x"]),
                    st.integers(-5, 5) | st.text(max_size=8), max_size=5)),
    min_size=1, max_size=8))
def test_fuzzed_garbage_never_stops_the_controller_answering(controller: ControllerProcess,
                                                        dealer: zmq.Socket,
                                                        payloads: list[bytes]) -> None:
    for payload in payloads:
        dealer.send(payload)
    dealer.send(encode(REGISTER))  # still served: the valid message right behind is answered
    deadline = time.monotonic() + 5.0
    while True:
        remaining_ms = int((deadline - time.monotonic()) * 1000)
        assert remaining_ms > 0 and dealer.poll(remaining_ms), "controller stopped answering"
        answer = decode(dealer.recv())
        if isinstance(answer, Ack) and answer.registered:
            break


def test_controller_still_registers_and_answers_after_the_fuzz(
        controller: ControllerProcess, dealer: zmq.Socket) -> None:
    # every fuzz example sent at least one bad payload, and each one was counted
    wait_until(">= 150 rejections counted", lambda: sum(rejected(controller).values()) >= 150)
    while dealer.poll(0):
        dealer.recv()
    dealer.send(encode(REGISTER))
    assert dealer.poll(5000), "no answer to a valid Register after the fuzz"
    answers = [decode(dealer.recv())]
    if dealer.poll(2000):
        answers.append(decode(dealer.recv()))
    assert any(isinstance(a, Ack) and a.registered for a in answers)
    assert any(isinstance(a, PolicyUpdate) for a in answers)
    replicas = controller.admin.get("/v1/replicas").json()["replicas"]
    assert "fuzz-survivor" in [r["replica_id"] for r in replicas]
    assert controller.admin.get("/healthz").json()["status"] == "ok"
    assert controller.process is not None and controller.process.poll() is None
