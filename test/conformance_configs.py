"""Router configurations of real checkpoints (their public config.json values) and an
independent reference for the conformance tests: SGLang 0.5.23's own routing functions run on
the logits / bias restricted to the experts a pruned row may use.

Shape legend: T rows, E routed experts, K routed top_k, S fused shared slots.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lynx.selection import RouterSpec

RESTRICT = -1.0e9  # finite exclusion for the reference (groups with no allowed expert tie low)


@dataclass(frozen=True)
class ModelRouter:
    """One checkpoint's router as SGLang's model file builds its ``TopK``."""

    name: str
    experts: int
    top_k: int
    renormalize: bool = True
    scoring: str = "softmax"
    groups: int | None = None  # n_group (None or 1: not grouped)
    topk_group: int | None = None
    correction_bias: bool = False
    routed_scaling_factor: float | None = None
    shared_experts: int = 0  # n_shared_experts SGLang can fuse into the TopK output
    custom_routing: bool = False  # Llama-4: sigmoid top-1 custom routing function

    @property
    def grouped(self) -> bool:
        return bool(self.groups)

    def spec(self, *, scale_on_output: bool = False, raw_logits: bool = False) -> RouterSpec:
        return RouterSpec(
            top_k=self.top_k, renormalize=self.renormalize,
            scoring="sigmoid" if self.scoring == "sigmoid" else "softmax",
            num_expert_group=self.groups if self.groups and self.groups > 1 else None,
            topk_group=self.topk_group if self.groups and self.groups > 1 else None,
            has_correction_bias=self.correction_bias,
            weights="raw_logits" if raw_logits else "gate",
            routed_scaling_factor=self.routed_scaling_factor, scale_on_output=scale_on_output)


MODELS: tuple[ModelRouter, ...] = (
    ModelRouter("DeepSeek-V3", 256, 8, True, "sigmoid", 8, 4, True, 2.5, shared_experts=1),
    ModelRouter("DeepSeek-V2-236B", 160, 6, False, "softmax", 8, 3, False, 16.0,
                shared_experts=2),
    ModelRouter("DeepSeek-V2-Lite", 64, 6, False, "softmax", 1, 1, False, 1.0,
                shared_experts=2),
    ModelRouter("Qwen3-30B-A3B", 128, 8),
    ModelRouter("Qwen3-235B-A22B", 128, 8),
    ModelRouter("Mixtral-8x7B", 8, 2),
    ModelRouter("OLMoE-1B-7B", 64, 8, renormalize=False),
    ModelRouter("GPT-OSS-20B", 32, 4),
    ModelRouter("GLM-4.5-Air", 128, 8, True, "sigmoid", 1, 1, True, 1.0, shared_experts=1),
    ModelRouter("Qwen2-57B-A14B", 64, 8, renormalize=False),
    ModelRouter("Llama-4-Scout", 16, 1, renormalize=False, scoring="sigmoid",
                custom_routing=True),
)
BY_NAME = {m.name: m for m in MODELS}


def draw_inputs(model: ModelRouter, rows: int, seed: int, scale: float = 1.5
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logits [T,E] fp32 with a per-expert skew, correction bias [E] or None)."""
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(model.experts, generator=gen) * scale)[None, :] + torch.randn(
        rows, model.experts, generator=gen) * scale
    bias = None
    if model.correction_bias:
        bias = torch.randn(model.experts, generator=gen) * 0.05 + (
            5.0 if model.name == "DeepSeek-V3" else 0.0)
    return logits, bias


def _plain(fn: Callable) -> Callable:
    return getattr(fn, "_torchdynamo_orig_callable", fn)


def sglang_routing(model: ModelRouter, logits: torch.Tensor, bias: torch.Tensor | None, *,
                   shared: int = 0, scale_on_output: bool = False, raw_logits: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T,K+S], ids [T,K+S]) from SGLang's own torch routing functions, the branch
    ``select_experts`` takes for this router (compiled ones unwrapped). ``bias`` may be
    [T,E] (SGLang's biased torch code broadcasts it row by row)."""
    from sglang.srt.layers.moe import topk as sg

    hidden = torch.zeros(logits.shape[0], 4)
    k = model.top_k + shared
    rsf = model.routed_scaling_factor
    if model.grouped:
        groups, topk_group = model.groups, model.topk_group
        if bias is not None:
            return _plain(sg.biased_grouped_topk_impl)(
                hidden, logits, bias, k, model.renormalize, groups, topk_group,
                num_fused_shared_experts=shared, routed_scaling_factor=rsf,
                apply_routed_scaling_factor_on_output=scale_on_output)
        return _plain(sg.grouped_topk_gpu)(
            hidden, logits, k, model.renormalize, groups, topk_group,
            num_fused_shared_experts=shared, routed_scaling_factor=rsf,
            apply_routed_scaling_factor_on_output=scale_on_output, scoring_func=model.scoring)
    if raw_logits:
        weights, ids = sg.fused_topk_softmax_torch_raw_logits(hidden, logits, k,
                                                              model.renormalize)
    else:
        weights, ids = sg.fused_topk_torch_native(hidden, logits, k, model.renormalize,
                                                  scoring_func=model.scoring)
    if scale_on_output and rsf is not None:
        weights = weights * rsf
    return weights, ids


def restricted_reference(model: ModelRouter, logits: torch.Tensor, bias: torch.Tensor | None,
                         allowed: torch.Tensor, *, scale_on_output: bool = False,
                         raw_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """SGLang's routing of every row restricted to ``allowed`` [T,E]: the bias is restricted
    for biased routers (their logits would still compete on the bias), the logits otherwise."""
    penalty = torch.where(allowed, 0.0, RESTRICT)
    if bias is not None:
        return sglang_routing(model, logits, bias.float()[None, :] + penalty,
                              scale_on_output=scale_on_output)
    return sglang_routing(model, logits.float() + penalty, None,
                          scale_on_output=scale_on_output, raw_logits=raw_logits)


def by_id(weights: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows sorted by expert id (SGLang returns its top-K unsorted)."""
    order = ids.long().argsort(dim=-1)
    return weights.float().gather(1, order), ids.long().gather(1, order)
