"""A ladder from shadow statistics (``LYNX_SHADOW``, `lynx.sglang_plugin.shadow`): calibration
from live traffic, with routing mass as the proxy for quality (issue 25).

Per decode batch bucket the runtime measured, per layer and candidate budget, the experts the
``budget`` policy would compute and the routing mass it would keep. For each mean budget this
allocates per-layer budgets exactly (`tables.allocate`: least summed mass lost per layer at
that mean of experts computed) and records the table's measured experts and mass. The cost
kind is ``mass_lost`` (1 - routing mass kept), not a quality measurement: the ladder says so
(``cost_kind``, each cost's source) and the controller orders and minimises by it. Check a
rung's quality with the lm-eval gate (``lynx-serve evaluate --rung``, ``--attach``) before
relying on it.

Tables: one per bucket with at least ``min_steps`` decode steps (the `MAX_TABLES` busiest),
at the bucket's smallest batch (its lower edge + 1), so the ladder's batch rule ("nearest
calibrated batch at or below") applies each table to the batches it was measured at.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import msgspec

from lynx.calibrate.ladder import STOCK_RUNG, assemble_rungs, default_means
from lynx.calibrate.tables import allocate
from lynx.selection.shadow import SHADOW_BASE, SHADOW_PER_BUDGET, shadow_width
from lynx.sglang_plugin.shadow import SHADOW_FORMAT
from lynx_protocol.ladder import (
    LADDER_FORMAT,
    MASS_LOST,
    MAX_TABLES,
    Ladder,
    LadderModel,
    RungCost,
    RungTable,
    validate_ladder,
)
from lynx_protocol.policy import MAX_EXPERTS, MAX_LAYERS

BASE, PER = len(SHADOW_BASE), len(SHADOW_PER_BUDGET)  # the file's row layout


class ShadowError(ValueError):
    """Unusable shadow statistics; the message is one line naming the file."""


class _Model(msgspec.Struct, forbid_unknown_fields=True):
    num_layers: Annotated[int, msgspec.Meta(ge=1, le=MAX_LAYERS)]
    num_experts: Annotated[int, msgspec.Meta(ge=2, le=MAX_EXPERTS)]
    top_k: Annotated[int, msgspec.Meta(ge=1, le=MAX_EXPERTS)]


class _Bucket(msgspec.Struct, forbid_unknown_fields=True):
    max_batch: Annotated[int, msgspec.Meta(ge=1)] | None
    layers: list[list[Annotated[float, msgspec.Meta(ge=0.0)]]]


class _ShadowFile(msgspec.Struct, forbid_unknown_fields=True):
    """`lynx.sglang_plugin.shadow`'s file, as read at this trust boundary."""

    format: str
    model: _Model
    budgets: list[int]
    batch_buckets: list[Annotated[int, msgspec.Meta(ge=1)]]
    buckets: list[_Bucket]
    every: Annotated[int, msgspec.Meta(ge=1)] = 1
    fields: dict[str, list[str]] = msgspec.field(default_factory=dict)


def load_shadow_file(path: Path) -> dict[str, Any]:
    """One file, checked: the documented types, budgets ascending in [top_k, E), every layer
    row as long as the budgets make it, every count finite, each bucket once and one of
    ``batch_buckets`` (or null: above the last). Raises `ShadowError` (one line, the file)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ShadowError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = msgspec.json.decode(raw, type=_ShadowFile)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ShadowError(f"{path}: not shadow statistics: {exc}".replace("\n", " ")) from None
    shape, budgets, edges = data.model, data.budgets, data.batch_buckets
    width = shadow_width(len(budgets))
    problems = [
        (data.format != SHADOW_FORMAT, f"format {data.format!r}, expected {SHADOW_FORMAT!r}"),
        (shape.top_k >= shape.num_experts, f"top_k {shape.top_k} >= {shape.num_experts} experts"),
        (not budgets or budgets != sorted(set(budgets)) or budgets[0] < shape.top_k
         or budgets[-1] >= shape.num_experts,
         f"budgets {budgets} are not ascending within [top_k, experts)"),
        (edges != sorted(set(edges)), f"batch_buckets {edges} are not ascending"),
        (len({b.max_batch for b in data.buckets}) != len(data.buckets), "a bucket twice"),
        (any(b.max_batch is not None and b.max_batch not in edges for b in data.buckets),
         "a bucket's max_batch is not one of batch_buckets"),
        (any(len(b.layers) != shape.num_layers or any(len(r) != width for r in b.layers)
             for b in data.buckets),
         f"layer rows are not {shape.num_layers} x {width} values"),
        (any(not math.isfinite(v) for b in data.buckets for r in b.layers for v in r),
         "a count is not finite"),
    ]
    for bad, why in problems:
        if bad:
            raise ShadowError(f"{path}: {why}")
    return {"model": msgspec.to_builtins(shape), "budgets": budgets, "batch_buckets": edges,
            "every": data.every, "buckets": {b.max_batch: b.layers for b in data.buckets}}


def read_shadow(paths: list[Path]) -> dict[str, Any]:
    """The statistics of one or more files (a DP deployment writes one per DP rank), summed
    bucket by bucket (`load_shadow_file` checks each). Raises `ShadowError` for a missing,
    damaged or mismatched file."""
    merged: dict[str, Any] | None = None
    for path in paths:
        data = load_shadow_file(path)
        if merged is None:
            merged = data
            continue
        if any(data[k] != merged[k] for k in ("model", "budgets", "batch_buckets", "every")):
            raise ShadowError(f"{path}: another model, budget grid or sampling than {paths[0]}")
        for edge, layers in data["buckets"].items():
            have = merged["buckets"].setdefault(edge, [[0.0] * len(r) for r in layers])
            merged["buckets"][edge] = [[a + b for a, b in zip(x, y, strict=True)]
                                       for x, y in zip(have, layers, strict=True)]
    if merged is None:
        raise ShadowError("no shadow statistics file given")
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
                       min_steps: int = 200, max_mass_lost: float = 0.1, name: str = ""
                       ) -> tuple[Ladder, dict[str, Any]]:
    """The ladder (``cost_kind`` ``mass_lost``) and a report from `read_shadow`'s ``data``.
    Layers never measured (dense layers such as DeepSeek-V3's first three, or layers Lynx
    passes through) get no pruning in every table and count in no mean. Raises `ShadowError`
    when no layer was measured, or no bucket has ``min_steps`` decode steps on every measured
    layer."""
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
        source=(f"lynx-serve shadow-ladder: routing mass from live decode steps (proxy cost "
                f"mass_lost, floor {max_mass_lost:g}); buckets with >= {min_steps} steps"))
    return validate_ladder(ladder, where="shadow ladder"), report


def add_parser(sub: Any) -> None:
    """``lynx-serve shadow-ladder``: the subcommand's arguments."""
    cmd = sub.add_parser("shadow-ladder", help="a ladder from shadow statistics (LYNX_SHADOW "
                         "files): routing mass as the quality proxy; review it, then PUT "
                         "/v1/ladder")
    cmd.add_argument("files", nargs="+", type=Path,
                     help="LYNX_SHADOW files (one per DP rank: <file>.dp<rank>)")
    cmd.add_argument("--means", help="comma-separated mean budgets (default: 3/4 of E down "
                     "to 1/8 of E, those >= 1.5 top_k)")
    cmd.add_argument("--min-steps", type=int, default=200,
                     help="measured decode steps (one in LYNX_SHADOW_EVERY) a batch bucket "
                     "needs to get a table")
    cmd.add_argument("--max-mass-lost", type=float, default=0.1,
                     help="floor: rungs losing more routing mass (a fraction) are dropped")
    cmd.add_argument("--name", default="", help="the model's name in the ladder")
    cmd.add_argument("--out", type=Path, help="write the ladder here (default: stdout)")


def run(args: Any) -> int:
    """Build, print a summary on stderr, write the ladder; exit 2 with one line on bad input."""
    import sys

    from lynx_protocol.ladder import encode_ladder

    try:
        means = [float(m) for m in args.means.split(",")] if args.means else None
        if means is not None and not all(math.isfinite(m) and m >= 1 for m in means):
            raise ShadowError(f"--means {args.means!r}: need finite means >= 1")
        if args.min_steps < 1 or not 0 < args.max_mass_lost <= 1:
            raise ShadowError("need --min-steps >= 1 and 0 < --max-mass-lost <= 1")
        if args.out is not None and not args.out.parent.is_dir():
            raise ShadowError(f"--out {args.out}: no such directory")
        ladder, _ = ladder_from_shadow(read_shadow(args.files), means, args.min_steps,
                                       args.max_mass_lost, args.name)
    except (ShadowError, ValueError) as exc:
        print(f"lynx-serve: error: shadow-ladder: {exc}".replace("\n", " "), file=sys.stderr)
        return 2
    for rung in ladder.rungs:
        print(f"  {rung.name}: {rung.experts():.2f} experts per layer-step, mass lost "
              f"{rung.cost(MASS_LOST):.4f}", file=sys.stderr)
    for gone in ladder.dropped:
        print(f"  dropped {gone.name}: {gone.reason}", file=sys.stderr)
    text = encode_ladder(ladder).decode()
    if args.out is None:
        print(text)
    else:
        args.out.write_text(text + "\n", encoding="utf-8")
        print(f"wrote {args.out}", file=sys.stderr)
    return 0
