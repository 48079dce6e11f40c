"""Calibration through a real SGLang CPU server (issue 25): ``lynx-serve calibrate --server``
against a server in evaluation mode and its own controller gives the transformers path's
per-layer sensitivities, the same tables, and a ladder with the same rungs and costs."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from lynx.calibrate.ladder import build_ladder
from lynx.calibrate.tables import calibrate
from lynx.serving.cli import main
from lynx_policy.testing import DEFAULT_TOKEN, ControllerProcess
from lynx_protocol.ladder import PPL_RISE

MODEL = Path(__file__).resolve().parents[1] / "models" / "qwen3-moe-mini"
SMALL = ("--batches", "16", "--windows", "16", "--window-len", "48")
LADDER = {"means": [20.0, 12.0], "batches": (16,), "windows": 16, "window_len": 48,
          "heldout_windows": 16}


@pytest.mark.slow
def test_server_calibration_equals_the_transformers_path(server_factory, tmp_path: Path,
                                                         monkeypatch) -> None:
    with ControllerProcess.launch(tmp_path / "ctl", {"mode": "off"}) as ctl:
        server = server_factory("qwen3-moe-mini", {
            "LYNX_ENABLED": "1", "LYNX_EVALUATION": "prefill-as-decode",
            "LYNX_STATS_INTERVAL_S": "3600", **ctl.runtime_env()},
            ("--disable-radix-cache", "--dtype", "float32"))
        ladder, report = build_ladder(MODEL, **LADDER, server=(server.url, ctl.admin_url,
                                                                DEFAULT_TOKEN))
        monkeypatch.setenv("LYNX_ADMIN_TOKEN", DEFAULT_TOKEN)
        out = tmp_path / "policy.json"
        assert main(["calibrate", "qwen3-moe-mini", "--target-mean", "14", *SMALL,
                     "--server", server.url, "--controller-admin", ctl.admin_url,
                     "--out", str(out)]) == 0
    want_ladder, want_report = build_ladder(MODEL, **LADDER)
    (mine,), (theirs,) = report["per_batch"], want_report["per_batch"]
    for layer, (a, b) in enumerate(zip(mine["sensitivity_nats"], theirs["sensitivity_nats"],
                                       strict=True)):
        for m in b:  # fp32 on both sides: SGLang's CPU kernels vs transformers'
            assert a[m] == pytest.approx(b[m], abs=2e-4), (layer, m)
            assert mine["kept"][layer][m] == pytest.approx(theirs["kept"][layer][m], abs=0.05)
    assert any(v > 0.005 for row in mine["sensitivity_nats"] for v in row.values())
    assert [r.name for r in ladder.rungs] == [r.name for r in want_ladder.rungs]
    assert len(ladder.rungs) >= 2
    for got, want in zip(ladder.rungs, want_ladder.rungs, strict=True):
        (g,), (w,) = got.tables, want.tables
        assert g.per_layer == w.per_layer
        assert g.experts_computed == pytest.approx(w.experts_computed, abs=0.05)
        assert g.mass_kept == pytest.approx(w.mass_kept, abs=1e-3)
        assert g.cost(PPL_RISE) == pytest.approx(w.cost(PPL_RISE), abs=5e-4)
    # the one-policy command: the same tables as the transformers path
    want = calibrate(MODEL, 14.0, (16,), 16, 48)
    assert json.loads(out.read_text()) == msgspec.to_builtins(want["policy"])


def test_server_calibration_needs_its_controller(monkeypatch, capsys) -> None:
    monkeypatch.delenv("LYNX_ADMIN_TOKEN", raising=False)
    for extra in ((), ("--ladder",)):
        assert main(["calibrate", "qwen3-moe-mini", "--target-mean", "14", *extra,
                     "--server", "http://127.0.0.1:1"]) == 2
        assert "--controller-admin" in capsys.readouterr().err
    monkeypatch.setenv("LYNX_ADMIN_TOKEN", DEFAULT_TOKEN)
    assert main(["calibrate", "qwen3-moe-mini", "--target-mean", "14", *SMALL,
                 "--server", "http://127.0.0.1:1", "--controller-admin",
                 "http://127.0.0.1:1"]) == 2  # nothing listens: one line, no traceback
    err = capsys.readouterr().err
    assert "calibrate:" in err and "Traceback" not in err
