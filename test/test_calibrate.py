"""Per-layer budgets calibrated offline (`lynx.calibrate`, ``lynx-serve calibrate``)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from conftest import reference_model
from hypothesis import given, settings
from hypothesis import strategies as st

from lynx.calibrate import allocate, calibrated_policy, default_candidates
from lynx_protocol.policy import decode_policy_json, validate_policy

CANDIDATES = (4, 6, 8, 12, 16, 32)


@st.composite
def sensitivities(draw: st.DrawFn) -> list[dict[int, float]]:
    """Per layer, a loss rise that falls as the budget grows (as measured ones do)."""
    layers = draw(st.integers(1, 6))
    out = []
    for _ in range(layers):
        drops = draw(st.lists(st.floats(0.0, 1.0), min_size=len(CANDIDATES),
                              max_size=len(CANDIDATES)))
        rise, table = sum(drops), {}
        for m, drop in zip(CANDIDATES, drops, strict=True):
            table[m] = rise
            rise -= drop
        out.append(table)
    return out


@settings(max_examples=60, deadline=None)
@given(sensitivities(), st.floats(4.0, 32.0))
def test_allocation_stays_within_the_target_and_uses_the_candidates(
        sens: list[dict[int, float]], target: float) -> None:
    budgets = allocate(sens, target)
    assert len(budgets) == len(sens) and set(budgets) <= set(CANDIDATES)
    assert sum(budgets) <= target * len(sens) + 1e-9
    # a larger target never uses fewer experts in total
    more = allocate(sens, min(32.0, target + 4.0))
    assert sum(more) >= sum(budgets)


@settings(max_examples=60, deadline=None)
@given(sensitivities(), st.floats(4.0, 32.0), st.randoms(use_true_random=False))
def test_allocation_is_the_least_loss_table_within_the_target(
        sens: list[dict[int, float]], target: float, rnd: object) -> None:
    """Against brute force over every table, with costs below the budgets (a union cap)."""
    import itertools
    import math

    caps = [rnd.choice(CANDIDATES) for _ in sens]  # type: ignore[attr-defined]
    cost = [{m: float(min(m, cap)) for m in CANDIDATES} for cap in caps]
    budgets = allocate(sens, target, cost)
    spent = sum(c[m] for c, m in zip(cost, budgets, strict=True))
    assert spent <= target * len(sens) + 1e-9
    loss = sum(t[m] for t, m in zip(sens, budgets, strict=True))
    best = min(sum(t[m] for t, m in zip(sens, table, strict=True))
               for table in itertools.product(CANDIDATES, repeat=len(sens))
               if sum(c[m] for c, m in zip(cost, table, strict=True))
               <= math.floor(target * len(sens) + 1e-9))
    assert loss <= best + 1e-9


def test_a_budget_above_the_union_costs_only_the_union() -> None:
    sensitive = {4: 1.0, 6: 0.8, 8: 0.5, 12: 0.3, 16: 0.2, 32: 0.0}
    flat = {m: 0.0 for m in CANDIDATES}
    union_12 = {m: float(min(m, 12)) for m in CANDIDATES}  # the layer's steps use 12 experts
    assert allocate([sensitive, flat], 8.0) == [12, 4]  # charged by budget: 32 does not fit
    assert allocate([sensitive, flat], 8.0, [union_12, union_12]) == [32, 4]  # 12 + 4 <= 16


def test_the_sensitive_layer_gets_the_experts() -> None:
    flat = {m: 0.0 for m in CANDIDATES}
    steep = {4: 1.0, 6: 0.6, 8: 0.3, 12: 0.1, 16: 0.0, 32: 0.0}
    assert allocate([flat, steep, flat], target_mean=8.0) == [4, 16, 4]
    with pytest.raises(ValueError, match="below the cheapest table"):
        allocate([flat], target_mean=3.0)


def test_the_policy_is_one_the_plugin_and_controller_accept() -> None:
    policy = calibrated_policy([(16, [4, 16, 8, 8]), (64, [8, 8, 8, 8])], num_experts=32)
    validate_policy(policy, num_layers=4, num_experts=32, top_k=4)
    assert [b.max_batch for b in policy.budgets] == [3, 32, 1_000_000]  # 32 = sqrt(16 * 64)
    assert policy.budgets[0].all_layers == 32 and policy.budgets[1].per_layer == [4, 16, 8, 8]
    assert default_candidates(32, 4) == [4, 6, 8, 12, 16, 24, 32]


@pytest.mark.slow  # ~1 min: 2 batch sizes x 4 layers x 7 budgets on a real checkpoint
def test_calibrate_command_writes_a_per_layer_table_for_a_real_model(tmp_path) -> None:
    out = tmp_path / "policy.json"
    done = subprocess.run([sys.executable, "-m", "lynx.serving.cli", "calibrate",
                           str(reference_model("qwen3-moe-mini")), "--target-mean", "12",
                           "--windows", "16", "--window-len", "48", "--batches", "4,16",
                           "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    policy = decode_policy_json(out.read_text())
    validate_policy(policy, num_layers=4, num_experts=32, top_k=4)
    assert [b.max_batch for b in policy.budgets] == [3, 8, 1_000_000]  # 8 = sqrt(4 * 16)
    tables = [b.per_layer for b in policy.budgets[1:]]
    assert all(t is not None and len(t) == 4 for t in tables)
    means = [float(m) for m in re.findall(r"table: mean ([0-9.]+) experts computed", done.stderr)]
    assert len(means) == 2 and all(m <= 12 for m in means), done.stderr  # the target holds
    assert any(len(set(t or [])) > 1 for t in tables)  # the layers differ in sensitivity
    assert "per-layer NLL rise" in done.stderr
    bad = subprocess.run([sys.executable, "-m", "lynx.serving.cli", "calibrate", "qwen3-moe-mini",
                          "--target-mean", "2"], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "below the cheapest table" in bad.stderr
    assert json.loads(out.read_text())["name"] == "budget"


def test_a_ladder_is_deterministic_for_a_seed_and_pareto_ordered(tmp_path) -> None:
    """Two runs of the ladder calibration of a real checkpoint give the same file; every rung
    is measured at every batch, costs rise and experts fall along it, and the CLI writes it."""
    from lynx.calibrate.ladder import build_ladder
    from lynx_protocol.ladder import (
        PPL_RISE,
        encode_ladder,
        load_ladder,
        start_rung,
        validate_ladder,
    )

    folder = reference_model("qwen3-moe-mini")
    kwargs = {"means": [24, 16, 12], "batches": (4, 8), "windows": 8, "window_len": 24,
              "heldout_windows": 8, "seed": 3, "max_ppl_rise": 0.5}
    first, report = build_ladder(folder, **kwargs)
    second, _ = build_ladder(folder, **kwargs)
    assert encode_ladder(first) == encode_ladder(second)
    validate_ladder(first, num_layers=4, num_experts=32)
    assert first.rungs[0].name == "none" and len(first.rungs) >= 2
    assert [t.batch for t in first.rungs[1].tables] == [4, 8]
    measured = {name for entry in report["per_batch"] for name in entry["rungs"]}
    assert {r.name for r in first.rungs[1:]} | {d.name for d in first.dropped} == measured
    for table in first.rungs[-1].tables:
        assert table.cost(PPL_RISE) is not None and 0.0 < table.mass_kept < 1.0
        assert "heldout" in table.costs[0].source
    out = tmp_path / "ladder.json"
    done = subprocess.run([sys.executable, "-m", "lynx.serving.cli", "calibrate", str(folder),
                           "--ladder", "--means", "16,12", "--batches", "4", "--windows", "4",
                           "--window-len", "16", "--heldout-windows", "4", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    written = load_ladder(out)
    assert written.model.num_experts == 32 and "rung" in done.stderr
    # the start threshold is stored, and the CLI names the rung a runtime starts on
    assert written.threshold is not None and written.threshold.value == 0.01
    start = start_rung(written)
    assert start is not None and f"start rung: {start.name}" in done.stderr
    assert all((t.cost(PPL_RISE) or 0) <= 0.01 for t in start.tables)
