"""`SglangServer`'s process and temporary-file lifecycle, with a stand-in for
``sglang.launch_server`` that leaves in its temporary directory what SGLang leaves: IPC names
from ``NamedTemporaryFile(delete=False)`` and Prometheus multiprocess files (the real server's
case is in test_e2e_serving.py). Every stopped server used to leave about ten entries in /tmp:
hundreds per `make test`."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import pytest

from lynx.serving.server import ServeError, SglangServer, free_port

# Answers /health with 200 after leaving its files where SGLang leaves them; echoes its env.
FAKE_SERVER = """
import http.server, json, os, pathlib, sys, tempfile
tempfile.NamedTemporaryFile(delete=False)  # an SGLang IPC name
pathlib.Path(os.environ["PROMETHEUS_MULTIPROC_DIR"], "counter_1.db").write_bytes(b"x")
print(json.dumps({k: os.environ[k] for k in
                  ("TMPDIR", "PROMETHEUS_MULTIPROC_DIR", "TORCHINDUCTOR_CACHE_DIR")}), flush=True)
if sys.argv[2] == "die":
    sys.exit(3)
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
"""


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This process's temporary directory for the test: what a server leaves shows here."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    for name in ("PROMETHEUS_MULTIPROC_DIR", "TORCHINDUCTOR_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    return scratch


class FakeServer(SglangServer):
    mode: str = "serve"

    def command(self) -> list[str]:
        return [sys.executable, "-c", FAKE_SERVER, str(self.port), self.mode]


def _fake(tmp_path: Path, name: str, env: dict[str, str] | None = None) -> FakeServer:
    return FakeServer(tmp_path, free_port(), env=env or {}, log_path=tmp_path / f"{name}.log",
                      ready_timeout_s=30)


def _env_seen(server: SglangServer) -> dict[str, str]:
    assert server.log_path is not None
    line = server.log_path.read_text().splitlines()[0]
    return dict(json.loads(line))


def test_each_server_gets_its_own_scratch_and_stop_removes_it(
        tmp_path: Path, scratch: Path) -> None:
    first, second = _fake(tmp_path, "a"), _fake(tmp_path, "b")
    with first, second:
        dirs = [first.scratch_dir, second.scratch_dir]
        assert dirs[0] is not None and dirs[1] is not None and dirs[0] != dirs[1]
        for server, d in zip((first, second), dirs, strict=True):
            env = _env_seen(server)
            assert env["TMPDIR"] == str(d) and d.parent == scratch
            assert env["PROMETHEUS_MULTIPROC_DIR"] == str(d / "metrics")
            # inductor's cache stays where torch puts it for this user, shared and warm
            assert Path(env["TORCHINDUCTOR_CACHE_DIR"]).parent == scratch
            assert Path(env["TORCHINDUCTOR_CACHE_DIR"]).name.startswith("torchinductor_")
            assert (d / "metrics" / "counter_1.db").exists()
            assert len([p for p in d.iterdir() if p.name != "metrics"]) == 1  # the IPC name
    assert list(scratch.iterdir()) == []
    assert first.scratch_dir is None and second.scratch_dir is None


def test_a_server_that_dies_at_start_up_leaves_nothing(tmp_path: Path, scratch: Path) -> None:
    server = _fake(tmp_path, "c")
    server.mode = "die"
    with pytest.raises(ServeError, match="exited with code 3"):
        server.start()
    assert server.scratch_dir is None
    assert list(scratch.iterdir()) == []


def test_a_launch_that_fails_leaves_nothing(tmp_path: Path, scratch: Path) -> None:
    server = FakeServer(tmp_path, free_port(), log_path=tmp_path / "e.log")
    server.command = lambda: ["/nonexistent/python"]  # type: ignore[method-assign]
    with pytest.raises(FileNotFoundError):
        server.spawn()
    assert server.scratch_dir is None and list(scratch.iterdir()) == []


def test_an_operators_own_dirs_are_used_and_kept(
        tmp_path: Path, scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    own, cache = tmp_path / "prom", tmp_path / "inductor"
    own.mkdir()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))
    server = _fake(tmp_path, "d", env={"PROMETHEUS_MULTIPROC_DIR": str(own)})
    with server:
        env = _env_seen(server)
    assert env["PROMETHEUS_MULTIPROC_DIR"] == str(own)
    assert env["TORCHINDUCTOR_CACHE_DIR"] == str(cache)
    assert (own / "counter_1.db").exists()
    assert list(scratch.iterdir()) == []
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(cache)  # this process's env untouched


def test_a_port_taken_while_sglang_starts_is_reported_at_once(tmp_path: Path) -> None:
    """SGLang's HTTP server logs the bind error and its scheduler keeps running: the wait
    reads the log and stops with PortTaken instead of waiting out the ready timeout (240 s;
    a CI run lost a test to it: a controller started just before took the port)."""
    import time

    from lynx.serving.server import BIND_FAILED, PortTaken

    class Running:
        returncode = None

        def poll(self) -> None:
            return None

    log = tmp_path / "sglang.log"
    log.write_text(f"INFO: Application startup complete.\nERROR: [Errno 98] {BIND_FAILED} "
                   "('127.0.0.1', 1): address already in use\n")
    server = SglangServer(tmp_path, free_port(), log_path=log, process=Running())  # type: ignore[arg-type]
    start = time.monotonic()
    with pytest.raises(PortTaken, match="was taken by another process"):
        server.wait_ready()
    assert time.monotonic() - start < 10
    assert issubclass(PortTaken, ServeError)  # callers that catch ServeError still do
