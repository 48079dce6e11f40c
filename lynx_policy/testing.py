"""Run a real controller process for tests, benchmarks and demos (cf. kopf's KopfRunner).

    with ControllerProcess.launch(tmp_path, overrides={"mode": "static"}) as ctl:
        ctl.admin.put("/v1/policy", json={...})

The controller is started as ``python -m lynx_policy.cli serve`` with a JSON config in a
private directory (state, audit log, ipc socket, log file), on a free loopback port.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

DEFAULT_TOKEN = "lynx-test-token-0123456789abcdef"


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(what: str, check: Callable[[], bool], timeout_s: float = 30.0) -> None:
    """Poll ``check`` every 0.25 s; AssertionError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout_s}s waiting for: {what}")


def deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


@dataclass
class ControllerProcess:
    workdir: Path
    config: dict[str, Any]
    token: str = DEFAULT_TOKEN
    process: subprocess.Popen[bytes] | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    fd_limit: int | None = None
    """Soft and hard RLIMIT_NOFILE of the controller process (None: inherited)."""

    @classmethod
    def launch(cls, workdir: Path, overrides: dict[str, Any] | None = None,
               token: str = DEFAULT_TOKEN, timeout_s: float = 30.0, *,
               curve: bool = False, fd_limit: int | None = None) -> ControllerProcess:
        """Start a controller in ``workdir``. ``curve``: the link on ``tcp://127.0.0.1`` sealed
        with CURVE, keys generated under ``workdir/keys`` (see `runtime_env`); else ipc://."""
        workdir.mkdir(parents=True, exist_ok=True)
        link: dict[str, Any] = {"bind": f"ipc://{workdir}/link.sock", "replica_stale_s": 5.0}
        if curve:
            from lynx_protocol.security import generate_keypair

            keys = workdir / "keys"
            if not (keys / "controller.key_secret").exists():
                generate_keypair(keys, "controller")
                public, _ = generate_keypair(keys, "runtime")
                (keys / "clients").mkdir()
                (keys / "clients" / public.name).write_bytes(public.read_bytes())
            link.update(bind=f"tcp://127.0.0.1:{free_tcp_port()}",
                        curve_server_secret=str(keys / "controller.key_secret"),
                        curve_clients_dir=str(keys / "clients"))
        base = {
            "link": link,
            "admin": {"host": "127.0.0.1", "port": free_tcp_port(), "health_cache_s": 0.0},
            "state": {"dir": str(workdir / "state")},
            "loop": {"interval_s": 0.5, "backoff_s": [0.5, 1.0]},
        }
        runner = cls(workdir, deep_merge(base, overrides or {}), token, fd_limit=fd_limit)
        runner.start(timeout_s)
        return runner

    @property
    def config_path(self) -> Path:
        return self.workdir / "controller.json"

    @property
    def log_path(self) -> Path:
        return self.workdir / "controller.log"

    @property
    def endpoint(self) -> str:
        return str(self.config["link"]["bind"])

    def runtime_env(self) -> dict[str, str]:
        """The plugin's environment for this controller (CURVE keys when it has them)."""
        env = {"LYNX_CONTROLLER": self.endpoint}
        link = self.config["link"]
        if link.get("curve_server_secret"):
            keys = Path(link["curve_server_secret"]).parent
            env.update(LYNX_CURVE_CLIENT_KEY=str(keys / "runtime.key_secret"),
                       LYNX_CURVE_SERVER_KEY=str(keys / "controller.key"))
        return env

    @property
    def admin_url(self) -> str:
        admin = self.config["admin"]
        scheme = "https" if admin.get("tls_cert_file") else "http"
        return f"{scheme}://{admin['host']}:{admin['port']}"

    @property
    def state_dir(self) -> Path:
        return Path(self.config["state"]["dir"])

    @property
    def admin(self) -> httpx.Client:
        """A client that sends the bearer token (a fresh one per access; close not needed)."""
        tls = self.config["admin"].get("tls_cert_file")
        return httpx.Client(base_url=self.admin_url, timeout=10.0, verify=tls or True,
                            headers={"Authorization": f"Bearer {self.token}",
                                     "X-Lynx-Actor": "test"})

    def start(self, timeout_s: float = 30.0) -> None:
        self.config_path.write_text(json.dumps(self.config, indent=2))
        env = {**os.environ, "LYNX_ADMIN_TOKEN": self.token, **self.extra_env}
        env = {k: v for k, v in env.items() if not k.startswith("LYNX_POLICY__")}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "lynx_policy.cli", "serve", "--config",
                 str(self.config_path)],
                stdout=log, stderr=subprocess.STDOUT, env=env,
                preexec_fn=None if self.fd_limit is None else self._limit_fds)
        self.wait_healthy(timeout_s)

    def _limit_fds(self) -> None:
        import resource

        assert self.fd_limit is not None
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.fd_limit, self.fd_limit))

    def wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"controller exited with {self.process.returncode}:\n"
                                   f"{self.log_text()[-3000:]}")
            try:
                if self.admin.get("/healthz", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"controller not healthy after {timeout_s}s:\n"
                           f"{self.log_text()[-3000:]}")

    def stop(self, timeout_s: float = 15.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def kill(self) -> None:
        """SIGKILL: no cleanup at all, as in a crash."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def restart(self, timeout_s: float = 30.0) -> None:
        self.stop()
        self.start(timeout_s)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Current value of one sample from the controller's /metrics."""
        text = self.admin.get("/metrics", timeout=5.0).text
        wanted = ",".join(f'{k}="{v}"' for k, v in sorted((labels or {}).items()))
        target = f"{name}{{{wanted}}}" if wanted else name
        for line in text.splitlines():
            if line.startswith(target + " "):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(f"{target} not in /metrics")

    def __enter__(self) -> ControllerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class LatencySource:
    """A runtime-like ``/metrics`` endpoint whose inter-token latency the test sets.

    A background thread observes ``latency_s`` into ``sglang:inter_token_latency_seconds``
    ``rate_hz`` times per second, so the histogram's recent quantiles follow ``latency_s``
    (500/s: a 3 s window holds enough samples for a P99, ``observe.min_tail_samples``).
    """

    BUCKETS = (0.02, 0.04, 0.08, 0.09, 0.15, 0.3, 0.6)

    def __init__(self, latency_s: float, rate_hz: float = 500.0,
                 buckets: tuple[float, ...] | None = None, port: int | None = None) -> None:
        """``buckets``: the histogram's layout (`BUCKETS` by default); ``port``: e.g. a
        stopped source's, to restart it in place (a free one by default)."""
        from prometheus_client import CollectorRegistry, Histogram, start_http_server

        self.latency_s = latency_s
        self.registry = CollectorRegistry()
        self.histogram = Histogram("sglang:inter_token_latency_seconds", "test-controlled ITL",
                                   ["model_name"], buckets=buckets or self.BUCKETS,
                                   registry=self.registry)
        self.port = port or free_tcp_port()
        self._server, _ = start_http_server(self.port, addr="127.0.0.1", registry=self.registry)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._observe, args=(rate_hz,), daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/metrics"

    def _observe(self, rate_hz: float) -> None:
        # Observations follow the wall clock, not the number of wake-ups: a thread starved on
        # a busy machine catches up, so the window's sample count stays ~rate_hz per second.
        child = self.histogram.labels(model_name="test")
        due = time.monotonic()
        while not self._stop.wait(0.01):
            behind = int((time.monotonic() - due) * rate_hz)
            for _ in range(behind):
                child.observe(self.latency_s)
            due += behind / rate_hz

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._server.shutdown()
        self._server.server_close()  # free the port, e.g. for a restart in place


class FakeReplica:
    """A RuntimeLink pumped by a thread like a scheduler loop, sending StepStats periodically.

    Applies every update it receives (``applied``) and reports a fixed decode batch size.
    """

    def __init__(self, registration: Any, endpoint: str, batch_size: int = 32,
                 stats_every_s: float = 0.5) -> None:
        from lynx_protocol.link import LinkSettings, RuntimeLink

        self.registration = registration
        self.link = RuntimeLink(registration, LinkSettings(endpoint=endpoint, heartbeat_s=0.2,
                                                           staleness_s=3.0))
        self.batch_size = batch_size
        self.stats_every_s = stats_every_s
        self.applied: list[Any] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from lynx_protocol.messages import StepStats

        seq = 0
        next_stats = time.monotonic()
        layers = self.registration.num_layers
        while not self._stop.wait(0.01):
            update = self.link.poll_update()
            if update is not None:
                self.applied.append(update)
                self.link.mark_acknowledged(update.version)
                self.link.mark_applied(update.version)
            if time.monotonic() >= next_stats and self.link.registered:
                seq += 1
                next_stats = time.monotonic() + self.stats_every_s
                version = self.applied[-1].version if self.applied else 0
                self.link.send(StepStats(
                    replica_id=self.registration.replica_id, seq=seq,
                    window_s=self.stats_every_s, batch_size_edges=[self.batch_size],
                    batch_size_counts=[50, 0], decode_steps=50, prefill_steps=0,
                    mixed_steps=0, experts_kept_mean=[4.0] * layers,
                    stock_union_mean=[6.0] * layers, routing_mass_kept=0.95,
                    step_latency_p50_ms=20.0, step_latency_p99_ms=40.0,
                    applied_policy_version=version))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.link.close()
