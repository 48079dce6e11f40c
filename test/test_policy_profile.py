"""``lynx-policy profile`` against a real controller process: refused budgets are skipped, and
the accepted ones are interleaved under one running load (not run one after another), so a
slow spell of a shared host cannot masquerade as the cost or the saving of pruning."""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from lynx_policy.profile import Admin, accepted_budgets, interleaved
from lynx_policy.testing import ControllerProcess


class _Generate(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = b'{"text": "ok"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def generate_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Generate)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def applied_policies(state_dir: Path) -> list[str]:
    out = []
    for line in (state_dir / "audit.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if entry["action"] == "put_policy" and entry["outcome"] == "applied":
            policy = entry["after"]["policy"]
            out.append("off" if policy.get("name") in (None, "off")
                       else str(policy["budgets"][0]["all_layers"]))
    return out


def test_refused_budgets_skipped_and_the_rest_interleaved(tmp_path: Path, generate_url: str,
                                                          capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    ctl = ControllerProcess.launch(tmp_path / "ctl", overrides={
        "mode": "static", "policy": {"name": "off"}, "floor": {"min_budget": 4}})
    try:
        admin = Admin(ctl.admin_url, ctl.token)
        assert accepted_budgets(admin, ["off", "8", "2", "4"]) == ["off", "8", "4"]
        assert "budget 2 skipped" in capsys.readouterr().err  # below the floor, with the reason
        args = argparse.Namespace(server_url=generate_url, seconds=0.6, slice_s=0.2,
                                  output_len=4)
        ok, failed = asyncio.run(interleaved(admin, ["off", "8", "4"], args, concurrency=2))
        assert ok > 0 and failed == 0
        cycled = applied_policies(tmp_path / "ctl" / "state")[2:]  # after 8, 4 (off: unchanged)
        # 1.8 s of load, a new budget every 0.2 s plus the PUT's own time (fsyncs on a busy
        # CI disk): back to the first budget at least once (slices shorter than --seconds),
        # always in order.
        assert len(cycled) >= 4, cycled
        assert cycled == (["off", "8", "4"] * len(cycled))[:len(cycled)], cycled
    finally:
        ctl.stop()
