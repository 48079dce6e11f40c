"""DP attention's global keep set (`lynx.selection.global_batch`) on a real 2-process gloo
group: every rank holds different rows, one all-reduce per layer gives both the keep set one
process holding every row would choose (bit for bit: fixed-point sums), each rank routes its
own rows as that process would, and an idle rank joins with zeros without a deadlock.

Shape legend: T rows (all ranks), E experts, K top_k."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lynx.selection import RouterSpec, make_knobs, select_layer_step
from lynx.selection.global_batch import idle_contribution

E, K, T, BUDGET = 32, 4, 24, 10
SPLIT = 9  # rank 0 holds rows [0, 9), rank 1 rows [9, 24) (or none: idle)


def _logits() -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    return torch.randn(E, generator=gen)[None] * 1.5 + torch.randn(T, E, generator=gen)


def _rank(rank: int, folder: str, idle: bool) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank,
                            world_size=2, timeout=datetime.timedelta(seconds=30))
    try:
        mine = _logits()[:SPLIT] if rank == 0 else _logits()[SPLIT:]
        if rank == 1 and idle:  # SGLang's empty_topk_output: no selection, but it joins
            dist.all_reduce(idle_contribution(E))
            return
        rows = torch.ones(mine.shape[0], dtype=torch.bool)
        sel = select_layer_step("budget", mine, RouterSpec(top_k=K), make_knobs(budget=BUDGET),
                                rows, rows, all_reduce=dist.all_reduce)
        torch.save({"keep": sel.keep, "ids": sel.topk_ids, "weights": sel.topk_weights},
                   f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _run(tmp_path: Path, idle: bool) -> dict[int, dict]:
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank, args=(r, str(tmp_path), idle)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)  # bounded: a deadlocked collective fails the test, never hangs it
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive and all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return {r: torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)
            if (tmp_path / f"rank{r}.pt").exists()}


def _single(rows_of: slice) -> object:
    logits = _logits()[rows_of]
    rows = torch.ones(logits.shape[0], dtype=torch.bool)
    return select_layer_step("budget", logits, RouterSpec(top_k=K), make_knobs(budget=BUDGET),
                             rows, rows)


@pytest.mark.slow  # two spawned processes
def test_both_ranks_choose_the_keep_set_of_one_process_holding_every_row(tmp_path: Path) -> None:
    got = _run(tmp_path, idle=False)
    whole = _single(slice(None))
    assert torch.equal(got[0]["keep"], got[1]["keep"])
    assert torch.equal(got[0]["keep"], whole.keep)  # type: ignore[attr-defined]
    local = _single(slice(0, SPLIT))
    assert not torch.equal(local.keep, whole.keep)  # type: ignore[attr-defined]
    ids = torch.cat([got[0]["ids"], got[1]["ids"]])
    assert torch.equal(ids, whole.topk_ids)  # type: ignore[attr-defined]
    assert torch.allclose(torch.cat([got[0]["weights"], got[1]["weights"]]),
                          whole.topk_weights)  # type: ignore[attr-defined]


@pytest.mark.slow
def test_an_idle_rank_joins_with_zeros_and_nothing_deadlocks(tmp_path: Path) -> None:
    got = _run(tmp_path, idle=True)
    assert set(got) == {0}
    assert torch.equal(got[0]["keep"], _single(slice(0, SPLIT)).keep)  # type: ignore[attr-defined]
