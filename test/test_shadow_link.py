"""Shadow statistics over the controller link (issue 25; the controller's torch-free side is
also tested in test_policy_shadow_store.py): runtimes in shadow mode send
`ShadowStats` (per bucket, the sums since their previous send); the controller adds the fleet's
up, persists them, builds a ``mass_lost`` ladder proposal on request, and applies it only when
an operator accepts the proposal they reviewed (by its id)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
import torch
from conformance_configs import BY_NAME, draw_inputs

from lynx.sglang_plugin.shadow import ShadowRecorder
from lynx.sglang_plugin.step_state import BATCH_BUCKETS, RuntimeState, StepLayout
from lynx_policy.shadow_store import ShadowStore
from lynx_protocol.ladder import MASS_LOST, decode_ladder
from lynx_protocol.messages import (
    MAX_MESSAGE_BYTES,
    TO_RUNTIME,
    ProtocolError,
    Register,
    ShadowStats,
    decode,
    encode,
)
from lynx_protocol.policy import MAX_LAYERS, PolicySpec
from lynx_protocol.shadow import (
    MAX_SHADOW_BUDGETS,
    ShadowError,
    check_shadow,
    ladder_from_shadow,
    merge_shadow,
    shadow_width,
)
from lynx_protocol.shadow_cli import load_shadow_file

MODEL = BY_NAME["Qwen3-30B-A3B"]
LAYERS = 3
SKEW = (4.0, 1.5, 0.5)


def register(name: str) -> Register:
    return Register(replica_id=name, model="m", num_layers=LAYERS, num_experts=MODEL.experts,
                    top_k=MODEL.top_k, policies=["off", "budget"])


def recorded(path: Path, seed: int, halves: int = 2, steps: int = 10
             ) -> tuple[list[tuple[int, list[list[float]]]], ShadowRecorder]:
    """Decode steps at 24 and 48 rows through a real recorder; its `deltas` after each half
    (what the link carries), and the recorder (its file written at the end)."""
    state = RuntimeState(LAYERS, MODEL.experts, MODEL.top_k, torch.device("cpu"),
                         PolicySpec(name="off"))
    state.shadow = True
    recorder = ShadowRecorder(state, path, 3600.0)
    sent = []
    for half in range(halves):
        for step in range(steps):
            for rows in (24, 48):
                state.begin_step(StepLayout("decode", rows, 0))
                for layer, skew in enumerate(SKEW):
                    logits, _ = draw_inputs(MODEL, rows, seed * 100_000 + (half * steps + step)
                                            * 10 + layer, skew)
                    recorder.observe(layer, logits, MODEL.spec(), None, None)
        sent += recorder.deltas(force=True)
    recorder.write_now()
    return sent, recorder


def message(name: str, recorder: ShadowRecorder, edge: int, layers: list[list[float]]
            ) -> ShadowStats:
    return ShadowStats(replica_id=name, max_batch=edge, batch_buckets=list(BATCH_BUCKETS),
                       budgets=recorder.budgets, every=recorder.state.shadow_every, layers=layers)


def test_the_links_deltas_add_up_to_the_file_and_fit_the_protocol(tmp_path: Path) -> None:
    sent, recorder = recorded(tmp_path / "a.json", seed=1)
    assert recorder.deltas(force=True) == []  # nothing new since the last send
    assert recorder.deltas() == []  # and not before the interval
    file = load_shadow_file(tmp_path / "a.json")
    assert sorted({edge for edge, _ in sent}) == [32, 64] and len(sent) == 4
    store = ShadowStore("")
    for edge, layers in sent:
        msg = decode(encode(message("r0", recorder, edge, layers)))  # over the wire
        assert isinstance(msg, ShadowStats)
        assert store.add(register("r0"), msg) is None
    held = store.data()
    assert held is not None and held["model"] == file["model"]
    for edge in (32, 64):
        flat = [v for row in held["buckets"][edge] for v in row]
        assert flat == pytest.approx([v for row in file["buckets"][edge] for v in row],
                                     abs=1e-5)  # the file rounds to 6 decimals
        assert store.steps(edge) == 20
    # the protocol's largest: 1024 layers x 16 budgets fits one message
    widest = ShadowStats(replica_id="r", max_batch=0, batch_buckets=list(BATCH_BUCKETS),
                         budgets=list(range(1, MAX_SHADOW_BUDGETS + 1)), every=1,
                         layers=[[1e12 + 0.5] * shadow_width(MAX_SHADOW_BUDGETS)] * MAX_LAYERS)
    assert len(encode(widest)) < MAX_MESSAGE_BYTES
    with pytest.raises(ProtocolError) as wrong:
        decode(encode(widest), accept=TO_RUNTIME)
    assert wrong.value.reason == "wrong_direction"


def test_the_controller_proposes_a_ladder_and_applies_only_the_one_reviewed(
        tmp_path: Path) -> None:
    """Two runtimes' statistics over real links into a real controller process: the proposal
    equals the ladder ``lynx-serve shadow-ladder`` builds from the same runtimes' files; an
    operator's accept applies it only under the id they reviewed; the sums survive a restart
    and ``lynx-policy ladder --from-shadow`` reads the controller's file."""
    from test_policy_admin import LiveReplica

    from lynx_policy.testing import ControllerProcess

    runs = {name: recorded(tmp_path / f"{name}.json", seed)
            for name, seed in (("shadow-0", 1), ("shadow-1", 2))}
    files = merge_shadow([(n, load_shadow_file(tmp_path / f"{n}.json")) for n in runs])
    expected, _ = ladder_from_shadow(files, min_steps=40, max_mass_lost=0.5,
                                     built_by="lynx-policy shadow proposal")
    with ControllerProcess.launch(tmp_path / "ctl", {"mode": "static"}) as ctl:
        lives = {name: LiveReplica(ctl.endpoint, register(name)) for name in runs}
        try:
            for name, live in lives.items():
                live.wait("replica did not register", lambda live=live: live.link.registered)
                sent, recorder = runs[name]
                for edge, layers in sent:
                    live.send(message(name, recorder, edge, layers))
            live.wait("the shadow statistics never arrived", lambda: ctl.admin.get(
                "/v1/shadow").json()["steps_by_bucket"] == {"32": 40.0, "64": 40.0})
            assert ctl.metric("lynx_controller_shadow_steps", {"max_batch": "32"}) == 40.0
            assert ctl.metric("lynx_controller_messages_received_total",
                              {"type": "shadow_stats"}) == 8
            short = ctl.admin.post("/v1/ladder/proposal", json={"min_steps": 1000})
            assert short.status_code == 422 and "1000 measured steps" in short.text
            made = ctl.admin.post("/v1/ladder/proposal",
                                  json={"min_steps": 40, "max_mass_lost": 0.5})
            assert made.status_code == 200, made.text
            proposal = made.json()
            ladder = msgspec.convert(proposal["ladder"], type=type(expected))
            assert [r.name for r in ladder.rungs] == [r.name for r in expected.rungs]
            for got, want in zip(ladder.rungs, expected.rungs, strict=True):
                assert [t.per_layer for t in got.tables] == [t.per_layer for t in want.tables]
                assert got.cost(MASS_LOST) == pytest.approx(want.cost(MASS_LOST), abs=2e-6)
            assert proposal["replicas"] == ["shadow-0", "shadow-1"]
            assert ctl.admin.get("/v1/ladder").json()["origin"] == "none"  # not applied yet
            stale = ctl.admin.post("/v1/ladder/proposal/accept", json={"id": "0" * 16})
            assert stale.status_code == 409 and "review it again" in stale.text
            assert ctl.admin.get("/v1/ladder").json()["origin"] == "none"
            accepted = ctl.admin.post("/v1/ladder/proposal/accept", json={"id": proposal["id"]})
            assert accepted.status_code == 200, accepted.text
            view = ctl.admin.get("/v1/ladder").json()
            assert view["origin"] == f"shadow proposal {proposal['id']}" and view["fits"]
            assert view["cost_kind"] == MASS_LOST
            audit = (ctl.state_dir / "audit.jsonl").read_text()
            assert "accept_ladder_proposal" in audit
        finally:
            for live in lives.values():
                live.close()
        ctl.stop()
        saved = ctl.state_dir / "shadow.json"
        cli = subprocess.run([sys.executable, "-m", "lynx_policy.cli", "ladder",
                              "--from-shadow", str(saved), "--min-steps", "40",
                              "--max-mass-lost", "0.5"], capture_output=True, text=True,
                             timeout=120)
        assert cli.returncode == 0, cli.stderr
        assert [r.name for r in decode_ladder(cli.stdout).rungs] == [
            r.name for r in expected.rungs]
        ctl.start()
        assert ctl.admin.get("/v1/shadow").json()["steps_by_bucket"] == {"32": 40.0,
                                                                         "64": 40.0}
        assert ctl.metric("lynx_controller_shadow_steps", {"max_batch": "64"}) == 40.0
        huge = ctl.admin.post("/v1/ladder/proposal", json={"means": [1e300]})
        assert huge.status_code == 422, huge.text
        assert ctl.admin.delete("/v1/shadow").status_code == 200
        assert not saved.exists()
        assert "lynx_controller_shadow_steps{" not in ctl.admin.get("/metrics").text
        assert json.loads(ctl.admin.get("/v1/ladder").text)["origin"].startswith("/")


def test_a_file_a_runtime_could_not_have_written_is_refused_in_one_line(tmp_path: Path
                                                                         ) -> None:
    recorded(tmp_path / "a.json", seed=1, halves=1)
    good = json.loads((tmp_path / "a.json").read_text())
    boasting = json.loads(json.dumps(good))
    boasting["buckets"][0]["layers"][0][2] = 100.0 * boasting["buckets"][0]["layers"][0][0] * 9
    edges = json.loads(json.dumps(good))
    edges["batch_buckets"] = list(range(1, 200))
    for data, match in ((boasting, "inconsistent"), (edges, "batch_buckets")):
        with pytest.raises(ShadowError, match=match) as bad:
            check_shadow(json.dumps(data).encode(), "f.json")
        assert "\n" not in str(bad.value)


def test_the_server_path_and_the_builder_cli_fail_in_one_line(tmp_path: Path, capsys) -> None:
    from lynx.calibrate.server_path import ServerPath, ServerPathError
    from lynx_policy.cli import main

    path = ServerPath("http://127.0.0.1:1", "http://127.0.0.1:1", "t", 2, timeout_s=2)
    with pytest.raises(ServerPathError, match=r"127\.0\.0\.1:1"):
        path.counters()
    path.close()
    recorded(tmp_path / "a.json", seed=1, halves=1)
    assert main(["ladder", "--from-shadow", str(tmp_path / "a.json"), "--out",
                 str(tmp_path)]) == 2  # --out names a folder
    assert "expected a file" in capsys.readouterr().err
