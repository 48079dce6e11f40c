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


PARETO_RUN_KEYS = {"mode", "target", "rep", "attainment", "goodput", "quality_cost_ppl",
                   "mass_kept"}
TESTBED_KEYS = {"model", "concurrency", "moe_share_f", "moe_speedup_s", "amdahl_bound",
                "tpot_ratio", "ppl_rise"}


def check_pareto_run(run: dict[str, Any]) -> None:
    assert set(run) == PARETO_RUN_KEYS, run
    assert run["mode"] in ("off", "adaptive") or run["mode"].startswith("static:"), run
    assert 0 <= run["attainment"] <= 1 and run["goodput"] >= 0, run
    assert run["quality_cost_ppl"] is None or run["quality_cost_ppl"] >= -0.01, run
    assert 0 < run["mass_kept"] <= 1, run
    if run["mode"] == "off":
        assert run["quality_cost_ppl"] in (0.0, None) and run["mass_kept"] == 1.0, run


def check_summary(summary: dict[str, Any]) -> None:
    """The issue's summary.json schema, exactly; stock and Lynx numbers present and positive."""
    assert set(summary) - {"testbed"} == {"machine", "moe_layer", "e2e", "slo_pareto"}
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
    pareto = summary["slo_pareto"]
    assert set(pareto) == {"targets_ms", "runs", "nonstationary", "step_load"}
    targets = pareto["targets_ms"]
    assert set(targets) == {"loose", "medium", "tight"} and all(v > 0 for v in targets.values())
    assert targets["loose"] >= targets["medium"] >= targets["tight"], targets
    modes = {(run["mode"], run["target"]) for run in pareto["runs"]}
    for target in targets:  # off and a static scored against every target, adaptive per target
        assert {("off", target), ("adaptive", target)} <= modes, modes
        assert any(m.startswith("static:") and t == target for m, t in modes), modes
    for run in pareto["runs"] + pareto["nonstationary"]["runs"]:
        check_pareto_run(run)
    assert pareto["nonstationary"]["runs"]
    if pareto["step_load"] is not None:
        assert set(pareto["step_load"]) == {"interval_s", "time_to_slo_s", "time_to_unprune_s"}
    if "testbed" in summary:
        assert set(summary["testbed"]) == TESTBED_KEYS


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
    runs = [{"mode": m, "target": t, "rep": 0, "attainment": 0.9, "goodput": 1.0,
             "quality_cost_ppl": 0.0, "mass_kept": 1.0}
            for m in ("adaptive", "off", "static:m48") for t in ("loose", "medium", "tight")]
    summary = {"machine": "cpu", "e2e": [row], "slo_pareto": {
        "targets_ms": {"loose": 3.0, "medium": 2.0, "tight": 1.0}, "runs": runs,
        "nonstationary": {"runs": runs[:1]}, "step_load": None},
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
    del broken["slo_pareto"]["runs"][0]["mass_kept"]
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
@pytest.mark.serial  # it profiles latency and plans from it: a neighbour's load would skew it
def test_bench_quick_writes_every_result(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(REPO / "benchmark" / "run_all.py"), "--quick",
                           "--out-dir", str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=1800)
    # A quick profile that leaves no latency model (noise on a 2-core machine: 3 of 5 runs on
    # 2026-12-07, 1 of 2 on 12-08) no longer ends the run; it is reported (below). On a failure,
    # the whole text (pytest.fail: an assert's message would be cut to a few lines).
    if done.returncode != 0:
        pytest.fail(f"run_all --quick exit {done.returncode}\n--- stdout\n{done.stdout[-6000:]}"
                    f"\n--- stderr\n{done.stderr[-4000:]}", pytrace=False)
    pareto = json.loads((tmp_path / "slo_pareto.json").read_text())
    if pareto["profile"]["rc"] != 0:
        assert "The latency profile left no model" in (tmp_path / "RESULTS.md").read_text()
    check_summary(json.loads((tmp_path / "summary.json").read_text()))
    check_moe_layer_rows(json.loads((tmp_path / "moe_layer.json").read_text())["rows"])
    for name in ("moe_layer.png", "slo_pareto.png", "frontier.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    results = (tmp_path / "RESULTS.md").read_text()
    assert "Amdahl bound" in results and "Selection overhead" in results
    info = json.loads((tmp_path / "run_info.json").read_text())
    print(f"bench-quick took {info['elapsed_s'] / 60:.1f} min")  # the < 5 min budget: RESULTS
