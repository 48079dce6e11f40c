"""What the GPU check's stages share (no SGLang needed): the routers of the conformance matrix
(public config.json values, routed experts only), their inputs and the comparison with the CPU
specification. Shape legend: T rows, E experts, K top_k."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lynx.selection import RouterSpec

# The routers of the conformance matrix (public config.json values), routed experts only.
ROUTERS: dict[str, tuple[int, RouterSpec]] = {
    "DeepSeek-V3": (256, RouterSpec(top_k=8, scoring="sigmoid", num_expert_group=8,
                                    topk_group=4, has_correction_bias=True,
                                    routed_scaling_factor=2.5, scale_on_output=True)),
    "DeepSeek-V2-236B": (160, RouterSpec(top_k=6, renormalize=False, num_expert_group=8,
                                         topk_group=3, routed_scaling_factor=16.0)),
    "DeepSeek-V2-Lite": (64, RouterSpec(top_k=6, renormalize=False)),
    "Qwen3-30B-A3B": (128, RouterSpec(top_k=8)),
    "Mixtral-8x7B": (8, RouterSpec(top_k=2)),
    "OLMoE-1B-7B": (64, RouterSpec(top_k=8, renormalize=False)),
    "GPT-OSS-20B-raw": (32, RouterSpec(top_k=4, renormalize=False, weights="raw_logits")),
    "GLM-4.5-Air": (128, RouterSpec(top_k=8, scoring="sigmoid", has_correction_bias=True)),
}
POLICIES = ("off", "budget", "affinity", "piggyback")
FIELDS = ("keep", "apply_rows", "rerouted", "allowed", "topk_ids")


def _inputs(experts: int, rows: int, seed: int, biased: bool
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, experts, generator=gen) * 1.5 + torch.randn(
        experts, generator=gen)[None] * 1.5
    logits = torch.cat([logits, torch.full((3, experts), float("nan"))])  # padding rows
    bias = torch.randn(experts, generator=gen) * 0.05 + 5.0 if biased else None
    return logits, bias


def _same(a: Any, b: Any) -> bool:
    exact = all(torch.equal(getattr(a, f).cpu(), getattr(b, f).cpu()) for f in FIELDS)
    return exact and torch.allclose(a.topk_weights.cpu(), b.topk_weights.cpu(), rtol=1e-5,
                                    atol=1e-6) and torch.allclose(a.stats.cpu(), b.stats.cpu(),
                                                                  rtol=1e-4, atol=1e-4)




def timer(device: str) -> Callable[[Callable[[], Any]], float]:
    """``run(fn)`` -> milliseconds of one call of ``fn``: CUDA events on a GPU, else the
    wall clock."""
    def run(fn: Callable[[], Any]) -> float:
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return float(start.elapsed_time(end))
        import time

        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return run
