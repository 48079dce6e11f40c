"""EPLB through SGLang's own ``TopK`` (issue 24, part 3): a call that carries a physical map
never gets logical ids written into its physical-id output. With SGLang's ``static`` or
``dynamic`` dispatch Lynx judges on the logical ids behind SGLang's physical ones, rows with
nothing dropped keep SGLang's physical ids bit for bit, and each kept expert's rerouted choices
go to one replica (a used one, else the least-loaded rank's); ``fake`` / ``lp`` calls pass
through, counted.

Shape legend: T rows, E logical experts, K top_k, P physical experts (E + redundant)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from topk_harness import build_topk, make_runtime, policy_spec, sglang_topology, standard

from lynx.sglang_plugin import eplb
from lynx.sglang_plugin.step_state import StepLayout

pytest.importorskip("sglang.srt.eplb.expert_location_dispatch")

T, E, K = 16, 8, 2
# physical slots: logical e sits at 9 - e, logical 0 and 3 have a second replica at 10, 11
REPLICAS = torch.tensor([[9, 10], [8, -1], [7, -1], [6, 11], [5, -1], [4, -1], [3, -1],
                         [2, -1]])
NUM_VALID = torch.tensor([2, 1, 1, 2, 1, 1, 1, 1])
PHYSICAL = 12  # slots 0 and 1 hold nothing of this layer


def dispatch_info(algorithm: str) -> Any:
    from sglang.srt.eplb.expert_location_dispatch import ExpertLocationDispatchInfo

    return ExpertLocationDispatchInfo(
        ep_dispatch_algorithm=algorithm,  # type: ignore[arg-type]
        partial_logical_to_rank_dispatch_physical_map=REPLICAS[:, 0].clone(),
        partial_logical_to_all_physical_map=REPLICAS.clamp_min(0),
        partial_logical_to_all_physical_map_num_valid=NUM_VALID,
        num_physical_experts=PHYSICAL, rank_invariant=True)


def skewed_logits() -> torch.Tensor:
    gen = torch.Generator().manual_seed(2)
    return torch.randn(T, E, generator=gen) * 2 + torch.linspace(2, -2, E)[None]


def topk_call(runtime: Any, info: Any, lynx: bool = True) -> Any:
    from sglang.srt.layers.moe.topk import TopK

    topk = build_topk(experts=E, top_k=K)
    hidden = torch.zeros(T, 8)
    if not lynx:
        return standard(TopK.forward_native(topk, hidden, skewed_logits(),
                                            expert_location_dispatch_info=info))
    runtime.state.begin_step(StepLayout("decode", T, 0))
    try:
        return standard(runtime.around_topk_forward(
            TopK.forward_native, topk, hidden, skewed_logits(), path="native",
            expert_location_dispatch_info=info))
    finally:
        runtime.state.step_active = False


def test_physical_ids_map_back_to_their_logical_experts() -> None:
    physical = torch.tensor([[9, 10], [11, 2], [6, 8]])
    assert eplb.to_logical(physical, dispatch_info("static")).tolist() == [[0, 0], [3, 7],
                                                                            [3, 1]]


@pytest.mark.parametrize("algorithm", ["static", "dynamic"])
def test_under_eplb_only_rerouted_rows_change_and_they_get_physical_ids(algorithm: str) -> None:
    info = dispatch_info(algorithm)
    runtime = make_runtime(policy_spec("budget", budget=3), E, K, layers=1)
    with sglang_topology():
        stock = topk_call(runtime, info, lynx=False)
        out = topk_call(runtime, info)
    assert int(stock.topk_ids.max()) >= E  # SGLang's output is physical: the case at hand
    stats = runtime.exporter.layer_totals()[0]
    assert 0 < stats[3] / stats[4] < 1  # something was dropped (mass kept < 1)
    logical_out = eplb.to_logical(out.topk_ids, info)
    logical_stock = eplb.to_logical(stock.topk_ids, info)
    kept = set(logical_out.flatten().tolist())  # every kept expert is routed to
    assert kept < set(logical_stock.flatten().tolist())  # fewer experts than stock's union
    untouched = torch.tensor([set(r) <= kept for r in logical_stock.tolist()])
    assert untouched.any() and (~untouched).any()
    assert torch.equal(out.topk_ids[untouched], stock.topk_ids[untouched])  # bit for bit
    assert torch.equal(out.topk_weights[untouched], stock.topk_weights[untouched])
    # every rerouted id is a replica of its logical expert, and one replica per expert: the
    # one the untouched rows use where they use one
    assert torch.equal(eplb.to_logical(out.topk_ids, info), logical_out)
    used = set(stock.topk_ids[untouched].flatten().tolist())
    for expert in kept:
        slots = set(out.topk_ids[~untouched][logical_out[~untouched] == expert].tolist())
        assert len(slots) <= 1, (expert, slots)
        replicas = set(REPLICAS[expert][: int(NUM_VALID[expert])].tolist())
        if slots and used & replicas:
            assert slots <= used, (expert, slots, used)
    assert runtime.exporter.passed_through["eplb_dispatch"] == 0


def test_rerouted_choices_go_to_a_used_replica_else_the_least_loaded_rank() -> None:
    """Two EP ranks of 6 physical slots each. Logical 0 has replicas at slots 9 and 10 (rank
    1), logical 3 at slot 1 (rank 0) and 11 (rank 1). Rows 2-3 are rerouted to logical 0 and
    3: every choice of 0 goes to slot 10, the replica the untouched rows use; 3, which no
    untouched row uses, goes to the rank with fewer used replicas, and with one rank to its
    lowest slot."""
    from sglang.srt.eplb.expert_location_dispatch import ExpertLocationDispatchInfo

    table = torch.tensor([[9, 10], [8, 0], [7, 0], [1, 11], [5, 0], [4, 0], [3, 0], [2, 0]])
    info = ExpertLocationDispatchInfo(
        ep_dispatch_algorithm="dynamic", partial_logical_to_rank_dispatch_physical_map=table[
            :, 0].clone(), partial_logical_to_all_physical_map=table,
        partial_logical_to_all_physical_map_num_valid=NUM_VALID, num_physical_experts=PHYSICAL,
        rank_invariant=True)
    logical = torch.tensor([[0, 0], [0, 0], [0, 3], [3, 0]])
    rerouted = torch.tensor([False, False, True, True])
    rank0_busy = torch.tensor([[2, 3], [4, 10], [0, 0], [0, 0]])  # rank 0: 3 used, rank 1: 1
    out = eplb.consolidated(logical, rank0_busy, rerouted, info, ranks=2)
    assert out[:2].tolist() == rank0_busy[:2].tolist()  # untouched rows: SGLang's ids
    assert out[2:].tolist() == [[10, 11], [11, 10]]
    rank1_busy = torch.tensor([[10, 8], [7, 2], [0, 0], [0, 0]])  # rank 0: 1 used, rank 1: 3
    assert eplb.consolidated(logical, rank1_busy, rerouted, info, ranks=2)[2:].tolist() == [
        [10, 1], [1, 10]]
    assert eplb.consolidated(logical, rank0_busy, rerouted, info)[2:].tolist() == [
        [10, 1], [1, 10]]  # one rank: a used replica, else the lowest slot


@pytest.mark.parametrize("algorithm", ["fake", "lp"])
def test_dispatch_lynx_cannot_map_back_passes_through_and_is_counted(algorithm: str) -> None:
    from sglang.srt.layers.moe.topk import TopK

    info = dispatch_info(algorithm)
    runtime = make_runtime(policy_spec("budget", budget=3), E, K, layers=1)
    called: list[Any] = []

    def original(*args: Any, **kwargs: Any) -> Any:  # SGLang's call, seen unchanged
        called.append(kwargs.get("expert_location_dispatch_info"))
        return TopK.forward_native(*args, **{**kwargs, "expert_location_dispatch_info": None})

    with sglang_topology():
        topk = build_topk(experts=E, top_k=K)
        runtime.state.begin_step(StepLayout("decode", T, 0))
        out = runtime.around_topk_forward(original, topk, torch.zeros(T, 8), skewed_logits(),
                                          path="native", expert_location_dispatch_info=info)
        runtime.state.step_active = False
        stock = standard(TopK.forward_native(topk, torch.zeros(T, 8), skewed_logits()))
    assert called == [info] and torch.equal(standard(out).topk_ids, stock.topk_ids)
    assert runtime.exporter.passed_through["eplb_dispatch"] == 1
    assert float(runtime.exporter.layer_totals().sum()) == 0  # nothing counted as pruned
