"""Expert parallelism in the plugin: SGLang's own ``TopK`` under an EP layout (SGLang's
contiguous blocks of E / R routed experts per rank). With ``LYNX_EP_BALANCE`` on (the default)
a ``budget`` table is spent per rank, so the busiest rank reads fewer experts than under one
global budget; off, the global budget of a single process. Either way the statistics count
the busiest rank's experts, kept and stock, and the exporter turns them into the EP gauges.

Shape legend: T rows, E experts, K top_k, R EP ranks."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch
from topk_harness import build_topk, call, make_runtime, policy_spec, sglang_topology, standard
from topk_harness import stock as stock_call

from lynx.selection import STAT_FIELDS
from lynx.selection.ep import rank_loads
from lynx.sglang_plugin.ranks import ParallelRanks
from lynx.sglang_plugin.step_state import StepLayout

pytest.importorskip("sglang.srt.layers.moe.topk")

T, E, K, R, BUDGET = 16, 16, 4, 2, 6
FIELD = {name: i for i, name in enumerate(STAT_FIELDS)}
TOP1 = torch.tensor([0, 8, 1, 9]).repeat(T // 4)  # two top-1 experts on each rank


def skewed_logits() -> torch.Tensor:
    """[T,E]: the rows' top-1s on both ranks (`TOP1`), their weaker choices on rank 0's block
    (what a global budget piles onto one rank)."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(T, E, generator=gen)
    logits[:, : E // R] += 4.0
    logits[torch.arange(T), TOP1] = 10.0
    return logits


def serve_one_step(balance: bool, ranks: int = R) -> tuple[Any, Any]:
    """(SGLang's STANDARD output through the hook, the runtime) for one decode step."""
    runtime = make_runtime(policy_spec("budget", budget=BUDGET), E, K, layers=1)
    runtime.ranks = ParallelRanks(0, 1, 0, 1, ep_size=ranks)  # as SGLang's state would say
    runtime.config = replace(runtime.config, ep_balance=balance)
    with sglang_topology():
        topk = build_topk(experts=E, top_k=K)
        out = standard(call(runtime, topk, skewed_logits(), StepLayout("decode", T, 0)))
        stock = standard(stock_call(topk, skewed_logits()))
    return (out, stock), runtime


def test_a_budget_under_ep_is_spent_per_rank_and_the_busiest_rank_reads_fewer_experts() -> None:
    (out, stock), balanced = serve_one_step(balance=True)
    (flat_out, _), flat = serve_one_step(balance=False)
    plan = balanced.plans[(0, "native")]
    assert plan.router is not None and plan.router.ep_ranks == R and plan.router.ep_balance
    stats, flat_stats = balanced.exporter.layer_totals()[0], flat.exporter.layer_totals()[0]
    kept = torch.zeros(E, dtype=torch.bool)
    kept[out.topk_ids.flatten()] = True  # experts the step routes to (every kept one is used)
    busiest = int(rank_loads(kept, R).max())
    assert busiest == stats[FIELD["rank_kept_max"]] < flat_stats[FIELD["rank_kept_max"]]
    # the stock side is the same batch either way, and the busiest stock rank is rank 0's
    assert stats[FIELD["rank_union_max"]] == flat_stats[FIELD["rank_union_max"]] == E // R
    assert bool(kept[TOP1].all())  # every row keeps its top-1
    # rows whose stock top-K is kept stay SGLang's own, bit for bit
    stock_kept = kept[stock.topk_ids].all(dim=1)
    assert torch.equal(out.topk_ids[stock_kept], stock.topk_ids[stock_kept])
    assert torch.equal(out.topk_weights[stock_kept], stock.topk_weights[stock_kept])
    # LYNX_EP_BALANCE=0 under EP is the single process's global budget, output for output
    (single_out, _), _ = serve_one_step(balance=True, ranks=1)
    assert torch.equal(flat_out.topk_ids, single_out.topk_ids)


class _Gauge:
    def __init__(self, name: str, values: dict) -> None:
        self.name, self.values, self.routing = name, values, ""

    def labels(self, routing: str) -> _Gauge:
        self.routing = routing
        return self

    def set(self, value: float) -> None:
        self.values[(self.name, self.routing)] = value


def test_the_exporter_turns_the_rank_statistics_into_the_ep_gauges() -> None:
    (out, stock), runtime = serve_one_step(balance=True)
    exporter, values = runtime.exporter, {}
    exporter.ep_ranks = R
    exporter._metrics = type("M", (), {name: _Gauge(name, values) for name in (
        "ep_rank_max", "ep_rank_mean", "ep_balancedness", "ep_pairs_max", "ep_pairs_mean")})()
    delta = exporter.layer_totals()
    exporter._export_ep(delta)
    d = delta[0]
    lynx_max, lynx_mean = float(d[FIELD["rank_kept_max"]]), float(d[FIELD["kept"]]) / R
    assert values[("ep_rank_max", "lynx")] == lynx_max
    assert values[("ep_rank_mean", "lynx")] == lynx_mean
    assert values[("ep_balancedness", "lynx")] == pytest.approx(lynx_mean / lynx_max)
    assert values[("ep_rank_max", "stock")] == E // R
    assert values[("ep_rank_max", "lynx")] < values[("ep_rank_max", "stock")]
    assert 0 < values[("ep_balancedness", "stock")] <= 1
    # token pairs: every row routes K pairs under either routing; the busiest rank's pairs
    # are the step's own count (one layer-step: the stock top-K of the skewed batch)
    assert values[("ep_pairs_mean", "lynx")] == values[("ep_pairs_mean", "stock")] == T * K / R
    stock_pairs = torch.bincount(stock.topk_ids.flatten() // (E // R), minlength=R)
    assert values[("ep_pairs_max", "stock")] == float(stock_pairs.max())
    lynx_pairs = torch.bincount(out.topk_ids.flatten() // (E // R), minlength=R)
    assert values[("ep_pairs_max", "lynx")] == float(lynx_pairs.max())
