"""Expert ids under EPLB, decided per TopK call from the dispatch information SGLang used.

Shape legend: T rows, K routed top_k, E logical experts, X replica slots per logical expert.

With EPLB (redundant or rebalanced experts) or an ``--ep-dispatch-algorithm``, SGLang's
STANDARD output carries *physical* expert ids: ``select_experts`` maps its logical top-K through
the call's ``ExpertLocationDispatchInfo`` (the one passed to ``TopK.forward_*``, else
``ExpertLocationDispatchInfo.init_new(layer_id)``). A server-wide flag cannot tell which calls
are mapped, so the plugin asks per call:
- no dispatch info: the ids are logical; pruned as everywhere else;
- ``static`` or ``dynamic``: the physical ids are mapped back to logical ones through the
  layer's replica table (every physical id is a replica of exactly one logical expert), Lynx
  judges and reroutes on those, and only the rerouted rows get new ids (`consolidated`): all of
  a kept expert's rerouted choices go to *one* of its replicas, one that the step's other rows
  already use if there is one (its weights are read anyway), else the one on the EP rank with
  the fewest active replicas. SGLang's own dispatch (``topk_ids_logical_to_physical``) would
  pick the rank's replica (``static``) or spread the rows over replicas (``dynamic``), waking
  replicas that nothing else needs. Rows with nothing dropped keep SGLang's physical ids bit
  for bit;
- ``fake`` (router logits replaced for load tests) and ``lp`` (replicas from an LP solved
  inside SGLang's routing): the call passes through unpruned, counted as ``eplb_dispatch``.
EPLB rebalances from what SGLang's expert-distribution recorder counted, which is the stock
routing: it fires inside ``select_experts``, before Lynx rewrites any row.
"""

from __future__ import annotations

from typing import Any

import torch

MAPPED = ("static", "dynamic")  # algorithms whose ids Lynx can map back and forth


def call_dispatch_info(topk: Any, kwargs: dict[str, Any]) -> Any:
    """The ``ExpertLocationDispatchInfo`` SGLang maps this call's ids with (None: logical)."""
    explicit = kwargs.get("expert_location_dispatch_info")
    if explicit is not None or getattr(topk, "is_draft", False):
        return explicit
    from sglang.srt.eplb.expert_location_dispatch import ExpertLocationDispatchInfo

    return ExpertLocationDispatchInfo.init_new(int(topk.layer_id))


def to_logical(physical: torch.Tensor, info: Any) -> torch.Tensor:
    """[T,K] logical ids of SGLang's physical ``physical`` [T,K] (inverse of the replica table
    ``partial_logical_to_all_physical_map`` [E,X] over its valid slots)."""
    table = info.partial_logical_to_all_physical_map.to(physical.device)  # [E,X]
    valid = torch.arange(table.shape[1], device=physical.device)[None, :] < \
        info.partial_logical_to_all_physical_map_num_valid.to(physical.device)[:, None]
    logical = torch.arange(table.shape[0], device=physical.device)[:, None].expand_as(table)
    slots = int(info.num_physical_experts)  # unused table slots write to one spare entry
    inverse = torch.zeros(slots + 1, dtype=physical.dtype, device=physical.device)
    inverse.scatter_(0, torch.where(valid, table, slots).flatten().long(),
                     logical.flatten().to(physical.dtype))
    return inverse[physical.long()]


def consolidated(logical: torch.Tensor, physical: torch.Tensor, rerouted: torch.Tensor,
                 info: Any, ranks: int = 1) -> torch.Tensor:
    """[T,K] physical ids for ``logical`` [T,K]: SGLang's own ``physical`` [T,K] on rows not
    ``rerouted`` [T] bool; on rerouted rows each logical expert's one chosen replica (module
    docstring): first a replica the unrerouted rows use, then the one whose EP rank (``ranks``
    contiguous blocks of the physical slots; 1 when they do not divide) holds the fewest
    used replicas, then the lowest slot. Static shapes, no host sync."""
    device = physical.device
    table = info.partial_logical_to_all_physical_map.to(device).long()  # [E,X]
    slots = int(info.num_physical_experts)
    valid = torch.arange(table.shape[1], device=device)[None, :] < \
        info.partial_logical_to_all_physical_map_num_valid.to(device)[:, None]  # [E,X]
    kept_rows = (~rerouted)[:, None].expand_as(physical).flatten()
    used = torch.zeros(slots + 1, dtype=torch.long, device=device).scatter_add_(
        0, torch.where(kept_rows, physical.flatten().long(), slots),
        torch.ones_like(kept_rows, dtype=torch.long))[:slots] > 0  # [P]
    per_rank = slots // ranks if ranks > 1 and slots % ranks == 0 else slots
    rank = torch.arange(slots, device=device) // per_rank  # [P]
    load = torch.zeros(slots // per_rank, dtype=torch.long, device=device).scatter_add_(
        0, rank, used.long())  # used replicas per rank
    slot = table.clamp(0, slots - 1)
    key = ((~used[slot]).long() * (slots + 1) + load[rank[slot]]) * (slots + 1) + slot
    key = torch.where(valid, key, torch.iinfo(torch.long).max)
    choice = table.gather(1, key.argmin(dim=1, keepdim=True)).squeeze(1)  # [E]
    return torch.where(rerouted[:, None], choice[logical.long()].to(physical.dtype), physical)
