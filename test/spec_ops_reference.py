"""Run under ``TRITON_INTERPRET=1 SGLANG_USE_CPU_ENGINE=1``: Lynx's pure-torch speculative ops
vs the Triton kernels SGLang 0.5.23 runs on GPUs for the same step, on random draft trees.
Prints one JSON line: per op, the number of cases and the ones that differ."""

from __future__ import annotations

import json
import sys

import torch
from sglang.kernels.ops.speculative import cache_locs, eagle, reconstruct_tree, spec_tree

from lynx.cpu_compat import spec_ops


def random_tree_mask(gen: torch.Generator, batch: int, n: int) -> torch.Tensor:
    """[B*n*n] bool: node 0 the root, every other node a child of an earlier node."""
    mask = torch.zeros(batch, n, n, dtype=torch.bool)
    for b in range(batch):
        mask[b, 0, 0] = True
        for i in range(1, n):
            parent = int(torch.randint(0, i, (1,), generator=gen))
            mask[b, i] = mask[b, parent]
            mask[b, i, i] = True
    return mask.reshape(-1)


def tree_case(gen: torch.Generator, batch: int, n: int) -> dict[str, bool]:
    mask = random_tree_mask(gen, batch, n)
    seq = torch.randint(1, 50, (batch,), generator=gen)
    ours = [torch.full((batch * n,), -7, dtype=torch.int64) for _ in range(4)]
    theirs = [t.clone() for t in ours]
    spec_ops.reconstruct_indices_from_tree_mask(mask, seq, *ours, batch, n)
    reconstruct_tree.reconstruct_indices_from_tree_mask_triton(mask, seq, *theirs, batch, n)
    result = {"reconstruct": all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))}
    # greedy verification over that tree, tokens from a small vocabulary so paths match
    _, index, next_token, next_sibling = (t.view(batch, n) for t in ours)
    candidates = torch.randint(0, 3, (batch, n), generator=gen)
    target = torch.randint(0, 3, (batch * n,), generator=gen)
    steps = int(torch.randint(2, n + 2, (1,), generator=gen))
    outs = []
    for fn in (spec_ops.verify_tree_greedy_cpu, "triton"):
        predicts = torch.zeros(batch * n, dtype=torch.int64)
        accept_index = torch.full((batch, steps), -1, dtype=torch.int64)
        accept_num = torch.zeros(batch, dtype=torch.int64)
        args = (predicts, accept_index, accept_num, candidates, index, next_token,
                next_sibling, target)
        if fn == "triton":
            spec_tree.verify_tree_greedy_triton(*args)
        else:
            fn(*args)
        outs.append((predicts, accept_index, accept_num))
    result["verify_tree_greedy"] = all(torch.equal(a, b) for a, b in zip(*outs, strict=True))
    # bonus token of the accepted path, and the compaction of accepted slots
    accept_index, accept_num = outs[0][1], outs[0][2]
    lens = accept_num + 1
    bonus = [torch.zeros(batch, dtype=torch.int64) for _ in range(2)]
    tokens = torch.randint(0, 1000, (batch * steps,), generator=gen)
    spec_ops.fill_bonus_tokens_cpu(tokens, lens, bonus[0], steps)
    eagle.fill_bonus_tokens[(batch,)](tokens, lens, bonus[1], steps)
    result["fill_bonus_tokens"] = torch.equal(*bonus)
    out_cache_loc = torch.randint(0, 10_000, (batch * n,), generator=gen)
    compact = [torch.full((batch * steps,), -1, dtype=torch.int64) for _ in range(2)]
    spec_ops.fill_accept_out_cache_loc_cpu(accept_index, out_cache_loc, compact[0])
    size = accept_index.numel()
    eagle.fill_accept_out_cache_loc[(size,)](accept_index, out_cache_loc, compact[1],
                                             1 << (size - 1).bit_length())
    result["fill_accept_out_cache_loc"] = torch.equal(*compact)
    return result


def extend_locs_case(gen: torch.Generator, batch: int) -> bool:
    pool_rows, pool_len = 12, 96
    table = torch.randint(0, 5000, (pool_rows, pool_len), generator=gen, dtype=torch.int32)
    rows = torch.randperm(pool_rows, generator=gen)[:batch]
    start = torch.randint(0, 60, (batch,), generator=gen)
    end = start + torch.randint(0, 30, (batch,), generator=gen)
    total = int((end - start).sum())
    outs = [torch.full((total + 2,), -1, dtype=torch.int64) for _ in range(2)]
    spec_ops.assign_extend_cache_locs_cpu(rows, table, start, end, outs[0], pool_len)
    cache_locs.assign_extend_cache_locs[(batch,)](rows, table, start, end, outs[1], pool_len,
                                                 1 << (batch - 1).bit_length())
    return torch.equal(*outs)


def main() -> None:
    gen = torch.Generator().manual_seed(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
    failures: dict[str, list[str]] = {}
    cases = 0
    for batch, n in [(1, 1), (1, 4), (3, 8), (4, 12), (2, 16), (5, 7)]:
        for repeat in range(3):
            cases += 1
            checks = tree_case(gen, batch, n)
            checks["assign_extend_cache_locs"] = extend_locs_case(gen, batch)
            for name, ok in checks.items():
                if not ok:
                    failures.setdefault(name, []).append(f"B={batch} n={n} #{repeat}")
    print(json.dumps({"cases": cases, "failures": failures}))


if __name__ == "__main__":
    main()
