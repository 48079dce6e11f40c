"""The adaptive control loop end to end, with latency the test controls.

A `LatencySource` serves ``sglang:inter_token_latency_seconds`` like a runtime; a `FakeReplica`
(a real RuntimeLink pumped like a scheduler) registers and reports decode batches of 32. The
controller observes the latency either through a real Prometheus server (Debian package
``prometheus``) scraping the source every second, or by scraping the source itself.

Histogram buckets put the p99 at: 0.25 s → 0.2985 (violates the 100 ms SLO), 0.03 s → 0.0398
(below 70 ms: headroom 0.3), 0.085 s → 0.0899 (inside the band: hold).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from lynx_policy.testing import ControllerProcess, FakeReplica, LatencySource, free_tcp_port
from lynx_protocol.messages import Register

# serial: the adaptive loop reads latencies over wall-clock windows against 15-25 s deadlines
pytestmark = pytest.mark.serial

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
TIGHTEN_AFTER, RELAX_AFTER = 2, 2


def controller_overrides(observe: dict[str, Any]) -> dict[str, Any]:
    return {
        "mode": "adaptive",
        "slo": [{"metric": "itl", "quantile": 0.99, "target_ms": 100}],
        "floor": {"min_budget": 2},
        "adaptive": {"buckets": [4, 4096], "min_batch": 8, "step_experts": 2, "headroom": 0.3,
                     "tighten_after_ticks": TIGHTEN_AFTER, "relax_after_ticks": RELAX_AFTER},
        "loop": {"interval_s": 0.5, "backoff_s": [0.5]},
        "observe": {"rate_window_s": 3, **observe},
    }


def snapshot(ctl: ControllerProcess) -> dict[str, Any]:
    state = ctl.admin.get("/v1/state").json()
    tick = state["loop"]["last_tick"] or {}
    budgets = {b["max_batch"]: b["all_layers"] for b in state["effective_policy"]["budgets"]}
    return {"ticks": state["loop"]["ticks"], "signal": tick.get("signal"),
            "budget": budgets.get(4096, 8), "version": state["version"]}


def drive(ctl: ControllerProcess, until, timeout_s: float) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    samples: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    while True:
        samples.append(snapshot(ctl))
        if until(samples):
            return samples
        assert time.monotonic() < deadline, f"not reached; last samples {samples[-5:]}"
        time.sleep(0.1)


def ticks_to_react(ctl: ControllerProcess, since_tick: int, signal: str, direction: str) -> int:
    """Ticks from the first ``signal`` after ``since_tick`` to the first ``direction`` decision
    after it, from the controller's own tick history (``loop.recent_ticks``): a client
    sampler stalled on a busy machine can neither hide nor add a tick."""
    ticks = [t for t in ctl.admin.get("/v1/state").json()["loop"]["recent_ticks"]
             if t["tick"] > since_tick]
    # the runtime's steps carry no prefill statistics here and no ladder plans: no tick held
    # a miss as one pruning cannot fix
    assert ticks and all(t["unfixable"] == "" for t in ticks)
    first_signal = next(t["tick"] for t in ticks if t["signal"] == signal)
    first_move = next(t["tick"] for t in ticks
                      if t["tick"] >= first_signal and t["direction"] == direction)
    return first_move - first_signal


def run_scenario(ctl: ControllerProcess, source: LatencySource, replica: FakeReplica) -> None:
    # 1. SLO violated → budgets drop, within a bounded number of ticks, never rising.
    source.latency_s = 0.25
    start = snapshot(ctl)["budget"]
    samples = drive(ctl, lambda s: s[-1]["budget"] <= start - 4, timeout_s=25)
    assert ticks_to_react(ctl, samples[0]["ticks"], "violated", "tighten") <= TIGHTEN_AFTER + 1
    budgets = [s["budget"] for s in samples]
    assert budgets == sorted(budgets, reverse=True), f"not monotone while violated: {budgets}"
    low = budgets[-1]
    assert low >= 2  # quality floor

    # The replica received and applied what the controller decided.
    state = ctl.admin.get("/v1/state").json()
    drive(ctl, lambda _: replica.applied and replica.applied[-1].version >= state["version"], 5)

    # 2. Headroom → budgets relax, again within a bounded number of ticks, never dropping.
    #    (Until the rate window has forgotten the slow tokens the SLO still reads violated.)
    source.latency_s = 0.03
    changed_at = snapshot(ctl)["ticks"]

    def relaxed_after_headroom(samples: list[dict[str, Any]]) -> bool:
        first = next((i for i, x in enumerate(samples) if x["signal"] == "headroom"), None)
        return first is not None and samples[-1]["budget"] > samples[first]["budget"]

    samples = drive(ctl, relaxed_after_headroom, timeout_s=25)
    samples = samples[next(i for i, x in enumerate(samples) if x["signal"] == "headroom"):]
    assert ticks_to_react(ctl, changed_at, "headroom", "relax") <= RELAX_AFTER + 1
    budgets = [s["budget"] for s in samples]
    assert budgets == sorted(budgets), f"not monotone with headroom: {budgets}"

    # 3. Steady latency inside the band → no change at all over many ticks.
    source.latency_s = 0.085
    drive(ctl, lambda s: len(s) >= 3 and all(x["signal"] == "within" for x in s[-3:]), 25)
    steady = snapshot(ctl)
    samples = drive(ctl, lambda s: s[-1]["ticks"] >= steady["ticks"] + 10, timeout_s=15)
    assert {s["version"] for s in samples} == {steady["version"]}, "policy changed in band"
    assert {s["signal"] for s in samples} == {"within"}

    assert ctl.metric("lynx_controller_decisions_total", {"direction": "tighten"}) >= 2
    assert ctl.metric("lynx_controller_decisions_total", {"direction": "relax"}) >= 1
    assert 0.0 < ctl.metric("lynx_controller_slo_attainment_ratio") < 1.0
    assert ctl.metric("lynx_controller_loop_degraded") == 0.0

    # 4. An SLO target the operator replaced leaves /metrics: no stale target or latency.
    ctl.admin.put("/v1/slo", json={"targets": [
        {"metric": "itl", "quantile": 0.9, "target_ms": 100}]}).raise_for_status()

    def only_the_new_target(_: object) -> bool:
        text = ctl.admin.get("/metrics").text
        return 'quantile="0.9"' in text and 'quantile="0.99"' not in text

    drive(ctl, only_the_new_target, 10)
    assert ctl.metric("lynx_controller_slo_target_seconds",
                      {"metric": "itl", "quantile": "0.9"}) == 0.1


@pytest.fixture
def source() -> Iterator[LatencySource]:
    src = LatencySource(latency_s=0.085)
    yield src
    src.close()


def register(metrics_url: str = "") -> Register:
    return Register(replica_id="loop-0", model="m", num_layers=2, num_experts=8, top_k=2,
                    policies=["off", "budget"], metrics_url=metrics_url)


def test_adaptive_loop_by_scraping_the_runtime(tmp_path: Path, source: LatencySource) -> None:
    with ControllerProcess.launch(tmp_path / "ctl", controller_overrides({})) as ctl:
        replica = FakeReplica(register(metrics_url=source.url), ctl.endpoint)
        try:
            run_scenario(ctl, source, replica)
        finally:
            replica.close()


@contextlib.contextmanager
def running_prometheus(workdir: Path, target_port: int | list[int], port: int | None = None
                       ) -> Iterator[str]:
    """A real Prometheus on 127.0.0.1 scraping ``target_port`` (or each of several) every
    second."""
    if not Path(PROMETHEUS).exists():
        pytest.skip("Prometheus binary not found (Debian: apt-get install prometheus)")
    port = port or free_tcp_port()
    ports = target_port if isinstance(target_port, list) else [target_port]
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: runtime\n    static_configs:\n"
        f"      - targets: {[f'127.0.0.1:{p}' for p in ports]}\n")
    with open(workdir / "prometheus.log", "wb") as log:
        process = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, (workdir / "prometheus.log").read_text()[-2000:]
            try:
                if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "Prometheus not ready after 30s"
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def prometheus(tmp_path: Path, source: LatencySource) -> Iterator[str]:
    with running_prometheus(tmp_path / "prometheus", source.port) as url:
        yield url


@pytest.mark.slow
def test_adaptive_loop_against_a_real_prometheus(tmp_path: Path, source: LatencySource,
                                                 prometheus: str) -> None:
    overrides = controller_overrides({"prometheus_url": prometheus,
                                      "label_selector": 'job="runtime"'})
    with ControllerProcess.launch(tmp_path / "ctl", overrides) as ctl:
        replica = FakeReplica(register(), ctl.endpoint)
        try:
            run_scenario(ctl, source, replica)
        finally:
            replica.close()


def test_unreachable_prometheus_degrades_then_recovers(tmp_path: Path,
                                                      source: LatencySource) -> None:
    if not Path(PROMETHEUS).exists():
        pytest.skip("Prometheus binary not found (Debian: apt-get install prometheus)")
    port = free_tcp_port()
    overrides = controller_overrides({"prometheus_url": f"http://127.0.0.1:{port}",
                                      "timeout_s": 5.0})  # a closed port fails at once
    overrides["loop"] = {"interval_s": 0.3, "backoff_s": [0.2, 0.4, 0.8]}
    with ControllerProcess.launch(tmp_path / "ctl", overrides) as ctl:
        before = snapshot(ctl)
        drive(ctl, lambda _: ctl.metric("lynx_controller_loop_degraded") == 1.0, 10)
        time.sleep(2.0)  # several failed ticks, backing off
        health = httpx.get(ctl.admin_url + "/healthz")
        assert health.status_code == 200 and health.json()["status"] == "degraded"
        assert "ObserveError" in health.json()["loop_error"]
        assert snapshot(ctl)["version"] == before["version"]  # policy held
        with running_prometheus(tmp_path / "prometheus", source.port, port):
            drive(ctl, lambda _: ctl.metric("lynx_controller_loop_degraded") == 0.0, 15)
            assert httpx.get(ctl.admin_url + "/healthz").json()["status"] == "ok"
            # Read the log while Prometheus still runs: the next tick after it stops
            # degrades the loop again, correctly, and would be counted here.
            log = ctl.log_text()
        # One line per episode, not one per failed tick (the loop failed several times).
        assert log.count("control loop degraded") == 1, log
        assert log.count("control loop recovered") == 1, log
