"""A ladder from shadow statistics (`lynx.calibrate.shadow_ladder`): the recorder measures live
decode steps of a real checkpoint's router (Qwen3-30B-A3B's values), the builder allocates
per-layer tables at each mean and orders them by routing mass lost; the controller reads the
ladder's cost kind."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest
import torch
from conformance_configs import BY_NAME, draw_inputs

from lynx.calibrate.shadow_ladder import ShadowError, ladder_from_shadow, read_shadow
from lynx.serving.cli import main
from lynx.sglang_plugin.shadow import ShadowRecorder
from lynx.sglang_plugin.step_state import RuntimeState, StepLayout
from lynx_policy.rungs import expected_quality_cost
from lynx_protocol.ladder import MASS_LOST, PPL_RISE, decode_ladder, encode_ladder, rung_policy
from lynx_protocol.policy import PolicySpec

MODEL = BY_NAME["Qwen3-30B-A3B"]
LAYERS = 3
SKEW = (4.0, 1.5, 0.5)  # layer 0 routes most concentrated, layer 2 flattest


def record(path: Path, steps: int, seed: int = 0, dense: int = 0) -> Path:
    """``steps`` decode steps at 24 and at 48 rows through the recorder, three MoE layers
    whose routers concentrate differently, after ``dense`` layers with no router (as
    DeepSeek-V3's first three: the hook never sees them)."""
    state = RuntimeState(dense + LAYERS, MODEL.experts, MODEL.top_k, torch.device("cpu"),
                         PolicySpec(name="off"))
    state.shadow = True
    recorder = ShadowRecorder(state, path, 3600.0)
    for step in range(steps):
        for rows in (24, 48):
            state.begin_step(StepLayout("decode", rows, 0))
            for layer, skew in enumerate(SKEW):
                logits, _ = draw_inputs(MODEL, rows, seed * 100_000 + step * 10 + layer, skew)
                recorder.observe(dense + layer, logits, MODEL.spec(), None, None)
    recorder.write_now()
    return path


def test_a_shadow_ladder_orders_rungs_by_mass_lost_and_spends_experts_where_it_pays(
        tmp_path: Path) -> None:
    data = read_shadow([record(tmp_path / "shadow.json", 40)])
    ladder, report = ladder_from_shadow(data, min_steps=40, max_mass_lost=0.5, name="q3")
    assert ladder.cost_kind == MASS_LOST == ladder.kind
    assert report["tables_from"] == [32, 64]
    assert [t.batch for t in ladder.rungs[0].tables] == [17, 33]  # lower edge + 1
    experts = [r.experts() for r in ladder.rungs]
    lost = [r.cost(MASS_LOST) for r in ladder.rungs]
    assert len(ladder.rungs) >= 4 and experts == sorted(experts, reverse=True)
    assert lost[0] == 0.0 and lost[1:] == sorted(lost[1:]) and lost[-1] > 0.01
    assert all(r.cost(PPL_RISE) == 0.0 for r in ladder.rungs)  # no quality was measured
    middle = ladder.rungs[len(ladder.rungs) // 2].tables[-1]
    assert middle.per_layer[0] < middle.per_layer[2]  # concentrated layer: fewer experts
    assert all(MODEL.top_k <= b <= MODEL.experts for b in middle.per_layer)
    assert "proxy" in middle.costs[0].source
    again = decode_ladder(encode_ladder(ladder), where="round trip")
    assert again == ladder and b'"cost_kind": "mass_lost"' in encode_ladder(ladder)
    # optional and encoded only when set: a ppl_rise ladder's bytes are as before the field
    assert b"cost_kind" not in encode_ladder(msgspec.structs.replace(ladder, cost_kind=None))
    # the controller's expected cost of a pinned rung is its mass lost, of the ladder's kind
    pinned = rung_policy(ladder, ladder.rungs[-1].name, [16, 32, 1 << 20], min_batch=4)
    cost = expected_quality_cost(ladder, pinned, ((48.0, 10),))
    assert cost == pytest.approx(ladder.rungs[-1].tables[-1].cost(MASS_LOST))


def test_dp_files_add_up_and_bad_statistics_are_refused_in_one_line(tmp_path: Path,
                                                                    capsys) -> None:
    one = read_shadow([record(tmp_path / "a.json", 6, seed=1)])
    both = read_shadow([tmp_path / "a.json", record(tmp_path / "b.json", 6, seed=2)])
    assert both["buckets"][32][0][0] == 2 * one["buckets"][32][0][0] == 12  # layer-steps
    with pytest.raises(ShadowError, match="has 40 measured steps"):
        ladder_from_shadow(both, min_steps=40)
    damaged = tmp_path / "damaged.json"
    damaged.write_text('{"format": "lynx-shadow/1"}')
    other = json.loads((tmp_path / "a.json").read_text())
    other["every"] = 4
    (tmp_path / "other.json").write_text(json.dumps(other))
    for files, match in (([tmp_path / "missing.json"], "cannot read"),
                         ([damaged], "not shadow statistics"),
                         ([tmp_path / "a.json", tmp_path / "other.json"], "another model")):
        with pytest.raises(ShadowError, match=match):
            read_shadow(files)
    assert main(["shadow-ladder", str(tmp_path / "missing.json")]) == 2
    assert "cannot read" in capsys.readouterr().err
    out = tmp_path / "ladder.json"
    assert main(["shadow-ladder", str(tmp_path / "a.json"), str(tmp_path / "b.json"),
                 "--min-steps", "10", "--max-mass-lost", "0.5", "--out", str(out)]) == 0
    assert decode_ladder(out.read_bytes()).cost_kind == MASS_LOST


def test_the_benchmark_compares_at_equal_experts_only_inside_the_calibrated_range() -> None:
    from benchmark.shadow_ladder import at_experts

    curve = [{"experts_computed": 64.0, "ppl_rise": 0.0}, {"experts_computed": 32.0,
                                                           "ppl_rise": 0.02}]
    assert at_experts(curve, 48.0) == pytest.approx(0.01)
    assert at_experts(curve, 64.0) == 0.0 and at_experts(curve, 24.0) is None


def test_the_controller_takes_a_shadow_ladder_and_plans_by_its_kind(tmp_path: Path) -> None:
    """The operator's review step: ``PUT /v1/ladder`` on a real controller process with a
    runtime of the ladder's shape registered; the controller reports the ladder's cost kind
    and pins a rung of it as a per-layer budget policy."""
    from test_policy_admin import LiveReplica

    from lynx_policy.testing import ControllerProcess
    from lynx_protocol.messages import Register

    data = read_shadow([record(tmp_path / "shadow.json", 20)])
    ladder, _ = ladder_from_shadow(data, min_steps=20, max_mass_lost=0.5)
    assert len(ladder.rungs) >= 3
    shape = Register(replica_id="shadow-0", model="m", num_layers=LAYERS,
                     num_experts=MODEL.experts, top_k=MODEL.top_k, policies=["off", "budget"])
    with ControllerProcess.launch(tmp_path / "ctl", {"mode": "static"}) as ctl:
        live = LiveReplica(ctl.endpoint, shape)
        try:
            live.wait("replica did not register", lambda: live.link.registered)
            put = ctl.admin.put("/v1/ladder", content=encode_ladder(ladder))
            assert put.status_code == 200, put.text
            view = ctl.admin.get("/v1/ladder").json()
            assert view["cost_kind"] == MASS_LOST and view["fits"]
            assert [r["cost"] for r in view["rungs"]] == [
                r.cost(MASS_LOST) for r in ladder.rungs]
            last = ladder.rungs[-1]
            pinned = ctl.admin.put("/v1/mode", json={"mode": "static", "rung": last.name})
            assert pinned.status_code == 200, pinned.text
            live.wait("the pinned rung never arrived", lambda: live.update is not None and any(
                b.per_layer == last.tables[-1].per_layer for b in live.update.policy.budgets))
        finally:
            live.close()


def test_layers_without_a_router_get_no_pruning_and_count_in_no_mean(tmp_path: Path) -> None:
    """DeepSeek-V3, Kimi-K2 and GLM-4.5 start with dense layers: the runtime's layer index
    covers them, the recorder never sees them. They used to make every bucket read 0 steps
    (no ladder) and divide by zero; now they keep every table unpruned and the means are
    over the MoE layers only, equal to the same traffic recorded without them."""
    plain, _ = ladder_from_shadow(read_shadow([record(tmp_path / "moe.json", 20)]),
                                  min_steps=20, max_mass_lost=0.5)
    dense, _ = ladder_from_shadow(read_shadow([record(tmp_path / "dense.json", 20, dense=2)]),
                                  min_steps=20, max_mass_lost=0.5)
    assert dense.model.num_layers == LAYERS + 2
    assert [r.name for r in dense.rungs] == [r.name for r in plain.rungs]
    for with_dense, without in zip(dense.rungs, plain.rungs, strict=True):
        for a, b in zip(with_dense.tables, without.tables, strict=True):
            assert a.per_layer == [MODEL.experts] * 2 + b.per_layer
            assert a.experts_computed == b.experts_computed and a.mass_kept == b.mass_kept
    empty = read_shadow([record(tmp_path / "none.json", 0)])
    with pytest.raises(ShadowError, match="no MoE layer was measured"):
        ladder_from_shadow(empty, min_steps=1)


def _mutations(good: dict) -> list[tuple[str, dict, str]]:
    """Files a newcomer's fuzzing broke the builder with (tracebacks, or ladders written from
    nonsense): each must be refused in one line naming the file."""
    import copy

    def changed(path: str, value: object) -> dict:
        data = copy.deepcopy(good)
        *keys, last = path.split(".")
        node = data
        for key in keys:
            node = node[int(key)] if key.isdigit() else node[key]
        node[int(last) if last.isdigit() else last] = value
        return data

    rows = good["buckets"][0]["layers"]
    return [
        ("layers", changed("model.num_layers", 5), "layer rows"),
        ("rows", changed("buckets.0.layers", rows[:2]), "layer rows"),
        ("row length", changed("buckets.0.layers.0", rows[0][:10]), "layer rows"),
        ("model type", changed("model", None), "not shadow statistics"),
        ("model key", changed("model", {"num_layers": 3, "num_experts": 128}),
         "not shadow statistics"),
        ("experts string", changed("model.num_experts", "128"), "not shadow statistics"),
        ("layers string", changed("buckets.0.layers", "abc"), "not shadow statistics"),
        ("budgets string", changed("budgets", "8,16"), "not shadow statistics"),
        ("edge not a bucket", changed("buckets.0.max_batch", 33), "not one of batch_buckets"),
        ("edge string", changed("buckets.0.max_batch", "32"), "not shadow statistics"),
        ("no experts", changed("model.num_experts", 0), "not shadow statistics"),
        ("top_k above E", changed("model.top_k", 500), "top_k"),
        ("budgets unsorted", changed("budgets", list(reversed(good["budgets"]))), "ascending"),
        ("budget above E", changed("budgets", [*good["budgets"][:-1], 999]), "ascending"),
        ("negative", changed("buckets.0.layers.0.3", -1.0), "not shadow statistics"),
        ("bucket twice", changed("buckets.1.max_batch", good["buckets"][0]["max_batch"]),
         "twice"),
    ]


def test_every_malformed_file_is_refused_in_one_line(tmp_path: Path, capsys) -> None:
    good = json.loads(record(tmp_path / "good.json", 2).read_text())
    for name, data, match in _mutations(good):
        path = tmp_path / f"{name.replace(' ', '_')}.json"
        path.write_text(json.dumps(data))
        with pytest.raises(ShadowError, match=match):
            read_shadow([path])
        assert main(["shadow-ladder", str(path), "--min-steps", "1"]) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, (name, err)
    huge = tmp_path / "huge.json"
    marked = json.loads(json.dumps(good))
    marked["buckets"][0]["layers"][0][3] = 12345.678
    huge.write_text(json.dumps(marked).replace("12345.678", "1e400"))  # inf once parsed
    with pytest.raises(ShadowError, match=r"finite|not shadow statistics"):
        read_shadow([huge])
    for argv in (["--means", "inf"], ["--means", "0"], ["--out", str(tmp_path / "no" / "x")]):
        assert main(["shadow-ladder", str(tmp_path / "good.json"), "--min-steps", "1",
                     *argv]) == 2, argv
        assert "Traceback" not in capsys.readouterr().err
