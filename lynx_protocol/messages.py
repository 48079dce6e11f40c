"""Wire messages between a runtime (SGLang scheduler, TP rank 0) and the policy controller.

Every message is a msgspec Struct encoded as one msgpack map with two envelope keys:
``v`` (the protocol version, `PROTOCOL_VERSION`) and ``type`` (the tag). A ZMQ message carries
exactly one encoded message in one frame.

Runtime → controller: `Register`, `StepStats`, `Heartbeat`, `ShadowStats` (shadow mode only;
a controller from before it rejects it as ``unknown_type`` and keeps everything else).
Controller → runtime: `PolicyUpdate`, `Ack`.

`decode` never raises anything but `ProtocolError`, whose ``reason`` is one of
`REJECT_REASONS` (a short, bounded label, fit for a metric label) and whose ``detail`` says
what was wrong.
"""

from __future__ import annotations

import itertools
import math
from typing import Annotated, cast

import msgspec

from lynx_protocol.policy import MAX_BUCKETS, MAX_LAYERS, PolicyName, PolicySpec
from lynx_protocol.shadow import MAX_SHADOW_BUDGETS, Edge, Value, shadow_width

PROTOCOL_VERSION = 2
"""Version 2 (one bump for the control-plane, controller and frontier work): bounded policies
(`lynx_protocol.policy`), the ``coverage`` policy, acknowledged vs applied policy versions, and
per batch-size bucket decode-step statistics (`DecodeBucket`). Version 1 peers are rejected
with ``unknown_version``."""
MAX_MESSAGE_BYTES = 1 << 20
"""Default upper bound on one encoded message [bytes]; a 64-layer StepStats is ~2 KiB."""

REJECT_REASONS: tuple[str, ...] = (
    "oversized",  # longer than the receiver's max_bytes
    "truncated",  # msgpack stops in the middle of a value (or an empty frame)
    "malformed",  # not msgpack, or trailing bytes after the message
    "not_a_message",  # valid msgpack but no {v: int, type: str} envelope
    "unknown_version",  # envelope version != PROTOCOL_VERSION
    "unknown_type",  # tag not in the protocol
    "wrong_direction",  # a known message type the receiver never accepts (e.g. Ack to controller)
    "invalid",  # schema or value constraint violated
)

ReplicaId = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[\w.:@/-]+$")]
Count = Annotated[int, msgspec.Meta(ge=0)]
Version = Annotated[int, msgspec.Meta(ge=0)]
NonNegFloat = Annotated[float, msgspec.Meta(ge=0.0)]
Fraction = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
LATENCY_EDGES_MS: tuple[float, ...] = (1, 2, 5, 10, 20, 35, 50, 75, 100, 200, 500, 1000, 2000,
                                       5000)
"""Inclusive upper bounds [ms] of the step-latency histograms (one more count: above)."""


class ProtocolError(ValueError):
    """A message that was rejected; ``reason`` is a label from `REJECT_REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class _Message(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True,
               tag_field="type"):
    v: int = PROTOCOL_VERSION


class Register(_Message, tag="register", frozen=True):
    """First message of a runtime, re-sent whenever the controller does not know it."""

    replica_id: ReplicaId
    model: Annotated[str, msgspec.Meta(max_length=512)]
    num_layers: Annotated[int, msgspec.Meta(ge=1, le=MAX_LAYERS)]
    """Number of MoE layers (the length of every per-layer list)."""
    num_experts: Annotated[int, msgspec.Meta(ge=1, le=65536)]
    top_k: Annotated[int, msgspec.Meta(ge=1, le=1024)]
    policies: Annotated[list[PolicyName], msgspec.Meta(max_length=16)]
    """Policy names this runtime can apply."""
    tp_size: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 1
    pid: Count = 0
    metrics_url: Annotated[str, msgspec.Meta(max_length=512)] = ""
    """The runtime's Prometheus ``/metrics`` URL, scraped when no Prometheus server is set."""

    def __post_init__(self) -> None:
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")


class DecodeBucket(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Pure decode steps of one batch-size bucket (decode rows <= ``max_batch``; the last
    bucket, ``max_batch`` 0, holds the steps above every edge) over one StepStats window."""

    max_batch: Count
    steps: Count
    latency_sum_ms: NonNegFloat
    """Summed forward wall time of those steps [ms] (host side, prefill-free)."""
    latency_counts: Annotated[list[Count], msgspec.Meta(max_length=len(LATENCY_EDGES_MS) + 1)]
    """Steps per `LATENCY_EDGES_MS` bucket, plus one for the steps above the last edge."""
    pruned_steps: Count
    experts_kept_mean: NonNegFloat
    """Mean over pruned layer-steps of the experts kept."""
    stock_union_mean: NonNegFloat
    """Mean over pruned layer-steps of the stock routing's expert union."""
    routing_mass_kept: Fraction
    """Stock top-K gate mass of pruned rows that landed on kept experts, as a fraction."""
    decode_rows_sum: Count = 0
    """Decode rows summed over the steps (mean batch = this / steps; 0: not reported)."""

    def __post_init__(self) -> None:
        if len(self.latency_counts) != len(LATENCY_EDGES_MS) + 1:
            raise ValueError(f"latency_counts needs {len(LATENCY_EDGES_MS) + 1} entries")
        if sum(self.latency_counts) != self.steps:
            raise ValueError("latency_counts must add up to steps")
        for value in (self.latency_sum_ms, self.experts_kept_mean, self.stock_union_mean):
            if not math.isfinite(value):
                raise ValueError("non-finite float")


class StepStats(_Message, tag="step_stats", frozen=True):
    """Aggregates over the last ``window_s`` seconds of forward steps of one runtime."""

    replica_id: ReplicaId
    seq: Count
    """Increments by one per StepStats sent by this runtime process; gaps mean drops."""
    window_s: Annotated[float, msgspec.Meta(gt=0.0, le=3600.0)]
    batch_size_edges: Annotated[list[Annotated[int, msgspec.Meta(ge=1)]],
                                msgspec.Meta(max_length=MAX_BUCKETS)]
    """Inclusive upper bounds [decode rows] of the batch-size histogram, increasing."""
    batch_size_counts: Annotated[list[Count], msgspec.Meta(max_length=MAX_BUCKETS + 1)]
    """Decode and mixed steps by their number of decode rows, per bucket; one more entry than
    edges: the last counts steps above the last edge."""
    decode_steps: Count
    prefill_steps: Count
    mixed_steps: Count
    experts_kept_mean: Annotated[list[NonNegFloat], msgspec.Meta(max_length=MAX_LAYERS)]
    """Per MoE layer: mean number of distinct experts computed per step after reduction."""
    stock_union_mean: Annotated[list[NonNegFloat], msgspec.Meta(max_length=MAX_LAYERS)]
    """Per MoE layer: mean number of distinct experts stock top-k routing would have used."""
    routing_mass_kept: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
    """Fraction of the routers' top-k probability mass that survived reduction."""
    step_latency_p50_ms: NonNegFloat
    step_latency_p99_ms: NonNegFloat
    applied_policy_version: Version
    """Newest policy version used at a forward step."""
    acknowledged_policy_version: Version = 0
    """Newest policy version received, validated and staged (applied at the next step)."""
    decode_buckets: Annotated[list[DecodeBucket], msgspec.Meta(max_length=MAX_BUCKETS + 1)] = \
        msgspec.field(default_factory=list)
    """Pure decode steps per batch-size bucket (the latency model's data)."""
    prefill_latency_sum_ms: NonNegFloat = 0.0
    mixed_latency_sum_ms: NonNegFloat = 0.0

    def __post_init__(self) -> None:
        edges = self.batch_size_edges
        if any(b <= a for a, b in itertools.pairwise(edges)):
            raise ValueError("batch_size_edges must be strictly increasing")
        if len(self.batch_size_counts) != len(edges) + 1:
            raise ValueError(
                f"batch_size_counts needs len(batch_size_edges)+1 = {len(edges) + 1} entries, "
                f"got {len(self.batch_size_counts)}"
            )
        if len(self.experts_kept_mean) != len(self.stock_union_mean):
            raise ValueError("experts_kept_mean and stock_union_mean differ in length")
        for value in (*self.experts_kept_mean, *self.stock_union_mean, self.window_s,
                      self.step_latency_p50_ms, self.step_latency_p99_ms,
                      self.prefill_latency_sum_ms, self.mixed_latency_sum_ms):
            if not math.isfinite(value):
                raise ValueError("non-finite float")


class ShadowStats(_Message, tag="shadow_stats", frozen=True):
    """Shadow statistics (`lynx_protocol.shadow`) of one decode batch bucket, summed since this
    runtime's previous ShadowStats for the bucket: a dropped message loses a sample of steps,
    never a ratio. The model shape is the replica's `Register`; at most ~480 KiB (1024 layers
    x 52 values)."""

    replica_id: ReplicaId
    max_batch: Count
    """The bucket: one of ``batch_buckets``, or 0 for the steps above the last edge."""
    batch_buckets: Annotated[list[Edge], msgspec.Meta(max_length=MAX_BUCKETS)]
    budgets: Annotated[list[Annotated[int, msgspec.Meta(ge=1)]],
                       msgspec.Meta(min_length=1, max_length=MAX_SHADOW_BUDGETS)]
    every: Annotated[int, msgspec.Meta(ge=1, le=1 << 20)]
    """One decode step measured in this many (``LYNX_SHADOW_EVERY``)."""
    layers: Annotated[list[Annotated[list[Value], msgspec.Meta(
        max_length=shadow_width(MAX_SHADOW_BUDGETS))]], msgspec.Meta(max_length=MAX_LAYERS)]
    """[L][W]: `SHADOW_BASE` then `SHADOW_PER_BUDGET` per budget, summed over layer-steps
    (each in [0, `MAX_SUM`]; the controller checks them against the replica's shape)."""

    def __post_init__(self) -> None:
        edges = self.batch_buckets
        if any(b <= a for a, b in itertools.pairwise(edges)):
            raise ValueError("batch_buckets must be strictly increasing")
        if self.max_batch and self.max_batch not in edges:
            raise ValueError(f"max_batch {self.max_batch} is not one of batch_buckets or 0")
        if any(b <= a for a, b in itertools.pairwise(self.budgets)):
            raise ValueError("budgets must be strictly increasing")
        width = shadow_width(len(self.budgets))
        if any(len(row) != width for row in self.layers):
            raise ValueError(f"every layer needs {width} values for {len(self.budgets)} budgets")
        if not all(math.isfinite(v) for row in self.layers for v in row):
            raise ValueError("non-finite float")


class Heartbeat(_Message, tag="heartbeat", frozen=True):
    """Liveness every ``heartbeat_s``; the controller answers with an `Ack`."""

    replica_id: ReplicaId
    applied_policy_version: Version
    """Newest policy version used at a forward step (0: the local/safe policy)."""
    acknowledged_policy_version: Version = 0
    """Newest policy version received, validated and staged; applied at the next step (an
    idle runtime acknowledges without applying)."""
    rejected_policy_version: Version = 0
    """Newest PolicyUpdate version this runtime refused (0: none); see ``rejected_reason``."""
    rejected_reason: Annotated[str, msgspec.Meta(max_length=256)] = ""


class PolicyUpdate(_Message, tag="policy_update", frozen=True):
    """The policy every replica should apply; ``version`` only ever increases per controller."""

    version: Annotated[int, msgspec.Meta(ge=1)]
    policy: PolicySpec
    controller_id: Annotated[str, msgspec.Meta(max_length=64)] = ""
    """Lineage of the controller's persisted state; a new id resets the runtime's version floor.

    Decoding enforces the policy's bounds (msgspec); whether this replica can apply it is
    checked once, by the runtime link (`lynx_protocol.policy.validate_for_replica`)."""


class Ack(_Message, tag="ack", frozen=True):
    """Controller's answer to Register/Heartbeat (and to stats from an unknown replica)."""

    registered: bool
    """False: the controller does not know this replica (e.g. it restarted); re-send Register."""
    policy_version: Version
    controller_id: Annotated[str, msgspec.Meta(max_length=64)] = ""


RuntimeMessage = Register | StepStats | Heartbeat | ShadowStats
ControllerMessage = PolicyUpdate | Ack
Message = RuntimeMessage | ControllerMessage

MESSAGE_TYPES: dict[str, type[_Message]] = {
    "register": Register, "step_stats": StepStats, "heartbeat": Heartbeat,
    "shadow_stats": ShadowStats, "policy_update": PolicyUpdate, "ack": Ack,
}
TO_CONTROLLER: frozenset[str] = frozenset({"register", "step_stats", "heartbeat",
                                           "shadow_stats"})
TO_RUNTIME: frozenset[str] = frozenset({"policy_update", "ack"})


class _Envelope(msgspec.Struct):
    v: int
    type: str


_encoder = msgspec.msgpack.Encoder()
_envelope_decoder = msgspec.msgpack.Decoder(_Envelope)
_decoders = {
    name: msgspec.msgpack.Decoder(cls) for name, cls in MESSAGE_TYPES.items()
}


def policy_update_size(policy: PolicySpec) -> int:
    """Encoded size [bytes] of the largest `PolicyUpdate` that could carry ``policy`` (widest
    version number and controller id): what an admin change must fit into the link's limit."""
    return len(encode(PolicyUpdate(version=(1 << 63) - 1, policy=policy,
                                   controller_id="x" * 64)))


def encode(msg: Message) -> bytes:
    """Serialize one message (msgpack map with ``v`` and ``type`` keys)."""
    return _encoder.encode(msg)


def decode(
    data: bytes | bytearray | memoryview, *, accept: frozenset[str] | None = None,
    max_bytes: int = MAX_MESSAGE_BYTES,
) -> Message:
    """Parse and validate one message; raises `ProtocolError` with a reason otherwise.

    ``accept``: the message types this receiver takes (`TO_CONTROLLER` or `TO_RUNTIME`);
    None accepts every type.
    """
    size = len(data)
    if size > max_bytes:
        raise ProtocolError("oversized", f"{size} bytes > limit {max_bytes}")
    if size == 0:
        raise ProtocolError("truncated", "empty frame")
    try:
        envelope = _envelope_decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise ProtocolError("not_a_message", _short(exc)) from None
    except msgspec.DecodeError as exc:
        text = str(exc)
        raise ProtocolError("truncated" if "truncated" in text else "malformed",
                            _short(exc)) from None
    if envelope.v != PROTOCOL_VERSION:
        raise ProtocolError("unknown_version",
                            f"version {envelope.v}, this side speaks {PROTOCOL_VERSION}")
    decoder = _decoders.get(envelope.type)
    if decoder is None:
        raise ProtocolError("unknown_type", f"type {envelope.type[:40]!r}")
    if accept is not None and envelope.type not in accept:
        raise ProtocolError("wrong_direction", f"{envelope.type!r} is not accepted here")
    try:
        return cast(Message, decoder.decode(data))
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ProtocolError("invalid", f"{envelope.type}: {_short(exc)}") from None


def _short(exc: Exception, limit: int = 200) -> str:
    text = str(exc).replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"
