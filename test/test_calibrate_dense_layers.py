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


def test_the_command_line_names_a_dense_layer_instead_of_failing(dense_first: Path,
                                                                 tmp_path: Path,
                                                                 capsys) -> None:
    import json

    from lynx.serving.cli import main

    out = tmp_path / "policy.json"
    assert main(["calibrate", str(dense_first), "--target-mean", "12", "--batches", "16",
                 "--windows", "16", "--window-len", "48", "--out", str(out)]) == 0
    assert "dense (no routed experts): never pruned" in capsys.readouterr().err
    (bucket,) = [b for b in json.loads(out.read_text())["budgets"] if b.get("per_layer")]
    assert bucket["per_layer"][0] == E


class _DenseFirstServer:
    """What `ServerPath.measure` reads back from a server whose layer 0 is dense: that layer
    records no step under any policy; layers 1-2 record, in evaluation mode, min(budget, 6)
    experts kept of a stock union of 6 (a budget-E layer is counted at its union). No SGLang
    server here runs a dense-first checkpoint (0.5.23's qwen3_moe has no mlp_only_layers),
    so this stands in for the counters only; the route itself is `test_plugin_evaluation`."""

    num_layers, num_experts, union = 3, 8, 6.0

    def measure(self, windows, spec, batch):
        bucket = spec.budgets[-1] if spec.budgets else None  # policy off: no table
        budgets = ([self.num_experts] * self.num_layers if bucket is None
                   else bucket.per_layer or [bucket.all_layers] * self.num_layers)
        kept = [None] + [float(min(b, self.union)) for b in budgets[1:]]
        unions = [None, self.union, self.union]
        nll = 1.0 + sum(0.01 * (self.num_experts - b) for b in budgets[1:])
        return nll, kept, unions, 1.0


def test_the_server_path_leaves_a_dense_layer_out_of_every_curve_and_mean() -> None:
    from lynx.calibrate.server_path import ServerPath, server_layer_sensitivity

    path = _DenseFirstServer()
    unions: list = []
    rise, kept = server_layer_sensitivity(path, torch.zeros(4, 8, dtype=torch.long), 4,
                                          [2, 4, E // 4], E // 4, unions)
    assert rise[0] == {} and kept[0] == {} and unions == [None, 6.0, 6.0]
    assert kept[1] == {2: 2.0, 4: 4.0, 8: 6.0} and rise[1][2] > rise[1][4] > 0
    budgets = allocate_routed(rise, 4.0, kept, E // 4)
    assert budgets[0] == E // 4
    spec = single_layer_policy(1, 2, 3, E // 4)
    _, experts, _ = ServerPath.measure_table(path, None, spec, 4, unions)
    assert experts == (2.0 + 6.0) / 2  # layers 1 and 2 only; the dense layer is in no mean
