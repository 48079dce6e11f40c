"""The routers of a transformers MoE model, for the transformers calibration path.

Shape legend: E routed experts, K top_k, H hidden size.

transformers (5.x) gives every MoE architecture a router module (``layers.<i>.mlp.gate``, or
``.mlp.router`` for GPT-OSS) that returns ``(logits [T,E], weights [T,K], ids [T,K])``. Its
routing rule differs per family, and the calibration hook must prune each by the rule it
routes with (`lynx.selection.RouterSpec`), or a pruned row would be routed by another model's
rule. `router_spec` reads the rule from the module, as SGLang's ``TopK`` is read in serving:

| module | scoring | groups | bias | renormalize | scaling |
|---|---|---|---|---|---|
| Mixtral | softmax | - | - | yes | - |
| Qwen3-MoE, Qwen2-MoE, OLMoE | softmax | - | - | ``norm_topk_prob`` | - |
| GPT-OSS (bias inside the logits) | softmax of the top-K logits | - | - | yes | - |
| DeepSeek-V2 | softmax | best expert per group | - | no | in the weights |
| DeepSeek-V3, GLM-4.5 | sigmoid | top-2 sum per group | yes | ``norm_topk_prob`` | in the weights |

(GPT-OSS: softmax over the top-K logits is the renormalized softmax; DeepSeek-V2 groups only
with ``topk_method = group_limited_greedy``; bias: ``e_score_correction_bias``.)

A router class not in this table is refused (`UnknownRouterError`): calibrate it through a
server (``--server``), whose plugin reads SGLang's own ``TopK``.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from lynx.selection import RouterSpec

_ROUTER_PATH = re.compile(r"layers\.(\d+)\.mlp\.(gate|router)$")
_SOFTMAX = ("MixtralTopKRouter", "Qwen3MoeTopKRouter", "Qwen2MoeTopKRouter", "OlmoeTopKRouter",
            "GptOssTopKRouter")
_BIASED = ("DeepseekV3TopkRouter", "Glm4MoeTopkRouter")


class UnknownRouterError(ValueError):
    """A transformers router whose rule the calibration hook does not know (one line)."""


def moe_routers(model: Any) -> dict[int, Any]:
    """{decoder layer index: MoE router module} of a transformers MoE model, in layer order;
    a dense layer (DeepSeek's first layers, Qwen3-MoE's ``mlp_only_layers``) has none."""
    routers = {}
    for name, module in model.named_modules():
        found = _ROUTER_PATH.search(name)
        if found and hasattr(module, "top_k") and hasattr(module, "num_experts"):
            routers[int(found.group(1))] = module
    return dict(sorted(routers.items()))


def router_spec(module: Any) -> tuple[RouterSpec, torch.Tensor | None]:
    """(the routing rule of a transformers router module, its correction bias [E] or None);
    the weights it returns carry the routed scaling factor (``scale_on_output``). Raises
    `UnknownRouterError` for a router class outside the module doc's table."""
    kind = type(module).__name__
    top_k = int(module.top_k)
    if kind in _SOFTMAX:
        return RouterSpec(top_k=top_k,
                          renormalize=bool(getattr(module, "norm_topk_prob", True))), None
    if kind != "DeepseekV2TopkRouter" and kind not in _BIASED:
        raise UnknownRouterError(
            f"router {kind}: the transformers path does not know its routing rule; "
            "calibrate through a server instead (--server)")
    groups = int(module.num_group or 1)
    grouped = {"num_expert_group": groups, "topk_group": int(module.topk_group)} \
        if groups > 1 else {}
    scaling = {"routed_scaling_factor": float(module.routed_scaling_factor),
               "scale_on_output": True}
    if kind == "DeepseekV2TopkRouter":
        if module.topk_method not in ("greedy", "group_limited_greedy"):
            raise UnknownRouterError(f"{kind}: topk_method {module.topk_method!r} unknown")
        if module.topk_method == "greedy":
            grouped = {}
        return RouterSpec(top_k=top_k, renormalize=False, **grouped, **scaling), None
    return RouterSpec(top_k=top_k, renormalize=bool(module.norm_topk_prob), scoring="sigmoid",
                      has_correction_bias=True, **grouped, **scaling), \
        module.e_score_correction_bias.detach().float()


def model_shape(model: Any) -> tuple[int, int]:
    """(E, K) of a transformers MoE model, from its routers. Raises `UnknownRouterError`
    when it has none."""
    routers = list(moe_routers(model).values())
    if not routers:
        raise UnknownRouterError(f"{type(model).__name__}: no MoE router found "
                                 "(layers.<i>.mlp.gate / .mlp.router)")
    return int(routers[0].num_experts), int(routers[0].top_k)
