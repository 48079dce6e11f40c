"""Admin HTTP API of a real controller process: auth, validation, audit, persistence, metrics."""

from __future__ import annotations

import json
import queue
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from lynx_policy.testing import ControllerProcess
from lynx_protocol.link import LinkSettings, RuntimeLink
from lynx_protocol.messages import PolicyUpdate, Register

BUDGET = {"name": "budget", "budgets": [{"max_batch": 16, "all_layers": 6},
                                        {"max_batch": 4096, "per_layer": [4, 5]}]}
REGISTER = Register(replica_id="admin-test-0", model="m", num_layers=2, num_experts=8, top_k=2,
                    policies=["off", "budget"])


@pytest.fixture(scope="module")
def controller(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControllerProcess]:
    with ControllerProcess.launch(tmp_path_factory.mktemp("admin"),  # no auth throttling:
                                  {"mode": "static",  # these tests fail auth on purpose
                                   "admin": {"auth_failures_per_peer": 100_000}}) as ctl:
        yield ctl


class LiveReplica:
    """A registered runtime link kept alive by its own thread for the whole module (heartbeats
    every 0.2 s, as the plugin's scheduler loop would), so a slow machine cannot let it go stale
    between tests; the newest policy update it received is `update`; `send` queues a message
    for that thread to send."""

    def __init__(self, endpoint: str, registration: Register = REGISTER) -> None:
        self.link = RuntimeLink(registration, LinkSettings(endpoint=endpoint, heartbeat_s=0.2,
                                                       staleness_s=5.0))
        self.update: PolicyUpdate | None = None
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:  # the only thread that touches the link's socket
        while not self._stop.is_set():
            update = self.link.poll_update()
            if update is not None:
                self.update = update
            while not self.outbox.empty():
                self.link.send(self.outbox.get())
            time.sleep(0.01)
        self.link.close()

    def wait(self, what: str, ready: Callable[[], bool], timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            assert time.monotonic() < deadline, what
            time.sleep(0.01)

    def send(self, msg: object) -> None:
        self.outbox.put(msg)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture(scope="module")
def replica(controller: ControllerProcess) -> Iterator[LiveReplica]:
    """A registered runtime (2 MoE layers, 8 experts) so shape checks have something to hit."""
    live = LiveReplica(controller.endpoint)
    live.wait("replica did not register", lambda: live.link.registered)
    yield live
    live.close()


def test_auth_is_required_on_every_v1_route(controller: ControllerProcess) -> None:
    routes = [("GET", p) for p in ("/v1/state", "/v1/replicas", "/v1/policy", "/v1/mode",
                                   "/v1/slo", "/v1/floor")]
    routes += [("PUT", p) for p in ("/v1/policy", "/v1/mode", "/v1/slo", "/v1/floor")]
    routes += [("GET", "/v1/ladder"), ("PUT", "/v1/ladder"), ("DELETE", "/v1/ladder"),
               ("GET", "/v1/shadow"), ("DELETE", "/v1/shadow"), ("GET", "/v1/ladder/proposal"),
               ("POST", "/v1/ladder/proposal"), ("POST", "/v1/ladder/proposal/accept")]
    with httpx.Client(base_url=controller.admin_url) as anonymous:
        for method, path in routes:
            missing = anonymous.request(method, path, json={})
            assert missing.status_code == 401, (method, path)
            assert missing.headers["www-authenticate"] == "Bearer"
            wrong = anonymous.request(method, path, json={},
                                      headers={"Authorization": "Bearer not-the-token"})
            assert wrong.status_code == 403, (method, path)
            basic = anonymous.request(method, path, headers={"Authorization": "Basic eDp5"})
            assert basic.status_code == 401
        assert anonymous.get("/healthz").json()["status"] == "ok"
        assert anonymous.get("/metrics").status_code == 200
        assert controller.admin.get("/v1/state").status_code == 200


def test_openapi_documents_bodies_and_bearer_auth(controller: ControllerProcess) -> None:
    doc = httpx.get(controller.admin_url + "/openapi.json").json()
    assert {"/v1/policy", "/v1/mode", "/v1/slo", "/v1/floor", "/v1/state", "/v1/replicas",
            "/healthz", "/metrics"} <= set(doc["paths"])
    body = doc["paths"]["/v1/policy"]["put"]["requestBody"]["content"]["application/json"]
    assert body["schema"]["$ref"] == "#/components/schemas/PolicySpec"
    assert "BudgetBucket" in doc["components"]["schemas"]
    assert doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert httpx.get(controller.admin_url + "/docs").status_code == 200


@pytest.mark.parametrize(("path", "body", "expected"), [
    ("/v1/policy", b"{not json", "not valid JSON"),
    ("/v1/policy", {"name": "budget"}, "needs at least one entry"),
    ("/v1/policy", {"name": "turbo"}, "$.name"),
    ("/v1/policy", {"name": "off", "colour": "red"}, "colour"),
    ("/v1/policy", {"name": "budget", "budgets": [{"max_batch": 8, "all_layers": 1}]},
     "quality floor"),
    ("/v1/policy", {"name": "budget", "budgets": [{"max_batch": 8, "per_layer": [4, 4, 4]}]},
     "replica admin-test-0"),
    ("/v1/policy", {"name": "affinity"}, "does not support policy 'affinity'"),
    # an integer beyond 64 bits was accepted, persisted, then failed every send (hole 1)
    ("/v1/policy", {"name": "budget", "budgets": [{"max_batch": 8, "all_layers": 10**30}]},
     "$.budgets[0].all_layers"),
    ("/v1/policy", {"name": "budget", "budgets": [{"max_batch": 2**70, "all_layers": 4}]},
     "$.budgets[0].max_batch"),
    # 20,000 buckets fit the 1 MiB JSON cap; their PolicyUpdate would not fit the link (hole 2)
    ("/v1/policy", {"name": "budget", "budgets": [{"max_batch": i + 1, "all_layers": 8}
                                                  for i in range(20_000)]}, "$.budgets"),
    ("/v1/mode", {"mode": "fast"}, "$.mode"),
    ("/v1/slo", {"targets": []}, "at least one"),
    ("/v1/slo", {"targets": [{"metric": "itl", "quantile": 1.5}]}, "$.targets[0].quantile"),
    ("/v1/floor", {"min_budget": 0}, "$.min_budget"),
    ("/v1/floor", {"min_budget": 2, "per_layer": [2, 2, 2]}, "MoE layers"),
    ("/v1/floor", {"min_budget": 9}, "exceeds the expert count 8"),
])
def test_bad_changes_are_422_with_a_reason(controller: ControllerProcess, replica: LiveReplica,
                                           path: str, body: object, expected: str) -> None:
    before = controller.admin.get("/v1/state").json()["version"]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = controller.admin.put(path, content=content)
    assert response.status_code == 422, response.text
    assert expected in response.json()["detail"]
    assert controller.admin.get("/v1/state").json()["version"] == before


def test_changes_bump_the_version_reach_the_replica_and_are_audited(
        controller: ControllerProcess, replica: LiveReplica) -> None:
    admin = controller.admin
    version = admin.get("/v1/policy").json()["version"]
    response = admin.put("/v1/policy", json=BUDGET)
    assert response.status_code == 200
    assert response.json()["version"] == version + 1
    assert response.json()["effective_policy"]["budgets"][1]["per_layer"] == [4, 5]
    replica.wait("update never reached the runtime",
                 lambda: replica.update is not None and replica.update.version == version + 1)
    assert replica.update is not None and replica.update.policy.budgets[0].all_layers == 6
    # Same body again: nothing changes, no new version.
    assert admin.put("/v1/policy", json=BUDGET).json()["version"] == version + 1
    # Raising the floor lifts budgets below it in the same version.
    floor = admin.put("/v1/floor", json={"min_budget": 5})
    assert floor.status_code == 200 and floor.json()["version"] == version + 2
    policy = admin.get("/v1/policy").json()["policy"]
    assert policy["budgets"][1]["per_layer"] == [5, 5]
    assert admin.put("/v1/slo", json={"targets": [{"metric": "tpot", "target_ms": 50}]}
                     ).status_code == 200
    assert admin.get("/v1/slo").json()["targets"][0]["metric"] == "tpot"
    replicas = admin.get("/v1/replicas").json()["replicas"]
    assert [r["replica_id"] for r in replicas] == ["admin-test-0"]
    assert replicas[0]["connected"] and replicas[0]["registration"]["num_experts"] == 8

    entries = [json.loads(line) for line in
               (controller.state_dir / "audit.jsonl").read_text().splitlines()]
    applied = [e for e in entries if e["action"] == "put_policy" and e["outcome"] == "applied"]
    assert applied and applied[-1]["actor"] == "test" and applied[-1]["client"] == "127.0.0.1"
    assert applied[-1]["after"]["policy"]["name"] == "budget"
    outcomes = {e["outcome"] for e in entries}
    assert {"applied", "rejected", "unchanged", "forbidden", "unauthenticated"} <= outcomes
    for text in ((controller.state_dir / "audit.jsonl").read_text(), controller.log_text(),
                 (controller.state_dir / "state.json").read_text()):
        assert controller.token not in text


def test_metrics_are_exported_under_their_names(controller: ControllerProcess,
                                                replica: LiveReplica) -> None:
    text = httpx.get(controller.admin_url + "/metrics").text
    for name in ("lynx_controller_mode{mode=\"static\"} 1.0", "lynx_controller_policy_version ",
                 "lynx_controller_decisions_total{direction=\"hold\"}",
                 "lynx_controller_slo_attainment_ratio ", "lynx_controller_replicas_connected 1.0",
                 "lynx_controller_messages_received_total{type=\"register\"}",
                 "lynx_controller_messages_rejected_total{reason=\"invalid\"}",
                 "lynx_controller_loop_duration_seconds_bucket",
                 "lynx_controller_loop_degraded 0.0", "lynx_controller_budget_experts"):
        assert name in text, name
    state = controller.admin.get("/v1/state").json()
    assert controller.metric("lynx_controller_policy_version") == state["version"]


def test_state_survives_restart_and_sigkill(tmp_path: Path) -> None:
    with ControllerProcess.launch(tmp_path / "ctl", {"mode": "off"}) as ctl:
        admin = ctl.admin
        assert admin.put("/v1/mode", json={"mode": "static"}).status_code == 200
        put = admin.put("/v1/policy", json=BUDGET).json()
        controller_id = admin.get("/v1/state").json()["controller_id"]
        assert ctl.stop() == 0
        assert "stopped at policy version" in ctl.log_text()

        ctl.start()
        state = ctl.admin.get("/v1/state").json()
        assert state["resumed"] and state["mode"] == "static"
        assert state["policy"] == put["policy"] and state["controller_id"] == controller_id
        assert state["version"] > put["version"]
        restarted = state["version"]

        assert ctl.admin.put("/v1/mode", json={"mode": "adaptive"}).json()["version"] == (
            restarted + 1)
        ctl.kill()  # SIGKILL right after an acknowledged change: it must have been persisted
        ctl.start()
        state = ctl.admin.get("/v1/state").json()
        assert state["mode"] == "adaptive" and state["version"] > restarted + 1
        assert not list(ctl.state_dir.glob(".*.tmp"))
        actions = [json.loads(line)["action"] for line in
                   (ctl.state_dir / "audit.jsonl").read_text().splitlines()]
        assert actions[0] == "init" and actions.count("restart") == 2


def test_admin_api_over_tls_still_requires_the_token(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    with ControllerProcess.launch(tmp_path / "ctl", {"admin": {
            "tls_cert_file": str(cert), "tls_key_file": str(key)}}) as ctl:
        assert ctl.admin_url.startswith("https://")
        assert ctl.admin.get("/v1/state").status_code == 200
        with httpx.Client(base_url=ctl.admin_url, verify=str(cert)) as anonymous:
            assert anonymous.get("/v1/state").status_code == 401
        with pytest.raises(httpx.HTTPError):  # plain HTTP is not served on that port
            httpx.get(ctl.admin_url.replace("https://", "http://") + "/healthz", timeout=3)
