"""Where the service reaches into uvicorn's internals: one module, every access guarded.

Tested with uvicorn 0.54 (the range in pyproject.toml). Each helper documents when it answers None or falls back,
so a uvicorn that changed its internals degrades to plain ASGI behaviour instead of breaking.

What is here, and when it falls back:
- `DirectWriter.attach(receive)`: a writer to the connection's transport for the direct-write fast path, from
  uvicorn-httptools' request cycle (`receive.__self__`: `transport`, `flow.write_paused`, `chunked_encoding`,
  `disconnected`, `response_started`, `response_complete`). None when any of those is missing (another server,
  h11, a changed uvicorn): the stream then goes through sse-starlette's response.
- `abort_connection(receive)`: drop a connection without flushing; does nothing when the transport is not there.
- `server_exiting()`: whether the uvicorn server running this process has begun to exit, read from the SIGTERM
  handler uvicorn installs (a bound method of its `Server`); False when the handler is anything else.
- `DrainingServer`: `uvicorn.Server` with the exit signals taken over (`handle_exit`), for the drain.
- `guarded_protocol`: uvicorn's httptools protocol with what uvicorn does not do by itself:
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
import gc
import logging
import signal
import socket
from collections import Counter
from collections.abc import Container
from types import FrameType
from typing import Any, Protocol

import uvicorn
from starlette.types import Receive
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .message import Message

__all__ = ["DirectWriter", "DrainingServer", "LegacyDirectWriter", "abort_connection", "guarded_protocol",
           "server_exiting"]

log = logging.getLogger("service.server")

_408_BODY = b'{"error":{"code":"request_timeout","message":"the request did not arrive within REQUEST_TIMEOUT"}}'
_408 = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(_408_BODY), _408_BODY))


def guarded_protocol(request_timeout: float, max_per_client: int, trusted: Container[str],
                     send_buffer: int = 0) -> type[HttpToolsProtocol]:
    """A protocol class for `uvicorn.Config(http=...)` with a request deadline, a per-address cap (addresses
    `in trusted` exempt: a `clients.TrustedProxies`) and a fixed send buffer (`send_buffer` 0: the kernel's
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


class DirectWriter:
    """Writes pre-framed messages to a uvicorn (httptools) connection without going through `send`."""

    __slots__ = ("_cycle",)

    def __init__(self, cycle: Any) -> None:
        self._cycle = cycle

    @classmethod
    def attach(cls, receive: Receive, legacy: bool = False) -> DirectWriter | None:
        """A writer for this request's connection, or None when the server is not uvicorn-httptools."""
        cycle = getattr(receive, "__self__", None)
        if cycle is None:
            return None
        for name in ("transport", "flow", "chunked_encoding", "disconnected", "response_started"):
            if not hasattr(cycle, name):
                return None
        if not hasattr(cycle.flow, "write_paused"):
            return None
        return LegacyDirectWriter(cycle) if legacy else cls(cycle)

    @property
    def disconnected(self) -> bool:
        return bool(self._cycle.disconnected)

    def write(self, message: Message) -> bool:
        """Write now if the connection takes it without blocking; False means: queue it instead."""
        cycle = self._cycle
        if cycle.disconnected or cycle.flow.write_paused or cycle.response_complete or not cycle.response_started:
            return False
        cycle.transport.write(message.chunk if cycle.chunked_encoding else message.frame)
        return True


class LegacyDirectWriter(DirectWriter):
    """For `GET /server/events`: writes each message in the old chat's form (`Message.legacy_chunk`)."""

    __slots__ = ()

    def write(self, message: Message) -> bool:
        cycle = self._cycle
        if cycle.disconnected or cycle.flow.write_paused or cycle.response_complete or not cycle.response_started:
            return False
        cycle.transport.write(message.legacy_chunk if cycle.chunked_encoding else message.legacy_frame)
        return True


def abort_connection(receive: Receive) -> None:
    """Drop the connection without flushing: a graceful close would wait for a client that does not read.

    uvicorn's `receive` is a bound method of its request cycle, which holds the transport; elsewhere the
    server's own timeouts have to do this.
    """
    transport = getattr(getattr(receive, "__self__", None), "transport", None)
    if transport is not None and hasattr(transport, "abort"):
        transport.abort()


def server_exiting() -> bool:
    """True once the uvicorn server running this process has begun to exit (its SIGTERM handler is a bound method
    of the `Server`, whose `should_exit` flips on a signal); False under any other handler or server."""
    server = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
    return getattr(server, "should_exit", False) is True


class Drainable(Protocol):
    draining: bool

    async def drain(self) -> None: ...


class DrainingServer(uvicorn.Server):
    """uvicorn's server, but the first exit signal drains `relay` (spread stream closes) before it stops, and
    objects alive after start-up are frozen out of the garbage collector (`freeze_gc`, see GC_THRESHOLDS)."""

    def __init__(self, config: uvicorn.Config, relay: Drainable, freeze_gc: bool = True) -> None:
        super().__init__(config)
        self.relay = relay
        self.freeze_gc = freeze_gc
        self._drain_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[object] | None = None) -> None:  # type: ignore[override]
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)  # type: ignore[arg-type]

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.freeze_gc:
            # Everything alive now lives as long as the process: never walk it again (see GC_THRESHOLDS).
            gc.collect()
            gc.freeze()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_task is not None or self._loop is None:
            self.force_exit = True
            self.should_exit = True
            return
        # Readiness turns 503 and new streams are turned away from this very moment, before the loop runs again.
        self.relay.draining = True
        log.info("signal received; draining", extra={"signal": signal.Signals(sig).name})
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        if self._drain_task is None:
            self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        try:
            await self.relay.drain()
        finally:
            self.should_exit = True
