"""Where the service reaches into uvicorn's internals: one module, every access guarded.

Tested with uvicorn 0.55 (the range in pyproject.toml; docs/upgrading.md lists every internal touched). Each
helper documents when it answers None or falls back, so a uvicorn that changed its internals degrades to plain
ASGI behaviour instead of breaking.

What is here, and when it falls back:
- `DirectWriter.attach(receive)`: a writer to the connection's transport for the direct-write fast path, from
  uvicorn-httptools' request cycle (`receive.__self__`: `transport`, `flow.write_paused`, `chunked_encoding`,
  `disconnected`, `response_started`, `response_complete`). None when any of those is missing (another server,
  h11, a changed uvicorn): the stream then goes through sse-starlette's response.
- `LightEvent`: replaces the two `asyncio.Event`s uvicorn allocates per connection and per request (flow
  control, the request cycle's message event) in `uvicorn_protocol.LightEvents`: ~1.2 KiB less per idle
  stream. uvicorn only calls `set`, `clear`, `is_set` and `wait` on them; any other type of event there is left
  alone.
- `UvicornEdge`: the `connection.Edge` the core is given under uvicorn (app.create_app, server.serve wire it).
- direct writes of one turn of the event loop are joined per connection and sent at its end (`_TickBatch`): the
  messages of one read from Redis reach each client in one send.
- `answer_directly(send, status, headers, body)`: a whole answer (head and body, known in full) written to the
  request cycle's transport in one go, with the bookkeeping uvicorn's `send` does for such an answer
  (`response_started`, `response_complete`, `message_event`, `keep_alive`, `on_response`, `default_headers`,
  `flow.write_paused`). False, and nothing done, when `send` is not uvicorn-httptools' or any of those is missing:
  the caller then sends as any ASGI app does. `start_directly(send, status, headers)`: a stream's head, the same
  way (`chunked_encoding`, `expected_content_length` as well). `whole_body(receive)`: a request's body when all
  of it is in (`body`, `more_body`), as `receive` would give it, else None.
- `abort_connection(receive)`: drop a connection without flushing; does nothing when the transport is not there.
- `server_exiting()`: whether the uvicorn server running this process has begun to exit, read from the SIGTERM
  handler uvicorn installs (a bound method of its `Server`); False when the handler is anything else.
- `DrainingServer`: `uvicorn.Server` with the exit signals taken over (`handle_exit`), for the drain.

A write to a client that fails (its transport closed under us, whatever uvicorn's flags say) costs that client
alone: the writer marks its request disconnected and answers "not written", and nothing raises into the hub or
the broker's reader that called it.

The HTTP protocol's own guards (request deadline, per-address cap, send buffer, streams' connections, no
upgrades) are in `uvicorn_protocol`.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
from http import HTTPStatus
from operator import attrgetter
from types import FrameType
from typing import Any, Protocol

import uvicorn
from starlette.types import Receive, Send
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from .message import Message

__all__ = ["CorkedWrites", "DirectWriter", "DrainingServer", "LegacyDirectWriter", "LightEvent", "UvicornEdge",
           "abort_connection", "answer_directly", "register_direct_cycle", "server_exiting", "start_directly",
           "whole_body"]

log = logging.getLogger("service.server")


class LightEvent:
    """`asyncio.Event` for uvicorn's per-connection and per-request events, without what it allocates up front:
    an empty `collections.deque` of waiters (~600 bytes) and an instance dict. An idle stream holds two of them
    (its connection's flow control and its request cycle); there is never more than one waiter on either.
    Same calls, same meaning: `wait()` returns True once set; `set()` wakes every waiter; `clear()`."""

    __slots__ = ("_value", "_waiters")

    def __init__(self, value: bool = False) -> None:
        self._value = value
        self._waiters: list[asyncio.Future[bool]] | None = None

    def is_set(self) -> bool:
        return self._value

    def set(self) -> None:
        if not self._value:
            self._value = True
            waiters, self._waiters = self._waiters, None
            for waiter in waiters or ():
                if not waiter.done():
                    waiter.set_result(True)

    def clear(self) -> None:
        self._value = False

    async def wait(self) -> bool:
        if self._value:
            return True
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = [waiter]
        else:
            self._waiters.append(waiter)
        try:
            return await waiter
        finally:
            waiters = self._waiters
            if waiters is not None and waiter in waiters:
                waiters.remove(waiter)


class CorkedWrites:
    """What a request's answer is written to: the writes of one turn of the loop go out in one send at its end.
    uvicorn writes an answer's head and its body separately (two system calls per publish); corked, they are one.
    The request cycle only writes, closes, aborts and asks whether the connection is closing.

    A stream's request keeps the cork for one more send (`hand_over`): its head and its first bytes (the greeting)
    go out together, then the stream writes to the connection's transport itself. Used by `uvicorn_protocol`'s
    per-request cork and by `http11.Connection`, which is its own cork; each declares the three slots."""

    __slots__ = ()
    transport: Any  # the connection's real transport
    _held: Any  # what this turn wrote, not yet sent (a list of bytes, or None); slots of the subclasses
    _handover: Any  # a stream's request cycle that gets the real transport once the held bytes are out

    def hand_over(self, cycle: Any) -> None:
        """`cycle` becomes a stream: its writes go to the transport itself once the next send is out (at once, when
        nothing is held and nothing will be: its head has gone already)."""
        if cycle.response_started and not self._held:
            cycle.transport = self.transport
        else:
            self._handover = cycle

    def write(self, data: bytes) -> None:
        held = self._held
        if held is None:
            self._held = [data]
            asyncio.get_running_loop().call_soon(self.flush)
        else:
            held.append(data)

    def write_whole(self, data: bytes) -> None:
        """A whole answer, or a stream's head with its first bytes, in one buffer (`answer_directly`,
        `start_directly`): sent at once, unless something is held already, which it follows. A stream waiting
        for its hand-over then writes to the transport itself."""
        if self._held is None:
            self.transport.write(data)
            stream = self._handover
            if stream is not None:
                self._handover = None
                stream.transport = self.transport
        else:
            self.write(data)

    def flush(self) -> None:
        held, self._held = self._held, None
        if held and not self.transport.is_closing():
            self.transport.write(held[0] if len(held) == 1 else b"".join(held))
        stream = self._handover
        if stream is not None and held:
            self._handover = None
            stream.transport = self.transport

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def abort(self) -> None:
        self._held = None
        self.transport.abort()

    def is_closing(self) -> bool:
        return bool(self.transport.is_closing())

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.transport.get_extra_info(name, default)


class _TickBatch:
    """Direct writes made during one turn of the event loop, joined per connection and sent at its end: the
    messages one read from Redis brought reach each client in one send instead of one send each (under a burst
    of publishes, the sends to subscribers were most of the service's system calls). One per edge (per relay),
    not per process: a process may run relays on several threads, each with its own loop."""

    __slots__ = ("_scheduled", "_writers")

    def __init__(self) -> None:
        self._writers: list[DirectWriter] = []
        self._scheduled = False

    def add(self, writer: DirectWriter) -> None:
        self._writers.append(writer)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        writers, self._writers = self._writers, []
        for writer in writers:
            writer.flush()


class DirectWriter:
    """Writes pre-framed messages to a uvicorn (httptools) connection without going through `send`."""

    __slots__ = ("_batch", "_cycle", "_held")

    # What is written of a message (attrgetter: a C call, no Python frame per delivery).
    _chunk = staticmethod(attrgetter("chunk"))
    _frame = staticmethod(attrgetter("frame"))

    def __init__(self, cycle: Any, batch: _TickBatch) -> None:
        self._cycle = cycle
        self._batch = batch
        self._held: list[bytes | memoryview] | None = None

    @classmethod
    def attach(cls, receive: Receive, batch: _TickBatch, legacy: bool = False) -> DirectWriter | None:
        """A writer for this request's connection, or None when the server is not uvicorn-httptools. The
        connection carries this stream to its end (the guarded protocol lets its HTTP parser go)."""
        cycle = getattr(receive, "__self__", None)
        if cycle is None:
            return None
        if type(cycle) not in _DIRECT_CYCLES:  # those are known to have it all (checked at import)
            for name in ("transport", "flow", "chunked_encoding", "disconnected", "response_started"):
                if not hasattr(cycle, name):
                    return None
            if not hasattr(cycle.flow, "write_paused"):
                return None
        protocol = getattr(getattr(cycle, "on_response", None), "__self__", None)
        release = getattr(protocol, "release_parser", None)
        if release is not None:
            release(cycle)
        return LegacyDirectWriter(cycle, batch) if legacy else cls(cycle, batch)

    @property
    def disconnected(self) -> bool:
        return bool(self._cycle.disconnected)

    def write(self, message: Message) -> bool:
        """Take the message for this turn's send if the connection takes it without blocking; False means: not
        written (queue it, or, when `disconnected` is now true, the client is gone)."""
        cycle = self._cycle
        if cycle.disconnected or cycle.flow.write_paused or cycle.response_complete or not cycle.response_started:
            return False
        data = self._chunk(message) if cycle.chunked_encoding else self._frame(message)
        held = self._held
        if held is None:
            self._held = [data]
            self._batch.add(self)
        else:
            held.append(data)
        return True

    def _send(self, data: bytes | memoryview) -> bool:
        cycle = self._cycle
        transport = cycle.transport
        if transport.is_closing():
            cycle.disconnected = True
            return False
        try:
            transport.write(data)
        except (RuntimeError, OSError):  # uvloop: "unable to perform operation on <TCPTransport closed=True>"
            cycle.disconnected = True
            return False
        return True

    def flush(self) -> None:
        """Send what this turn's writes hold (at the end of the turn, or before the stream writes itself)."""
        held, self._held = self._held, None
        if held and not self._cycle.disconnected:
            self._send(held[0] if len(held) == 1 else b"".join(held))


class LegacyDirectWriter(DirectWriter):
    """For `GET /server/events`: writes each message in the old chat's form (`Message.legacy_chunk`)."""

    __slots__ = ()

    _chunk = staticmethod(attrgetter("legacy_chunk"))
    _frame = staticmethod(attrgetter("legacy_frame"))


_CYCLE_NAMES = ("transport", "flow", "scope", "default_headers", "keep_alive", "disconnected", "response_started",
                "response_complete", "message_event", "on_response", "waiting_for_100_continue", "chunked_encoding",
                "expected_content_length", "body", "more_body")
# uvicorn-httptools' own cycle, only if it still has what the answer sets and reads, and the service's own
# (`http11.Cycle`, which keeps those names: `register_direct_cycle`).
_DIRECT_CYCLES: set[type] = {RequestResponseCycle} if all(
    name in RequestResponseCycle.__init__.__code__.co_names for name in _CYCLE_NAMES
) and "write_paused" in FlowControl.__init__.__code__.co_names else set()


def register_direct_cycle(cls: type) -> None:
    """Let direct answers and body reads serve `cls`'s request cycles: a class with every attribute of
    `_CYCLE_NAMES`, with uvicorn's meaning (service/http11.py's `Cycle`)."""
    missing = [name for name in _CYCLE_NAMES if name not in getattr(cls, "__slots__", ())]
    if missing:
        raise TypeError(f"{cls.__name__} lacks {missing}")
    _DIRECT_CYCLES.add(cls)

_STATUS_LINES: dict[int, bytes] = {}


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        line = _STATUS_LINES[status] = b"HTTP/1.1 %d %s\r\n" % (status, HTTPStatus(status).phrase.encode())
    return line


def _writable_cycle(send: Send) -> Any:
    """uvicorn-httptools' request cycle behind `send` when an answer may be written to it directly now; None: not
    that cycle, an answer already started, a client gone, writing paused (uvicorn's `send` waits for the drain),
    or a HEAD request."""
    if type(getattr(send, "__self__", None)) not in _DIRECT_CYCLES:
        return None
    cycle: Any = send.__self__  # type: ignore[attr-defined]
    if cycle.response_started or cycle.disconnected or cycle.flow.write_paused or cycle.scope["method"] == "HEAD":
        return None
    return cycle


def _head(cycle: Any, status: int, headers: list[tuple[bytes, bytes]], last: bytes) -> list[bytes]:
    """An answer's head as uvicorn's `send` lays it out: status line, default headers, `headers`, `connection:
    close` when the connection will not be kept, then `last` (the framing header, if any, and the blank line)."""
    content = [_status_line(status)]
    for name, value in (*cycle.default_headers, *headers):
        content += (name, b": ", value, b"\r\n")
    if not cycle.keep_alive:
        content.append(b"connection: close\r\n")
    content.append(last)
    cycle.response_started = True
    cycle.waiting_for_100_continue = False
    return content


def answer_directly(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> bool:
    """Write a whole answer to uvicorn's connection, as uvicorn's `send` would for `http.response.start` then one
    `http.response.body`, in one write and without its two message dicts, awaits and per-header checks (a publish's
    202 spent more in them than in its own code). `headers` must be the caller's own, valid HTTP header lines,
    lower-case, with `content-length`, and no `connection` or `transfer-encoding` header.

    False, having done nothing, where `_writable_cycle` finds none. The caller then uses `send`."""
    cycle = _writable_cycle(send)
    if cycle is None:
        return False
    content = _head(cycle, status, headers, b"\r\n")
    content.append(body)
    transport = cycle.transport
    # uvicorn_protocol's cork sends what is whole at once; any other transport is written as it is
    getattr(transport, "write_whole", transport.write)(b"".join(content))
    cycle.response_complete = True
    cycle.message_event.set()
    if not cycle.keep_alive:
        transport.close()
    cycle.on_response()
    return True


def start_directly(send: Send, status: int, headers: list[tuple[bytes, bytes]], first: bytes = b"") -> bool:
    """Write a streamed answer's head (chunked: its body follows through `send` or a DirectWriter), as uvicorn's
    `send` writes it for an `http.response.start` without a content-length, without its per-header checks (two
    regular expressions per header, per stream opened), and `first`, the body's first chunk, in the same write (as
    `send` frames an `http.response.body` with `more_body`): a stream's head and greeting leave in one send, with
    no message, coroutine or turn of the loop between them. `headers` as for `answer_directly`. False, having done
    nothing, where `answer_directly` would be: the caller sends `http.response.start` (and `first`) then."""
    cycle = _writable_cycle(send)
    if cycle is None:
        return False
    content = _head(cycle, status, headers, b"transfer-encoding: chunked\r\n\r\n")
    cycle.chunked_encoding = True
    cycle.expected_content_length = 0
    if first:
        content += (b"%x\r\n" % len(first), first, b"\r\n")
    transport = cycle.transport
    getattr(transport, "write_whole", transport.write)(b"".join(content))
    return True


def whole_body(receive: Receive) -> bytes | None:
    """The request's body when it has arrived in full and nothing of it was read: what uvicorn's `receive` would
    return as its one `http.request` message, with the same bookkeeping (reading resumed, the message event
    cleared), without the coroutine, the wait and the message dict. None otherwise (more to come, a client gone,
    an `Expect: 100-continue` not yet answered, not uvicorn-httptools): read it with `receive`."""
    if type(getattr(receive, "__self__", None)) not in _DIRECT_CYCLES:
        return None
    cycle: Any = receive.__self__  # type: ignore[attr-defined]
    if cycle.more_body or cycle.disconnected or cycle.response_complete or cycle.waiting_for_100_continue:
        return None
    body = bytes(cycle.body)
    cycle.body = bytearray()
    cycle.flow.resume_reading()
    cycle.message_event.clear()
    return body


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


class UvicornEdge:
    """The server, as the core sees it (`connection.Edge`), under uvicorn: direct writes on httptools, dropping a
    connection through its transport, and uvicorn's exit read from its signal handler. Where uvicorn's internals
    are not there (h11, another server, a changed uvicorn) each answers as `connection.PlainEdge` does."""

    __slots__ = ("_batch",)

    def __init__(self) -> None:
        self._batch = _TickBatch()

    def writer(self, receive: Receive, legacy: bool) -> DirectWriter | None:
        return DirectWriter.attach(receive, self._batch, legacy)

    def abort(self, receive: Receive) -> None:
        abort_connection(receive)

    def exiting(self) -> bool:
        return server_exiting()

    def whole_body(self, receive: Receive) -> bytes | None:
        return whole_body(receive)


class Drainable(Protocol):
    draining: bool

    async def drain(self) -> None: ...


def listen_with_send_buffer(sock: Any, size: int) -> None:
    """SEND_BUFFER_BYTES on a TCP listening socket: Linux copies a listener's SO_SNDBUF to every connection it
    accepts, so each stream gets it with no system call of its own (set per connection, it cost a socket object and
    a call, ~8 us of a stream's opening). A connection already queued for accepting when it is set keeps the
    kernel's autotuning: `DrainingServer.startup` sets it before the loop first accepts, the workers before
    `listen`. A Unix socket's connections do not inherit it: the protocol sets theirs (http11.Connection)."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
        except OSError as exc:
            log.warning("could not set the send buffer of a listening socket", extra={"error": str(exc)})


def unix_send_buffer(transport: Any, size: int) -> None:
    """SEND_BUFFER_BYTES for a connection that does not inherit it from its listener: a Unix socket's (a TCP
    connection has it from `listen_with_send_buffer`). Both protocols call it from `connection_made`."""
    if not size or isinstance(transport.get_extra_info("peername"), tuple):
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
        except OSError:
            pass


class DrainingServer(uvicorn.Server):
    """uvicorn's server, but the first exit signal drains `relay` (spread stream closes) before it stops, and
    objects alive after start-up are frozen out of the garbage collector (`freeze_gc`, see GC_THRESHOLDS)."""

    def __init__(self, config: uvicorn.Config, relay: Drainable, freeze_gc: bool = True, send_buffer: int = 0) -> None:
        super().__init__(config)
        self.relay = relay
        self.freeze_gc = freeze_gc
        self.send_buffer = send_buffer
        self._drain_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[object] | None = None) -> None:  # type: ignore[override]
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)  # type: ignore[arg-type]

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.send_buffer:
            for server in self.servers:
                for sock in server.sockets:
                    listen_with_send_buffer(sock, self.send_buffer)
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
