"""The transformers calibration path on every router kind (`lynx.calibrate.hf_routers`): tiny
randomly initialised checkpoints with the real checkpoints' router values
(`lynx.reference.tiny`; none can be downloaded here).

Each router module's rule, as `router_spec` reads it, must reproduce what the module itself
routes: the same experts and the same weights on the model's own hidden states. A wrong
scoring, renormalisation, group rule, bias or routed scaling factor fails here, and would
otherwise calibrate every pruned row by another model's rule.
"""

from __future__ import annotations

import json

import pytest
import torch

from lynx.calibrate.hf_routers import UnknownRouterError, moe_routers, router_spec
from lynx.calibrate.tables import layer_sensitivity
from lynx.reference.tiny import ROUTERS, tiny_model
from lynx.selection.routers import stock_routing
from lynx.selection.routing import route_restricted

DENSE_FIRST = {"DeepSeek-V3", "DeepSeek-V2", "DeepSeek-V2-Lite", "GLM-4.5-Air",
               "GLM-4.5-DSV3-router"}
REFERENCE = ("mixtral-mini", "qwen3-moe-mini")  # the trained reference models


def _model(name: str):
    if name in REFERENCE:
        from conftest import reference_model

        from lynx.reference.loading import load_reference

        return load_reference(reference_model(name), dtype=torch.float32)[0]
    return tiny_model(name)


def _routed(model, rows: int = 64) -> dict[int, tuple]:
    """{layer: (router module, its input [T,H], its output)} on random token windows."""
    seen: dict[int, tuple] = {}

    def keep(layer: int):
        def hook(module, args, out) -> None:
            seen.setdefault(layer, (module, args[0], out))
        return hook

    handles = [module.register_forward_hook(keep(layer))
               for layer, module in moe_routers(model).items()]
    tokens = torch.randint(0, 1000, (4, rows // 4), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model(input_ids=tokens)
    for handle in handles:
        handle.remove()
    return seen


@pytest.mark.parametrize("name", [*sorted(ROUTERS), *REFERENCE])
def test_the_rule_read_from_each_router_reproduces_its_own_routing(name: str) -> None:
    model = _model(name)
    routed = _routed(model)
    layers = model.config.num_hidden_layers
    assert sorted(routed) == list(range(1 if name in DENSE_FIRST else 0, layers))
    for layer, (module, _, (logits, weights, ids)) in routed.items():
        spec, bias = router_spec(module)
        if name in ("DeepSeek-V3", "GLM-4.5-DSV3-router"):
            assert spec.grouped and spec.scoring == "sigmoid" and bias is not None
        if name == "DeepSeek-V2":  # group_limited_greedy, no renormalisation, rsf 16
            assert spec.grouped and spec.output_scale == 16.0 and not spec.renormalize
        stock = stock_routing(logits.float(), spec, bias)
        everything = torch.ones_like(logits, dtype=torch.bool)
        ours_w, ours_ids = route_restricted(logits.float(), spec, stock, everything)
        order, ours_order = ids.argsort(-1), ours_ids.argsort(-1)
        assert torch.equal(ids.gather(1, order), ours_ids.gather(1, ours_order)), (name, layer)
        torch.testing.assert_close(weights.float().gather(1, order),
                                   ours_w.gather(1, ours_order), rtol=1e-5, atol=1e-6)


def test_a_dense_first_layer_is_left_out_and_a_grouped_router_prunes() -> None:
    model = tiny_model("DeepSeek-V3")
    windows = torch.randint(0, 1000, (16, 12), generator=torch.Generator().manual_seed(3))
    rise, kept = layer_sensitivity(model, windows, 16, [8, 24, 256])
    assert rise[0] == {} and kept[0] == {}
    for layer in (1, 2):
        assert kept[layer][24] < kept[layer][256] - 10  # budget 24 computes fewer experts
        assert rise[layer][256] == 0.0


def test_an_unknown_router_is_refused_with_the_server_path_named() -> None:
    class SomeRouter(torch.nn.Module):
        top_k, num_experts = 2, 8

    with pytest.raises(UnknownRouterError, match="--server"):
        router_spec(SomeRouter())


def test_calibrate_takes_an_architecture_this_cpu_cannot_serve(tmp_path, capsys) -> None:
    """GPT-OSS: SGLang needs an attention backend with sinks that no CPU has, so
    ``lynx-serve serve`` refuses it in one line; its calibration in transformers (or through
    a GPU server) does not need this CPU to serve it."""
    from lynx.reference.tiny import write_tiny
    from lynx.serving.cli import main

    folder = write_tiny("GPT-OSS-20B", tmp_path / "gpt-oss")
    assert main(["serve", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "not servable on the CPU default" in err and "Traceback" not in err
    out = tmp_path / "policy.json"
    assert main(["calibrate", str(folder), "--target-mean", "14", "--batches", "16",
                 "--windows", "16", "--window-len", "24", "--out", str(out)]) == 0
    policy = json.loads(out.read_text())
    (table,) = [b["per_layer"] for b in policy["budgets"] if b.get("per_layer")]
    assert len(table) == 3 and all(4 <= m <= 32 for m in table) and min(table) < 32
