"""Stock SGLang and SGLang + Lynx side by side on the CPU, the Lynx one steered by a real
policy controller (``lynx-policy``): one install, plugin off vs on, policies switched live
through the controller's admin API (no restarts between policies).

Both servers run on 127.0.0.1 with the project's CPU defaults plus ``EXTRA_ARGS``; the stock
server has ``LYNX_ENABLED=0`` (byte-for-byte stock SGLang).
"""

from __future__ import annotations

import contextlib
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from benchmark.common import Variant
from lynx.serving.metrics_reader import samples
from lynx.serving.server import SglangServer, free_port
from lynx_policy.testing import ControllerProcess

# --dtype float32: SGLang's "auto" turns a float32 checkpoint into float16 (slow on this CPU);
# a larger KV cap so 64 concurrent requests never get retracted.
EXTRA_ARGS: tuple[str, ...] = ("--dtype", "float32", "--max-total-tokens", "16384")
COUNTERS = ("lynx_experts_kept_total", "lynx_experts_stock_union_total",
            "lynx_routing_mass_kept_total", "lynx_routing_mass_total",
            "lynx_top1_kept_rows_total", "lynx_pruned_rows_total")


def process_group_cpu_s(server: SglangServer) -> float:
    """CPU seconds (user + system) used so far by every process of a server's process group:
    a cost measure far less sensitive than wall time to other tenants of a shared machine."""
    import os

    if server.process is None:
        return 0.0
    pgid = os.getpgid(server.process.pid)
    ticks = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields after the name: state ppid pgrp ... utime stime
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def wait_for(what: str, check: Callable[[], bool], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if check():
                return
        time.sleep(0.2)
    raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def metric_value(url: str, name: str, labels: dict[str, str] | None = None) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(v for lab, v in samples(text, name)
               if all(lab.get(k) == val for k, val in (labels or {}).items()))


@dataclass
class ServingPair:
    model_path: Path
    stock: SglangServer | None
    """None when launched ``with_stock=False`` (experiments on the Lynx server alone)."""
    lynx: SglangServer
    controller: ControllerProcess
    workdir: Path

    @classmethod
    @contextlib.contextmanager
    def launch(cls, model_path: Path, workdir: Path | None = None,
               controller_overrides: dict[str, Any] | None = None,
               extra_args: tuple[str, ...] = EXTRA_ARGS, threads: int = 1,
               with_stock: bool = True, extra_lynx_env: dict[str, str] | None = None
               ) -> Iterator[ServingPair]:
        """Start the controller, then both servers in parallel; stop everything on exit.
        ``threads``: torch/OpenMP threads per server (1: the two servers, the load generator
        and other tenants of a 2-core machine do not stall each other's OpenMP teams).
        ``extra_lynx_env``: extra environment of the Lynx server (e.g. ``LYNX_TIME_MOE``)."""
        tmp = None
        if workdir is None:
            tmp = tempfile.TemporaryDirectory(prefix="lynx-bench-")
            workdir = Path(tmp.name)
        overrides = {"mode": "static", "policy": {"name": "off"},
                     "loop": {"interval_s": 1.0, "backoff_s": [1.0, 2.0]},
                     **(controller_overrides or {})}
        controller = ControllerProcess.launch(workdir / "controller", overrides=overrides)
        common = {"OMP_NUM_THREADS": str(threads)}
        lynx_env = {**common, "LYNX_ENABLED": "1", "LYNX_CONTROLLER": controller.endpoint,
                    "LYNX_POLICY": '{"name":"off"}', "LYNX_STATS_INTERVAL_S": "0.5",
                    "LYNX_STALE_AFTER_S": "30", "LYNX_SAFE_POLICY": "keep",
                    "LYNX_REPLICA_ID": "bench-lynx", **(extra_lynx_env or {})}
        stock = SglangServer(model_path, free_port(), env={**common, "LYNX_ENABLED": "0"},
                             extra_args=extra_args, log_path=workdir / "sglang-stock.log",
                             ready_timeout_s=600)
        lynx = SglangServer(model_path, free_port(), env=lynx_env, extra_args=extra_args,
                            log_path=workdir / "sglang-lynx.log", ready_timeout_s=600)
        servers = [stock, lynx] if with_stock else [lynx]
        pair = cls(model_path, stock if with_stock else None, lynx, controller, workdir)
        try:
            errors: list[BaseException] = []

            def start(server: SglangServer) -> None:
                try:
                    server.start()
                except BaseException as exc:
                    errors.append(exc)

            starters = [threading.Thread(target=start, args=(s,)) for s in servers]
            for thread in starters:
                thread.start()
            for thread in starters:
                thread.join()
            if errors:
                raise errors[0]
            wait_for("the Lynx server to register with the controller",
                     lambda: len(controller.admin.get("/v1/replicas").json()["replicas"]) >= 1)
            yield pair
        finally:
            for server in servers:
                server.stop()
            controller.stop()
            if tmp is not None:
                tmp.cleanup()

    # -- policy -------------------------------------------------------------------------------
    def poke(self) -> None:
        """One tiny request: a staged policy takes effect at the next forward step, and the
        plugin's gauges and statistics window move only on steps."""
        with contextlib.suppress(httpx.HTTPError):
            httpx.post(f"{self.lynx.url}/generate", timeout=60, json={
                "text": "1+1=", "sampling_params": {"max_new_tokens": 1, "temperature": 0}})

    def _wait_version(self, version: int, timeout_s: float = 60.0) -> None:
        def applied() -> bool:
            self.poke()
            return metric_value(self.lynx.url, "lynx_policy_version") >= version

        wait_for(f"the runtime to apply policy version {version}", applied, timeout_s)

    def set_policy(self, variant: Variant) -> None:
        """Static mode with ``variant``'s policy, applied by the runtime before returning."""
        admin = self.controller.admin
        if admin.get("/v1/mode").json()["mode"] != "static":
            admin.put("/v1/mode", json={"mode": "static"}).raise_for_status()
        reply = admin.put("/v1/policy", content=variant.policy_json())
        reply.raise_for_status()
        self._wait_version(int(reply.json()["version"]))

    def pin_rung(self, rung: str) -> None:
        """Static mode with rung ``rung`` of the controller's ladder pinned
        (``PUT /v1/mode {"mode": "static", "rung": ...}``), applied by the runtime before
        returning."""
        reply = self.controller.admin.put("/v1/mode", json={"mode": "static", "rung": rung})
        reply.raise_for_status()
        self._wait_version(int(reply.json()["version"]))

    def set_mode(self, mode: str) -> None:
        """Change the controller's mode; waits (briefly) for the runtime to take the new
        version when the effective policy changes with it."""
        reply = self.controller.admin.put("/v1/mode", json={"mode": mode})
        reply.raise_for_status()
        with contextlib.suppress(TimeoutError):
            self._wait_version(int(reply.json()["version"]), timeout_s=10.0)

    def put(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        reply = self.controller.admin.put(path, json=body)
        reply.raise_for_status()
        return dict(reply.json())

    # -- statistics ---------------------------------------------------------------------------
    def lynx_counters(self) -> dict[str, float]:
        """Lynx's cumulative counters, after letting the statistics window close."""
        time.sleep(0.7)
        self.poke()  # the statistics window closes on a step
        time.sleep(0.7)
        text = httpx.get(f"{self.lynx.url}/metrics", timeout=10).text
        return {name: sum(v for _, v in samples(text, name)) for name in COUNTERS}


def counter_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    rows = delta["lynx_pruned_rows_total"]
    union = delta["lynx_experts_stock_union_total"]
    mass = delta["lynx_routing_mass_total"]
    return {
        **delta,
        "top1_kept_rate": delta["lynx_top1_kept_rows_total"] / rows if rows else 1.0,
        "kept_over_union": delta["lynx_experts_kept_total"] / union if union else 1.0,
        "mass_kept_rate": delta["lynx_routing_mass_kept_total"] / mass if mass else 1.0,
    }
