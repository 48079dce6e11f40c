"""Calibration of a checkpoint whose first layer is dense (Qwen3-MoE's ``mlp_only_layers``; as
DeepSeek-V3's, Kimi-K2's and GLM-4.5's first layers): per-layer tables are indexed by decoder
layer as the runtime's are, a dense layer is never pruned and counts in no mean. A tiny
randomly initialised model from qwen3-moe-mini's config values (none can be downloaded here)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from lynx.calibrate import mean_nll, moe_routers
from lynx.calibrate.ladder import build_ladder
from lynx.calibrate.tables import allocate_routed, calibrate
from lynx_protocol.ladder_build import single_layer_policy

MINI = Path(__file__).resolve().parents[1] / "models" / "qwen3-moe-mini"
E, LAYERS = 32, 4


@pytest.fixture(scope="module")
def dense_first(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("qwen3-moe-dense-first")
    config = AutoConfig.from_pretrained(MINI)
    config.mlp_only_layers = [0]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(MINI / name, folder / name)
    return folder


def test_routers_are_indexed_by_decoder_layer(dense_first: Path) -> None:
    from lynx.reference.loading import load_reference

    model, _ = load_reference(dense_first, dtype=torch.float32)
    assert list(moe_routers(model)) == [1, 2, 3]
    windows = torch.randint(0, 1000, (16, 24), generator=torch.Generator().manual_seed(1))
    _, stock = mean_nll(model, windows, single_layer_policy(3, E, LAYERS, E), 16)
    _, pruned = mean_nll(model, windows, single_layer_policy(3, 4, LAYERS, E), 16)
    # budget 4 on decoder layer 3 prunes its router (the last; the rows' top-1 experts are
    # always kept, so up to 16 stay), and the layers before it route as stock
    assert pruned[2] < stock[2] - 4
    assert pruned[:2] == stock[:2]


def test_a_dense_layer_is_never_pruned_and_counts_in_no_mean(dense_first: Path) -> None:
    ladder, report = build_ladder(dense_first, means=[20.0, 12.0], batches=(16,), windows=16,
                                  window_len=48, heldout_windows=16)
    (entry,) = report["per_batch"]
    assert entry["sensitivity_nats"][0] == {} and entry["kept"][0] == {}
    assert all(entry["kept"][layer] for layer in range(1, LAYERS))
    assert len(ladder.rungs) >= 2
    for rung in ladder.rungs[1:]:
        (table,) = rung.tables
        assert table.per_layer[0] == E and len(table.per_layer) == LAYERS
        assert min(table.per_layer[1:]) < E
    # the target mean is met over the routed layers alone (E at layer 0 would break it)
    budgets = entry["rungs"]["m12"]["budgets"]
    routed = [entry["kept"][layer][budgets[layer]] for layer in range(1, LAYERS)]
    assert sum(routed) / len(routed) <= 12.0 + 1e-6
    fitted = calibrate(dense_first, 12.0, (16,), 16, 48)
    (one,) = fitted["per_batch"]
    assert one["budgets"][0] == E and one["mean_kept"] <= 12.0 + 1e-6


def test_allocate_routed_needs_a_routed_layer() -> None:
    with pytest.raises(ValueError, match="no layer has routed experts"):
        allocate_routed([{}, {}], 8.0, [{}, {}], E)
    curve = {4: 0.5, 8: 0.1, E: 0.0}
    assert allocate_routed([{}, curve], 8.0, [{}, {4: 4.0, 8: 8.0, E: 20.0}], E) == [E, 8]
