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
  judges and reroutes on those, and only the rerouted rows get new ids, mapped to physical
  ones by SGLang's own dispatch (`topk_ids_logical_to_physical`: the rank's replica, or one
  spread by row). Rows with nothing dropped keep SGLang's physical ids bit for bit;
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


def to_physical(logical: torch.Tensor, info: Any) -> torch.Tensor:
    """[T,K] physical ids of ``logical`` [T,K] by SGLang's own dispatch for ``info``."""
    from sglang.srt.eplb.expert_location_dispatch import topk_ids_logical_to_physical

    return topk_ids_logical_to_physical(logical, info).to(logical.dtype)
