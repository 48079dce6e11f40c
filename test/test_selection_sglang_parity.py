"""`route_reference` is SGLang 0.5.23's own routing: stock and on Lynx's masking inputs.

Each router kind is run through SGLang's torch implementation (the compiled ones unwrapped:
the point is the math, not inductor) on the unmasked inputs and on the selection's masked
inputs (logit bias, or the per-row correction bias, which SGLang's torch code broadcasts
row by row). Shape legend: T rows, E experts, K top_k."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from lynx.selection import (
    RouterSpec,
    make_knobs,
    route_reference,
    select_layer_step,
    stock_gate_mass,
    stock_routing,
)

topk = pytest.importorskip("sglang.srt.layers.moe.topk")

T, E, K, GROUPS, TOPK_GROUP = 16, 16, 4, 4, 2


def _plain(fn: Callable) -> Callable:
    return getattr(fn, "_torchdynamo_orig_callable", fn)


def sglang_route(router: RouterSpec, logits: torch.Tensor, bias: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    hidden = torch.zeros(logits.shape[0], 8)
    if router.has_correction_bias and router.grouped:
        return _plain(topk.biased_grouped_topk_impl)(
            hidden, logits, bias, K, router.renormalize, GROUPS, TOPK_GROUP)
    if router.has_correction_bias:
        return _plain(topk.biased_topk_impl)(hidden, logits, bias, K, router.renormalize,
                                             scoring_func=router.scoring)
    if router.grouped:
        return _plain(topk.grouped_topk_gpu)(hidden, logits, K, router.renormalize, GROUPS,
                                             TOPK_GROUP, scoring_func=router.scoring)
    return topk.fused_topk_torch_native(hidden, logits, K, router.renormalize,
                                        scoring_func=router.scoring)


def _by_id(weights: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows sorted by expert id (SGLang's grouped kernels return their top-K unsorted)."""
    order = ids.long().argsort(dim=-1)
    return weights.float().gather(1, order), ids.long().gather(1, order)


ROUTERS = {
    "softmax": RouterSpec(top_k=K),
    "softmax-raw": RouterSpec(top_k=K, renormalize=False),
    "sigmoid": RouterSpec(top_k=K, scoring="sigmoid"),
    "grouped-softmax": RouterSpec(top_k=K, num_expert_group=GROUPS, topk_group=TOPK_GROUP),
    "biased": RouterSpec(top_k=K, scoring="sigmoid", has_correction_bias=True),
    "biased-grouped": RouterSpec(top_k=K, scoring="sigmoid", num_expert_group=GROUPS,
                                 topk_group=TOPK_GROUP, has_correction_bias=True),
}


@pytest.mark.parametrize("kind", list(ROUTERS))
@pytest.mark.parametrize("policy", ["budget", "affinity"])
def test_reference_routing_is_sglangs_stock_and_masked(kind: str, policy: str) -> None:
    router = ROUTERS[kind]
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(T, E, generator=gen) * 1.5 + torch.randn(E, generator=gen)[None]
    bias = torch.randn(E, generator=gen) * 0.2 if router.has_correction_bias else None
    valid = torch.arange(T) < T - 3
    prunable = valid & (torch.arange(T) >= 2)  # 2 prefill rows, 11 decode rows, 3 padding
    selection = select_layer_step(policy, logits, router, make_knobs(budget=3), valid,
                                  prunable, bias)

    stock_ours = _by_id(*route_reference(logits, router, correction_bias=bias))
    stock_theirs = _by_id(*sglang_route(router, logits, bias))
    assert torch.equal(stock_ours[1], stock_theirs[1])
    assert torch.allclose(stock_ours[0], stock_theirs[0], atol=1e-6)

    if router.has_correction_bias:
        masked_logits, masked_bias = logits, selection.correction_bias
    else:
        masked_logits, masked_bias = logits + selection.logit_bias, bias
    weights, ids = sglang_route(router, masked_logits, masked_bias)
    ours = _by_id(*route_reference(logits, router, logit_bias=selection.logit_bias,
                                   correction_bias=masked_bias if bias is not None else None))
    assert torch.equal(_by_id(weights, ids)[1], ours[1])
    assert torch.allclose(_by_id(weights, ids)[0], ours[0], atol=1e-6)

    pruned = selection.apply_rows
    assert bool(selection.keep[ids.long()[pruned]].all()), "SGLang routed to a dropped expert"
    stock_top1 = stock_routing(logits, router, bias).ids[:, 0]
    assert bool((ids.long() == stock_top1[:, None]).any(dim=1)[pruned].all()), "top-1 lost"
    assert torch.equal(_by_id(weights, ids)[1][~pruned], stock_theirs[1][~pruned])
    if not router.renormalize:  # the plugin restores the stock gate mass of pruned rows
        mass = stock_gate_mass(stock_routing(logits, router, bias))
        restored = weights.float() * (mass / weights.float().sum(-1))[:, None]
        assert torch.allclose(restored.sum(-1), stock_theirs[0].sum(-1), atol=1e-6)
