"""The fleet's shadow statistics (`ShadowStats` from runtimes in shadow mode) and the ladder
proposal built from them, which an operator reviews before it is applied.

Each message carries one decode batch bucket's sums since that runtime's previous message, so
the store adds them up: one sum per bucket for the whole fleet, whatever the number of replicas
or their restarts (a lost message loses a sample of steps, not a ratio). One model shape,
budget grid and sampling at a time (the first that arrives, or the persisted one); a message of
another is refused and counted until ``DELETE /v1/shadow``. Memory: at most (edges + 1) x L x W
float64, e.g. 11 x 61 x 37 x 8 B = 200 KiB for DeepSeek-V3, 27 MiB at the protocol's bounds.

Persisted as ``shadow.json`` in ``state.dir``, in the runtimes' file format
(`lynx_protocol.shadow`), at most every `PERSIST_S` seconds and at shutdown, so
``lynx-policy ladder --from-shadow`` and ``lynx-serve shadow-ladder`` read it too. A damaged file
stops the controller at start-up with one line (it will not guess); the proposal is not
persisted (rebuild it).
"""

from __future__ import annotations

import hashlib
import json
import time
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lynx_policy.state import StateError, write_atomically
from lynx_protocol.ladder import Ladder, encode_ladder
from lynx_protocol.messages import Register, ShadowStats
from lynx_protocol.shadow import (
    ShadowError,
    check_shadow,
    ladder_from_shadow,
    rows_problem,
    shadow_document,
)

SHADOW_FILE = "shadow.json"
PERSIST_S = 30.0
MAX_CONTRIBUTORS = 4096  # replica ids remembered for GET /v1/shadow


class ShadowStore:
    """Summed shadow statistics per decode bucket (``None``: above the last edge)."""

    def __init__(self, state_dir: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(state_dir) / SHADOW_FILE if state_dir else None
        self.clock = clock
        self.grid: tuple[Any, ...] | None = None  # (layers, experts, top_k, budgets, every, edges)
        self.sums: dict[int | None, array] = {}
        self.contributors: dict[str, int] = {}
        self.refused = 0
        self.proposal: dict[str, Any] | None = None
        self.generation = 0  # bumped by `reset`: a proposal built before it is not kept
        self._dirty = False
        self._persisted_at = clock()
        if self.path is not None and self.path.exists():
            try:
                self._restore(check_shadow(self.path.read_bytes(), str(self.path)))
            except (ShadowError, OSError) as exc:
                raise StateError(f"persisted shadow statistics unusable: {exc} (fix or remove "
                                 "the file; the controller will not guess)") from None

    def _restore(self, data: dict[str, Any]) -> None:
        shape = data["model"]
        self.grid = (shape["num_layers"], shape["num_experts"], shape["top_k"],
                     tuple(data["budgets"]), data["every"], tuple(data["batch_buckets"]))
        self.sums = {edge: array("d", (v for row in rows for v in row))
                     for edge, rows in data["buckets"].items()}

    def add(self, reg: Register, msg: ShadowStats) -> str | None:
        """Add one message from the registered replica ``reg``; returns why it was refused
        (None: added). Refused: layers other than the replica's, budgets outside [top_k, E),
        or another shape, grid or sampling than the statistics held."""
        grid = (reg.num_layers, reg.num_experts, reg.top_k, tuple(msg.budgets), msg.every,
                tuple(msg.batch_buckets))
        why = self._misfit(reg, msg, grid)
        if why is not None:
            self.refused += 1
            return why
        self.grid = grid
        edge = msg.max_batch or None
        flat = [v for row in msg.layers for v in row]
        total = self.sums.setdefault(edge, array("d", bytes(8 * len(flat))))
        for i, value in enumerate(flat):  # at most 1e15 a message: no overflow in 1e290 of them
            total[i] += value
        if msg.replica_id in self.contributors or len(self.contributors) < MAX_CONTRIBUTORS:
            self.contributors[msg.replica_id] = self.contributors.get(msg.replica_id, 0) + 1
        self._dirty = True
        if self.clock() - self._persisted_at >= PERSIST_S:
            self.persist()
        return None

    def _misfit(self, reg: Register, msg: ShadowStats, grid: tuple[Any, ...]) -> str | None:
        budgets = tuple(msg.budgets)
        if len(msg.layers) != reg.num_layers:
            return f"{len(msg.layers)} layers, the replica registered {reg.num_layers}"
        if budgets[0] < reg.top_k or budgets[-1] >= reg.num_experts:
            return f"budgets {list(budgets)} not within [top_k, experts)"
        inconsistent = rows_problem(msg.layers, reg.num_layers, len(budgets), reg.num_experts)
        if inconsistent is not None:
            return inconsistent
        if self.grid is not None and grid != self.grid and self.sums:
            return ("another model shape, budget grid or sampling than the statistics held "
                    "(DELETE /v1/shadow to start over)")
        return None

    def shape(self) -> dict[str, Any] | None:
        """The statistics' ``model``, ``budgets``, ``batch_buckets`` and ``every`` (None before
        any arrived), without copying the sums."""
        if self.grid is None or not self.sums:
            return None
        layers, experts, top_k, budgets, every, edges = self.grid
        return {"model": {"num_layers": layers, "num_experts": experts, "top_k": top_k},
                "budgets": list(budgets), "batch_buckets": list(edges), "every": every}

    def data(self) -> dict[str, Any] | None:
        """The statistics as data (`lynx_protocol.shadow`; a copy), or None before any
        arrived."""
        shape = self.shape()
        if shape is None:
            return None
        layers = shape["model"]["num_layers"]
        width = len(self.sums[next(iter(self.sums))]) // layers
        return {**shape, "buckets": {
            edge: [list(flat[i * width:(i + 1) * width]) for i in range(layers)]
            for edge, flat in self.sums.items()}}

    def replicas(self, limit: int = 64) -> dict[str, int]:
        """Messages added per contributing replica (the first ``limit`` ids, sorted)."""
        return dict(sorted(self.contributors.items())[:limit])

    def file_bytes(self) -> bytes | None:
        """The statistics in the runtimes' file format (None: none held)."""
        data = self.data()
        if data is None:
            return None
        return json.dumps(shadow_document(
            data["model"], data["budgets"], data["batch_buckets"], data["every"],
            data["buckets"]), allow_nan=False).encode()

    def persist(self) -> None:
        """Write ``shadow.json`` if anything changed (or remove it after a reset)."""
        self._persisted_at = self.clock()
        if self.path is None or not self._dirty:
            return
        raw = self.file_bytes()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if raw is None:
            self.path.unlink(missing_ok=True)
        else:
            write_atomically(self.path, raw)
        self._dirty = False

    def reset(self) -> None:
        """Forget the statistics and the proposal (persisted at once)."""
        self.grid, self.sums, self.contributors, self.proposal = None, {}, {}, None
        self.generation += 1
        self._dirty = True
        self.persist()

    def steps(self, edge: int | None) -> float:
        """Measured decode steps of one bucket (the fewest over the layers measured)."""
        flat = self.sums.get(edge)
        if flat is None or self.grid is None:
            return 0.0
        width = len(flat) // self.grid[0]
        seen = [flat[i] for i in range(0, len(flat), width) if flat[i] > 0]
        return min(seen) if seen else 0.0

    def steps_by_bucket(self) -> dict[int | None, float]:
        """Measured decode steps per bucket."""
        return {edge: self.steps(edge) for edge in self.sums}

    def accepted(self, proposal_id: str) -> Ladder:
        """The proposal's ladder if ``proposal_id`` names it. Raises LookupError (none) or
        ValueError (another one: rebuilt since it was reviewed)."""
        if self.proposal is None:
            raise LookupError("no ladder proposal: POST /v1/ladder/proposal first")
        if proposal_id != self.proposal["id"]:
            raise ValueError(f"proposal {proposal_id!r} is not the current one "
                             f"({self.proposal['id']}): review it again")
        ladder: Ladder = self.proposal["ladder"]
        return ladder



def build_proposal(data: dict[str, Any] | None, replicas: list[str], means: list[float] | None,
                   min_steps: int, max_mass_lost: float, name: str = "") -> dict[str, Any]:
    """A proposal from statistics as data (`ShadowStore.data`): ``id`` (a digest of the
    ladder, named to accept it), ``ladder``, ``report``, ``built_at``, ``replicas``. Pure but
    for the clock; seconds of CPU for a DeepSeek-V3-sized model, so the admin API runs it in a
    thread. Raises `ShadowError` (no statistics, or none that make a ladder)."""
    if data is None:
        raise ShadowError("no shadow statistics yet: start runtimes with LYNX_SHADOW and a "
                          "controller link, and serve decode traffic")
    ladder, report = ladder_from_shadow(data, means, min_steps, max_mass_lost, name,
                                        built_by="lynx-policy shadow proposal")
    digest = hashlib.sha256(encode_ladder(ladder)).hexdigest()[:16]
    return {"id": digest, "ladder": ladder, "report": report, "built_at": time.time(),
            "replicas": replicas}
