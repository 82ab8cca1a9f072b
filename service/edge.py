"""What a server's connections share at the edge, for both HTTP protocols (`http11.Connection`,
`uvicorn_protocol`'s parts): one sweep for every deadline they keep, and the count of open connections per address.

`Deadlines`: a request that must arrive within REQUEST_TIMEOUT, an idle keep-alive. A request moves a float and an
entry of a dict; a timer per connection was two event-loop calls for every stream opened (set, and cancelled once
its request was whole). The sweep runs only while some connection waits, and a deadline is kept to within
`interval`: a quarter of the shortest deadline kept (REQUEST_TIMEOUT, and KEEPALIVE_TIMEOUT where the sweep closes
idle connections too), at most a second. A keep-alive of 1 s swept once a second closed idle connections up to a
second late, so a proxy's request rarely met the close it must be able to survive (tests/test_balancers.py).

`AddressCounts` (MAX_CONNECTIONS_PER_CLIENT): open connections per client address, trusted proxies exempt (their
clients are counted by the per-client limits, by the address the proxy reports). Over the cap a connection is
closed at once, so one address cannot take the process's file descriptors.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Container
from typing import Literal, Protocol

__all__ = ["BAD_REQUEST_ANSWER", "TIMED_OUT_ANSWER", "AddressCounts", "Deadlines", "Timed"]

log = logging.getLogger("service.server")


def _error(status: bytes, code: str, message: str) -> bytes:
    """A whole answer the connection writes itself (no app ran): the service's JSON error, and the close."""
    body = b'{"error":{"code":"%s","message":"%s"}}' % (code.encode(), message.encode())
    return (b"HTTP/1.1 %s\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s"
            % (status, len(body), body))


TIMED_OUT_ANSWER = _error(b"408 Request Timeout", "request_timeout",
                          "the request did not arrive within REQUEST_TIMEOUT")
BAD_REQUEST_ANSWER = _error(b"400 Bad Request", "bad_request", "the request is not valid HTTP/1.1")


class Timed(Protocol):
    """A connection with a deadline: `due` (loop time, or None) and what to do when it has passed."""

    loop: asyncio.AbstractEventLoop

    @property
    def due(self) -> float | None: ...

    def timed_out(self) -> None: ...


class Deadlines:
    __slots__ = ("interval", "timer", "waiting")

    def __init__(self, shortest: float) -> None:
        self.interval = min(1.0, shortest / 4)
        self.waiting: dict[Timed, None] = {}
        self.timer: asyncio.TimerHandle | None = None

    def add(self, connection: Timed) -> None:
        self.waiting[connection] = None
        if self.timer is None:
            self.timer = connection.loop.call_later(self.interval, self.sweep, connection.loop)

    def sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        self.timer = None
        now = loop.time()
        late = [c for c in self.waiting if c.due is not None and c.due <= now]
        for connection in late:
            del self.waiting[connection]
            connection.timed_out()
        if self.waiting:
            self.timer = loop.call_later(self.interval, self.sweep, loop)


class AddressCounts:
    __slots__ = ("counts", "limit", "refused", "trusted")

    def __init__(self, limit: int, trusted: Container[str]) -> None:
        self.limit = limit  # 0: no cap
        self.trusted = trusted
        self.counts: Counter[str] = Counter()
        self.refused = 0

    def take(self, address: str | None) -> str | Literal[False] | None:
        """Count a new connection from `address`: the address to give back when it ends, None when it is not
        counted (no cap, no address, a trusted proxy), False when it is over the cap (close it at once)."""
        if not self.limit or address is None or address in self.trusted:
            return None
        counts = self.counts
        if counts[address] >= self.limit:
            self.refused += 1
            if self.refused == 1 or self.refused % 1000 == 0:
                log.warning("connection refused: too many open from one address (MAX_CONNECTIONS_PER_CLIENT)",
                            extra={"client": address, "limit": self.limit, "refused_total": self.refused})
            return False
        counts[address] += 1
        return address

    def give_back(self, address: str) -> None:
        counts = self.counts
        counts[address] -= 1
        if counts[address] <= 0:
            del counts[address]
