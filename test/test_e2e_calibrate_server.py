"""Calibration through a real SGLang CPU server (issue 25): ``lynx-serve calibrate --server``
against a server in evaluation mode and its own controller gives the transformers path's
per-layer sensitivities and the same tables."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from lynx.calibrate.tables import calibrate
from lynx.serving.cli import main
from lynx_policy.testing import DEFAULT_TOKEN, ControllerProcess

MODEL = Path(__file__).resolve().parents[1] / "models" / "qwen3-moe-mini"
ARGS = {"target_mean": 14.0, "batches": (16,), "windows": 16, "window_len": 48}


@pytest.mark.slow
def test_server_calibration_equals_the_transformers_path(server_factory, tmp_path: Path,
                                                         monkeypatch, capsys) -> None:
    with ControllerProcess.launch(tmp_path / "ctl", {"mode": "off"}) as ctl:
        server = server_factory("qwen3-moe-mini", {
            "LYNX_ENABLED": "1", "LYNX_EVALUATION": "prefill-as-decode",
            "LYNX_STATS_INTERVAL_S": "3600", **ctl.runtime_env()},
            ("--disable-radix-cache", "--dtype", "float32"))
        got = calibrate(MODEL, ARGS["target_mean"], ARGS["batches"], ARGS["windows"],
                        ARGS["window_len"], server=(server.url, ctl.admin_url, DEFAULT_TOKEN))
        monkeypatch.setenv("LYNX_ADMIN_TOKEN", DEFAULT_TOKEN)
        out = tmp_path / "policy.json"
        assert main(["calibrate", "qwen3-moe-mini", "--target-mean", "14", "--batches", "16",
                     "--windows", "16", "--window-len", "48", "--server", server.url,
                     "--controller-admin", ctl.admin_url, "--out", str(out)]) == 0
    want = calibrate(MODEL, ARGS["target_mean"], ARGS["batches"], ARGS["windows"],
                     ARGS["window_len"])
    assert got["path"].startswith("server ") and want["path"] == "transformers"
    (mine,), (theirs,) = got["per_batch"], want["per_batch"]
    for layer, (a, b) in enumerate(zip(mine["sensitivity_nats"], theirs["sensitivity_nats"],
                                       strict=True)):
        for m in b:  # fp32 on both sides: SGLang's CPU kernels vs transformers'
            assert a[m] == pytest.approx(b[m], abs=2e-4), (layer, m)
            assert mine["kept"][layer][m] == pytest.approx(theirs["kept"][layer][m], abs=0.05)
    assert any(v > 0.005 for row in mine["sensitivity_nats"] for v in row.values())
    assert mine["budgets"] == theirs["budgets"]
    assert json.loads(out.read_text()) == msgspec.to_builtins(got["policy"])


def test_server_calibration_needs_its_controller(monkeypatch, capsys) -> None:
    monkeypatch.delenv("LYNX_ADMIN_TOKEN", raising=False)
    assert main(["calibrate", "qwen3-moe-mini", "--target-mean", "14", "--server",
                 "http://127.0.0.1:1"]) == 2
    assert "--controller-admin" in capsys.readouterr().err
    assert main(["calibrate", "qwen3-moe-mini", "--ladder", "--server", "http://127.0.0.1:1",
                 "--controller-admin", "http://127.0.0.1:2"]) == 2
    assert "not built yet" in capsys.readouterr().err
