"""The MoE layers under test: shapes (real checkpoints' experts, top-k and widths, scaled to
this CPU) and one layer's SGLang CPU routing and MoE callables over random expert weights, with
the plugin's selection step (``MoeLayerBench``). Used by ``moe_layer.py`` and ``frontier.py``."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

from benchmark.common import Variant, selection_knobs


@dataclass(frozen=True)
class Shape:
    name: str
    num_experts: int
    top_k: int
    hidden: int
    intermediate: int  # per-expert FFN width
    logits_from: str | None  # reference model whose real routing fits E and k
    note: str
    fine_grained: bool = False

    def scaled(self, factor: int) -> Shape:
        return Shape(self.name, self.num_experts, self.top_k, max(16, self.hidden // factor),
                     max(16, self.intermediate // factor), self.logits_from, self.note,
                     self.fine_grained)


SHAPES: tuple[Shape, ...] = (
    Shape("mixtral-mini", 8, 2, 128, 256, "mixtral-mini", "reference model as trained"),
    Shape("qwen3-moe-mini", 32, 4, 128, 64, "qwen3-moe-mini", "reference model as trained",
          fine_grained=True),
    Shape("mixtral-mini-wide16", 8, 2, 128, 4096, "mixtral-mini", "reference, experts x16 wide"),
    Shape("qwen3-moe-mini-wide16", 32, 4, 128, 1024, "qwen3-moe-mini",
          "reference, experts x16 wide", fine_grained=True),
    Shape("qwen3-moe-128-wide16", 128, 8, 128, 512, "qwen3-moe-128",
          "reference at the production ratio (128 experts, top-8), experts x16 wide",
          fine_grained=True),
    Shape("Mixtral-8x7B/8", 8, 2, 512, 1792, "mixtral-mini",
          "Mixtral-8x7B (H 4096, I 14336) scaled 1/8"),
    Shape("Qwen3-30B-A3B/4", 128, 8, 512, 192, None, "Qwen3-30B-A3B (H 2048, I 768) scaled 1/4",
          fine_grained=True),
    Shape("DeepSeek-V2-Lite/4", 64, 6, 512, 352, None,
          "DeepSeek-V2-Lite routed experts (H 2048, I 1408) scaled 1/4; shared experts omitted",
          fine_grained=True),
)
QUICK_SHAPES = ("qwen3-moe-mini-wide16", "Qwen3-30B-A3B/4")
# Also measured in bf16 (the checkpoints' dtype) to show the compute-bound CPU fallback.
BF16_SHAPES = ("qwen3-moe-mini-wide16", "Mixtral-8x7B/8", "Qwen3-30B-A3B/4")


class MoeLayerBench:
    """One shape's expert weights and SGLang's routing/MoE callables."""

    def __init__(self, shape: Shape, dtype: torch.dtype, seed: int = 0) -> None:
        from sglang.srt.layers.moe.moe_runner import MoeRunnerConfig
        from sglang.srt.layers.moe.topk import TopKConfig

        gen = torch.Generator().manual_seed(seed)
        e, h, i = shape.num_experts, shape.hidden, shape.intermediate
        self.shape = shape
        self.dtype = dtype
        self.layer = SimpleNamespace(
            num_experts=e,
            w13_weight=(torch.randn(e, 2 * i, h, generator=gen) * 0.02).to(dtype),
            w2_weight=(torch.randn(e, h, i, generator=gen) * 0.02).to(dtype),
        )
        self.runner_config = MoeRunnerConfig(activation="silu")
        self.topk_config = TopKConfig(top_k=shape.top_k, renormalize=True, torch_native=True)
        from lynx.selection import RouterSpec

        self.router = RouterSpec(top_k=shape.top_k, renormalize=True)
        from lynx.selection.compiled import CompiledSelection

        # As the plugin runs it on the CPU once warm; compiled here on first use, untimed.
        self.selection = CompiledSelection()

    def route(self, x: torch.Tensor, logits: torch.Tensor) -> Any:
        from sglang.srt.layers.moe.topk import select_experts

        return select_experts(hidden_states=x, router_logits=logits, topk_config=self.topk_config)

    def experts(self, x: torch.Tensor, topk_output: Any) -> torch.Tensor:
        from sglang.srt.layers.moe.fused_moe_native import moe_forward_native

        return moe_forward_native(self.layer, x, topk_output, self.runner_config)

    def knobs(self, variant: Variant, batch: int, layer: int = 0) -> tuple[Any, bool]:
        """The plugin's knobs for ``variant`` in ``layer`` (per-layer tables differ by layer)
        and whether it prunes there."""
        knobs = selection_knobs(variant, batch, layer, self.shape.num_experts)
        return knobs, bool(knobs.enabled)

    def select(self, knobs: Any, logits: torch.Tensor, stock_ids: torch.Tensor, *,
               eager: bool = False) -> Any:
        """The selection step of one layer as the plugin runs it in SGLang's TopK hook:
        ``lynx.selection.select_layer_step`` (keep set, routing, statistics) judged on
        SGLang's own routed ids ``stock_ids`` [T,K], compiled (`lynx.selection.compiled`), or
        the eager specification with ``eager``."""
        from lynx.selection import select_layer_step

        rows = torch.ones(logits.shape[0], dtype=torch.bool)
        step = select_layer_step if eager else self.selection
        return step(knobs_policy(knobs), logits, self.router, knobs, rows, rows,
                    stock_ids=stock_ids)

    def route_lynx(self, knobs: Any, x: torch.Tensor, logits: torch.Tensor) -> Any:
        """What the plugin's TopK hook returns (STANDARD format): SGLang's routing with the
        rerouted rows' columns replaced by the selection's routing."""
        from lynx.sglang_plugin.formats import merge_standard_output

        own = self.route(x, logits)
        sel = self.select(knobs, logits, own.topk_ids)
        return merge_standard_output(own, sel.topk_weights, sel.topk_ids, sel.rerouted,
                                     self.shape.top_k)


def knobs_policy(knobs: Any) -> str:
    from lynx.selection import POLICY_NAMES

    return POLICY_NAMES[int(knobs.policy_code)]
