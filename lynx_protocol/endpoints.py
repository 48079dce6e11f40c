"""Where the controller listens (``ipc://`` by default, ``tcp://`` for containers) and how a
runtime reaches it (`LinkSettings`).

Endpoints stay clear of SGLang's own sockets: SGLang uses random ``ipc://`` temp files (and,
with DP attention, TCP ports ``port+233..238``; KV events 5557/5558), so Lynx uses
``/tmp/lynx-<name>.sock`` and TCP port `DEFAULT_TCP_PORT`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from lynx_protocol.messages import MAX_MESSAGE_BYTES

DEFAULT_NAME = "default"
DEFAULT_TCP_PORT = 5790
"""Controller ZMQ port for ``tcp://`` deployments (the admin HTTP API defaults to 5791)."""
IPC_PATH_MAX = 100
"""Unix socket paths are limited to ~107 bytes by the kernel; keep a margin."""

_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_TCP_RE = re.compile(r"^tcp://(?P<host>\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.*-]+):(?P<port>\d{1,5})$")


class EndpointError(ValueError):
    """An endpoint string that ZMQ would not accept or that Lynx does not allow."""


def default_endpoint(name: str = DEFAULT_NAME) -> str:
    """``ipc:///tmp/lynx-<name>.sock``."""
    if not _NAME_RE.match(name):
        raise EndpointError(f"endpoint name {name!r} must match {_NAME_RE.pattern}")
    return f"ipc:///tmp/lynx-{name}.sock"


def tcp_endpoint(host: str, port: int = DEFAULT_TCP_PORT) -> str:
    return validate_endpoint(f"tcp://{host}:{port}")


def validate_endpoint(endpoint: str) -> str:
    """Return ``endpoint`` if it is an ``ipc://`` path or ``tcp://host:port``; raise otherwise."""
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://"):]
        if not path.startswith("/"):
            raise EndpointError(f"ipc endpoint needs an absolute path: {endpoint!r}")
        if len(path.encode()) > IPC_PATH_MAX:
            raise EndpointError(f"ipc path longer than {IPC_PATH_MAX} bytes: {endpoint!r}")
        return endpoint
    match = _TCP_RE.match(endpoint)
    if match is None:
        raise EndpointError(
            f"endpoint {endpoint!r} must be 'ipc:///abs/path' or 'tcp://host:port'"
        )
    port = int(match.group("port"))
    if not 1 <= port <= 65535:
        raise EndpointError(f"port {port} out of range in {endpoint!r}")
    return endpoint


@dataclass(frozen=True)
class LinkSettings:
    endpoint: str = field(default_factory=default_endpoint)
    """Controller endpoint, ``ipc:///path`` or ``tcp://host:port``."""
    staleness_s: float = 10.0
    """Seconds without an answer to our messages before the link is ``stale``."""
    heartbeat_s: float = 1.0
    """Seconds between Heartbeats (or Register, while the controller does not know us)."""
    send_queue: int = 64
    """Messages ZMQ may buffer towards the controller; beyond that, sends are dropped."""
    receive_queue: int = 64
    max_message_bytes: int = MAX_MESSAGE_BYTES
    max_receive_per_poll: int = 256
    """Bound on messages drained by one poll, so a flood cannot stall a scheduler step."""
    curve_client_secret: str = ""
    """CURVE: this runtime's key pair file (``NAME.key_secret``), re-read at every reconnect."""
    curve_server_public: str = ""
    """CURVE: the controller's public key file; the link talks to no other server."""
    plaintext_tcp: bool = False
    """Explicit opt-in to an unauthenticated ``tcp://`` link."""

    @property
    def curve(self) -> bool:
        return bool(self.curve_client_secret)

    def __post_init__(self) -> None:
        validate_endpoint(self.endpoint)
        if bool(self.curve_client_secret) != bool(self.curve_server_public):
            raise ValueError("curve_client_secret and curve_server_public go together")
        if self.endpoint.startswith("tcp://") and not (self.curve or self.plaintext_tcp):
            raise ValueError("a tcp:// controller link needs CURVE keys or plaintext_tcp")
        if self.staleness_s <= 0 or self.heartbeat_s <= 0:
            raise ValueError("staleness_s and heartbeat_s must be > 0")
        if self.heartbeat_s >= self.staleness_s:
            raise ValueError("heartbeat_s must be shorter than staleness_s")
