"""The controller's ladder (`lynx_protocol.ladder`): where it comes from, where it persists,
and whether it fits the replicas it would plan for.

Origin, in order: ``ladder.json`` in ``state.dir`` (written by ``PUT /v1/ladder``, so an
admin's ladder survives restarts and wins over the config), else the config's ``ladder`` file,
else none (the planner then writes uniform budgets, as before ladders existed). The ladder
never travels on the link: the planner turns rungs into ordinary per-layer budget policies.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import msgspec

from lynx_policy.state import StateError, write_atomically
from lynx_protocol.ladder import Ladder, LadderError, encode_ladder, load_ladder, validate_ladder
from lynx_protocol.messages import Register

log = logging.getLogger(__name__)
LADDER_FILE = "ladder.json"


def misfit_of(ladder: Ladder, replicas: Iterable[Register]) -> str | None:
    """Why ``ladder`` does not fit one of ``replicas`` (one line; None: it fits every one)."""
    for reg in replicas:
        try:
            validate_ladder(ladder, where=f"replica {reg.replica_id}",
                            num_layers=reg.num_layers, num_experts=reg.num_experts)
        except LadderError as exc:
            return str(exc)
    return None


class LadderStore:
    """The current ladder (or none); ``replace`` persists before it returns."""

    def __init__(self, state_dir: str, config_file: str = "") -> None:
        self.path = Path(state_dir) / LADDER_FILE
        self.ladder: Ladder | None = None
        self.origin = "none"
        if self.path.exists():
            try:
                self.ladder, self.origin = load_ladder(self.path), str(self.path)
            except LadderError as exc:
                raise StateError(f"persisted ladder unusable: {exc} (fix or remove the file; "
                                 "the controller will not guess)") from None
        elif config_file:
            try:
                self.ladder, self.origin = load_ladder(config_file), config_file
            except LadderError as exc:  # checked at config load; changed since
                raise StateError(f"config ladder: {exc}") from None

    def replace(self, ladder: Ladder | None, origin: str) -> None:
        """Persist (or remove, for None) and adopt ``ladder``."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if ladder is None:
            self.path.unlink(missing_ok=True)
        else:
            write_atomically(self.path, encode_ladder(ladder))
        self.ladder, self.origin = ladder, origin if ladder is not None else "none"

    def misfit(self, replicas: Iterable[Register]) -> str | None:
        """Why the ladder fits no plan for these replicas (None: it fits every one)."""
        return "no ladder" if self.ladder is None else misfit_of(self.ladder, replicas)

    def for_planning(self, replicas: Iterable[Register]) -> Ladder | None:
        """The ladder when it fits every connected replica, else None (uniform budgets)."""
        return self.ladder if self.misfit(replicas) is None else None

    def view(self, replicas: Iterable[Register]) -> dict[str, Any]:
        """Summary for ``GET /v1/ladder`` and ``GET /v1/model``."""
        ladder = self.ladder
        misfit = self.misfit(replicas)
        return {
            "origin": self.origin,
            "fits": misfit is None, "misfit": None if ladder is None else misfit,
            "model": None if ladder is None else msgspec.to_builtins(ladder.model),
            "cost_kind": None if ladder is None else ladder.kind,
            "rungs": [] if ladder is None else [
                {"name": r.name, "experts_computed": round(r.experts(), 3),
                 "cost": r.cost(ladder.kind), "batches": [t.batch for t in r.tables]}
                for r in ladder.rungs],
        }
