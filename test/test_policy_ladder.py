"""The ladder file (`lynx_protocol.ladder`): format round trip, one-line errors for damaged or
mismatched ladders, the Pareto filter, the batch rule and the rung as a wire policy."""

from __future__ import annotations

import itertools
import json

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ladders import EXPERTS, LAYERS, ladders, mini_ladder, rung

from lynx_protocol.ladder import (
    LADDER_FORMAT,
    Ladder,
    LadderError,
    LadderModel,
    Threshold,
    decode_ladder,
    encode_ladder,
    load_ladder,
    pareto_filter,
    rung_bucket,
    rung_of_bucket,
    start_rung,
    table_for,
    validate_ladder,
)
from lynx_protocol.messages import MAX_MESSAGE_BYTES, policy_update_size
from lynx_protocol.policy import PolicySpec, validate_policy


@settings(max_examples=80, deadline=None)
@given(ladders())
def test_a_ladder_round_trips_through_its_file_format(ladder) -> None:
    validate_ladder(ladder)
    assert decode_ladder(encode_ladder(ladder)) == ladder


def test_the_start_threshold_is_optional_and_picks_the_furthest_rung_within_it() -> None:
    ladder = mini_ladder()  # ppl_rise: none 0, m20 0.002, m16 0.004, m12 0.010, m8 0.030
    assert b"threshold" not in encode_ladder(ladder)  # encoded only when set
    assert start_rung(ladder) is None  # no threshold: the runtime does not start on a rung
    for value, name in ((0.0, "none"), (0.004, "m16"), (0.0099, "m16"), (0.01, "m12"),
                        (1.0, "m8")):
        limited = msgspec.structs.replace(ladder, threshold=Threshold(value=value))
        assert decode_ladder(encode_ladder(limited)) == limited
        assert json.loads(encode_ladder(limited))["threshold"] == {"value": value,
                                                                  "kind": "ppl_rise"}
        chosen = start_rung(limited)
        assert chosen is not None and chosen.name == name, (value, chosen)
    other = msgspec.structs.replace(ladder, threshold=Threshold(value=1.0, kind="exact_match"))
    chosen = start_rung(other)  # a kind no rung measured: no pruning
    assert chosen is not None and chosen.name == "none"


def test_file_errors_are_one_line_and_name_the_file(tmp_path) -> None:
    good = json.loads(encode_ladder(mini_ladder()))
    cases = {
        "missing.json": None,
        "garbage.json": b"{not json",
        "format.json": {**good, "format": "lynx-ladder/9"},
        "short.json": {**good, "rungs": [{**good["rungs"][0], "tables": [
            {**t, "per_layer": t["per_layer"][:2]} for t in good["rungs"][0]["tables"]]},
            *good["rungs"][1:]]},
        "dup.json": {**good, "rungs": [good["rungs"][0], good["rungs"][1], good["rungs"][1]]},
        "unordered.json": {**good, "rungs": [good["rungs"][0], good["rungs"][2],
                                             good["rungs"][1]]},
        "stock.json": {**good, "rungs": good["rungs"][1:]},
        "batches.json": {**good, "rungs": [good["rungs"][0], {**good["rungs"][1], "tables":
                                                              good["rungs"][1]["tables"][:2]}]},
        "unknown.json": {**good, "extra": 1},
        "negative.json": {**good, "rungs": [good["rungs"][0], {**good["rungs"][1], "tables": [
            {**t, "per_layer": [0] * LAYERS} for t in good["rungs"][1]["tables"]]}]},
        "threshold.json": {**good, "threshold": {"value": -0.01}},
        "threshold_kind.json": {**good, "threshold": {"value": 0.01, "kind": "PPL"}},
    }
    for name, content in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content if isinstance(content, bytes)
                             else json.dumps(content).encode())
        with pytest.raises(LadderError) as info:
            load_ladder(path)
        message = str(info.value)
        assert "\n" not in message and str(path) in message, (name, message)


def test_a_ladder_for_another_model_shape_is_refused() -> None:
    ladder = mini_ladder()
    validate_ladder(ladder, num_layers=LAYERS, num_experts=EXPERTS)
    with pytest.raises(LadderError, match="made for 4 MoE layers, the model has 48"):
        validate_ladder(ladder, where="PUT /v1/ladder", num_layers=48, num_experts=EXPERTS)
    with pytest.raises(LadderError, match=r"^replica r1: made for 32 experts, the model has 128"):
        validate_ladder(ladder, where="replica r1", num_layers=LAYERS, num_experts=128)


def test_the_pareto_filter_drops_a_rung_that_costs_more_than_a_faster_one() -> None:
    stock = rung("none", [EXPERTS] * 2, 0.0)
    slow_dear = rung("a", [24, 24], 0.010)
    fast_cheap = rung("b", [16, 16], 0.004)  # faster and cheaper: "a" is dominated
    faster = rung("c", [8, 8], 0.020)
    noisy = rung("d", [20, 20], -0.001)  # measured below zero: noise, but kept over rung 0
    kept, dropped = pareto_filter([stock, slow_dear, fast_cheap, faster, noisy])
    names = [r.name for r in kept]
    assert names == ["none", "d", "b", "c"]  # by falling experts, costs rising after rung 0
    assert {d.name for d in dropped} | set(names) == {"none", "a", "b", "c", "d"}
    assert any(d.name == "a" and "faster" in d.reason for d in dropped)
    for before, after in itertools.pairwise(kept[1:]):  # strictly better each way after rung 0
        assert after.experts() < before.experts() and after.cost() > before.cost()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(4, 32), st.floats(-0.01, 0.05)), min_size=1,
                max_size=8))
def test_no_kept_rung_is_dominated_and_nothing_is_lost(points) -> None:
    rungs = [rung("none", [EXPERTS], 0.0)] + [rung(f"r{i}", [b], c)
                                               for i, (b, c) in enumerate(points)]
    kept, dropped = pareto_filter(rungs)
    assert kept[0].name == "none"
    assert sorted([r.name for r in kept] + [d.name for d in dropped]) == sorted(
        r.name for r in rungs)
    for a in kept[1:]:
        for b in rungs[1:]:
            dominated = (b.experts() <= a.experts() and b.cost() <= a.cost()
                         and (b.experts(), b.cost()) != (a.experts(), a.cost()))
            assert not dominated, (a, b)
    validate_ladder(Ladder(format=LADDER_FORMAT, rungs=kept,
                           model=LadderModel(num_layers=1, num_experts=EXPERTS, top_k=4)))


def test_the_batch_rule_takes_the_nearest_calibrated_batch_at_or_below_else_the_smallest() -> None:
    m16 = mini_ladder().rung("m16")
    assert [table_for(m16, b).batch for b in (1, 15, 16, 31, 32, 63, 64, 4096)] == \
        [16, 16, 16, 16, 32, 32, 64, 64]


def test_a_rung_travels_as_an_ordinary_per_layer_budget_policy() -> None:
    ladder = mini_ladder()
    for index, r in enumerate(ladder.rungs):
        bucket = rung_bucket(r, 48, 48, EXPERTS)
        spec = validate_policy(PolicySpec(name="budget", budgets=[bucket]), num_layers=LAYERS,
                               num_experts=EXPERTS, top_k=4)
        assert policy_update_size(spec) < MAX_MESSAGE_BYTES
        assert rung_of_bucket(ladder, bucket) == index
        assert (bucket.all_layers == EXPERTS) == (index == 0)
    assert msgspec.json.decode(encode_ladder(ladder))["format"] == "lynx-ladder/1"


@pytest.mark.parametrize("model", ["mixtral-mini", "qwen3-moe-mini", "qwen3-moe-128"])
def test_the_reference_checkpoints_ship_a_ladder_that_fits_them(model: str) -> None:
    """``make ladders`` output, committed beside each checkpoint: valid, for its shape, with a
    pruning rung whose held-out cost is measured and below the 5% floor."""
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "models" / model
    config = json.loads((folder / "config.json").read_text())
    experts = config.get("num_local_experts") or config["num_experts"]
    ladder = validate_ladder(load_ladder(folder / "lynx_ladder.json"),
                             num_layers=config["num_hidden_layers"], num_experts=experts)
    assert ladder.model.top_k == config["num_experts_per_tok"] and len(ladder.rungs) >= 2
    assert all(r.cost() <= 0.05 for r in ladder.rungs)
    assert all(t.costs and "heldout" in t.costs[0].source for r in ladder.rungs
               for t in r.tables)
