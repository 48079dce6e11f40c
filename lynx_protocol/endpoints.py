"""Where the controller listens: ``ipc://`` by default, ``tcp://`` for containers.

Chosen to stay clear of SGLang's own sockets: SGLang uses random ``ipc://`` temp files (and,
with DP attention, TCP ports ``port+233..238``; KV events 5557/5558), so Lynx uses
``/tmp/lynx-<name>.sock`` and TCP port `DEFAULT_TCP_PORT`.
"""

from __future__ import annotations

import re

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
