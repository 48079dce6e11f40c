"""The ladder on a real controller process: PUT/GET/DELETE /v1/ladder validated against the
registered replica, persisted across a restart, a rung pinned by name in static mode reaching
the replica as a per-layer budget policy, and a damaged config ladder refused in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from ladders import mini_ladder, small_ladder
from test_policy_admin import LiveReplica

from lynx_policy.testing import ControllerProcess
from lynx_protocol.ladder import encode_ladder, load_ladder, rung_of_bucket
from lynx_protocol.messages import Register

SHAPE = Register(replica_id="ladder-test-0", model="m", num_layers=2, num_experts=8, top_k=2,
                 policies=["off", "budget"])


@pytest.fixture(scope="module")
def controller(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControllerProcess]:
    with ControllerProcess.launch(tmp_path_factory.mktemp("ladder"), {
            "mode": "static", "floor": {"min_budget": 3},
            "adaptive": {"buckets": [4, 16, 64, 4096], "min_batch": 8}}) as ctl:
        yield ctl


@pytest.fixture(scope="module")
def replica(controller: ControllerProcess) -> Iterator[LiveReplica]:
    live = LiveReplica(controller.endpoint, SHAPE)
    live.wait("replica did not register", lambda: live.link.registered)
    yield live
    live.close()


def test_a_ladder_is_validated_against_the_replica_then_persisted(
        controller: ControllerProcess, replica: LiveReplica) -> None:
    admin = controller.admin
    assert admin.get("/v1/ladder").json()["origin"] == "none"
    wrong = admin.put("/v1/ladder", content=encode_ladder(mini_ladder()))  # 4 layers x 32
    assert wrong.status_code == 422
    assert wrong.json()["detail"] == ("replica ladder-test-0: made for 4 MoE layers, the "
                                      "model has 2")
    damaged = json.loads(encode_ladder(small_ladder()))
    damaged["rungs"] = damaged["rungs"][1:]  # no no-pruning rung 0
    assert "rung 0" in admin.put("/v1/ladder", json=damaged).json()["detail"]
    assert admin.put("/v1/ladder", content=b"{").status_code == 422
    assert not (controller.state_dir / "ladder.json").exists()
    ok = admin.put("/v1/ladder", content=encode_ladder(small_ladder()))
    assert ok.status_code == 200, ok.text
    assert ok.json()["fits"] and [r["name"] for r in ok.json()["rungs"]] == [
        "none", "m6", "m4", "m2"]
    assert load_ladder(controller.state_dir / "ladder.json") == small_ladder()
    audit = (controller.state_dir / "audit.jsonl").read_text().splitlines()
    assert any(json.loads(line)["action"] == "put_ladder" and json.loads(line)["outcome"] ==
               "rejected" for line in audit)
    assert json.loads(audit[-1])["action"] == "put_ladder"
    assert json.loads(audit[-1])["outcome"] == "applied"


def test_a_rung_pinned_by_name_reaches_the_replica(controller: ControllerProcess,
                                                   replica: LiveReplica) -> None:
    admin = controller.admin
    admin.put("/v1/ladder", content=encode_ladder(small_ladder())).raise_for_status()
    before = admin.get("/v1/state").json()["version"]
    for body, reason in (({"mode": "adaptive", "rung": "m4"}, "give mode 'static'"),
                         ({"mode": "static", "rung": "m9"}, "no rung 'm9'"),
                         ({"mode": "static", "rung": "m2"}, "quality floor 3")):
        refused = admin.put("/v1/mode", json=body)
        assert refused.status_code == 422 and reason in refused.json()["detail"], refused.text
    assert admin.get("/v1/state").json()["version"] == before
    pinned = admin.put("/v1/mode", json={"mode": "static", "rung": "m4"})
    assert pinned.status_code == 200, pinned.text
    replica.wait("pinned rung not received", lambda: replica.update is not None
                 and replica.update.version > before)
    assert replica.update is not None
    policy = replica.update.policy
    assert policy.name == "budget" and [b.max_batch for b in policy.budgets] == [4, 16, 64, 4096]
    assert [rung_of_bucket(small_ladder(), b) for b in policy.budgets] == [0, 2, 2, 2]
    assert policy.budgets[1].per_layer == [4, 4]


def test_the_ladder_survives_a_restart_and_can_be_removed(controller: ControllerProcess,
                                                          replica: LiveReplica) -> None:
    controller.admin.put("/v1/ladder", content=encode_ladder(small_ladder())).raise_for_status()
    controller.restart()
    view = controller.admin.get("/v1/ladder").json()
    assert view["origin"].endswith("ladder.json") and len(view["rungs"]) == 4
    assert controller.admin.delete("/v1/ladder").json()["origin"] == "none"
    assert not (controller.state_dir / "ladder.json").exists()


def test_a_damaged_config_ladder_is_refused_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad-ladder.json"
    bad.write_text('{"format": "lynx-ladder/1", "rungs": []}')
    config = tmp_path / "controller.json"
    config.write_text(json.dumps({"ladder": str(bad)}))
    result = subprocess.run([sys.executable, "-m", "lynx_policy.cli", "check-config",
                             "--config", str(config)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0] and "ladder" in lines[0], result.stderr
