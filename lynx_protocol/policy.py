"""The policy a runtime applies: the one data type the controller and the runtime both own.

A `PolicySpec` is what the local config file/env gives the runtime at start-up and what the
controller sends in a `PolicyUpdate`. It is plain data (msgspec), torch-free, validated by
`validate_policy` against a model's shape before a runtime accepts it.

Knob meanings (units in brackets):
- ``name``: ``off`` (stock routing), ``budget`` (keep at most ``m`` experts per layer and step,
  every valid token keeps its top-1), ``affinity`` (published AffinityBinning, knobs
  ``alpha``/``beta``), ``piggyback`` (each token keeps its top-``k0``; other slots only on
  experts the batch already uses).
- ``budgets``: for ``budget``; a table of batch-size buckets. A step with ``n`` real decode rows
  uses the first bucket with ``n <= max_batch`` (the last bucket covers everything above).
  Each bucket gives ``per_layer`` budgets [experts] (length = number of MoE layers) or a single
  ``all_layers`` budget. A budget >= the model's expert count means "no pruning".
- ``coverage``: for ``coverage``; keep the fewest experts whose batch routing mass reaches this
  fraction (0, 1] of the step's total, per layer and step (every token's top-1 on top).
- ``prune_mixed``: prune the decode rows of a mixed prefill+decode (chunked-prefill) step.
  Prefill rows are never pruned.
- ``prune_verify``: prune speculative-decoding verify steps (every draft row of every request;
  rows vote per request, see `lynx.selection.speculative`; the budget bucket is chosen by the
  step's draft rows). Off by default: it changes the target's predictions on draft rows, so
  it can lower the acceptance length. Encoded only when set (``omit_defaults``): a runtime
  that predates it refuses such a policy by name instead of ignoring it.

Bounds (protocol version 2; `validate_policy` checks them, msgspec enforces them when decoding):
at most `MAX_BUCKETS` buckets, `MAX_LAYERS` per-layer entries, ``max_batch`` in [1, `MAX_BATCH`],
budgets in [1, `MAX_EXPERTS`], ``alpha`` in (0, 64], ``beta`` in [0, 64], ``k0`` in [1, 1024].
With these bounds every valid policy encodes as a `PolicyUpdate` well under the link's 1 MiB
message limit (largest: 64 buckets x 1024 layers, ~330 KiB), so nothing accepted is undeliverable.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

import msgspec

PolicyName = Literal["off", "budget", "affinity", "piggyback", "coverage"]
POLICY_NAMES: tuple[PolicyName, ...] = ("off", "budget", "affinity", "piggyback", "coverage")
MAX_BUCKETS = 64
MAX_LAYERS = 1024
MAX_BATCH = 1 << 20  # decode rows
MAX_EXPERTS = 1 << 16
MAX_K0 = 1024

Budget = Annotated[int, msgspec.Meta(ge=1, le=MAX_EXPERTS)]


class BudgetBucket(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Expert budget for steps whose real decode row count is <= ``max_batch``."""

    max_batch: Annotated[int, msgspec.Meta(ge=1, le=MAX_BATCH)]
    all_layers: Budget | None = None
    per_layer: Annotated[list[Budget], msgspec.Meta(max_length=MAX_LAYERS)] | None = None

    def budget_for_layer(self, layer: int) -> int:
        if self.per_layer is not None:
            return self.per_layer[layer]
        assert self.all_layers is not None
        return self.all_layers


class PolicySpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    name: PolicyName = "off"
    budgets: Annotated[list[BudgetBucket], msgspec.Meta(max_length=MAX_BUCKETS)] = \
        msgspec.field(default_factory=list)
    alpha: Annotated[float, msgspec.Meta(gt=0.0, le=64.0)] = 3.0
    beta: Annotated[int, msgspec.Meta(ge=0, le=64)] = 2
    k0: Annotated[int, msgspec.Meta(ge=1, le=MAX_K0)] = 1
    coverage: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 0.9
    prune_mixed: bool = True
    prune_verify: bool = False


def policy_document(spec: PolicySpec) -> dict[str, object]:
    """Every field of ``spec`` as JSON-ready builtins, defaults included (for people and the
    admin API; the wire and the state file omit defaults)."""
    return {name: msgspec.to_builtins(getattr(spec, name)) for name in spec.__struct_fields__}


class PolicyError(ValueError):
    """A policy that cannot be applied; the message says which field and why."""


def validate_policy(
    spec: PolicySpec, *, num_layers: int | None = None, num_experts: int | None = None,
    top_k: int | None = None,
) -> PolicySpec:
    """Check a policy's internal consistency and, when given, its fit to a model's shape.

    Returns the same spec; raises `PolicyError` with a one-line reason otherwise.
    """
    if spec.name not in POLICY_NAMES:
        raise PolicyError(f"unknown policy {spec.name!r}; expected one of {POLICY_NAMES}")
    if not (0.0 < spec.alpha <= 64.0):  # also catches NaN
        raise PolicyError(f"alpha must be in (0, 64], got {spec.alpha}")
    if not (0 <= spec.beta <= 64):
        raise PolicyError(f"beta must be in [0, 64], got {spec.beta}")
    if not (1 <= spec.k0 <= MAX_K0):
        raise PolicyError(f"k0 must be in [1, {MAX_K0}], got {spec.k0}")
    if not (0.0 < spec.coverage <= 1.0):
        raise PolicyError(f"coverage must be in (0, 1], got {spec.coverage}")
    if len(spec.budgets) > MAX_BUCKETS:
        raise PolicyError(f"at most {MAX_BUCKETS} budget buckets, got {len(spec.budgets)}")
    if top_k is not None and spec.k0 > top_k:
        raise PolicyError(f"k0={spec.k0} exceeds the model's top_k={top_k}")
    if spec.name == "budget" and not spec.budgets:
        raise PolicyError("policy 'budget' needs at least one entry in 'budgets'")
    last = 0
    for i, bucket in enumerate(spec.budgets):
        where = f"budgets[{i}]"
        if bucket.max_batch <= last or bucket.max_batch > MAX_BATCH:
            raise PolicyError(
                f"{where}.max_batch must increase and be in [1, {MAX_BATCH}], "
                f"got {bucket.max_batch}"
            )
        last = bucket.max_batch
        if (bucket.all_layers is None) == (bucket.per_layer is None):
            raise PolicyError(f"{where}: give exactly one of 'all_layers' or 'per_layer'")
        values = bucket.per_layer if bucket.per_layer is not None else [bucket.all_layers]
        if len(values) > MAX_LAYERS:
            raise PolicyError(f"{where}.per_layer: at most {MAX_LAYERS} layers, got {len(values)}")
        for v in values:
            assert v is not None
            if not (1 <= v <= MAX_EXPERTS):
                raise PolicyError(f"{where}: a budget must be in [1, {MAX_EXPERTS}] experts, "
                                  f"got {v}")
        if (bucket.per_layer is not None and num_layers is not None
                and len(bucket.per_layer) != num_layers):
            raise PolicyError(
                f"{where}.per_layer has {len(bucket.per_layer)} entries, "
                f"the model has {num_layers} MoE layers"
            )
    del num_experts  # budgets above the expert count are legal and mean "no pruning"
    return spec


def validate_for_replica(spec: PolicySpec, *, replica: str, policies: Sequence[str],
                         num_layers: int, num_experts: int, top_k: int) -> PolicySpec:
    """Can this replica apply ``spec``? The one check both trust boundaries run: the admin API
    for every connected replica before accepting a change, the runtime link for its own
    replica before handing an update to the engine. PolicyError names the replica."""
    if spec.name not in policies:
        raise PolicyError(f"replica {replica} does not support policy {spec.name!r}")
    try:
        return validate_policy(spec, num_layers=num_layers, num_experts=num_experts,
                               top_k=top_k)
    except PolicyError as exc:
        raise PolicyError(f"replica {replica}: {exc}") from None


def bucket_for(spec: PolicySpec, n_rows: int) -> BudgetBucket | None:
    """The budget bucket a step with ``n_rows`` real decode rows uses (None if no table)."""
    for bucket in spec.budgets:
        if n_rows <= bucket.max_batch:
            return bucket
    return spec.budgets[-1] if spec.budgets else None


def decode_policy_json(raw: bytes | str) -> PolicySpec:
    """Parse and validate a policy from JSON (config file, env var or admin request)."""
    try:
        spec = msgspec.json.decode(raw, type=PolicySpec)
    except msgspec.ValidationError as exc:
        raise PolicyError(f"invalid policy: {exc}") from None
    except msgspec.DecodeError as exc:
        raise PolicyError(f"policy is not valid JSON: {exc}") from None
    return validate_policy(spec)
