"""The deployment's topology without containers, on 127.0.0.1: a real Prometheus (Debian
package) with the generated scrape config and the committed alert rules, scraping a real SGLang
CPU server with the Lynx plugin, the real controller started from the image's
``controller.toml`` and the real sglang-router started with the compose file's arguments.
Every dashboard panel query and every alert's measured expression must return data, and every
metric they reference must be on a live ``/metrics`` page."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from lynx.deploy import constants as c
from lynx.deploy.dashboard import live_stack_queries, referenced_metric_names
from lynx.deploy.prometheus import render_prometheus_config, rule_queries
from lynx.serving.client import StreamedTraffic
from lynx.serving.metrics_reader import samples
from lynx.serving.server import free_port
from lynx_policy.testing import ControllerProcess, deep_merge
from lynx_protocol.security import generate_keypair

pytestmark = pytest.mark.slow
PROMETHEUS = shutil.which("prometheus")
BUDGET = {"name": "budget", "budgets": [{"max_batch": 100000, "all_layers": 2}]}


def _wait_for(what: str, check: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def _process(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _router_args(worker: str, port: int, metrics_port: int) -> list[str]:
    """The compose file's router command, on loopback ports."""
    router = yaml.safe_load((c.DOCKER_DIR / "compose.cpu.yaml").read_text())["services"]["router"]
    args = [str(a) for a in router["command"]]
    replace = {"0.0.0.0": "127.0.0.1", str(c.ROUTER_PORT): str(port),
               str(c.ROUTER_METRICS_PORT): str(metrics_port)}
    args = [replace.get(a, a) for a in args]
    start, end = args.index("--worker-urls") + 1, args.index("--policy")
    return [*args[:start], worker, *args[end:]]


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[ControllerProcess]:
    shipped = tomllib.loads((c.DOCKER_DIR / "controller" / "controller.toml").read_text())
    keys = tmp_path / "link-keys"  # as `make link-keys` writes them, CURVE on tcp:// as shipped
    generate_keypair(keys, "controller")
    public, _ = generate_keypair(keys, "runtime-1")
    (keys / "clients").mkdir()
    (keys / "clients" / public.name).write_bytes(public.read_bytes())
    local = {"link": {"bind": f"tcp://127.0.0.1:{free_port()}",
                      "curve_server_secret": str(keys / "controller.key_secret"),
                      "curve_clients_dir": str(keys / "clients")},
             "admin": {"host": "127.0.0.1", "port": free_port(), "token_file": ""},
             "state": {"dir": str(tmp_path / "state")}, "loop": {"interval_s": 1.0},
             "observe": {"prometheus_url": "http://127.0.0.1:1"}}  # set once Prometheus runs
    ctl = ControllerProcess(tmp_path / "controller", deep_merge(shipped, local))
    ctl.workdir.mkdir(parents=True)
    yield ctl
    ctl.stop()


def _query(prom: str, expr: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=10)
    body = response.json()
    assert body.get("status") == "success", (expr, body)
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus missing: make prometheus")
def test_every_panel_and_rule_returns_data_on_the_live_topology(
        tmp_path: Path, server_factory: Any, controller: ControllerProcess) -> None:
    pytest.importorskip("sglang_router", reason="pip install sglang-router==0.3.2")
    prom_port, router_port, router_metrics = free_port(), free_port(), free_port()
    prom = f"http://127.0.0.1:{prom_port}"
    controller.config["observe"]["prometheus_url"] = prom
    controller.start()
    keys = tmp_path / "link-keys"
    runtime = server_factory("mixtral-mini", env={
        "LYNX_ENABLED": "1", "LYNX_CONTROLLER": controller.endpoint,
        "LYNX_CURVE_CLIENT_KEY": str(keys / "runtime-1.key_secret"),
        "LYNX_CURVE_SERVER_KEY": str(keys / "controller.key"),
        "LYNX_REPLICA_ID": "runtime-1", "LYNX_STATS_INTERVAL_S": "1"})
    router = _process([sys.executable, "-m", "sglang_router.launch_router",
                       *_router_args(runtime.url, router_port, router_metrics)],
                      tmp_path / "router.log")
    config = tmp_path / "prometheus.yml"
    config.write_text(render_prometheus_config(
        [f"127.0.0.1:{runtime.port}"], controller.admin_url.removeprefix("http://"),
        f"127.0.0.1:{router_metrics}", "1s",
        rule_files=[str(c.DOCKER_DIR / "prometheus" / "rules.yml")]))
    assert PROMETHEUS is not None
    prometheus = _process([PROMETHEUS, f"--config.file={config}",
                           f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                           f"--web.listen-address=127.0.0.1:{prom_port}"],
                          tmp_path / "prometheus.log")
    traffic = StreamedTraffic(f"http://127.0.0.1:{router_port}")
    try:
        _wait_for("router", lambda: httpx.get(f"http://127.0.0.1:{router_port}/liveness",
                                              timeout=2).status_code == 200, 60)
        _wait_for("prometheus", lambda: httpx.get(f"{prom}/-/ready", timeout=2)
                  .status_code == 200, 60)

        def router_serves() -> bool:
            reply = httpx.post(f"http://127.0.0.1:{router_port}/generate", timeout=30, json={
                "text": "1+1=", "sampling_params": {"max_new_tokens": 2, "temperature": 0}})
            return reply.status_code == 200
        _wait_for("the router to route a request to its worker", router_serves, 120)
        admin = controller.admin
        admin.put("/v1/policy", json=BUDGET).raise_for_status()
        admin.put("/v1/mode", json={"mode": "static"}).raise_for_status()
        traffic.start()

        def targets_up() -> bool:
            active = httpx.get(f"{prom}/api/v1/targets", timeout=5).json()["data"][
                "activeTargets"]
            return len(active) == 3 and all(t["health"] == "up" for t in active)
        _wait_for("all three scrape targets up", targets_up, 60)

        queries = live_stack_queries()
        missing = list(queries)

        def all_return_data() -> bool:
            missing[:] = [q for q in missing if not _query(prom, q)]
            return not missing
        try:
            _wait_for("every dashboard/rule query to return data", all_return_data, 240)
        except AssertionError:
            pytest.fail(f"queries without data: {missing}")
        assert traffic.ok > 0 and traffic.failed == 0, traffic.errors[:5]

        pages = "\n".join(httpx.get(url, timeout=10).text for url in (
            f"{runtime.url}/metrics", f"{controller.admin_url}/metrics",
            f"http://127.0.0.1:{router_metrics}/metrics"))
        live = {name for line in pages.splitlines() if line and not line.startswith("#")
                for name in [line.split("{")[0].split(" ")[0]]}
        base = referenced_metric_names("base")  # the EP panels: test_e2e_parallel
        assert base <= live, base - live
        # The top-1 invariant holds on the live stack: the alert's ratio is exactly 1.
        ratios = _query(prom, rule_queries()[3])
        assert ratios and all(float(r["value"][1]) == 1.0 for r in ratios), ratios
        assert sum(v for _, v in samples(httpx.get(f"{runtime.url}/metrics").text,
                                         "lynx_controller_connected")) == 1.0
    finally:
        traffic.finish(timeout_s=90)
        for process in (prometheus, router):
            _stop(process)
