"""Replica ids bound to the CURVE key that registered them (the link's identity, not the
message's claim).

On a CURVE link the controller's ZAP handler admits a runtime by its public key and ZMQ tags
every message with that key (``User-Id``, z85). A replica id belongs to the key that first
registered it: another key cannot register, heartbeat or send statistics under it (refused and
counted), so one stolen or misbehaving runtime key reaches no replica but its own. An id is
released when its key leaves the allow-list (so live key rotation works: the new key takes the
id once the old one is removed) or by the admin (``DELETE /v1/replicas/{id}``). Ownership is
persisted (``state.dir/replica_keys.json``, atomic) across controller restarts. On ``ipc://``
(a 0600 local socket: one trust domain) and plain-text TCP, messages carry no key and ids are
not bound.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import msgspec

from lynx_policy.state import write_atomically

log = logging.getLogger(__name__)
OWNERS_FILE = "replica_keys.json"


class ReplicaOwners:
    """replica id -> owning key (z85 text); ``allowed`` gives the keys allowed right now."""

    def __init__(self, state_dir: str | Path, allowed: Callable[[], frozenset[bytes]]) -> None:
        self.path = Path(state_dir) / OWNERS_FILE
        self.allowed = allowed
        self.owners: dict[str, str] = {}
        if self.path.exists():
            try:
                self.owners = msgspec.json.decode(self.path.read_bytes(), type=dict[str, str])
            except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
                log.error("%s unreadable (%s): replica ids start unbound", self.path, exc)

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self.path, msgspec.json.encode(self.owners))

    def check(self, replica_id: str, key: str, registering: bool) -> bool:
        """May the runtime with ``key`` act as ``replica_id``? Registering an unowned id (or
        one whose key left the allow-list) binds it to ``key``. An empty key (no CURVE) is
        never bound and always passes."""
        if not key:
            return True
        owner = self.owners.get(replica_id)
        if owner == key:
            return True
        if owner is not None and owner.encode() in self.allowed():
            return False  # another allowed key owns it
        if not registering:
            return False  # heartbeats and statistics never claim an id
        self.owners[replica_id] = key
        self._save()
        if owner is not None:
            log.info("replica id %s re-bound to a new key (its previous key left the "
                     "allow-list)", replica_id)
        return True

    def release(self, replica_id: str) -> bool:
        """Forget the owner of ``replica_id`` (admin); True if it had one."""
        if self.owners.pop(replica_id, None) is None:
            return False
        self._save()
        return True
