"""Shadow statistics (``LYNX_SHADOW``): their layout, their check at each trust boundary, and the
ladder built from them, with routing mass as the proxy for quality (issue 25). Torch-free:
the runtime measures (`lynx.selection.shadow`, `lynx.sglang_plugin.shadow`), the runtime's
``lynx-serve shadow-ladder`` and the controller (``lynx-policy ladder --from-shadow``, the admin
API's proposal) read and build.

Shape legend: L layers (the runtime's MoE layer index), M candidate budgets, W = `shadow_width`
(M) values per layer: `SHADOW_BASE` then `SHADOW_PER_BUDGET` for each budget in turn, each a
sum over the decode layer-steps measured in one batch bucket.

Statistics as data (`check_shadow`'s result, what `ladder_from_shadow` takes): ``model``
{num_layers, num_experts, top_k}, ``budgets`` [M], ``batch_buckets`` (decode rows, inclusive
upper edges), ``every`` (one decode step measured in this many), ``buckets`` {edge or None
(above the last edge): [L][W]}.

Ladder: per decode batch bucket with at least ``min_steps`` measured steps (the `MAX_TABLES`
busiest), per mean budget, per-layer budgets allocated exactly (`ladder_build.allocate`: least
summed mass lost per layer at that mean of measured experts). Each table sits at its bucket's
smallest batch (lower edge + 1), so the ladder's batch rule ("nearest calibrated batch at or
below") applies it to the batches it was measured at. The cost kind is ``mass_lost``
(1 - routing mass kept), not a quality measurement: the ladder says so (``cost_kind``, each
cost's source). Check a rung with the lm-eval gate (``lynx-serve evaluate --rung --attach``).
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import msgspec

from lynx_protocol.ladder import (
    LADDER_FORMAT,
    MASS_LOST,
    MAX_TABLES,
    Ladder,
    LadderError,
    LadderModel,
    RungCost,
    RungTable,
    decode_ladder,
    encode_ladder,
)
from lynx_protocol.ladder_build import STOCK_RUNG, allocate, assemble_rungs, default_means
from lynx_protocol.policy import MAX_BATCH, MAX_BUCKETS, MAX_EXPERTS, MAX_LAYERS

SHADOW_FORMAT = "lynx-shadow/1"
SHADOW_BASE: tuple[str, ...] = (
    "layer_steps",  # 1 if the step had a decode row, else 0
    "rows",  # decode rows measured
    "stock_union",  # distinct experts in their stock top-K (what stock computes)
    "mass_total",  # their stock top-K gate mass
)
SHADOW_PER_BUDGET: tuple[str, ...] = (
    "kept",  # experts the budget policy would compute
    "mass_kept",  # stock top-K gate mass on those experts
    "top1_kept",  # rows whose top-1 expert those experts hold
)
MAX_SHADOW_BUDGETS = 16
MAX_SUM = 1e15
"""Largest value a sum may hold (a runtime measuring 1e6 rows a second for 30 years stays
below it): bounds every value on the wire and in a file, so sums never overflow to inf."""
BASE, PER = len(SHADOW_BASE), len(SHADOW_PER_BUDGET)
Edge = Annotated[int, msgspec.Meta(ge=1, le=MAX_BATCH)]
Value = Annotated[float, msgspec.Meta(ge=0.0, le=MAX_SUM)]


def shadow_width(budgets: int) -> int:
    """Length W of one layer's statistics for ``budgets`` candidates."""
    return BASE + budgets * PER


def shadow_budgets(num_experts: int, top_k: int) -> list[int]:
    """The candidate budgets a runtime measures: K, 1.5K, 2K, 3K, 4K, E/8, 3E/16, E/4, 3E/8,
    E/2, 3E/4 (those in [K, E), deduplicated, ascending): the per-layer candidates of
    ``lynx-serve calibrate`` (`calibrate.tables.default_candidates`) and the smaller means of
    its ladders (`ladder_build.default_means`). At most 11 (< `MAX_SHADOW_BUDGETS`)."""
    values = {top_k, top_k + top_k // 2, 2 * top_k, 3 * top_k, 4 * top_k, num_experts // 8,
              3 * num_experts // 16, num_experts // 4, 3 * num_experts // 8,
              num_experts // 2, 3 * num_experts // 4}
    return sorted(v for v in values if top_k <= v < num_experts)


class ShadowError(ValueError):
    """Unusable shadow statistics; the message is one line naming where they came from."""


class ShadowModel(msgspec.Struct, forbid_unknown_fields=True):
    num_layers: Annotated[int, msgspec.Meta(ge=1, le=MAX_LAYERS)]
    num_experts: Annotated[int, msgspec.Meta(ge=2, le=MAX_EXPERTS)]
    top_k: Annotated[int, msgspec.Meta(ge=1, le=MAX_EXPERTS)]


class _Bucket(msgspec.Struct, forbid_unknown_fields=True):
    max_batch: Edge | None
    layers: Annotated[list[list[Value]], msgspec.Meta(max_length=MAX_LAYERS)]


class _ShadowFile(msgspec.Struct, forbid_unknown_fields=True):
    """The file (`lynx.sglang_plugin.shadow`, or the controller's ``shadow.json``)."""

    format: str
    model: ShadowModel
    budgets: Annotated[list[int], msgspec.Meta(max_length=MAX_SHADOW_BUDGETS)]
    batch_buckets: Annotated[list[Edge], msgspec.Meta(max_length=MAX_BUCKETS)]
    buckets: Annotated[list[_Bucket], msgspec.Meta(max_length=MAX_BUCKETS + 1)]
    every: Annotated[int, msgspec.Meta(ge=1)] = 1
    fields: dict[str, list[str]] = msgspec.field(default_factory=dict)


def grid_problem(shape: ShadowModel, budgets: list[int], edges: list[int]) -> str | None:
    """Why a model shape, budget grid and bucket edges are inconsistent (None: they are not)."""
    if shape.top_k >= shape.num_experts:
        return f"top_k {shape.top_k} >= {shape.num_experts} experts"
    if (not budgets or len(budgets) > MAX_SHADOW_BUDGETS or budgets != sorted(set(budgets))
            or budgets[0] < shape.top_k or budgets[-1] >= shape.num_experts):
        return f"budgets {budgets} are not ascending within [top_k, experts)"
    if edges != sorted(set(edges)):
        return f"batch_buckets {edges} are not ascending"
    return None


def rows_problem(layers: list[list[float]], num_layers: int, budgets: int,
                 num_experts: int) -> str | None:
    """Why one bucket's ``layers`` are not [L][W] sums a runtime could have measured (None:
    they are): finite, in [0, `MAX_SUM`], and consistent per layer (experts at most E per
    step, mass kept at most the mass, top-1 rows at most the rows)."""
    width = shadow_width(budgets)
    if len(layers) != num_layers or any(len(row) != width for row in layers):
        return f"layer rows are not {num_layers} x {width} values"
    if any(not (math.isfinite(v) and 0.0 <= v <= MAX_SUM) for row in layers for v in row):
        return f"a count is not finite and within [0, {MAX_SUM:g}]"
    slack = 1e-6
    for layer, row in enumerate(layers):
        steps, rows, union, mass = row[:BASE]
        per = [row[BASE + PER * i: BASE + PER * (i + 1)] for i in range(budgets)]
        if (union > num_experts * steps + slack or rows < steps - slack
                or any(kept > num_experts * steps + slack or kept_mass > mass * (1 + slack)
                       + slack or top1 > rows + slack for kept, kept_mass, top1 in per)):
            return (f"layer {layer}: inconsistent sums (experts above {num_experts} per step, "
                    "mass kept above the mass, or top-1 rows above the rows)")
    return None


def check_shadow(raw: bytes, where: str) -> dict[str, Any]:
    """Statistics as data from one file's bytes, checked: the documented types, budgets
    ascending in [top_k, E), every layer row W long, every count finite, each bucket once and
    one of ``batch_buckets`` (or null: above the last). Raises `ShadowError` (one line,
    naming ``where``)."""
    try:
        data = msgspec.json.decode(raw, type=_ShadowFile)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ShadowError(f"{where}: not shadow statistics: {exc}".replace("\n", " ")) from None
    shape, budgets, edges = data.model, data.budgets, data.batch_buckets
    problems = [
        (data.format != SHADOW_FORMAT, f"format {data.format!r}, expected {SHADOW_FORMAT!r}"),
        (True, grid_problem(shape, budgets, edges)),
        (len({b.max_batch for b in data.buckets}) != len(data.buckets), "a bucket twice"),
        (any(b.max_batch is not None and b.max_batch not in edges for b in data.buckets),
         "a bucket's max_batch is not one of batch_buckets"),
        *((True, rows_problem(b.layers, shape.num_layers, len(budgets), shape.num_experts))
          for b in data.buckets),
    ]
    for bad, why in problems:
        if bad and why:
            raise ShadowError(f"{where}: {why}")
    return {"model": msgspec.to_builtins(shape), "budgets": budgets, "batch_buckets": edges,
            "every": data.every, "buckets": {b.max_batch: b.layers for b in data.buckets}}


def shadow_document(model: dict[str, int], budgets: list[int], edges: list[int], every: int,
                    buckets: dict[int | None, list[list[float]]]) -> dict[str, Any]:
    """The file's content (JSON-ready) for statistics as data: what `check_shadow` reads
    back. ``buckets``: edge (None above the last) -> [L][W] sums."""
    return {"format": SHADOW_FORMAT, "model": model, "budgets": budgets,
            "batch_buckets": edges, "every": every,
            "fields": {"base": list(SHADOW_BASE), "per_budget": list(SHADOW_PER_BUDGET)},
            "buckets": [{"max_batch": edge, "layers": rows} for edge, rows in buckets.items()]}


def merge_shadow(parts: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """Statistics of several sources (``(where, data)``; a DP deployment writes one file per
    DP rank) summed bucket by bucket. Raises `ShadowError` when there are none, or a source
    has another model, budget grid or sampling than the first."""
    if not parts:
        raise ShadowError("no shadow statistics given")
    first, merged = parts[0][0], None
    for where, data in parts:
        if merged is None:
            merged = {**data, "buckets": {k: [list(r) for r in v]
                                          for k, v in data["buckets"].items()}}
            continue
        if any(data[k] != merged[k] for k in ("model", "budgets", "batch_buckets", "every")):
            raise ShadowError(f"{where}: another model, budget grid or sampling than {first}")
        for edge, layers in data["buckets"].items():
            have = merged["buckets"].setdefault(edge, [[0.0] * len(r) for r in layers])
            merged["buckets"][edge] = [[a + b for a, b in zip(x, y, strict=True)]
                                       for x, y in zip(have, layers, strict=True)]
    assert merged is not None
    return merged


Curve = list[dict[int, float]]  # per layer, {budget: value}


def bucket_curves(layers: list[list[float]], budgets: list[int], experts: int
                  ) -> tuple[Curve, Curve, Curve]:
    """Per layer, {budget: mass lost [fraction]}, {budget: experts computed per step} and
    {budget: mass kept [summed gate mass]} at every candidate and at ``experts`` (no pruning:
    the stock union, nothing lost)."""
    lost: Curve = []
    kept: Curve = []
    mass: Curve = []
    for row in layers:
        steps, _, union, total = row[:BASE]
        per = [row[BASE + PER * i: BASE + PER * (i + 1)] for i in range(len(budgets))]
        kept.append({**{m: p[0] / steps for m, p in zip(budgets, per, strict=True)},
                     experts: union / steps})
        mass.append({**{m: p[1] for m, p in zip(budgets, per, strict=True)}, experts: total})
        lost.append({m: max(0.0, 1.0 - mass[-1][m] / total) if total else 0.0
                     for m in kept[-1]})
    return lost, kept, mass


def ladder_from_shadow(data: dict[str, Any], means: list[float] | None = None,
                       min_steps: int = 200, max_mass_lost: float = 0.1, name: str = "",
                       built_by: str = "lynx-serve shadow-ladder"
                       ) -> tuple[Ladder, dict[str, Any]]:
    """The ladder (``cost_kind`` ``mass_lost``) and a report (steps by bucket, the buckets
    tabled, each rung's budgets, experts and mass lost) from statistics as data. Layers never
    measured (dense layers such as DeepSeek-V3's first three, or layers Lynx passes through)
    get no pruning in every table and count in no mean. Raises `ShadowError` when no layer
    was measured, or no bucket has ``min_steps`` decode steps on every measured layer."""
    shape = data["model"]
    experts, top_k, layers = shape["num_experts"], shape["top_k"], shape["num_layers"]
    edges = data["batch_buckets"]
    measured = [layer for layer in range(layers)
                if any(rows[layer][0] > 0 for rows in data["buckets"].values())]
    if not measured:
        raise ShadowError("no MoE layer was measured: serve decode traffic with LYNX_SHADOW")
    steps = {edge: min(rows[layer][0] for layer in measured)
             for edge, rows in data["buckets"].items()}
    busy = sorted((e for e in steps if steps[e] >= min_steps), key=lambda e: -steps[e])
    chosen = sorted(busy[:MAX_TABLES], key=lambda e: edges.index(e) if e in edges else 99)
    if not chosen:
        raise ShadowError(f"no decode batch bucket has {min_steps} measured steps yet "
                          f"(steps by bucket: {steps}); let the runtime serve longer")
    means = sorted(set(means or default_means(experts, top_k)), reverse=True)
    if not all(1.0 <= m <= experts for m in means):
        raise ShadowError(f"mean budgets {means} must be within [1, {experts}] experts")
    tables: dict[str, list[RungTable]] = {}
    unreachable: dict[str, str] = {}
    report: dict[str, Any] = {"steps_by_bucket": steps, "tables_from": chosen, "per_batch": []}
    for edge in chosen:
        index = edges.index(edge) if edge in edges else len(edges)
        batch = edges[index - 1] + 1 if index else 1
        rows = data["buckets"][edge]
        lost, kept, mass = bucket_curves([rows[layer] for layer in measured], data["budgets"],
                                         experts)
        source = (f"shadow statistics: {int(steps[edge])} measured decode steps (1 in "
                  f"{data.get('every', 1)}) of {batch}-{edge or 'more'} rows; mass_lost is a "
                  "routing-mass proxy, not quality")
        total = sum(m[experts] for m in mass)
        tables.setdefault(STOCK_RUNG, []).append(RungTable(
            batch=batch, per_layer=[experts] * layers, mass_kept=1.0,
            experts_computed=round(sum(k[experts] for k in kept) / len(measured), 4),
            costs=[RungCost(kind=MASS_LOST, value=0.0, source=source)]))
        entry: dict[str, Any] = {"batch": batch, "rungs": {}}
        for mean in means:
            rung = f"m{mean:g}"
            try:
                budgets = allocate(lost, mean, kept)
            except ValueError as exc:
                unreachable[rung] = str(exc)
                continue
            computed = sum(k[m] for k, m in zip(kept, budgets, strict=True)) / len(measured)
            share = sum(m[b] for m, b in zip(mass, budgets, strict=True)) / total if total else 1.0
            per_layer = [experts] * layers
            for layer, budget in zip(measured, budgets, strict=True):
                per_layer[layer] = budget
            tables.setdefault(rung, []).append(RungTable(
                batch=batch, per_layer=per_layer, experts_computed=round(computed, 4),
                mass_kept=round(min(share, 1.0), 6), costs=[RungCost(
                    kind=MASS_LOST, value=round(max(0.0, 1.0 - share), 6), source=source)]))
            entry["rungs"][rung] = {"budgets": per_layer, "experts_computed": computed,
                                    "mass_lost": 1.0 - share}
        report["per_batch"].append(entry)
    within, dropped = assemble_rungs(tables, len(chosen), unreachable, MASS_LOST, max_mass_lost)
    ladder = Ladder(
        format=LADDER_FORMAT, cost_kind=MASS_LOST,
        model=LadderModel(num_layers=layers, num_experts=experts, top_k=top_k, name=name),
        rungs=within, dropped=dropped,
        source=(f"{built_by}: routing mass from live decode steps (proxy cost mass_lost, "
                f"floor {max_mass_lost:g}); buckets with >= {min_steps} steps"))
    try:  # structs built in code skip their field limits: check them as a reader would
        checked = decode_ladder(encode_ladder(ladder), where="shadow ladder")
    except LadderError as exc:
        raise ShadowError(str(exc)) from None
    return checked, report
