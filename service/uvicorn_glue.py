"""Where the service reaches into uvicorn's internals: one module, every access guarded.

Tested with uvicorn 0.54 (the range in pyproject.toml). Each helper documents when it answers None or falls back,
so a uvicorn that changed its internals degrades to plain ASGI behaviour instead of breaking.

`guarded_protocol`: uvicorn's httptools protocol with what uvicorn does not do by itself:
- a request deadline (REQUEST_TIMEOUT): a new connection must deliver a complete request (headers and body)
  within it, and so must each later request on a keep-alive connection from its first byte (an idle keep-alive
  connection is uvicorn's KEEPALIVE_TIMEOUT's business); otherwise it is answered 408 and closed.
  uvicorn sets no timer before a request completes, so half-sent requests (slowloris) were held for ever;
- a cap on open connections per client address (MAX_CONNECTIONS_PER_CLIENT), connections from trusted proxies
  (TRUST_PROXY_HEADERS) exempt: their clients are counted by the per-client limits instead, by the address the
  proxy reports. Over the cap a connection is closed at once, so one address cannot take the process's file
  descriptors;
- a fixed kernel send buffer per connection (SEND_BUFFER_BYTES): with the kernel's autotuning, a client that
  stops reading absorbs up to `tcp_wmem` max (4 MiB on Linux) before the server sees any backpressure, so a
  stall goes unnoticed (and costs kernel memory) for megabytes; with a fixed buffer it reaches the stream's
  bounded queue and write timeout after a few hundred KiB.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import Counter
from collections.abc import Container
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["guarded_protocol"]

log = logging.getLogger("service.server")

_408_BODY = b'{"error":{"code":"request_timeout","message":"the request did not arrive within REQUEST_TIMEOUT"}}'
_408 = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(_408_BODY), _408_BODY))


def guarded_protocol(request_timeout: float, max_per_client: int, trusted: Container[str],
                     send_buffer: int = 0) -> type[HttpToolsProtocol]:
    """A protocol class for `uvicorn.Config(http=...)` with a request deadline, a per-address cap (addresses
    `in trusted` exempt: a `ratelimit.TrustedProxies`) and a fixed send buffer (`send_buffer` 0: the kernel's
    autotuning)."""
    open_by_address: Counter[str] = Counter()
    refused = 0

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        _deadline: asyncio.TimerHandle | None = None
        _address: str | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            nonlocal refused
            super().connection_made(transport)
            if send_buffer:
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    try:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
                    except OSError:
                        pass
            address = self.client[0] if self.client else None
            if max_per_client and address is not None and address not in trusted:
                if open_by_address[address] >= max_per_client:
                    refused += 1
                    if refused == 1 or refused % 1000 == 0:
                        log.warning("connection refused: too many open from one address (MAX_CONNECTIONS_PER_CLIENT)",
                                    extra={"client": address, "limit": max_per_client, "refused_total": refused})
                    transport.abort()
                    return
                open_by_address[address] += 1
                self._address = address
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            address, self._address = self._address, None
            if address is not None:
                open_by_address[address] -= 1
                if open_by_address[address] <= 0:
                    del open_by_address[address]
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()

        def on_message_complete(self) -> None:
            self._disarm()
            super().on_message_complete()

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(request_timeout, self._timed_out)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _timed_out(self) -> None:
            self._deadline = None
            if self.transport.is_closing():
                return
            cycle: Any = self.cycle
            if cycle is None or cycle.response_complete:
                # Nothing started (or an idle keep-alive connection that began a new request): say why, close.
                self.transport.write(_408)
                self.transport.close()
            else:
                # The app is waiting for a body that does not come: it sees a disconnect.
                cycle.disconnected = True
                cycle.message_event.set()
                self.transport.abort()

    return GuardedHttpToolsProtocol
