"""Smoke tests of the benchmarks: `make bench-quick` end to end (its MoE-layer rows checked),
the plugin-overhead script, and the schema of ``benchmark/results/summary.json`` (the file
``make bench`` writes)."""

from __future__ import annotations

import json
import numbers
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SUMMARY = REPO / "benchmark" / "results" / "summary.json"
MOE_KEYS = {"shape": str, "E": int, "k": int, "batch": int, "policy": str,
            "knob": (int, float, str), "stock_ms": float, "lynx_ms": float, "speedup": float,
            "experts_stock": float,
            "experts_kept": float, "bound": float, "fraction_of_bound": float,
            "overhead_share": float, "default": bool}
E2E_KEYS = {"model": str, "concurrency": int, "policy": str, "knob": (int, float, str),
            "tpot_stock_ms": float, "tpot_lynx_ms": float, "tpot_ratio": float,
            "exact_match_stock": float, "exact_match_lynx": float, "ppl_stock": float,
            "ppl_lynx": float, "top1_kept_rate": float, "default": bool, "moe_share": float,
            "amdahl_bound": float}


def _check_row(row: dict[str, Any], spec: dict[str, Any], where: str) -> None:
    assert set(row) == set(spec), f"{where}: keys {sorted(row)} != {sorted(spec)}"
    for key, kind in spec.items():
        value = row[key]
        if kind is bool:
            ok = isinstance(value, bool)
        elif kind is float:  # any JSON number
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
        elif kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, kind) and not isinstance(value, bool)
        assert ok, f"{where}: {key}={value!r} is not {kind}"


SLO_RUN_KEYS = ("mode", "throughput_within_slo", "slo_attainment", "routing_mass_kept",
                "experts_kept_mean")


def check_summary(summary: dict[str, Any]) -> None:
    """The issue's summary.json schema, exactly; stock and Lynx numbers present and positive."""
    assert set(summary) == {"machine", "moe_layer", "e2e", "slo"}
    assert isinstance(summary["machine"], str) and summary["machine"]
    assert summary["moe_layer"], "no MoE-layer rows"
    for i, row in enumerate(summary["moe_layer"]):
        _check_row(row, MOE_KEYS, f"moe_layer[{i}]")
        assert row["stock_ms"] > 0 and row["lynx_ms"] > 0 and row["speedup"] > 0
        assert 0 < row["experts_kept"] <= row["E"] and 0 < row["experts_stock"] <= row["E"]
        assert row["bound"] > 0 and row["overhead_share"] >= 0
    assert summary["e2e"], "no end-to-end rows"
    for i, row in enumerate(summary["e2e"]):
        _check_row(row, E2E_KEYS, f"e2e[{i}]")
        assert row["tpot_stock_ms"] > 0 and row["tpot_lynx_ms"] > 0
        assert row["ppl_stock"] > 0 and row["ppl_lynx"] > 0
        assert 0 < row["moe_share"] <= 1 and row["amdahl_bound"] >= 1 - row["moe_share"]
        for key in ("exact_match_stock", "exact_match_lynx", "top1_kept_rate"):
            assert 0.0 <= row[key] <= 1.0, f"e2e[{i}].{key}={row[key]} not a fraction"
    slo = summary["slo"]
    assert {"slo_ms", "runs", "step_load"} <= set(slo) and slo["slo_ms"] > 0
    modes = {run["mode"] for run in slo["runs"]}
    assert {"adaptive", "off"} <= modes and any(m.startswith("static:") for m in modes), modes
    for run in slo["runs"]:  # one entry per repetition and mode
        assert set(SLO_RUN_KEYS) <= set(run), run
        assert run["throughput_within_slo"] >= 0 and 0 <= run["slo_attainment"] <= 1
        assert 0 < run["routing_mass_kept"] <= 1
        assert run["experts_kept_mean"] is None or run["experts_kept_mean"] > 0
    if slo["step_load"] is not None:
        assert set(slo["step_load"]) == {"interval_s", "time_to_slo_s", "time_to_unprune_s"}


def check_moe_layer_rows(rows: list[dict[str, Any]]) -> None:
    """The quick MoE-layer run: its shapes, batches and policies, every token's top-1 kept,
    nothing dropped at batch 1, never more experts than the stock union, a default row per
    shape and pruned batch whose weights-read bound is above 1."""
    assert {r["shape"].split()[0] for r in rows} == {"qwen3-moe-mini-wide16", "Qwen3-30B-A3B/4"}
    assert {r["batch"] for r in rows} == {1, 16, 64}
    assert {r["policy"] for r in rows} == {"budget", "affinity", "piggyback", "coverage"}
    for row in rows:
        _check_row({k: row[k] for k in MOE_KEYS}, MOE_KEYS, row["shape"])
        assert row["stock_ms"] > 0 and row["lynx_ms"] > 0, row
        assert row["top1_kept_rate"] == 1.0, row  # every token keeps its top-1 expert
        if row["batch"] == 1:
            assert row["experts_kept"] == row["experts_stock"] == row["k"], row
        else:
            assert row["experts_kept"] <= row["experts_stock"], row
    defaults = [r for r in rows if r["default"] and r["batch"] > 1]
    assert len(defaults) == 4 and all(r["bound"] > 1 for r in defaults), defaults


def test_summary_json_schema() -> None:
    if not SUMMARY.is_file():
        pytest.skip("no benchmark/results/summary.json yet: run `make bench-quick`")
    check_summary(json.loads(SUMMARY.read_text()))


def test_schema_check_rejects_missing_or_extra_fields() -> None:
    row = {k: 1.0 for k in E2E_KEYS} | {"model": "m", "policy": "budget", "knob": 4,
                                         "concurrency": 32, "default": True}
    summary = {"machine": "cpu", "e2e": [row], "slo": {"slo_ms": 1.0, "step_load": None,
                                                       "runs": [
        {"mode": m, "throughput_within_slo": 1.0, "slo_attainment": 1.0,
         "routing_mass_kept": 1.0, "experts_kept_mean": None}
        for m in ("adaptive", "off", "static:8")]},
        "moe_layer": [{k: 1.0 for k in MOE_KEYS} | {"shape": "s", "E": 8, "k": 2, "batch": 16,
                                                   "policy": "budget", "knob": 4,
                                                   "default": False}]}
    check_summary(summary)
    broken = json.loads(json.dumps(summary))
    del broken["e2e"][0]["ppl_lynx"]
    with pytest.raises(AssertionError):
        check_summary(broken)
    broken = json.loads(json.dumps(summary))
    broken["moe_layer"][0]["extra"] = 1
    with pytest.raises(AssertionError):
        check_summary(broken)
    broken = json.loads(json.dumps(summary))
    del broken["slo"]["runs"][0]["routing_mass_kept"]
    with pytest.raises(AssertionError):
        check_summary(broken)
    broken = json.loads(json.dumps(summary))
    broken["e2e"][0]["tpot_lynx_ms"] = 0.0
    with pytest.raises(AssertionError):
        check_summary(broken)
    broken = json.loads(json.dumps(summary))
    broken["e2e"][0]["amdahl_bound"] = None  # a run without MoE timing
    with pytest.raises(AssertionError):
        check_summary(broken)


def test_plugin_overhead_times_the_real_hooks_and_restores_them(tmp_path: Path) -> None:
    out = tmp_path / "overhead.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmark" / "plugin_overhead.py"),
                           "--steps", "300", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["topk_passthrough_us"] > 0 and result["forward_hook_us"] > 0
    assert result["per_step_us"] == pytest.approx(
        result["forward_hook_us"] + result["layers"] * result["topk_passthrough_us"], abs=0.05)
    assert "us per step with policy off" in done.stdout

    sys.path.insert(0, str(REPO))
    from benchmark import plugin_overhead
    before = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tempfile, "tempdir", str(scratch))
        plugin_overhead.measure(50)
    assert os.environ.get("PROMETHEUS_MULTIPROC_DIR") == before
    assert not list(scratch.glob("lynx-prom-*"))  # its multiprocess directory is gone


@pytest.mark.slow  # ~5 min: `make bench-quick`, every benchmark end to end (CI runs it)
def test_bench_quick_writes_every_result(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(REPO / "benchmark" / "run_all.py"), "--quick",
                           "--out-dir", str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=1800)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    check_summary(json.loads((tmp_path / "summary.json").read_text()))
    check_moe_layer_rows(json.loads((tmp_path / "moe_layer.json").read_text())["rows"])
    for name in ("moe_layer.png", "slo_ramp.png", "frontier.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    results = (tmp_path / "RESULTS.md").read_text()
    assert "Amdahl bound" in results and "Selection overhead" in results
    info = json.loads((tmp_path / "run_info.json").read_text())
    print(f"bench-quick took {info['elapsed_s'] / 60:.1f} min")  # the < 5 min budget: RESULTS
