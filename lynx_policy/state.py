"""Persisted controller state (atomic JSON file) and the audit log (JSON lines).

`StateKeeper` is the one place the mode, policy, SLO targets and quality floor change. Every
change gets the next policy version, is written to ``state.json`` atomically (temp file +
fsync + ``os.replace`` + directory fsync) *before* anyone is told, and is appended to
``audit.jsonl``. A restart loads the file and bumps the version once, so versions keep
increasing across restarts and runtimes re-apply the resumed policy.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec

from lynx_policy.config import ControllerConfig, Mode, QualityFloor, SloTarget
from lynx_protocol.messages import PolicyUpdate
from lynx_protocol.policy import PolicySpec

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
AUDIT_FILE = "audit.jsonl"
STATE_SCHEMA = 1
OFF_POLICY = PolicySpec(name="off")


class StateError(RuntimeError):
    """The persisted state exists but cannot be used (the controller refuses to start)."""


class PersistedState(msgspec.Struct, frozen=True, kw_only=True):
    schema: int = STATE_SCHEMA
    controller_id: str
    """Random id of this state's lineage; runtimes reset their version floor when it changes."""
    version: int
    mode: Mode
    policy: PolicySpec
    """The static policy, or adaptive mode's current table; runtimes get ``off`` in mode off."""
    slo: list[SloTarget]
    floor: QualityFloor
    updated_at: float
    """Unix time of the last change [s]."""

    def effective_policy(self) -> PolicySpec:
        return OFF_POLICY if self.mode == "off" else self.policy

    def update_message(self) -> PolicyUpdate:
        return PolicyUpdate(version=self.version, policy=self.effective_policy(),
                            controller_id=self.controller_id)


def write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class AuditLog:
    """Append-only JSON lines: when, who (actor + client address), what, outcome. No secrets."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def record(self, *, actor: str, client: str, action: str, outcome: str,
               **detail: Any) -> None:
        entry = {"ts": time.time(), "actor": actor, "client": client, "action": action,
                 "outcome": outcome, **detail}
        line = msgspec.json.encode(entry) + b"\n"
        try:
            with open(self.path, "ab") as handle:
                handle.write(line)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:  # an audit failure must not take the controller down
            log.error("audit log %s not writable: %s", self.path, exc.strerror)


class StateKeeper:
    def __init__(self, config: ControllerConfig) -> None:
        self.dir = Path(config.state.dir)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(f"state.dir {self.dir}: {exc.strerror}") from None
        self.path = self.dir / STATE_FILE
        for leftover in self.dir.glob(f".{STATE_FILE}.*.tmp"):  # a write cut short by a crash
            leftover.unlink(missing_ok=True)
            log.info("removed %s left by an interrupted state write", leftover.name)
        self.audit = AuditLog(self.dir / AUDIT_FILE)
        loaded = self._load()
        if loaded is None:
            self.state = PersistedState(
                controller_id=uuid.uuid4().hex, version=1, mode=config.mode,
                policy=config.policy, slo=list(config.slo), floor=config.floor,
                updated_at=time.time())
            self.resumed = False
            action = "init"
        else:
            self.state = msgspec.structs.replace(loaded, version=loaded.version + 1,
                                                 updated_at=time.time())
            self.resumed = True
            action = "restart"
        self._save()
        self.audit.record(actor="controller", client="local", action=action, outcome="applied",
                          version=self.state.version, mode=self.state.mode)

    def _load(self) -> PersistedState | None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(f"{self.path}: {exc.strerror}") from None
        try:
            state = msgspec.json.decode(raw, type=PersistedState)
        except msgspec.MsgspecError as exc:
            raise StateError(f"{self.path} is unreadable ({exc}); move it away to start "
                             "fresh (runtimes then reset their version floor)") from None
        if state.schema != STATE_SCHEMA:
            raise StateError(f"{self.path}: schema {state.schema}, expected {STATE_SCHEMA}")
        return state

    def _save(self) -> None:
        write_atomically(self.path, msgspec.json.format(msgspec.json.encode(self.state)))

    def change(self, *, actor: str, client: str, action: str, note: str = "",
               **fields: Any) -> PersistedState:
        """Apply field changes as a new version: persist first, then audit; returns new state."""
        before = {name: _plain(getattr(self.state, name)) for name in fields}
        self.state = msgspec.structs.replace(self.state, version=self.state.version + 1,
                                             updated_at=time.time(), **fields)
        self._save()
        self.audit.record(actor=actor, client=client, action=action, outcome="applied",
                          version=self.state.version, note=note, before=before,
                          after={name: _plain(value) for name, value in fields.items()})
        return self.state


def _plain(value: Any) -> Any:
    return msgspec.to_builtins(value)
