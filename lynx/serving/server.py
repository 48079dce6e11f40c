"""Start, probe and stop an SGLang server on the CPU default (a real ``sglang.launch_server``).

CPU default flags and why:
- ``SGLANG_USE_CPU_ENGINE=1`` + ``--device cpu``: SGLang's CPU engine is opt-in.
- ``--attention-backend torch_native``: the x86 default (intel_amx) needs the AMX sgl_kernel build.
- ``--max-total-tokens 4096``: without a cap the default KV cache takes ~14.5 GB of RAM.
- ``--sleep-on-idle``: otherwise the idle scheduler spins a whole core.
- ``--enable-metrics``: Prometheus ``/metrics`` (latency histograms the controller reads).
- ``--bucket-inter-token-latency`` (`LATENCY_BUCKET_FLAGS`): buckets 9% apart from 1 ms to
  8.2 s for the inter-token and per-request TPOT histograms, SGLang's default edges among
  them. SGLang's default alone jumps 40 -> 60 -> 80 -> 100 -> 200 ms, so a quantile inside
  one of those buckets is an interpolation the controller cannot confirm a miss or a meet
  from (`lynx_policy.quantiles.bucket_bounds`).

Each server runs with its own scratch directory as ``TMPDIR``, removed when it stops: SGLang
names its IPC sockets with ``NamedTemporaryFile(delete=False)`` and removes its Prometheus
multiprocess directory only at a clean interpreter exit, so every stopped server left about ten
entries in /tmp. The multiprocess directory is ``<scratch>/metrics`` unless the operator set
``PROMETHEUS_MULTIPROC_DIR``; inductor's cache stays where it was (``TORCHINDUCTOR_CACHE_DIR``).
"""

from __future__ import annotations

import contextlib
import getpass
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

SGLANG_ITL_BUCKETS_S: tuple[float, ...] = (
    0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.025, 0.03, 0.035, 0.04, 0.06, 0.08, 0.1,
    0.2, 0.4, 0.6, 0.8, 1.0, 2.0, 4.0, 6.0, 8.0)
"""SGLang 0.5.23's default inter-token (and TPOT) buckets [s]
(``sglang.srt.observability.metrics_collector``)."""
LATENCY_BUCKETS_S: tuple[float, ...] = tuple(sorted(
    {float(f"{0.001 * 2 ** (k / 8):.4g}") for k in range(105)} | set(SGLANG_ITL_BUCKETS_S)))
"""Inter-token (and TPOT) histogram buckets [s]: 1 ms x 2^(k/8), k = 0..104 (1 ms to 8.19 s,
each 9% above the one before; module doc), and SGLang's default edges: a fleet half on each
layout during a rolling restart shares SGLang's edges, which the controller merges at
(`lynx_policy.quantiles.common_edges`)."""
LATENCY_BUCKET_FLAGS: tuple[str, ...] = ("--bucket-inter-token-latency",
                                         *(f"{b:g}" for b in LATENCY_BUCKETS_S))
"""What every SGLang server Lynx starts or deploys exports its latency histograms with."""

CPU_DEFAULT_FLAGS: tuple[str, ...] = (
    "--device", "cpu",
    "--attention-backend", "torch_native",
    "--max-total-tokens", "4096",
    "--sleep-on-idle",
    "--enable-metrics",
    *LATENCY_BUCKET_FLAGS,
)


DECODE_BOUND_FLAGS: tuple[str, ...] = ("--dtype", "float32", "--max-total-tokens", "16384",
                                       "--max-running-requests", "32")
"""The decode-bound testbed's flags (widened fp32 checkpoints): a KV pool for 32 full
requests instead of the default 4,096 tokens (~8)."""


class ServeError(RuntimeError):
    """The server could not be started or did not become ready; the message is one line."""


class PortTaken(ServeError):
    """Another process bound the server's port between the check and SGLang's bind: SGLang
    logs the bind error and keeps its scheduler running, so only its log tells."""


BIND_FAILED = "error while attempting to bind on address"
"""What SGLang's HTTP server (uvicorn) logs when its port is taken."""


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _inductor_cache_dir() -> str:
    """Where torch's inductor caches by default (``torch._inductor.runtime.cache_dir_utils``:
    ``<tempdir>/torchinductor_<user>``), so a server with its own TMPDIR keeps a warm cache.
    Not imported from torch: that import costs ~3 s in launchers that have no torch otherwise
    (`lynx-serve`, the demo)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid_{os.getuid()}"
    user = re.sub(r'[\\/:*?"<>|]', "_", user)
    return str(Path(tempfile.gettempdir()) / f"torchinductor_{user}")


@dataclass
class SglangServer:
    """One ``sglang.launch_server`` process on the CPU default; use as a context manager."""

    model_path: Path
    port: int
    host: str = "127.0.0.1"
    extra_args: Sequence[str] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    log_path: Path | None = None
    ready_timeout_s: float = 240.0
    process: subprocess.Popen[bytes] | None = None
    scratch_dir: Path | None = field(default=None, init=False)  # its TMPDIR, removed at stop

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "sglang.launch_server",
            "--model-path", str(self.model_path),
            "--host", self.host, "--port", str(self.port),
            *CPU_DEFAULT_FLAGS, *self.extra_args,
        ]

    def start(self) -> SglangServer:
        """Launch the server and wait until it answers /health (ServeError otherwise)."""
        self.spawn()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def spawn(self) -> SglangServer:
        """Launch the server process without waiting for it (then `wait_ready`): several
        servers then start side by side."""
        if not port_is_free(self.host, self.port):
            raise ServeError(f"port {self.port} on {self.host} is busy; pick another with --port")
        self.scratch_dir = Path(tempfile.mkdtemp(prefix=f"lynx-sglang-{self.port}-"))
        (self.scratch_dir / "metrics").mkdir()
        # defaults the caller's environment may override; then what this server must have
        env = {"PROMETHEUS_MULTIPROC_DIR": str(self.scratch_dir / "metrics"),
               "TORCHINDUCTOR_CACHE_DIR": _inductor_cache_dir(),
               **os.environ, "TMPDIR": str(self.scratch_dir), "SGLANG_USE_CPU_ENGINE": "1",
               "LYNX_METRICS_URL": f"{self.url}/metrics", **self.env}
        log = self.log_path or Path(f"/tmp/lynx-sglang-{self.port}.log")
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log
        try:
            with log.open("wb") as fh:
                self.process = subprocess.Popen(
                    self.command(), stdout=fh, stderr=subprocess.STDOUT, env=env,
                    start_new_session=True,
                )
        except BaseException:
            self.stop()  # removes the scratch directory
            raise
        return self

    def wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServeError(
                    f"sglang exited with code {self.process.returncode} during start-up; "
                    f"last log lines:\n{self.log_tail()}"
                )
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.log_path is not None and self.log_path.exists() and \
                    BIND_FAILED in self.log_path.read_text(errors="replace"):
                raise PortTaken(f"port {self.port} on {self.host} was taken by another process "
                                f"while sglang started; see {self.log_path}")
            time.sleep(0.5)
        raise ServeError(f"sglang not ready after {self.ready_timeout_s:.0f}s; see {self.log_path}")

    def log_tail(self, lines: int = 15) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace").splitlines()
        kept = [line for line in text if "is ignored" not in line]
        return "\n".join(kept[-lines:])

    def stop(self, timeout_s: float = 20.0) -> None:
        """Stop the server and all its children by process group (pid of the launcher), then
        remove the scratch directory (its TMPDIR) `spawn` made for it."""
        try:
            self._stop_process(timeout_s)
        finally:
            if self.scratch_dir is not None:
                shutil.rmtree(self.scratch_dir, ignore_errors=True)
                self.scratch_dir = None

    def _stop_process(self, timeout_s: float) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        pgid = os.getpgid(self.process.pid)
        os.killpg(pgid, signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.process.wait(timeout=timeout_s)
        with contextlib.suppress(ProcessLookupError):  # children share the process group
            os.killpg(pgid, signal.SIGKILL)

    def __enter__(self) -> SglangServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
