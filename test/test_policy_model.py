"""The latency model: fitting, readiness, StepStats -> samples, persistence (no sockets)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from lynx_policy.model import (
    MIN_STEPS,
    FleetModel,
    MassPoint,
    Sample,
    expected_union,
    fit_latency,
    samples_from_stats,
)
from lynx_policy.modelstore import MODEL_FILE, ModelStore
from lynx_protocol.messages import LATENCY_EDGES_MS, DecodeBucket, Register, StepStats

EDGES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]


def synthetic(a: float, b: float, c: float, noise: float, seed: int = 0,
              outliers: int = 0) -> list[Sample]:
    rng = random.Random(seed)
    out = []
    for batch in (1, 4, 8, 16, 24, 32, 48, 64):
        for experts in (4, 8, 16, 24, 32):
            t = a + b * batch + c * experts
            out.append(Sample(batch, experts, t * (1 + rng.gauss(0, noise)), 20))
    for i in range(outliers):  # a GC pause / another tenant: 5x slower windows
        out[i * 7] = Sample(out[i * 7].batch, out[i * 7].experts, out[i * 7].latency_ms * 5, 20)
    return out


def test_fit_recovers_coefficients_and_reports_its_error() -> None:
    fit = fit_latency(synthetic(3.0, 0.5, 0.8, noise=0.02))
    assert fit.ready, fit.reason
    assert fit.a_ms == pytest.approx(3.0, abs=1.0)
    assert fit.b_ms_per_row == pytest.approx(0.5, rel=0.05)
    assert fit.c_ms_per_expert == pytest.approx(0.8, rel=0.05)
    assert 0 < fit.rmse_ms / fit.mean_ms < 0.05
    assert fit.predict(32, 16) == pytest.approx(3 + 16 + 12.8, rel=0.03)


def test_fit_is_robust_to_outlier_windows() -> None:
    plain = fit_latency(synthetic(3.0, 0.5, 0.8, noise=0.02, outliers=0))
    robust = fit_latency(synthetic(3.0, 0.5, 0.8, noise=0.02, outliers=3))
    # 3 of 40 windows 5x slow: least squares would move c by far more than 10%
    assert robust.c_ms_per_expert == pytest.approx(plain.c_ms_per_expert, rel=0.1)
    assert robust.b_ms_per_row == pytest.approx(plain.b_ms_per_row, rel=0.1)


def test_fit_keeps_costs_non_negative() -> None:
    # latency falls with m (nonsense, e.g. noise): c is clamped to 0 and the model not ready
    samples = [Sample(16, m, 50 - m, 30) for m in (4, 8, 16, 32)]
    fit = fit_latency(samples)
    assert fit.c_ms_per_expert == 0 and fit.b_ms_per_row >= 0
    assert not fit.ready and "pruning would not help" in fit.reason


def test_not_ready_without_spread_in_experts_or_steps() -> None:
    flat = [Sample(b, 30.0, 5 + 0.5 * b, 50) for b in (4, 16, 32, 64)]
    fit = fit_latency(flat)
    assert not fit.ready and "lynx-policy profile" in fit.reason
    few = [Sample(16, m, 5 + m, 1) for m in (4, 8, 16)]
    fit = fit_latency(few)
    assert not fit.ready and str(MIN_STEPS) in fit.reason
    assert not fit_latency([]).ready


def test_expected_union_bounds() -> None:
    assert expected_union(32, 4, 1) == pytest.approx(4)
    assert expected_union(32, 4, 0) == 0
    assert expected_union(128, 8, 64) < 128
    assert expected_union(128, 8, 64) > expected_union(128, 8, 16)


def bucket(max_batch: int, steps: int, ms: float, pruned: int = 0, kept: float = 0.0,
           union: float = 0.0, mass: float = 1.0, rows: int = 0) -> DecodeBucket:
    counts = [0] * (len(LATENCY_EDGES_MS) + 1)
    counts[5] = steps
    return DecodeBucket(max_batch=max_batch, steps=steps, latency_sum_ms=ms * steps,
                        latency_counts=counts, pruned_steps=pruned, experts_kept_mean=kept,
                        stock_union_mean=union, routing_mass_kept=mass, decode_rows_sum=rows)


def stats(buckets: list[DecodeBucket], seq: int = 1, replica: str = "r0") -> StepStats:
    return StepStats(replica_id=replica, seq=seq, window_s=1.0, batch_size_edges=EDGES,
                     batch_size_counts=[0] * 11, decode_steps=sum(b.steps for b in buckets),
                     prefill_steps=0, mixed_steps=0, experts_kept_mean=[],
                     stock_union_mean=[], routing_mass_kept=1.0, step_latency_p50_ms=0,
                     step_latency_p99_ms=0, applied_policy_version=1, decode_buckets=buckets)


def test_samples_from_stats_mixes_pruned_and_stock_steps() -> None:
    msg = stats([bucket(32, 10, 20.0, pruned=6, kept=8.0, union=24.0, mass=0.8, rows=280),
                 bucket(4, 5, 9.0)])
    samples, points = samples_from_stats(msg, num_experts=32, top_k=4)
    big, small = samples
    assert big.batch == 28 and big.steps == 10 and big.latency_ms == 20
    assert big.experts == pytest.approx((6 * 8 + 4 * 24) / 10)  # unpruned steps: measured union
    # no rows reported: geometric middle of (2, 4]; no pruned step: expected uniform union
    assert small.batch == pytest.approx((3 * 4) ** 0.5)
    assert small.experts == pytest.approx(expected_union(32, 4, small.batch))
    assert points == [MassPoint(28, 8.0, 24.0, 0.8, 6)]


def test_fleet_mass_kept_interpolates_and_is_unknown_below_evidence() -> None:
    fleet = FleetModel(fits=(fit_latency(synthetic(3, 0.5, 0.8, 0.01)),), num_experts=32,
                       top_k=4, mass_points=(MassPoint(32, 8.0, 24.0, 0.8, 10),),
                       largest_batch=64)
    assert fleet.union(32) == 24.0  # measured near 32
    assert fleet.mass_kept(32, 24) == 1.0
    assert fleet.mass_kept(32, 16) == pytest.approx(0.8 + 0.2 * (16 / 24 - 1 / 3) / (2 / 3))
    assert fleet.mass_kept(32, 4) is None
    assert fleet.union(2) == pytest.approx(expected_union(32, 4, 2))


def register(replica: str = "r0", experts: int = 32) -> Register:
    return Register(replica_id=replica, model="m", num_layers=4, num_experts=experts, top_k=4,
                    policies=["off", "budget"])


def training_stats(seed: int = 0) -> list[StepStats]:
    rng = random.Random(seed)
    out = []
    for i, (rows, m) in enumerate((r, m) for r in (4, 16, 32) for m in (8, 16, 24)):
        steps = 20
        out.append(stats([bucket(32 if rows > 16 else 16, steps,
                                 3 + 0.4 * rows + 0.6 * m + rng.gauss(0, 0.1), pruned=steps,
                                 kept=m, union=28, mass=0.7 + 0.01 * m, rows=rows * steps)],
                         seq=i + 1))
    return out


def test_store_learns_persists_and_reloads(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    assert store.ingest(register(), training_stats()) == 9
    fit = store.replicas["r0"].fit
    assert fit.ready and fit.c_ms_per_expert == pytest.approx(0.6, rel=0.1)
    store.save(force=True)
    again = ModelStore(tmp_path)
    assert again.replicas["r0"].fit == fit
    assert again.replicas["r0"].samples == store.replicas["r0"].samples
    fleet = again.fleet(["r0", "unknown"])
    assert fleet is not None and fleet.ready and fleet.largest_batch == 32
    # a different registration (another model behind the same id) starts afresh
    again.ingest(register(experts=64), training_stats()[:1])
    assert len(again.replicas["r0"].samples) == 1
    assert again.compare([("r0", training_stats()[0])])[16][1] is None  # not ready yet


def test_store_moves_an_unreadable_file_aside(tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / MODEL_FILE).write_text(json.dumps({"schema": 1, "replicas": {"r0": 5}}))
    store = ModelStore(tmp_path)
    assert store.replicas == {}
    assert (tmp_path / (MODEL_FILE + ".bad")).is_file()
    assert "learning afresh" in caplog.text


def test_compare_predicts_the_same_steps(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    store.ingest(register(), training_stats())
    rows = store.compare([("r0", s) for s in training_stats(seed=1)])
    for observed, predicted in rows.values():
        assert predicted is not None and predicted == pytest.approx(observed, rel=0.05)


RECORDING = Path(__file__).parent / "data" / "model_qwen3_moe_mini_wide16.json"
"""``model.json`` of a controller after ``lynx-policy profile`` against the widened fp32
qwen3-moe-mini served by SGLang's CPU engine (budgets off/16/8/4 x concurrency 1/8/24/48)."""


def test_fit_on_a_real_cpu_recording_predicts_held_out_windows(tmp_path: Path) -> None:
    (tmp_path / MODEL_FILE).write_bytes(RECORDING.read_bytes())
    record = next(iter(ModelStore(tmp_path).replicas.values()))
    train, held_out = record.samples[::2], record.samples[1::2]
    fit = fit_latency(train)
    assert fit.ready, fit.reason
    # more rows and more experts cost more; an expert is worth about a row here
    assert fit.b_ms_per_row > 0.5 and fit.c_ms_per_expert > 0.5
    error = sum(s.steps * abs(fit.predict(s.batch, s.experts) - s.latency_ms)
                for s in held_out) / sum(s.steps * s.latency_ms for s in held_out)
    assert error < 0.2, f"held-out relative error {error:.3f}"
    # pruning from the union (32) to 4 experts at 48 rows is predicted to save > 20%
    assert fit.predict(48, 4) < 0.8 * fit.predict(48, 32)
