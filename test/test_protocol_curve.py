"""The controller link sealed with ZMQ CURVE (ZAP allow-list of runtime keys), against a real
``lynx-policy`` process on 127.0.0.1: allowed runtimes register; a wrong client key is refused
and counted with no state change; a runtime refuses a controller with the wrong server key;
keys rotate without restarting either side; plain TCP needs an explicit opt-in; the replica
registry is bounded."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from lynx_policy.config import ConfigError, load_config
from lynx_policy.testing import ControllerProcess, free_tcp_port
from lynx_protocol.link import LinkSettings, RuntimeLink
from lynx_protocol.messages import Register
from lynx_protocol.security import generate_keypair

# serial: ZMQ handshakes pumped against wall-clock deadlines
pytestmark = pytest.mark.serial


def _register(name: str) -> Register:
    return Register(replica_id=name, model="m", num_layers=2, num_experts=8, top_k=2,
                    policies=["off", "budget"])


def _pump(link: RuntimeLink, until: Callable[[], bool], timeout_s: float,
          updates: list | None = None) -> bool:
    """Poll like a scheduler until ``until()``; updates received go into ``updates``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        update = link.poll_update()
        if update is not None and updates is not None:
            updates.append(update)
        if until():
            return True
        time.sleep(0.01)
    return False


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    out = {}
    server_public, out["server_secret"] = generate_keypair(tmp_path / "server", "controller")
    out["server_public"] = server_public
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    for name in ("runtime-a", "runtime-b", "intruder"):
        public, out[name] = generate_keypair(tmp_path / "runtimes", name)
        if name == "runtime-a":
            (allowed / public.name).write_bytes(public.read_bytes())
        out[name + ".pub"] = public
    out["allowed"] = allowed
    _, out["fake_server"] = generate_keypair(tmp_path / "fake", "controller")
    out["fake_server_public"] = tmp_path / "fake" / "controller.key"
    return out


def _controller(tmp_path: Path, keys: dict[str, Path], **link: object) -> ControllerProcess:
    port = free_tcp_port()
    return ControllerProcess.launch(tmp_path / "ctl", {"mode": "static", "link": {
        "bind": f"tcp://127.0.0.1:{port}", "curve_server_secret": str(keys["server_secret"]),
        "curve_clients_dir": str(keys["allowed"]), **link}})


def _link(ctl: ControllerProcess, name: str, client: Path, server_public: Path) -> RuntimeLink:
    return RuntimeLink(_register(name), LinkSettings(
        endpoint=ctl.endpoint, heartbeat_s=0.2, staleness_s=1.0,
        curve_client_secret=str(client), curve_server_public=str(server_public)))


def _replicas(ctl: ControllerProcess) -> list[str]:
    return sorted(r["replica_id"] for r in ctl.admin.get("/v1/replicas").json()["replicas"])


def test_allowed_key_registers_and_a_wrong_client_key_is_refused(tmp_path: Path,
                                                                  keys: dict[str, Path]) -> None:
    with _controller(tmp_path, keys) as ctl:
        version = ctl.admin.get("/v1/state").json()["version"]
        with _link(ctl, "intruder", keys["intruder"], keys["server_public"]) as bad:
            # Pump until the controller has denied two handshakes, the second after the link
            # went stale and reconnected with a new socket (a busy machine may take a while):
            # the intruder never registers meanwhile.
            def denied_twice() -> bool:
                return bad.registered or (bad.counters.reconnects >= 1 and ctl.metric(
                    "lynx_controller_auth_denied_total", {"reason": "wrong_key"}) >= 2)

            assert _pump(bad, denied_twice, 20.0)
            assert not bad.registered
        assert _replicas(ctl) == []
        assert ctl.admin.get("/v1/state").json()["version"] == version  # no state change
        with _link(ctl, "runtime-a", keys["runtime-a"], keys["server_public"]) as good:
            got: list = []
            assert _pump(good, lambda: good.registered and bool(got), 10.0, got)
            assert got[-1].policy.name == "off"
            assert _replicas(ctl) == ["runtime-a"]


def test_runtime_refuses_a_controller_with_the_wrong_server_key(tmp_path: Path,
                                                                keys: dict[str, Path]) -> None:
    with _controller(tmp_path, keys) as ctl:
        ctl.admin.put("/v1/policy", json={"name": "budget", "budgets": [
            {"max_batch": 64, "all_layers": 4}]})
        with _link(ctl, "runtime-a", keys["runtime-a"], keys["fake_server_public"]) as link:
            updates: list = []
            assert not _pump(link, lambda: bool(updates), 2.5, updates)
            assert link.state == "stale" and link.counters.received == 0
            assert link.counters.reconnects >= 1  # keys re-read, still refused
        assert _replicas(ctl) == []


def test_keys_rotate_without_restarting_either_side(tmp_path: Path,
                                                    keys: dict[str, Path]) -> None:
    """The runtime's key file is replaced and the controller's allow-list changed: the
    runtime picks its new pair up when it reconnects; the removed key is refused."""
    runtime_key = tmp_path / "runtime.key_secret"
    runtime_key.write_bytes(keys["runtime-a"].read_bytes())
    with _controller(tmp_path, keys, replica_stale_s=1.0) as ctl:
        with _link(ctl, "rotating", runtime_key, keys["server_public"]) as link:
            assert _pump(link, lambda: link.registered, 10.0)
            # rotate: allow runtime-b, remove runtime-a, give the runtime runtime-b's pair
            allowed = keys["allowed"]
            (allowed / keys["runtime-b.pub"].name).write_bytes(keys["runtime-b.pub"].read_bytes())
            (allowed / keys["runtime-a.pub"].name).unlink()
            runtime_key.write_bytes(keys["runtime-b"].read_bytes())
            ctl.kill()  # the connection drops; the link goes stale and reconnects
            assert _pump(link, lambda: link.state == "stale", 10.0)
            ctl.start()
            assert _pump(link, lambda: link.registered, 15.0)
            assert link.counters.reconnects >= 1
            assert _replicas(ctl) == ["rotating"]
        with _link(ctl, "old-key", keys["runtime-a"], keys["server_public"]) as old:
            assert not _pump(old, lambda: old.registered, 2.0)  # removed: refused


def test_plain_tcp_needs_an_explicit_opt_in(tmp_path: Path) -> None:
    config = tmp_path / "c.json"
    config.write_text('{"link": {"bind": "tcp://127.0.0.1:5999"}}')
    with pytest.raises(ConfigError, match="needs CURVE keys"):
        load_config(config, environ={})
    config.write_text('{"link": {"bind": "tcp://127.0.0.1:5999", "plaintext_tcp": true}}')
    assert load_config(config, environ={}).link.plaintext_tcp
    with pytest.raises(ValueError, match="CURVE keys or plaintext_tcp"):
        LinkSettings(endpoint="tcp://127.0.0.1:5999")
    from lynx.sglang_plugin.config import LynxConfigError
    from lynx.sglang_plugin.config import load_config as plugin_config

    with pytest.raises(LynxConfigError, match="needs CURVE keys"):
        plugin_config({"LYNX_ENABLED": "1", "LYNX_CONTROLLER": "tcp://127.0.0.1:5999"})


def test_registry_is_bounded_and_ipc_socket_is_owner_only(tmp_path: Path) -> None:
    with ControllerProcess.launch(tmp_path / "ctl", {"mode": "static",
                                                     "link": {"max_replicas": 2}}) as ctl:
        path = Path(ctl.endpoint[len("ipc://"):])
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        links = [RuntimeLink(_register(f"r{i}"), LinkSettings(endpoint=ctl.endpoint,
                                                              heartbeat_s=0.2, staleness_s=2))
                 for i in range(3)]
        try:
            for link in links:
                _pump(link, lambda link=link: link.registered, 3.0)
            assert _replicas(ctl) == ["r0", "r1"]
            assert ctl.metric("lynx_controller_registrations_refused_total") >= 1
        finally:
            for link in links:
                link.close()


def test_keys_cli_writes_a_pair_and_refuses_to_overwrite(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "lynx_policy.cli", "keys", "generate", "--dir",
               str(tmp_path), "--name", "controller"]
    first = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    secret = tmp_path / "controller.key_secret"
    assert (tmp_path / "controller.key").is_file()
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    again = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "exists already" in again.stderr


def test_allow_list_changes_take_effect_without_restarting_the_controller(
        tmp_path: Path, keys: dict[str, Path]) -> None:
    """A key added to the clients directory is admitted at its next connection and a removed
    one refused, while the same controller process keeps running."""
    with _controller(tmp_path, keys) as ctl:
        pid = ctl.process.pid if ctl.process else None
        with _link(ctl, "runtime-b", keys["runtime-b"], keys["server_public"]) as early:
            assert not _pump(early, lambda: early.registered, 1.5)  # not listed yet
        allowed = keys["allowed"]
        (allowed / keys["runtime-b.pub"].name).write_bytes(keys["runtime-b.pub"].read_bytes())
        with _link(ctl, "runtime-b", keys["runtime-b"], keys["server_public"]) as admitted:
            assert _pump(admitted, lambda: admitted.registered, 10.0)
        (allowed / keys["runtime-a.pub"].name).unlink()
        time.sleep(1.0)  # the directory is re-checked at most every 0.5 s
        with _link(ctl, "runtime-a", keys["runtime-a"], keys["server_public"]) as removed:
            assert not _pump(removed, lambda: removed.registered, 1.5)
        assert ctl.process is not None and ctl.process.pid == pid and ctl.process.poll() is None
        assert _replicas(ctl) == ["runtime-b"]


def test_a_replica_id_belongs_to_the_key_that_registered_it(tmp_path: Path,
                                                             keys: dict[str, Path]) -> None:
    """A second allowed key cannot take over, heartbeat or send statistics under an id (refused
    and counted, the owner stays current); ownership survives a controller restart; removing
    the owner's key from the allow-list releases the id to its replacement; the admin can
    release an id."""
    allowed = keys["allowed"]
    (allowed / keys["runtime-b.pub"].name).write_bytes(keys["runtime-b.pub"].read_bytes())
    with _controller(tmp_path, keys) as ctl:
        with _link(ctl, "shared-id", keys["runtime-a"], keys["server_public"]) as owner:
            assert _pump(owner, lambda: owner.registered, 10.0)
            with _link(ctl, "shared-id", keys["runtime-b"], keys["server_public"]) as thief:
                assert not _pump(thief, lambda: thief.registered, 2.0)
                assert _pump(owner, lambda: ctl.metric(
                    "lynx_controller_replica_key_refusals_total") >= 2, 10.0)
            assert owner.registered and _replicas(ctl) == ["shared-id"]
        ctl.restart()  # ownership is persisted
        with _link(ctl, "shared-id", keys["runtime-b"], keys["server_public"]) as thief:
            assert not _pump(thief, lambda: thief.registered, 2.0)
        (allowed / keys["runtime-a.pub"].name).unlink()  # rotation: the owner's key leaves
        with _link(ctl, "shared-id", keys["runtime-b"], keys["server_public"]) as successor:
            assert _pump(successor, lambda: successor.registered, 10.0)
        (allowed / keys["runtime-a.pub"].name).write_bytes(keys["runtime-a.pub"].read_bytes())
        with _link(ctl, "shared-id", keys["runtime-a"], keys["server_public"]) as old:
            assert not _pump(old, lambda: old.registered, 2.0)  # now runtime-b's
        reply = ctl.admin.delete("/v1/replicas/shared-id")
        assert reply.status_code == 200 and reply.json()["key_released"] is True
        with _link(ctl, "shared-id", keys["runtime-a"], keys["server_public"]) as back:
            assert _pump(back, lambda: back.registered, 10.0)
        assert ctl.admin.delete("/v1/replicas/no-such").status_code == 404


def test_a_peer_without_curve_is_refused_and_counted(tmp_path: Path,
                                                     keys: dict[str, Path]) -> None:
    """A plain-text peer on the CURVE port fails the handshake before the allow-list sees it,
    never registered. Each of its connection attempts is counted: no_curve when the
    controller read its mechanism, aborted when the peer saw the mismatch first and reset the
    connection (a TCP race: both happen, run to run); wrong keys stay counted as wrong_key."""
    import zmq

    def refused() -> float:
        return sum(ctl.metric("lynx_controller_auth_denied_total", {"reason": r})
                   for r in ("no_curve", "aborted"))

    with _controller(tmp_path, keys) as ctl:
        context = zmq.Context()
        plain = context.socket(zmq.DEALER)
        plain.setsockopt(zmq.LINGER, 0)
        plain.connect(ctl.endpoint)
        try:
            plain.send(b"not a CURVE handshake")
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and refused() < 1:
                time.sleep(0.1)
            assert refused() >= 1
            assert ctl.metric("lynx_controller_auth_denied_total", {"reason": "protocol"}) == 0
            assert ctl.metric("lynx_controller_auth_denied_total", {"reason": "wrong_key"}) == 0
            assert _replicas(ctl) == []
            assert ctl.admin.get("/healthz").json()["status"] == "ok"
        finally:
            plain.close()
            context.term()
