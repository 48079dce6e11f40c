"""`SglangServer`'s process and temporary-file lifecycle, with a stand-in for
``sglang.launch_server`` that writes Prometheus multiprocess files the way SGLang's workers do
(the real server's case is in test_e2e_serving.py). Every stopped server used to leave its
multiprocess directory in /tmp: about a thousand of them a day on a developer's machine."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pytest

from lynx.serving.server import ServeError, SglangServer, free_port

# Answers /health with 200 and writes a metrics file where SGLang's workers write theirs.
FAKE_SERVER = """
import http.server, os, pathlib, sys
pathlib.Path(os.environ["PROMETHEUS_MULTIPROC_DIR"], "counter_1.db").write_bytes(b"x")
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
    return scratch


class FakeServer(SglangServer):
    mode: str = "serve"

    def command(self) -> list[str]:
        return [sys.executable, "-c", FAKE_SERVER, str(self.port), self.mode]


def test_each_server_gets_its_own_metrics_dir_and_stop_removes_it(
        tmp_path: Path, scratch: Path) -> None:
    first = FakeServer(tmp_path, free_port(), log_path=tmp_path / "a.log", ready_timeout_s=30)
    second = FakeServer(tmp_path, free_port(), log_path=tmp_path / "b.log", ready_timeout_s=30)
    with first, second:
        dirs = [first.metrics_dir, second.metrics_dir]
        assert dirs[0] is not None and dirs[1] is not None and dirs[0] != dirs[1]
        for d in dirs:  # the process wrote into the directory it was given
            assert d is not None and (d / "counter_1.db").exists()
    assert all(d is not None and d.parent == scratch for d in dirs)
    assert list(scratch.iterdir()) == []
    assert first.metrics_dir is None and second.metrics_dir is None


def test_a_server_that_dies_at_start_up_leaves_no_metrics_dir(
        tmp_path: Path, scratch: Path) -> None:
    server = FakeServer(tmp_path, free_port(), log_path=tmp_path / "c.log", ready_timeout_s=30)
    server.mode = "die"
    with pytest.raises(ServeError, match="exited with code 3"):
        server.start()
    assert server.metrics_dir is None
    assert list(scratch.iterdir()) == []


def test_an_operators_own_multiproc_dir_is_used_and_kept(tmp_path: Path, scratch: Path) -> None:
    own = tmp_path / "prom"
    own.mkdir()
    server = FakeServer(tmp_path, free_port(), env={"PROMETHEUS_MULTIPROC_DIR": str(own)},
                        log_path=tmp_path / "d.log", ready_timeout_s=30)
    with server:
        assert server.metrics_dir is None
    assert (own / "counter_1.db").exists()
    assert list(scratch.iterdir()) == []
