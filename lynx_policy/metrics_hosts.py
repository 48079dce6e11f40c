"""Which runtime ``/metrics`` URLs the controller may fetch (`ScrapeObserver`): the registered
ones only from an allowed host, so that a runtime cannot make the controller fetch for it."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit


async def host_addresses(host: str) -> set[str]:
    """The IP addresses ``host`` resolves to (empty when it does not)."""
    try:
        return {str(ipaddress.ip_address(host))}
    except ValueError:
        pass
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None,
                                                             type=socket.SOCK_STREAM)
    except OSError:
        return set()
    return {str(info[4][0]) for info in infos}


async def scrape_allowed(url: str, peer: str, allowed_hosts: list[str]) -> bool:
    """May the controller fetch a runtime's registered ``metrics_url``? Only http(s) URLs
    whose host is in ``observe.metrics_hosts`` or resolves to the address the link saw the
    runtime connect from (``peer``; a local ``ipc://`` runtime: a loopback address). The
    controller fetches what a runtime names, so an unchecked URL would be a blind SSRF."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    if parts.hostname in allowed_hosts:
        return True
    addresses = await host_addresses(parts.hostname)
    if not peer:
        return bool(addresses) and all(a.startswith("127.") or a == "::1" for a in addresses)
    return peer in addresses
