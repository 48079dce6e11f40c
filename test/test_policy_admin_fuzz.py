"""Admin API fuzzing over the whole PolicySpec schema (hypothesis), against a real controller
with a connected runtime link: a 2xx answer means every connected replica acknowledges the new
version within seconds; anything else is a 4xx with a message and an unchanged state."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lynx_policy.testing import ControllerProcess
from lynx_protocol.link import LinkSettings, RuntimeLink
from lynx_protocol.messages import Register
from lynx_protocol.policy import POLICY_NAMES

WIDE_INT = st.integers(-5, 10) | st.integers(-(2**70), 2**70) | st.sampled_from(
    [0, 1, 2, 8, 9, 65536, 65537, 2**20, 2**20 + 1, 2**63])
NUMBER = WIDE_INT | st.floats(allow_nan=False, allow_infinity=False, width=64) | st.sampled_from(
    [0.0, 0.5, 1.0, 1.5, 64.0, 64.5, -1.0])
BUCKET = st.fixed_dictionaries({"max_batch": WIDE_INT}, optional={
    "all_layers": WIDE_INT, "per_layer": st.lists(WIDE_INT, max_size=4),
    "extra": st.just(1)})
POLICY = st.fixed_dictionaries({}, optional={
    "name": st.sampled_from([*POLICY_NAMES, "turbo", ""]),
    "budgets": st.lists(BUCKET, max_size=4) | st.just([{"max_batch": 1, "all_layers": 4}] * 70),
    "alpha": NUMBER, "beta": WIDE_INT, "k0": WIDE_INT, "coverage": NUMBER,
    "prune_mixed": st.booleans() | st.just("yes"), "colour": st.just("red")})


class AckingReplica(threading.Thread):
    """A runtime link polled in its own thread; acknowledges and applies every update."""

    def __init__(self, endpoint: str) -> None:
        super().__init__(daemon=True)
        self.link = RuntimeLink(Register(replica_id="fuzz-replica", model="m", num_layers=2,
                                         num_experts=8, top_k=2, policies=list(POLICY_NAMES)),
                                LinkSettings(endpoint=endpoint, heartbeat_s=0.1,
                                             staleness_s=5.0))
        self.stop = threading.Event()
        self.outcomes: dict[str, int] = {"accepted": 0, "refused": 0}

    def run(self) -> None:
        while not self.stop.is_set():
            update = self.link.poll_update()
            if update is not None:
                self.link.mark_acknowledged(update.version)
                self.link.mark_applied(update.version)
            time.sleep(0.01)
        self.link.close()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ControllerProcess, Any]]:
    with ControllerProcess.launch(tmp_path_factory.mktemp("adminfuzz"),
                                  {"mode": "static"}) as ctl:
        replica = AckingReplica(ctl.endpoint)
        replica.start()
        deadline = time.monotonic() + 10
        while not ctl.admin.get("/v1/replicas").json()["replicas"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        yield ctl, replica
        replica.stop.set()
        replica.join(timeout=5)


def _acknowledged(ctl: ControllerProcess) -> int:
    return int(ctl.admin.get("/v1/replicas").json()["replicas"][0][
        "acknowledged_policy_version"])


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(POLICY)
# valid bodies always tried: how many random ones are valid varies by seed (CI drew 2 of 60)
@example({"name": "off"})
@example({"name": "budget", "budgets": [{"max_batch": 4096, "all_layers": 4}]})
@example({"name": "budget", "budgets": [{"max_batch": 8, "all_layers": 8},
                                        {"max_batch": 4096, "per_layer": [2, 3]}]})
def test_2xx_means_delivered_else_4xx_and_nothing_changed(
        setup: tuple[ControllerProcess, Any], body: dict) -> None:
    ctl, replica = setup
    before = ctl.admin.get("/v1/state").json()
    response = ctl.admin.put("/v1/policy", content=json.dumps(body).encode())
    if response.status_code == 200:
        replica.outcomes["accepted"] += 1
        version = response.json()["version"]
        deadline = time.monotonic() + 5.0
        while _acknowledged(ctl) < version:
            assert time.monotonic() < deadline, f"accepted v{version} never acknowledged"
            time.sleep(0.05)
    else:
        replica.outcomes["refused"] += 1
        assert 400 <= response.status_code < 500, response.text
        assert response.json()["detail"]
        after = ctl.admin.get("/v1/state").json()
        assert after["version"] == before["version"] and after["policy"] == before["policy"]


def test_the_fuzz_reached_both_outcomes(setup: tuple[ControllerProcess, Any]) -> None:
    _, replica = setup
    assert replica.outcomes["accepted"] >= 3 and replica.outcomes["refused"] >= 10, \
        replica.outcomes
