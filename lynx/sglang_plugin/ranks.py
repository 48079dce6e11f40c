"""Where this scheduler process sits in SGLang's parallel layout, read from SGLang's own
parallel state (``sglang.srt.runtime_context.get_parallel()``), never from attributes that
may not exist: SGLang 0.5.23's ``ModelRunner`` has no ``tp_rank``, and reading it with a
default made every TP rank believe it was rank 0 (every Lynx counter doubled at TP=2).

Roles Lynx derives from the ranks:
- one replica per DP rank: each DP rank has its own scheduler group, its own batches and so
  its own batch-size distribution and step latency, which is what the controller models; it
  registers as ``<replica_id>/dp<rank>`` when ``dp_size > 1``;
- within a replica, TP rank 0 exports the statistics (every TP rank computes the same routing
  on the same replicated router logits, so one export counts each step once) and owns the
  controller link (it is the rank that pulls requests from the tokenizer; SGLang broadcasts
  them, and with them Lynx's policy messages, to the other TP ranks).
Expert parallelism without an all-to-all backend (``--ep-size``): every rank holds the same
tokens and replicated router logits, so every rank computes the same keep set; rank r holds
the contiguous block of E / ``ep_size`` routed experts that SGLang assigns it, and Lynx spends
``budget`` tables per rank (`lynx.selection.ep`, ``LYNX_EP_BALANCE``).
DP attention (``--enable-dp-attention``) gathers all DP ranks' tokens into each MoE layer; that
layout is not modelled here and is refused at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class RankError(RuntimeError):
    """SGLang's parallel state is missing or a layout Lynx does not support (one line)."""


@dataclass(frozen=True)
class ParallelRanks:
    tp_rank: int
    tp_size: int
    dp_rank: int  # 0 without data parallelism
    dp_size: int
    ep_size: int = 1  # MoE expert-parallel ranks (SGLang's moe_ep_size; 1 without EP)

    @property
    def exports(self) -> bool:
        """This rank exports statistics and owns the controller link (TP rank 0)."""
        return self.tp_rank == 0

    def replica_id(self, base: str) -> str:
        """The controller-side replica name of this rank's DP replica."""
        return f"{base}/dp{self.dp_rank}" if self.dp_size > 1 else base

    def replica_file(self, path: Path) -> Path:
        """The file this DP replica writes: ``<path>.dp<rank>`` under DP, else ``path``."""
        return path.with_name(f"{path.name}.dp{self.dp_rank}") if self.dp_size > 1 else path

    def labels(self) -> dict[str, str]:
        return {"tp_rank": str(self.tp_rank), "dp_rank": str(self.dp_rank)}


def ranks_from_sglang() -> ParallelRanks:
    """This process's ranks from SGLang's parallel state; RankError if it is not published
    (a scheduler always has it) or DP attention is on."""
    try:
        from sglang.srt.runtime_context import get_parallel

        parallel = get_parallel()
        tp_rank, tp_size = int(parallel.tp_rank), int(parallel.tp_size)
        dp_size = int(parallel.dp_size or 1)
        attn_dp = int(parallel.attn_dp_size or 1)
        dp_rank = parallel.dp_rank  # None: no data-parallel controller
        ep_size = int(getattr(parallel, "moe_ep_size", 1) or 1)
    except (ImportError, ValueError, RuntimeError, AttributeError) as exc:
        raise RankError(f"Lynx: SGLang's parallel state is not available ({exc}); the plugin "
                        "runs inside SGLang's scheduler processes only") from None
    if attn_dp > 1:
        raise RankError("Lynx: DP attention (--enable-dp-attention) is not supported: its MoE "
                        "layers see every DP rank's tokens; disable Lynx or DP attention")
    if not 0 <= tp_rank < tp_size:
        raise RankError(f"Lynx: inconsistent TP rank {tp_rank} of {tp_size}")
    return ParallelRanks(tp_rank, tp_size, int(dp_rank or 0), dp_size, ep_size)
