"""Conformance matrix, library level: `select_layer_step` for the routers of real checkpoints
x weight formats x scaling on output x padding rows x policies x batch sizes, checked against
SGLang 0.5.23's own routing functions (stock, and restricted to the experts each pruned row may
use) - an independent computation, not the library's reference.

Shape legend: T rows, E experts, K routed top_k, P padding rows.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from conformance_configs import MODELS, ModelRouter, by_id, draw_inputs, restricted_reference
from conformance_configs import sglang_routing as sglang

from lynx.selection import (
    apply_logit_bias,
    make_knobs,
    masking_logit_bias,
    select_layer_step,
    statistics_dict,
)

pytest.importorskip("sglang.srt.layers.moe.topk")

ROWS = (1, 4, 16, 64)
PADDING = ("clean", "nan", "inf")
PAD_ROWS = 3


def policies(model: ModelRouter) -> list[tuple[str, dict]]:
    k = model.top_k
    return [("off", {}), ("budget", {"budget": k}), ("budget", {"budget": max(2 * k, 16)}),
            ("affinity", {}), ("piggyback", {"k0": 1}), ("coverage", {"coverage": 0.8})]


def weight_formats(model: ModelRouter) -> list[str]:
    """gate: SGLang's STANDARD routing; raw_logits: the flashinfer TRT-LLM routed runner's
    STANDARD routing (plain softmax only); masked_logits: what bypassed / Triton-kernel
    formats route from (renormalised routers without a correction bias only)."""
    out = ["gate"]
    if model.scoring == "softmax" and not model.grouped:
        out.append("raw_logits")
    if model.renormalize and not model.correction_bias:
        out.append("masked_logits")
    return out


CELLS = [(m, fmt, scale) for m in MODELS if not m.custom_routing
         for fmt in weight_formats(m)
         for scale in ([False, True] if m.routed_scaling_factor else [False])]


def _padded(logits: torch.Tensor, padding: str) -> torch.Tensor:
    if padding == "clean":
        return logits
    pad = torch.full((PAD_ROWS, logits.shape[1]), float(padding))
    pad[:, 0] = -pad[:, 0] if padding == "inf" else pad[:, 0]
    return torch.cat([logits, pad])


def check_cell(model: ModelRouter, fmt: str, scale: bool, padding: str, policy: str,
               knob: dict, rows: int, seed: int) -> dict[str, float]:
    logits, bias = draw_inputs(model, rows, seed)
    raw = fmt == "raw_logits"
    spec = model.spec(scale_on_output=scale, raw_logits=raw)
    z = _padded(logits, padding)
    total = z.shape[0]
    valid = torch.arange(total) < rows
    knobs = make_knobs(policy=policy if policy != "off" else "off", **knob)
    knobs.enabled.fill_(policy != "off")
    sel = select_layer_step(policy, z, spec, knobs, valid, valid, bias)
    e = model.experts
    stock_w, stock_ids = sglang(model, logits, bias, scale_on_output=scale, raw_logits=raw)
    pruned = sel.apply_rows[:rows]
    assert not bool(sel.apply_rows[rows:].any()), "a padding row was pruned"
    assert bool(pruned.all()) == (policy != "off")
    ids, weights = sel.topk_ids[:rows], sel.topk_weights[:rows]
    assert bool(((ids >= 0) & (ids < e)).all())
    # every pruned row keeps its stock top-1 (SGLang's chosen id with the best choice score)
    choice = logits if bias is None else (torch.sigmoid(logits) + bias if model.scoring ==
                                          "sigmoid" else torch.softmax(logits, -1) + bias)
    top1 = stock_ids.long().gather(1, choice.gather(1, stock_ids.long()).argmax(-1, True))
    assert bool((ids == top1).any(-1)[pruned].all()), "a pruned row lost its top-1"
    assert bool(sel.keep[ids[pruned]].all()), "a pruned row routes to a dropped expert"
    union = torch.zeros(e, dtype=torch.bool)
    union[stock_ids.long()[pruned].flatten()] = True
    if bool(pruned.any()):
        assert bool((sel.keep <= union).all()), "kept an expert outside the stock union"
    else:
        assert bool(sel.keep.all())
    stats = statistics_dict(sel.stats)
    assert all(torch.isfinite(torch.tensor(list(stats.values()))).tolist())
    assert stats["nonfinite_rows"] == 0 and stats["rows"] == float(pruned.sum())
    assert stats["stock_union"] == float(union.sum())
    # weights and ids against SGLang restricted to the allowed experts (independent)
    if fmt == "masked_logits":
        masked = apply_logit_bias(z, masking_logit_bias(z, sel.allowed))[:rows]
        ref_w, ref_ids = sglang(model, masked, None, scale_on_output=scale)
    else:
        ref_w, ref_ids = restricted_reference(model, logits, bias, sel.allowed[:rows],
                                              scale_on_output=scale, raw_logits=raw)
    ours_w, ours_ids = by_id(weights, ids)
    ref_w, ref_ids = by_id(ref_w, ref_ids)
    assert torch.equal(ours_ids, ref_ids), "ids differ from SGLang's restricted routing"
    if spec.renormalize or raw:
        assert torch.allclose(ours_w, ref_w, rtol=1e-4, atol=1e-6)
    else:  # same shape as SGLang's, scaled to the row's stock top-K gate mass
        assert torch.allclose(ours_w / ours_w.sum(-1, True), ref_w / ref_w.sum(-1, True),
                              rtol=1e-4, atol=1e-6)
        assert torch.allclose(ours_w.sum(-1), stock_w.float().sum(-1), rtol=1e-4, atol=1e-6)
    if not bool(pruned.any()):  # off: exactly SGLang's stock routing
        assert torch.equal(ours_ids, by_id(stock_w, stock_ids)[1])
    return stats


@pytest.mark.parametrize(("model", "fmt", "scale"), CELLS,
                         ids=[f"{m.name}-{f}-{'rsf_out' if s else 'rsf_later'}"
                              for m, f, s in CELLS])
def test_library_conformance_matrix(model: ModelRouter, fmt: str, scale: bool) -> None:
    cells = 0
    for (padding, (policy, knob), rows) in itertools.product(PADDING, policies(model), ROWS):
        try:
            check_cell(model, fmt, scale, padding, policy, knob, rows, seed=cells)
        except AssertionError as exc:
            raise AssertionError(f"{padding} {policy}{knob} T={rows}: {exc}") from exc
        cells += 1
    assert cells == len(PADDING) * len(policies(model)) * len(ROWS)


def test_matrix_size_is_what_the_readme_reports() -> None:
    size = sum(len(PADDING) * len(policies(m)) * len(ROWS) for m, _, _ in CELLS)
    assert len(CELLS) >= 20 and size >= 1200, (len(CELLS), size)
