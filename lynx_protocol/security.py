"""CURVE security for the controller link: key files, the controller's client allow-list, and
socket set-up. ZMQ's own CURVE (libsodium) and ZAP through pyzmq's ``zmq.auth``; no home-made
crypto.

Key files are pyzmq certificates: ``NAME.key`` (public key only, safe to copy) and
``NAME.key_secret`` (public + secret key, owner-only). The controller has a server pair and a
directory of allowed runtime public keys; each runtime has its own pair and the controller's
public key. `AllowedClients` re-reads that directory when it changes, so adding or removing a
runtime's key takes effect on its next connection without restarting either side.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

import zmq
import zmq.auth

log = logging.getLogger(__name__)


class KeyError_(ValueError):
    """A key file is missing, unreadable or not a CURVE certificate (one line)."""


def generate_keypair(directory: Path, name: str) -> tuple[Path, Path]:
    """Write ``NAME.key`` and ``NAME.key_secret`` (mode 0600) into ``directory``; returns
    (public, secret) paths. Refuses to overwrite an existing pair."""
    directory.mkdir(parents=True, exist_ok=True)
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    if public.exists() or secret.exists():
        raise KeyError_(f"{public} or {secret} exists already; remove it to rotate")
    made_public, made_secret = zmq.auth.create_certificates(str(directory), name)
    os.chmod(made_secret, stat.S_IRUSR | stat.S_IWUSR)
    return Path(made_public), Path(made_secret)


def load_public_key(path: Path) -> bytes:
    """The z85 public key of a ``.key`` (or ``.key_secret``) certificate file."""
    try:
        public, _ = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise KeyError_(f"cannot read CURVE public key {path}: {exc}") from None
    return public


def load_keypair(path: Path) -> tuple[bytes, bytes]:
    """(public, secret) z85 keys of a ``.key_secret`` certificate file."""
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise KeyError_(f"cannot read CURVE key pair {path}: {exc}") from None
    if not secret:
        raise KeyError_(f"{path} holds no secret key (use the .key_secret file)")
    return public, secret


def set_client_keys(socket: zmq.Socket, client_secret: Path, server_public: Path) -> None:
    """Make ``socket`` a CURVE client (call before connect): it talks only to the server whose
    public key is in ``server_public``."""
    public, secret = load_keypair(client_secret)
    socket.curve_publickey = public
    socket.curve_secretkey = secret
    socket.curve_serverkey = load_public_key(server_public)


def set_server_keys(socket: zmq.Socket, server_secret: Path) -> None:
    """Make ``socket`` a CURVE server (call before bind); clients are checked by ZAP."""
    public, secret = load_keypair(server_secret)
    socket.curve_publickey = public
    socket.curve_secretkey = secret
    socket.curve_server = True
    socket.zap_domain = b"lynx"


class AllowedClients:
    """ZAP credentials provider: the public keys in a directory (``*.key``), re-read whenever
    the directory changes (checked at most every ``recheck_s``). Counts denials."""

    def __init__(self, directory: Path, recheck_s: float = 0.5,
                 on_denied: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.directory = directory
        self.recheck_s = recheck_s
        self.on_denied = on_denied
        self.clock = clock
        self.denied = 0
        self._keys: frozenset[bytes] = frozenset()
        self._signature: tuple = ()
        self._checked = float("-inf")
        self.reload()

    def _listing(self) -> tuple:
        try:
            return tuple(sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size)
                                for p in self.directory.glob("*.key")))
        except OSError:
            return ()

    def reload(self) -> frozenset[bytes]:
        """Read every ``*.key`` file (unreadable ones are logged and skipped)."""
        keys = set()
        for path in sorted(self.directory.glob("*.key")):
            try:
                keys.add(load_public_key(path))
            except KeyError_ as exc:
                log.warning("skipping allowed-client key: %s", exc)
        self._keys = frozenset(keys)
        self._signature = self._listing()
        self._checked = self.clock()
        return self._keys

    def keys(self) -> frozenset[bytes]:
        now = self.clock()
        if now - self._checked >= self.recheck_s:
            self._checked = now
            if self._listing() != self._signature:
                before = len(self._keys)
                self.reload()
                log.info("allowed runtime keys reloaded from %s: %d -> %d", self.directory,
                         before, len(self._keys))
        return self._keys

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP: is ``key`` (z85) an allowed runtime? (pyzmq's credentials-provider API)"""
        allowed = key in self.keys()
        if not allowed:
            self.denied += 1
            if self.on_denied is not None:
                self.on_denied()
        return allowed


def restrict_ipc_path(endpoint: str) -> None:
    """``ipc://PATH`` endpoints: owner-only permissions on the socket file (unencrypted ipc is
    allowed, but only this user may connect)."""
    if endpoint.startswith("ipc://"):
        path = Path(endpoint[len("ipc://"):])
        if path.exists():
            os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
