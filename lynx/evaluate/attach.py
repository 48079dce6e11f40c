"""Attach the gate's measured accuracy drops to a ladder rung, as costs of their own kind.

``lynx-serve evaluate --rung NAME --attach [LADDER]`` runs the gate on the rung and then writes,
into every table of that rung, one `RungCost` per task:

- ``kind`` = ``acc_drop_<task>`` (the task name lower-cased, other characters as ``_``, cut to
  the protocol's 32 characters);
- ``value`` = the paired accuracy drop, stock - Lynx, as a fraction (0.01 = one point; negative
  when the rung scored higher);
- ``source`` = what measured it: lm-eval's version, the task and metric, n, the standard error
  and the concurrency (the rung's tables cover every batch size; the gate's decode batches
  came from that many requests in flight).

A cost of the same kind is replaced, others are kept, and the file is written atomically in
the ladder's format. A controller or runtime reads the new kinds as it reads ``ppl_rise``
(`lynx_protocol.ladder`: ``costs`` is a list of kinds; ``threshold.kind`` may name one), so
the protocol is unchanged and a mixed-version fleet reads the file.
"""

from __future__ import annotations

import re
from pathlib import Path

import msgspec

from lynx.evaluate.gate import TaskDelta
from lynx_protocol.ladder import Ladder, RungCost, encode_ladder, load_ladder

KIND_PREFIX = "acc_drop_"


def cost_kind(task: str) -> str:
    """``acc_drop_<task>`` within the protocol's kind pattern (``[a-z][a-z0-9_]{0,31}``)."""
    return (KIND_PREFIX + re.sub(r"[^a-z0-9_]", "_", task.lower()))[:32]


def attach(ladder: Ladder, rung: str, deltas: list[TaskDelta], source: str) -> Ladder:
    """``ladder`` with every task's drop attached to each table of ``rung`` (module docstring).
    Raises ValueError for a rung the ladder does not hold."""
    names = [r.name for r in ladder.rungs]
    if rung not in names:
        raise ValueError(f"attach: the ladder has no rung {rung!r} (it has {names})")
    new_costs = {cost_kind(d.task): RungCost(
        kind=cost_kind(d.task), value=round(-d.delta / 100.0, 6),
        source=f"{source}; {d.task} {d.metric}, n={d.n}, stderr {d.stderr:.2f} points"[:512])
        for d in deltas}
    rungs = []
    for r in ladder.rungs:
        if r.name == rung:
            tables = [msgspec.structs.replace(t, costs=[
                *(c for c in t.costs if c.kind not in new_costs), *new_costs.values()])
                for t in r.tables]
            r = msgspec.structs.replace(r, tables=tables)
        rungs.append(r)
    return msgspec.structs.replace(ladder, rungs=rungs)


def attach_to_file(path: Path, rung: str, deltas: list[TaskDelta], source: str) -> Ladder:
    """Load the ladder at ``path``, attach (`attach`), write it back atomically; returns it.
    Raises LadderError (a damaged file) or ValueError (no such rung)."""
    ladder = attach(load_ladder(path), rung, deltas, source)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(encode_ladder(ladder))
    tmp.replace(path)
    return ladder
