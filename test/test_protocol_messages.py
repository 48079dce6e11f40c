"""Wire protocol: every message round-trips; every kind of bad input is a ProtocolError."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lynx_protocol.messages import (
    MAX_MESSAGE_BYTES,
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    REJECT_REASONS,
    TO_CONTROLLER,
    TO_RUNTIME,
    Ack,
    Heartbeat,
    PolicyUpdate,
    ProtocolError,
    Register,
    StepStats,
    decode,
    encode,
)
from lynx_protocol.policy import BudgetBucket, PolicySpec

REGISTER = Register(replica_id="olmoe-0.dp0", model="lynx/olmoe-tiny", num_layers=4,
                    num_experts=16, top_k=4, policies=["off", "budget", "piggyback"], tp_size=2,
                    pid=4242, metrics_url="http://127.0.0.1:30000/metrics")
STEP_STATS = StepStats(
    replica_id="olmoe-0.dp0", seq=7, window_s=5.0, batch_size_edges=[1, 4, 16, 64],
    batch_size_counts=[3, 10, 40, 2, 0], decode_steps=50, prefill_steps=4, mixed_steps=5,
    experts_kept_mean=[9.5, 10.0, 8.25, 11.0], stock_union_mean=[12.0, 13.5, 12.0, 14.0],
    routing_mass_kept=0.93, step_latency_p50_ms=21.5, step_latency_p99_ms=48.0,
    applied_policy_version=3)
HEARTBEAT = Heartbeat(replica_id="olmoe-0.dp0", applied_policy_version=3,
                      rejected_policy_version=2, rejected_reason="per_layer has 3 entries")
POLICY_UPDATE = PolicyUpdate(
    version=4, controller_id="c0ffee",
    policy=PolicySpec(name="budget", budgets=[
        BudgetBucket(max_batch=8, all_layers=16),
        BudgetBucket(max_batch=64, per_layer=[6, 6, 8, 8])], prune_mixed=False))
ACK = Ack(registered=True, policy_version=4, controller_id="c0ffee")
ALL = [REGISTER, STEP_STATS, HEARTBEAT, POLICY_UPDATE, ACK]


@pytest.mark.parametrize("msg", ALL, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(msg: object) -> None:
    data = encode(msg)  # type: ignore[arg-type]
    assert decode(data) == msg
    envelope = msgspec.msgpack.decode(data)
    assert envelope["v"] == PROTOCOL_VERSION
    assert MESSAGE_TYPES[envelope["type"]] is type(msg)


def test_direction_is_enforced() -> None:
    for msg in (REGISTER, STEP_STATS, HEARTBEAT):
        assert decode(encode(msg), accept=TO_CONTROLLER) == msg
        with pytest.raises(ProtocolError) as err:
            decode(encode(msg), accept=TO_RUNTIME)
        assert err.value.reason == "wrong_direction"
    for msg in (POLICY_UPDATE, ACK):
        with pytest.raises(ProtocolError, match="wrong_direction"):
            decode(encode(msg), accept=TO_CONTROLLER)


def _raw(msg: object) -> dict:
    return msgspec.msgpack.decode(encode(msg))  # type: ignore[arg-type]


def _reason(data: bytes, **kwargs: int) -> str:
    with pytest.raises(ProtocolError) as err:
        decode(data, **kwargs)  # type: ignore[arg-type]
    assert err.value.reason in REJECT_REASONS
    assert err.value.detail
    return err.value.reason


@pytest.mark.parametrize(("mutate", "reason"), [
    (lambda d: d.update(num_layers="four"), "invalid"),
    (lambda d: d.update(num_layers=0), "invalid"),
    (lambda d: d.update(top_k=99), "invalid"),  # top_k > num_experts
    (lambda d: d.update(replica_id=""), "invalid"),
    (lambda d: d.update(replica_id="bad id with spaces"), "invalid"),
    (lambda d: d.update(policies=["telepathy"]), "invalid"),
    (lambda d: d.update(surprise=1), "invalid"),
    (lambda d: d.pop("model"), "invalid"),
    (lambda d: d.update(v=1), "unknown_version"),  # protocol 1 peers: a clear rejection
    (lambda d: d.update(v=3), "unknown_version"),
    (lambda d: d.update(v=0), "unknown_version"),
    (lambda d: d.update(v="1"), "not_a_message"),
    (lambda d: d.update(type="registerx"), "unknown_type"),
    (lambda d: d.pop("type"), "not_a_message"),
])
def test_bad_register_is_rejected_with_reason(mutate, reason: str) -> None:
    data = _raw(REGISTER)
    mutate(data)
    assert _reason(msgspec.msgpack.encode(data)) == reason


@pytest.mark.parametrize(("field", "value"), [
    ("batch_size_counts", [1, 2, 3]),  # needs len(edges)+1
    ("batch_size_edges", [4, 4, 16, 64]),  # not increasing
    ("routing_mass_kept", 1.5),
    ("experts_kept_mean", [1.0]),  # length differs from stock_union_mean
    ("seq", -1),
    ("window_s", 0.0),
    ("step_latency_p99_ms", float("inf")),
])
def test_inconsistent_step_stats_are_invalid(field: str, value: object) -> None:
    data = _raw(STEP_STATS)
    data[field] = value
    assert _reason(msgspec.msgpack.encode(data)) == "invalid"


def test_policy_update_with_unusable_policy_is_invalid() -> None:
    """Decoding enforces the bounds; whether a replica can apply a policy is the link's one
    check (`validate_for_replica`), not repeated here."""
    from lynx_protocol.policy import PolicyError, validate_policy

    data = _raw(POLICY_UPDATE)
    data["policy"] = {"name": "budget", "budgets": []}
    decoded = decode(msgspec.msgpack.encode(data))
    assert isinstance(decoded, PolicyUpdate)
    with pytest.raises(PolicyError, match="at least one entry"):
        validate_policy(decoded.policy)
    data["policy"] = {"name": "budget", "budgets": [{"max_batch": 8, "all_layers": 0}]}
    assert _reason(msgspec.msgpack.encode(data)) == "invalid"
    data = _raw(POLICY_UPDATE)
    data["version"] = 0
    assert _reason(msgspec.msgpack.encode(data)) == "invalid"


def test_size_limits() -> None:
    data = encode(STEP_STATS)
    assert _reason(data, max_bytes=len(data) - 1) == "oversized"
    assert decode(data, max_bytes=len(data)) == STEP_STATS
    assert _reason(b"\x00" * (MAX_MESSAGE_BYTES + 1)) == "oversized"
    assert _reason(b"") == "truncated"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(ALL), st.data())
def test_every_strict_prefix_is_truncated(msg: object, data: st.DataObject) -> None:
    encoded = encode(msg)  # type: ignore[arg-type]
    cut = data.draw(st.integers(min_value=0, max_value=len(encoded) - 1))
    assert _reason(encoded[:cut]) == "truncated"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_never_crash_the_decoder(blob: bytes) -> None:
    try:
        msg = decode(blob)
    except ProtocolError as err:
        assert err.reason in REJECT_REASONS
    else:
        assert type(msg) in MESSAGE_TYPES.values()


_msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=20) | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(_msgpack_values, st.sampled_from(ALL), st.sampled_from(ALL))
def test_well_formed_msgpack_with_wrong_shape_is_rejected(value: object, msg: object,
                                                          other: object) -> None:
    for candidate in (value, {**_raw(msg), "type": _raw(other)["type"]},
                      {**_raw(msg), next(iter(_raw(msg))): value}):
        blob = msgspec.msgpack.encode(candidate)
        try:
            decoded = decode(blob)
        except ProtocolError as err:
            assert err.reason in REJECT_REASONS
        else:  # only acceptable if it really is a valid message of its declared type
            assert decode(encode(decoded)) == decoded


@settings(max_examples=200, deadline=None)
@given(st.integers(-(2**63), 2**64 - 1).filter(lambda v: v != PROTOCOL_VERSION),
       st.sampled_from(ALL))
def test_any_other_version_is_unknown_version(version: int, msg: object) -> None:
    data = _raw(msg)
    data["v"] = version
    assert _reason(msgspec.msgpack.encode(data)) == "unknown_version"


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=30).filter(lambda t: t not in MESSAGE_TYPES), st.sampled_from(ALL))
def test_any_other_type_is_unknown_type(tag: str, msg: object) -> None:
    data = _raw(msg)
    data["type"] = tag
    assert _reason(msgspec.msgpack.encode(data)) == "unknown_type"


@settings(max_examples=100, deadline=None)
@given(layers=st.integers(1, 64), edges=st.lists(st.integers(1, 4096), unique=True, max_size=12),
       seq=st.integers(0, 2**40), mass=st.floats(0.0, 1.0))
def test_generated_step_stats_round_trip(layers: int, edges: list[int], seq: int,
                                         mass: float) -> None:
    edges = sorted(edges)
    stats = StepStats(replica_id="r", seq=seq, window_s=1.0, batch_size_edges=edges,
                      batch_size_counts=list(range(len(edges) + 1)), decode_steps=1,
                      prefill_steps=0, mixed_steps=0, experts_kept_mean=[1.0] * layers,
                      stock_union_mean=[2.0] * layers, routing_mass_kept=mass,
                      step_latency_p50_ms=1.0, step_latency_p99_ms=2.0,
                      applied_policy_version=0)
    assert decode(encode(stats)) == stats


def test_the_largest_valid_policy_is_deliverable() -> None:
    """Protocol 2 bounds every number and list of a policy, so whatever validates also fits
    one link message (the admin API rejects anything that would not, before persisting)."""
    from lynx_protocol.messages import MAX_MESSAGE_BYTES, policy_update_size
    from lynx_protocol.policy import (
        MAX_BATCH,
        MAX_BUCKETS,
        MAX_EXPERTS,
        MAX_LAYERS,
        BudgetBucket,
        PolicySpec,
        validate_policy,
    )

    widest = PolicySpec(name="budget", budgets=[
        BudgetBucket(max_batch=MAX_BATCH - MAX_BUCKETS + i, per_layer=[MAX_EXPERTS] * MAX_LAYERS)
        for i in range(1, MAX_BUCKETS + 1)])
    validate_policy(widest)
    assert policy_update_size(widest) < MAX_MESSAGE_BYTES // 2  # ~330 KiB


@pytest.mark.parametrize("spec", [
    {"name": "budget", "budgets": [{"max_batch": 8, "all_layers": 10**30}]},
    {"name": "budget", "budgets": [{"max_batch": 8, "per_layer": [2] * 1025}]},
    {"name": "budget", "budgets": [{"max_batch": i + 1, "all_layers": 2} for i in range(65)]},
    {"name": "coverage", "coverage": 0.0},
    {"name": "piggyback", "k0": 5000},
])
def test_out_of_bounds_policies_are_refused_by_decoding_and_by_validation(spec: dict) -> None:
    import json

    from lynx_protocol.policy import PolicyError, PolicySpec, decode_policy_json, validate_policy

    with pytest.raises(PolicyError):
        decode_policy_json(json.dumps(spec))
    built = PolicySpec(**{k: v for k, v in spec.items() if k != "budgets"})
    if "budgets" in spec:  # built in Python (no msgspec checks): validate_policy still refuses
        from lynx_protocol.policy import BudgetBucket

        built = PolicySpec(name="budget", budgets=[BudgetBucket(**b) for b in spec["budgets"]])
    with pytest.raises(PolicyError):
        validate_policy(built)


def test_heartbeat_carries_acknowledged_and_applied_versions() -> None:
    beat = Heartbeat(replica_id="r", applied_policy_version=3, acknowledged_policy_version=4)
    again = decode(encode(beat), accept=TO_CONTROLLER)
    assert isinstance(again, Heartbeat)
    assert (again.acknowledged_policy_version, again.applied_policy_version) == (4, 3)
