"""One runtime replica as the controller's registry keeps it: its registration, the policy
versions it applied, acknowledged or refused, and its latest decode statistics."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import msgspec

from lynx_policy.evidence import StallCounts
from lynx_protocol.messages import Register, StepStats

STATS_BYTES_PER_REPLICA = 256 * 1024
"""Memory bound on one replica's kept statistics [decoded bytes, `decoded_size`]."""


def decoded_size(stats: StepStats) -> int:
    """Upper estimate of the memory one decoded StepStats holds [bytes]: ~700 for the struct,
    33 per list entry (a float object and its slot), 700 per decode bucket (tested against
    tracemalloc). The encoded size undercounts it ~3.5x (a msgpack float is 9 bytes)."""
    entries = (len(stats.experts_kept_mean) + len(stats.stock_union_mean)
               + len(stats.batch_size_edges) + len(stats.batch_size_counts))
    return 700 + 33 * entries + 700 * len(stats.decode_buckets)


MIX_HISTORY = 1024
"""StepStats mixes kept per replica (~100 bytes each): 512 s at the runtime's default 0.5 s
interval, 205 s at 0.2 s."""


@dataclass
class Replica:
    registration: Register
    identity: bytes
    registered_at: float
    """Unix time of the (latest) Register [s]."""
    last_seen: float
    """Monotonic time of the latest valid message [s]."""
    applied_version: int = 0
    """Newest policy version the replica used at a forward step."""
    acknowledged_version: int = 0
    """Newest policy version the replica received, validated and staged (an idle replica
    acknowledges without applying: that is fine, not lagging)."""
    refused_version: int = 0
    refused_reason: str = ""
    recent_stats: deque[tuple[float, StepStats]] = field(default_factory=lambda: deque(maxlen=64))
    """The latest StepStats (at most 64 and `STATS_BYTES_PER_REPLICA` decoded bytes)."""
    stats_bytes: deque[int] = field(default_factory=deque)
    recent_mix: deque[tuple[float, tuple[tuple[float, int], ...]]] = field(
        default_factory=lambda: deque(maxlen=MIX_HISTORY))
    """(monotonic arrival [s], (mean decode rows, steps) pairs) of the latest StepStats: the
    batch mix behind a latency window (`lynx_policy.evidence.window_mix`), kept longer than
    ``recent_stats`` (whose byte cap holds ~35 s of a 48-layer model's statistics at 1 s,
    while a ``tpot`` reading reaches back 2 x ``observe.max_window_s``)."""
    recent_stalls: deque[tuple[float, StallCounts]] = field(
        default_factory=lambda: deque(maxlen=MIX_HISTORY))
    """(monotonic arrival [s], `StallCounts`) of the latest StepStats, kept as long as
    ``recent_mix``: the prefill/mixed steps behind a latency window
    (`lynx_policy.evidence.window_stalls`)."""
    stats_gaps: int = 0
    """StepStats lost in transit (from ``seq`` gaps)."""
    messages: int = 0
    last_sent_version: int = 0
    last_sent_at: float = float("-inf")
    behind_since: float | None = None
    """Monotonic time since which the replica has not acknowledged the current version."""
    peer_address: str = ""
    """The IP address the link saw the runtime connect from ("" on ipc://)."""

    @property
    def replica_id(self) -> str:
        return self.registration.replica_id

    def note_versions(self, applied: int, acknowledged: int) -> None:
        """What a Heartbeat or StepStats says (an applied version is acknowledged too)."""
        self.applied_version = applied
        self.acknowledged_version = max(acknowledged, applied)

    def status(self, now: float, version: int, ack_timeout_s: float) -> str:
        """``current`` (applied), ``acknowledged`` (staged; an idle replica applies it at its
        next step: fine), ``pending`` (not acknowledged yet, within ``ack_timeout_s``),
        ``behind`` (not acknowledged for longer: degraded) or ``refused``."""
        if self.refused_version == version:
            return "refused"
        if self.applied_version == version:
            return "current"
        if self.acknowledged_version == version:
            return "acknowledged"
        since = now if self.behind_since is None else self.behind_since
        return "behind" if now - since > ack_timeout_s else "pending"

    def view(self, now: float, connected_within_s: float) -> dict[str, Any]:
        last_stats = self.recent_stats[-1][1] if self.recent_stats else None
        return {
            "replica_id": self.replica_id,
            "connected": now - self.last_seen <= connected_within_s,
            "last_seen_s_ago": round(now - self.last_seen, 3),
            "registered_at": self.registered_at,
            "registration": msgspec.to_builtins(self.registration),
            "applied_policy_version": self.applied_version,
            "acknowledged_policy_version": self.acknowledged_version,
            "refused_policy_version": self.refused_version,
            "refused_reason": self.refused_reason,
            "messages": self.messages,
            "stats_gaps": self.stats_gaps,
            "last_stats": msgspec.to_builtins(last_stats) if last_stats else None,
        }
