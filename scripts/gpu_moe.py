"""GPU check stages 3-4: one MoE layer at production shapes, stock routing vs Lynx's, and the
selection step's own cost (used by `gpu_check.py`; no SGLang needed).

Shape legend: B rows (decode batch), E experts, K top_k, H hidden, I expert FFN width.

The MoE layer is timed as one grouped GEMM per projection (`gpu_ep.grouped_moe`, PyTorch's
``torch._grouped_mm``; an expert nobody routes to is an empty group, never read, so the
layer's cost follows the experts used); routing and the pairs' placement are inside both
times. `moe_layer` (gather the rows routed to an expert, SwiGLU FFN, scatter-add weighted,
SGLang's native form) is its reference, checked against it in every run. Timing:
CUDA events, medians of interleaved repetitions; the selection step is inside the Lynx time.
Bound: the weights-read bound = bytes of the experts actually read / the device-to-device copy
bandwidth measured in the same run.
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lynx.selection import RouterSpec, make_knobs, select_layer_step

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_common import timer as make_timer
from gpu_ep import grouped_moe, grouped_plan


@dataclass(frozen=True)
class MoeShape:
    name: str
    experts: int
    top_k: int
    hidden: int
    ffn: int


PRODUCTION = (MoeShape("Qwen3-30B-A3B", 128, 8, 2048, 768),
              MoeShape("Mixtral-8x7B", 8, 2, 4096, 14336),
              MoeShape("DeepSeek-V2-Lite", 64, 6, 2048, 1408))
DRY_RUN = (MoeShape("tiny-fine", 16, 4, 64, 32), MoeShape("tiny-coarse", 4, 2, 64, 128))


def moe_layer(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor,
              w2: torch.Tensor) -> torch.Tensor:
    """[B,H] output of the routed experts (ids/weights [B,K]; w13 [E,2I,H], w2 [E,H,I])."""
    out = torch.zeros_like(x)
    flat_ids = ids.flatten()
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=w13.shape[0]).tolist()
    rows = order // ids.shape[1]
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue  # never read: this is what pruning saves
        picked = order[start:start + count]
        token = rows[start:start + count]
        start += count
        gate_up = x[token] @ w13[expert].T
        gate, up = gate_up.chunk(2, dim=-1)
        y = (torch.nn.functional.silu(gate) * up) @ w2[expert].T
        out.index_add_(0, token, y * weights.flatten()[picked, None].to(y.dtype))
    return out


def copy_bandwidth(device: str, megabytes: int) -> float:
    """Device-to-device copy bandwidth [bytes/ms] (read + write counted)."""
    src = torch.empty(megabytes << 20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    timer = make_timer(device)
    times = [timer(lambda: dst.copy_(src)) for _ in range(5)]
    return 2 * src.numel() / statistics.median(times[1:])


def stage_moe_layer(device: str, dry_run: bool) -> dict[str, Any]:
    """Stock vs Lynx (budget = 2K, every row's top-1 kept) per shape and batch size."""
    shapes = DRY_RUN if dry_run else PRODUCTION
    dtype = torch.float32 if dry_run else torch.bfloat16
    batches = (1, 4, 16) if dry_run else (1, 2, 4, 8, 16, 32, 64, 128)
    reps = 3 if dry_run else 15
    bandwidth = copy_bandwidth(device, 8 if dry_run else 2048)
    timer = make_timer(device)
    rows_out, exact = [], True
    for shape in shapes:
        gen = torch.Generator().manual_seed(0)
        w13 = (torch.randn(shape.experts, 2 * shape.ffn, shape.hidden, generator=gen) * 0.02
               ).to(dtype).to(device)
        w2 = (torch.randn(shape.experts, shape.hidden, shape.ffn, generator=gen) * 0.02
              ).to(dtype).to(device)
        expert_bytes = (w13[0].numel() + w2[0].numel()) * w13.element_size()
        router = RouterSpec(top_k=shape.top_k)
        knobs = make_knobs(device, budget=2 * shape.top_k, policy="budget")
        skew = torch.randn(shape.experts, generator=gen) * 1.5  # popular and rare experts
        for batch in batches:
            x = torch.randn(batch, shape.hidden, generator=gen).to(dtype).to(device)
            logits = (skew[None] + torch.randn(batch, shape.experts, generator=gen) * 1.5
                      ).to(device)
            rows = torch.ones(batch, dtype=torch.bool, device=device)
            stock_w, stock_ids = torch.softmax(logits, -1).topk(shape.top_k, dim=-1)
            stock_w = stock_w / stock_w.sum(-1, keepdim=True)

            def stock(x=x, w=stock_w, ids=stock_ids, w13=w13, w2=w2) -> torch.Tensor:
                return grouped_moe(x, w, grouped_plan(ids, w13.shape[0]), w13, w2)

            def lynx(x=x, logits=logits, rows=rows, w13=w13, w2=w2, router=router,
                     knobs=knobs) -> torch.Tensor:
                sel = select_layer_step("budget", logits, router, knobs, rows, rows)
                return grouped_moe(x, sel.topk_weights, grouped_plan(sel.topk_ids, w13.shape[0]),
                                   w13, w2)

            reference = moe_layer(x, stock_ids, stock_w, w13, w2)
            exact = exact and torch.allclose(stock().float(), reference.float(), rtol=2e-2,
                                             atol=2e-3)
            sel = select_layer_step("budget", logits, router, knobs, rows, rows)
            used = {"stock": int(stock_ids.unique().numel()),
                    "lynx": int(sel.topk_ids.unique().numel())}
            times: dict[str, list[float]] = {"stock": [], "lynx": []}
            for fn in (stock, lynx):
                fn()  # warm-up
            for _ in range(reps):  # interleaved
                times["stock"].append(timer(stock))
                times["lynx"].append(timer(lynx))
            stock_ms, lynx_ms = (statistics.median(times[k]) for k in ("stock", "lynx"))
            rows_out.append({
                "shape": shape.name, "batch": batch, "experts_stock": used["stock"],
                "experts_lynx": used["lynx"], "stock_ms": round(stock_ms, 4),
                "lynx_ms": round(lynx_ms, 4), "speedup": round(stock_ms / lynx_ms, 3),
                "weights_bound_ms_stock": round(used["stock"] * expert_bytes / bandwidth, 4),
                "weights_bound_ms_lynx": round(used["lynx"] * expert_bytes / bandwidth, 4),
                "bound_speedup": round(used["stock"] / used["lynx"], 3),
            })
    ok = exact and all(r["experts_lynx"] <= r["experts_stock"] for r in rows_out)
    return {"ok": ok, "grouped_equals_reference": exact, "dtype": str(dtype),
            "copy_bandwidth_gbps": round(bandwidth / 1e6, 1), "rows": rows_out}


def stage_selection_cost(device: str, dry_run: bool) -> dict[str, Any]:
    """The selection step alone (eager; CUDA-graph replay on a GPU) as a share of the layer."""
    shapes = DRY_RUN if dry_run else PRODUCTION
    timer = make_timer(device)
    out = []
    for shape in shapes:
        for batch in ((4, 16) if dry_run else (16, 32, 64)):
            logits = torch.randn(batch, shape.experts, device=device) * 2
            rows = torch.ones(batch, dtype=torch.bool, device=device)
            router = RouterSpec(top_k=shape.top_k)
            knobs = make_knobs(device, budget=2 * shape.top_k, policy="budget")

            def step(logits=logits, rows=rows, router=router, knobs=knobs) -> Any:
                return select_layer_step("by_code", logits, router, knobs, rows, rows)

            step()
            eager = statistics.median(timer(step) for _ in range(10))
            replay = None
            if device == "cuda":
                stream = torch.cuda.Stream()
                with torch.cuda.stream(stream):
                    step()
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    step()
                replay = statistics.median(timer(graph.replay) for _ in range(20))
            out.append({"shape": shape.name, "batch": batch, "eager_ms": round(eager, 4),
                        "graph_ms": None if replay is None else round(replay, 4)})
    return {"ok": True, "rows": out}
