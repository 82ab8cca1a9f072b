"""Who "one client" is, for the per-client limits: its address, or the one its trusted proxies forwarded.

The peer's address, unless the peer is one of the proxies listed in TRUST_PROXY_HEADERS. Then `X-Forwarded-For`
is read from the RIGHT, the end the proxies wrote: hops that are trusted proxies are skipped, and the first one
that is not is the client. Whatever a client put at the left of the header itself is never reached, so the
proxies may append to the header or overwrite it, and a client that connects directly (not a trusted proxy) has
its header ignored. (A token's `sub`, when there is one, is the client instead: auth.py decides.)
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from starlette.requests import Request

__all__ = ["TrustedProxies", "client_ip"]


class TrustedProxies:
    """The proxies whose `X-Forwarded-For` is believed (TRUST_PROXY_HEADERS): `address in trusted`.

    Empty (the default): nobody's. IPv4-mapped IPv6 peers (`::ffff:10.1.2.3`, on dual-stack sockets) are
    matched as the IPv4 address they are.
    """

    __slots__ = ("networks",)

    def __init__(self, networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network] = ()) -> None:
        self.networks = tuple(networks)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __contains__(self, address: object) -> bool:
        if not self.networks:
            return False
        ip = address if isinstance(address, (ipaddress.IPv4Address, ipaddress.IPv6Address)) else _hop(str(address))
        return ip is not None and any(ip in network for network in self.networks)

    def __repr__(self) -> str:
        return f"TrustedProxies({', '.join(map(str, self.networks)) or 'nobody'})"


def _hop(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """One X-Forwarded-For entry as an address: `1.2.3.4`, `1.2.3.4:567`, `::1`, `[::1]`, `[::1]:567`; else None."""
    text = text.strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]  # IPv4 with a port (some proxies add it); a bare IPv6 has 2+ colons
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def client_ip(request: Request, trusted: TrustedProxies) -> str:
    """Who the client is, by address: the peer, or when the peer is a trusted proxy, the rightmost hop of
    `X-Forwarded-For` that is not a trusted proxy (all trusted: the leftmost). An entry that is not an address
    ends the walk: the last trusted hop is then the client, never attacker-chosen text."""
    client = request.scope.get("client")  # not `request.client`: a namedtuple made per read
    peer: str | None = client[0] if client else None
    if peer is None:
        return "unknown"
    if peer not in trusted:
        return peer
    client = _hop(peer)
    for header in reversed(request.headers.getlist("x-forwarded-for")):
        for entry in reversed(header.split(",")):
            ip = _hop(entry)
            if ip is None:
                return str(client)
            client = ip
            if ip not in trusted:
                return str(ip)
    return str(client)


# -- input limits ------------------------------------------------------------------------------------------------
