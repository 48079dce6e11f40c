"""The ladder: calibrated per-layer budget tables at a set of mean budgets, the controller's knob.

A *rung* is one calibrated table per calibration batch size (``lynx-serve calibrate --ladder``),
with what it was measured to cost. Rungs are ordered from no pruning (rung 0, always present,
cost 0) to the most aggressive one the calibration's quality floor allowed, and
Pareto-filtered: along the order every rung computes fewer experts *and* costs more quality
than the one before (a rung that costs more than a faster one is dropped, and the file lists it
under ``dropped`` with the reason). Torch-free plain data, shared by the runtime's calibration
(which writes it) and the controller (which plans over it).

Shape legend: L MoE layers, E experts, K top_k.

Format ``lynx-ladder/1`` (JSON, one object):
- ``model``: the shape it fits (``num_layers`` L, ``num_experts`` E, ``top_k`` K, ``name``).
- ``rungs[]``: ``name``, ``tables[]`` (ascending ``batch``, the same batches in every rung),
  each with ``per_layer`` [L] budgets [experts], ``experts_computed`` (mean distinct experts
  per layer and decode step measured at that batch), ``mass_kept`` (share of the stock top-K
  gate mass of pruned rows that stayed on kept experts) and ``costs[]``, each a ``kind``
  (``ppl_rise``: held-out perplexity rise as a fraction, 0.0049 = +0.49 %; the accuracy gate
  adds kinds), ``value`` and ``source`` (what measured it).
- ``dropped[]``: rungs the Pareto filter or the quality floor removed, with the reason.
- ``cost_kind`` (optional, encoded only when set; default ``ppl_rise``): the cost kind the
  rungs are ordered by and the controller minimises. A ladder built from shadow statistics
  (``lynx-serve shadow-ladder``) sets ``mass_lost`` (1 - routing mass kept: a proxy,
  no quality measured). Readers from before the field refuse such a ladder, as below.
- ``threshold`` (optional, encoded only when set): ``kind`` and ``value``, the largest cost of
  that kind a rung may have for a runtime to start on it unattended: a runtime serving a
  checkpoint that ships the ladder starts on `start_rung`, the furthest rung within it.
  Readers from before the field refuse a ladder that sets it (one line naming the file or
  request; ``forbid_unknown_fields``): upgrade the controller before shipping such ladders.

Batch rule: a step of B decode rows uses the table of the nearest calibrated batch at or below
B, else the smallest (`table_for`). On the wire a rung is an ordinary per-layer ``budget``
`PolicySpec` (`rung_bucket`): no ladder on the link, no protocol change.
Bounds keep a ladder within one admin request (<= 1 MiB): `MAX_RUNGS` rungs, `MAX_TABLES`
tables, `MAX_COSTS` costs, `MAX_LAYERS` layers.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from lynx_protocol.policy import (
    MAX_BATCH,
    MAX_EXPERTS,
    MAX_LAYERS,
    Budget,
    BudgetBucket,
    PolicySpec,
)

LADDER_FORMAT: Literal["lynx-ladder/1"] = "lynx-ladder/1"
MAX_RUNGS = 16
MAX_TABLES = 4
MAX_COSTS = 8
PPL_RISE = "ppl_rise"
MASS_LOST = "mass_lost"  # 1 - routing mass kept: the proxy cost of a shadow-built ladder
CostKind = Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9_]{0,31}$")]
Name = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
Text = Annotated[str, msgspec.Meta(max_length=512)]
Fraction = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]


class LadderError(ValueError):
    """A damaged or mismatched ladder; the message is one line and names where it came from."""


class _Plain(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class RungCost(_Plain, frozen=True):
    kind: CostKind
    value: Annotated[float, msgspec.Meta(ge=-1.0, le=1e6)]
    source: Text = ""


class RungTable(_Plain, frozen=True):
    batch: Annotated[int, msgspec.Meta(ge=1, le=MAX_BATCH)]
    per_layer: Annotated[list[Budget], msgspec.Meta(min_length=1, max_length=MAX_LAYERS)]
    experts_computed: Annotated[float, msgspec.Meta(ge=0.0, le=MAX_EXPERTS)]
    mass_kept: Fraction = 1.0
    costs: Annotated[list[RungCost], msgspec.Meta(max_length=MAX_COSTS)] = \
        msgspec.field(default_factory=list)

    def cost(self, kind: str = PPL_RISE) -> float | None:
        return next((c.value for c in self.costs if c.kind == kind), None)


class Rung(_Plain, frozen=True):
    name: Name
    tables: Annotated[list[RungTable], msgspec.Meta(min_length=1, max_length=MAX_TABLES)]

    def cost(self, kind: str = PPL_RISE) -> float:
        """Mean over the calibrated batches of this cost kind (0 where none is measured)."""
        values = [c for c in (t.cost(kind) for t in self.tables) if c is not None]
        return sum(values) / len(values) if values else 0.0

    def experts(self) -> float:
        """Mean over the calibrated batches of the experts computed per layer and step."""
        return sum(t.experts_computed for t in self.tables) / len(self.tables)


class DroppedRung(_Plain, frozen=True):
    name: Name
    reason: Text


class Threshold(_Plain, frozen=True):
    """The largest cost of ``kind`` a rung may have for a runtime to start on it unattended."""

    value: Annotated[float, msgspec.Meta(ge=0.0, le=1e6)]
    kind: CostKind = PPL_RISE


class LadderModel(_Plain, frozen=True):
    num_layers: Annotated[int, msgspec.Meta(ge=1, le=MAX_LAYERS)]
    num_experts: Annotated[int, msgspec.Meta(ge=1, le=MAX_EXPERTS)]
    top_k: Annotated[int, msgspec.Meta(ge=1, le=MAX_EXPERTS)]
    name: Text = ""


class Ladder(_Plain, frozen=True, omit_defaults=True):
    format: Literal["lynx-ladder/1"]
    model: LadderModel
    rungs: Annotated[list[Rung], msgspec.Meta(min_length=1, max_length=MAX_RUNGS)]
    dropped: Annotated[list[DroppedRung], msgspec.Meta(max_length=4 * MAX_RUNGS)] = \
        msgspec.field(default_factory=list)
    source: Text = ""
    threshold: Threshold | None = None
    cost_kind: CostKind | None = None

    @property
    def kind(self) -> str:
        """The cost kind the rungs are ordered by (``cost_kind``, else ``ppl_rise``)."""
        return self.cost_kind or PPL_RISE

    def rung(self, name: str) -> Rung:
        for rung in self.rungs:
            if rung.name == name:
                return rung
        raise LadderError(f"no rung {name!r}; the ladder has {[r.name for r in self.rungs]}")


def start_rung(ladder: Ladder) -> Rung | None:
    """The rung a runtime starts on: the furthest whose every table measured the threshold's
    cost kind at or below its value (rung 0 when none does); None without a threshold."""
    limit = ladder.threshold
    if limit is None:
        return None
    within = [r for r in ladder.rungs if all(
        (cost := t.cost(limit.kind)) is not None and cost <= limit.value for t in r.tables)]
    return within[-1] if within else ladder.rungs[0]


def prunes(table: RungTable, num_experts: int) -> bool:
    return any(b < num_experts for b in table.per_layer)


def validate_ladder(ladder: Ladder, *, where: str = "ladder", num_layers: int | None = None,
                    num_experts: int | None = None) -> Ladder:
    """Check internal consistency (rung 0 prunes nothing, unique names, the same ascending
    batches and L entries in every table, Pareto order: fewer experts and a higher cost of
    the ladder's `Ladder.kind` rung after rung) and, when given, the fit to a model. Raises
    `LadderError` naming ``where``; returns the ladder."""
    shape = ladder.model

    def fail(message: str) -> LadderError:
        return LadderError(f"{where}: {message}")

    if num_layers is not None and num_layers != shape.num_layers:
        raise fail(f"made for {shape.num_layers} MoE layers, the model has {num_layers}")
    if num_experts is not None and num_experts != shape.num_experts:
        raise fail(f"made for {shape.num_experts} experts, the model has {num_experts}")
    names = [r.name for r in ladder.rungs]
    if len(set(names)) != len(names):
        raise fail(f"duplicate rung names in {names}")
    batches = [t.batch for t in ladder.rungs[0].tables]
    if any(b <= a for a, b in itertools.pairwise(batches)):
        raise fail(f"rung {names[0]}: table batches must increase, got {batches}")
    for rung in ladder.rungs:
        if [t.batch for t in rung.tables] != batches:
            raise fail(f"rung {rung.name}: batches {[t.batch for t in rung.tables]} differ "
                       f"from rung {names[0]}'s {batches}")
        for table in rung.tables:
            if len(table.per_layer) != shape.num_layers:
                raise fail(f"rung {rung.name} batch {table.batch}: per_layer has "
                           f"{len(table.per_layer)} entries, the model {shape.num_layers}")
            if not all(math.isfinite(c.value) for c in table.costs):
                raise fail(f"rung {rung.name} batch {table.batch}: a cost is not finite")
    first, kind = ladder.rungs[0], ladder.kind
    if any(prunes(t, shape.num_experts) for t in first.tables) or first.cost(kind) != 0.0:
        raise fail(f"rung 0 ({first.name}) must prune nothing and cost 0")
    for before, after in zip(ladder.rungs, ladder.rungs[1:], strict=False):
        if not after.experts() < before.experts():
            raise fail(f"rung {after.name} computes no fewer experts than {before.name} "
                       f"({after.experts():.2f} >= {before.experts():.2f}): not Pareto-ordered")
        if before is not first and not after.cost(kind) > before.cost(kind):
            raise fail(f"rung {after.name} costs no more {kind} than the slower {before.name} "
                       f"({after.cost(kind):.5f} <= {before.cost(kind):.5f}): {before.name} is "
                       "dominated, not Pareto-filtered")
    return ladder


def pareto_filter(rungs: list[Rung], kind: str = PPL_RISE
                  ) -> tuple[list[Rung], list[DroppedRung]]:
    """Rung 0 first (no pruning, cost 0 by definition), then the others by descending experts
    computed; a rung is dropped when another computes no more experts at no more cost of
    ``kind`` (rung 0 is never dropped, nor does it drop a pruning rung measured at <= 0:
    noise). Returns (kept, in ladder order; dropped, with the reason)."""
    first = rungs[0]

    def cost(rung: Rung) -> float:
        return rung.cost(kind)

    kept, dropped = [first], []
    for rung in sorted(rungs[1:], key=lambda r: -r.experts()):
        top = kept[-1]
        if not rung.experts() < first.experts():
            dropped.append(DroppedRung(name=rung.name, reason=f"computes no fewer experts "
                                       f"than {first.name} ({rung.experts():.2f})"))
            continue
        if top is not first and rung.experts() >= top.experts() and cost(rung) >= cost(top):
            dropped.append(DroppedRung(name=rung.name, reason=f"as many experts as {top.name} "
                                       f"at no lower cost ({cost(rung):.5f})"))
            continue
        while len(kept) > 1 and cost(rung) <= cost(kept[-1]):
            gone = kept.pop()
            dropped.append(DroppedRung(name=gone.name, reason=f"costs {cost(gone):.5f}, no "
                                       f"less than the faster {rung.name} ({cost(rung):.5f})"))
        kept.append(rung)
    return kept, dropped


def table_for(rung: Rung, batch: float) -> RungTable:
    """The nearest calibrated table at or below ``batch`` decode rows, else the smallest."""
    chosen = rung.tables[0]
    for table in rung.tables:
        if table.batch <= batch:
            chosen = table
    return chosen


def rung_bucket(rung: Rung, max_batch: int, batch: float, num_experts: int) -> BudgetBucket:
    """The budget bucket (``max_batch``) that applies ``rung`` at ``batch`` rows: its table's
    per-layer budgets, or ``all_layers = num_experts`` where it prunes nothing."""
    table = table_for(rung, batch)
    if not prunes(table, num_experts):
        return BudgetBucket(max_batch=max_batch, all_layers=num_experts)
    return BudgetBucket(max_batch=max_batch, per_layer=list(table.per_layer))


def rung_policy(ladder: Ladder, name: str, edges: list[int], min_batch: int) -> PolicySpec:
    """A static ``budget`` policy pinning rung ``name`` on buckets with upper bounds ``edges``
    (each bucket gets the table for its upper bound; buckets below ``min_batch`` rows are not
    pruned). Raises `LadderError` for an unknown rung."""
    rung = ladder.rung(name)
    experts = ladder.model.num_experts
    return PolicySpec(name="budget", budgets=[
        BudgetBucket(max_batch=edge, all_layers=experts) if edge < min_batch
        else rung_bucket(rung, edge, edge, experts) for edge in edges])


def batch_rule_edges(ladder: Ladder, no_pruning_below: int) -> list[int]:
    """Bucket upper bounds that apply the batch rule exactly: no pruning below
    ``no_pruning_below`` rows, then one bucket per calibrated batch reaching up to the next
    one (the last bucket covers everything above)."""
    batches = [t.batch for t in ladder.rungs[0].tables]
    edges = [no_pruning_below - 1] if no_pruning_below > 1 else []
    edges += [b - 1 for b in batches[1:] if b - 1 > (edges[-1] if edges else 0)]
    return [*edges, MAX_BATCH]


def rung_of_bucket(ladder: Ladder, bucket: BudgetBucket) -> int | None:
    """Index of the rung a bucket applies (any of its tables), 0 for no pruning, None for a
    table that is no rung's (set by hand, or from another ladder)."""
    experts = ladder.model.num_experts
    if bucket.per_layer is None:
        return 0 if (bucket.all_layers or 0) >= experts else None
    if all(b >= experts for b in bucket.per_layer):
        return 0
    for index, rung in enumerate(ladder.rungs):
        if any(t.per_layer == bucket.per_layer for t in rung.tables):
            return index
    return None


def encode_ladder(ladder: Ladder) -> bytes:
    return msgspec.json.format(msgspec.json.encode(ladder), indent=1)


def decode_ladder(raw: bytes | str, where: str = "ladder") -> Ladder:
    """Parse and validate; `LadderError` (one line, naming ``where``) on any problem."""
    try:
        ladder = msgspec.json.decode(raw, type=Ladder)
    except msgspec.ValidationError as exc:
        raise LadderError(f"{where}: not a {LADDER_FORMAT} ladder: {exc}".replace("\n", " ")
                          ) from None
    except msgspec.DecodeError as exc:
        raise LadderError(f"{where}: not valid JSON: {exc}".replace("\n", " ")) from None
    return validate_ladder(ladder, where=where)


def load_ladder(path: str | Path) -> Ladder:
    """Read and validate a ladder file; `LadderError` names the file."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise LadderError(f"{path}: cannot read: {exc.strerror}") from None
    return decode_ladder(raw, where=str(path))
