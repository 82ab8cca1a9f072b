"""Where the service reaches into uvicorn's internals: one module, every access guarded.

Tested with uvicorn 0.54 (the range in pyproject.toml). Each helper documents when it answers None or falls back,
so a uvicorn that changed its internals degrades to plain ASGI behaviour instead of breaking.

What is here, and when it falls back:
- `DirectWriter.attach(receive)`: a writer to the connection's transport for the direct-write fast path, from
  uvicorn-httptools' request cycle (`receive.__self__`: `transport`, `flow.write_paused`, `chunked_encoding`,
  `disconnected`, `response_started`, `response_complete`). None when any of those is missing (another server,
  h11, a changed uvicorn): the stream then goes through sse-starlette's response.
- `_Pipeline`: uvicorn's per-connection queue of pipelined requests as a list (~650 bytes less per connection).
- `LightEvent`: replaces the two `asyncio.Event`s uvicorn allocates per connection and per request (flow
  control, the request cycle's message event) in `guarded_protocol`: ~1.2 KiB less per idle stream. uvicorn only
  calls `set`, `clear`, `is_set` and `wait` on them; any other type of event there is left alone.
- `HeldWrites`: direct writes made while a batch is held are joined per connection and written when it is
  released (the messages of one read from Redis reach each client in one send).
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
  bounded queue and write timeout after a few hundred KiB;
- overlapping pipelined publishes (`overlap`): uvicorn runs the requests pipelined on a connection one after
  another, so each publish waited for the previous one's Redis round trip. Requests `overlap(scope)` accepts
  (the publish route) start as soon as their headers are in, up to `max_overlap` at once; their answers are held
  (`_HeldTransport`) and written in request order, those ready together in one send. Their Redis commands share
  a write and a round trip. What must keep request order (handing each message to the broker) is kept in order
  by a `Turn` each such request finds in its scope (`scope["extensions"]["relay.turn"]`). Anything else
  pipelined behind them waits for them, as uvicorn would have it wait;
- a connection that carries a stream lets its HTTP parser go (`release_parser`, from `DirectWriter.attach`): it
  reads no further request, and closes when the stream ends.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
from collections import Counter, deque
from collections.abc import Callable, Container
from operator import attrgetter
from types import FrameType
from typing import Any, Protocol

import uvicorn
from starlette.types import Receive
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .message import Message

__all__ = ["TURN", "DirectWriter", "DrainingServer", "HeldWrites", "LegacyDirectWriter", "LightEvent", "Turn",
           "abort_connection", "guarded_protocol", "server_exiting"]

log = logging.getLogger("service.server")

_408_BODY = b'{"error":{"code":"request_timeout","message":"the request did not arrive within REQUEST_TIMEOUT"}}'
_408 = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(_408_BODY), _408_BODY))


TURN = "relay.turn"


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


class Turn:
    """The request order of overlapping pipelined requests, for the part of their work that must keep it.

    A request `await`s `wait()` before that part and calls `passed()` right after it has begun: for a publish,
    just before handing the message to the broker, which queues publishes in the order it is called (nothing
    runs between `passed()` and the broker queueing the command, so the request behind cannot overtake it). A
    request that answers or fails passes too. In the usual case the request ahead has passed before the next one
    even runs, and `wait()` returns without suspending.
    """

    __slots__ = ("_ahead", "_waiter", "done")

    def __init__(self, ahead: Turn | None) -> None:
        self.done: bool = False
        self._ahead: Turn | None = ahead if ahead is not None and not ahead.done else None
        self._waiter: asyncio.Future[None] | None = None

    async def wait(self) -> None:
        ahead = self._ahead
        if ahead is not None and not ahead.done:
            ahead._waiter = asyncio.get_running_loop().create_future()
            await ahead._waiter
        self._ahead = None

    def passed(self) -> None:
        if not self.done:
            self.done = True
            self._ahead = None
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)


class _Pipeline(list):  # type: ignore[type-arg]
    """uvicorn's queue of pipelined requests (`protocol.pipeline`) as a list: uvicorn calls `appendleft`, `pop`
    and truth on it, and it holds a few requests at most (reading pauses behind them); an empty `deque` costs ~700
    bytes per connection, an empty list 56."""

    __slots__ = ()

    def appendleft(self, item: Any) -> None:
        self.insert(0, item)

    def popleft(self) -> Any:
        return self.pop(0)


class _HeldTransport:
    """What a request started ahead of its turn writes to: its answer is kept until every answer before it is
    out. The request cycle only ever writes, closes and asks whether the connection is closing."""

    __slots__ = ("chunks", "closed", "protocol")

    def __init__(self, protocol: Any) -> None:
        self.protocol = protocol
        self.chunks: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.chunks.append(bytes(data))
        self.protocol.schedule_flush()

    def close(self) -> None:
        self.closed = True
        self.protocol.schedule_flush()

    def abort(self) -> None:
        self.protocol.transport.abort()

    def is_closing(self) -> bool:
        return self.closed or bool(self.protocol.transport.is_closing())

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.protocol.transport.get_extra_info(name, default)


def guarded_protocol(request_timeout: float, max_per_client: int, trusted: Container[str],
                     send_buffer: int = 0, overlap: Callable[[Any], bool] | None = None,
                     max_overlap: int = 32) -> type[HttpToolsProtocol]:
    """A protocol class for `uvicorn.Config(http=...)` with a request deadline, a per-address cap (addresses
    `in trusted` exempt: a `clients.TrustedProxies`), a fixed send buffer (`send_buffer` 0: the kernel's
    autotuning) and overlapping pipelined requests that `overlap(scope)` accepts (None: none)."""
    open_by_address: Counter[str] = Counter()
    refused = 0

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        _deadline: asyncio.TimerHandle | None = None
        _address: str | None = None
        # Overlapping pipelined requests: those running with their answers held, in request order, each writing
        # to a _HeldTransport; the last one's Turn; whether a flush is scheduled; and what to write and close
        # with once the held answers are out.
        _early: deque[Any] | None = None
        _turn: Turn | None = None
        _flush_scheduled = False
        _close_after_early = False
        _tail = b""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if isinstance(self.pipeline, deque) and not self.pipeline:
                self.pipeline = _Pipeline()  # type: ignore[assignment]

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            nonlocal refused
            super().connection_made(transport)
            flow: Any = self.flow
            if isinstance(getattr(flow, "_is_writable_event", None), asyncio.Event):
                flow._is_writable_event = LightEvent(flow._is_writable_event.is_set())  # noqa: SLF001
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
            self._drop_early()
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
            if self._early and (cycle is None or cycle.response_complete):
                # Answers of earlier requests are still held: the 408 goes after them, and whatever of the late
                # request still comes is not read (it must not start once it has been answered).
                self._tail, self._close_after_early = _408, True
                self.parser = None  # type: ignore[assignment]
                self.schedule_flush()
            elif cycle is None or cycle.response_complete:
                # Nothing started (or an idle keep-alive connection that began a new request): say why, close.
                self.transport.write(_408)
                self.transport.close()
            else:
                # The app is waiting for a body that does not come: it sees a disconnect.
                cycle.disconnected = True
                cycle.message_event.set()
                self.transport.abort()

        # -- overlapping pipelined requests ------------------------------------------------------------------

        # -- a connection that carries a stream ---------------------------------------------------------------

        def release_parser(self, cycle: Any) -> None:
            """`cycle` streams from now on: the connection reads no further request (an EventSource never sends
            one, and one pipelined behind a stream would wait for the stream's end): the HTTP parser (~900 bytes
            with its callbacks) goes, requests already queued behind the stream are dropped unanswered (as on any
            connection that closes before answering them: a client sends them again on a new one), and the
            connection closes when the stream ends. Bytes that come later are ignored: before, uvicorn answered
            them with a 400 written into the middle of the stream."""
            if self._early or cycle.more_body or cycle.disconnected:
                return  # something else is under way on this connection: leave it as it is
            self.pipeline.clear()
            cycle.keep_alive = False
            self.parser = None  # type: ignore[assignment]
            # Read (and drop) what comes: bytes left unread in the socket would turn the close into a reset.
            self.flow.resume_reading()

        def data_received(self, data: bytes) -> None:
            if self.parser is None:
                return  # bytes after a stream's request: nothing will read them (see release_parser)
            super().data_received(data)

        def _may_overlap(self, cycle: Any) -> bool:
            return overlap is not None and not cycle.waiting_for_100_continue and overlap(cycle.scope)

        def _start_asgi_task(self, cycle: Any, app: Any) -> None:
            # Every request starts here (uvicorn calls it for a request that arrives with nothing in flight, and
            # for the oldest queued one once the one before has answered).
            early = self._early
            if self._may_overlap(cycle):
                if early and (len(early) >= max_overlap or not early[-1].keep_alive):
                    self._queue(cycle, app)  # over the cap, or after a request that closes the connection
                    return
                self._hold(cycle)
            elif early:
                self._queue(cycle, app)  # anything else waits for the held answers, as uvicorn would have it
                return
            super()._start_asgi_task(cycle, app)

        def _queue(self, cycle: Any, app: Any) -> None:
            self.pipeline.appendleft((cycle, app))
            self.flow.pause_reading()

        def on_headers_complete(self) -> None:
            before: Any = self.cycle
            super().on_headers_complete()
            cycle: Any = self.cycle
            if cycle is not before and type(getattr(cycle, "message_event", None)) is asyncio.Event:
                # Nothing waits on it yet (the request's task has not run): the lighter event takes its place.
                cycle.message_event = LightEvent(cycle.message_event.is_set())
            pipeline = self.pipeline
            early = self._early
            if (cycle is not before and early and early[-1] is before and len(pipeline) == 1
                    and pipeline[0][0] is cycle):
                # uvicorn queued it behind a held request still running: it may run now too (if it may
                # overlap, within the cap, and the request before did not ask to close the connection).
                _, app = pipeline.popleft()
                self._start_asgi_task(cycle, app)
                if not (pipeline and pipeline[0][0] is cycle):  # it runs: read on
                    self.flow.resume_reading()

        def _hold(self, cycle: Any) -> None:
            if self._early is None:
                self._early = deque()
            cycle.transport = _HeldTransport(self)
            turn = self._turn = Turn(self._turn)
            cycle.scope.setdefault("extensions", {})[TURN] = turn

            def answered() -> None:
                turn.passed()
                self.schedule_flush()

            cycle.on_response = answered
            self._early.append(cycle)

        def on_response_complete(self) -> None:
            # A request that answered directly (not held) is done; uvicorn starts the next queued one.
            super().on_response_complete()
            self._start_queued()

        def _start_queued(self) -> None:
            """Start the queued requests that may overlap the one(s) running, oldest first."""
            pipeline = self.pipeline
            early = self._early
            while pipeline and early and not self.transport.is_closing():
                cycle, app = pipeline[-1]
                if (not self._may_overlap(cycle) or len(early) >= max_overlap or not early[-1].keep_alive):
                    return
                pipeline.pop()
                self._start_asgi_task(cycle, app)

        def shutdown(self) -> None:
            if self._early:
                self._close_after_early = True
                cycle: Any = self.cycle
                if cycle is not None and not cycle.response_complete:
                    cycle.keep_alive = False
                return
            super().shutdown()

        def schedule_flush(self) -> None:
            # At the end of this turn of the loop: answers that become ready together go out in one send.
            if not self._flush_scheduled:
                self._flush_scheduled = True
                self.loop.call_soon(self._flush)

        def _drop_early(self) -> None:
            """The connection is gone or closing: the held requests will never be answered. Those still running
            see a disconnect, and none waits for ever on the turn of one ahead."""
            early = self._early
            if early:
                for cycle in early:
                    if not cycle.response_complete:
                        cycle.disconnected = True
                    cycle.message_event.set()
                    cycle.scope["extensions"][TURN].passed()
                early.clear()

        def _flush(self) -> None:
            self._flush_scheduled = False
            early = self._early
            if not early:
                return
            transport = self.transport
            if transport.is_closing():
                self._drop_early()
                return
            out: list[bytes] = []
            done = 0
            while early:
                cycle = early[0]
                held: _HeldTransport = cycle.transport
                if held.chunks:
                    out.extend(held.chunks)
                    held.chunks.clear()
                if held.closed:  # the answer ended the connection (connection: close, or a failed request)
                    self._drop_early()
                    transport.write(b"".join(out))
                    transport.close()
                    return
                if not cycle.response_complete:
                    break
                early.popleft()
                done += 1
            if not early and self._close_after_early:
                transport.write(b"".join(out) + self._tail)
                transport.close()
                return
            if out:
                transport.write(b"".join(out))
            if done and not early:
                # The last held answer is out: what uvicorn does after an answer (the next queued request, or
                # the keep-alive timer), counting the others first.
                self.server_state.total_requests += done - 1
                self.on_response_complete()
            elif done:
                self.server_state.total_requests += done
                self._start_queued()

    return GuardedHttpToolsProtocol


class HeldWrites:
    """Direct writes made between `hold()` and `release()` are joined per connection and written at `release()`:
    the messages that one read from Redis brought reach each client in one send instead of one send each (under
    a burst of publishes, the sends to subscribers were most of the service's system calls).

    Synchronous by contract: nothing awaits between the two calls, so nothing else can write to a connection in
    between and order is kept. One per relay, not one per process: a process may run relays on several threads.
    """

    __slots__ = ("_writers", "holding")

    def __init__(self) -> None:
        self.holding = False
        self._writers: list[DirectWriter] = []

    def hold(self) -> None:
        self.holding = True

    def release(self) -> None:
        self.holding = False
        writers = self._writers
        if writers:
            self._writers = []
            for writer in writers:
                writer.release()


class DirectWriter:
    """Writes pre-framed messages to a uvicorn (httptools) connection without going through `send`."""

    __slots__ = ("_cycle", "_held", "_writes")

    # What is written of a message (attrgetter: a C call, no Python frame per delivery).
    _chunk = staticmethod(attrgetter("chunk"))
    _frame = staticmethod(attrgetter("frame"))

    def __init__(self, cycle: Any, writes: HeldWrites | None = None) -> None:
        self._cycle = cycle
        self._writes = writes
        self._held: list[bytes] | None = None

    @classmethod
    def attach(cls, receive: Receive, legacy: bool = False, writes: HeldWrites | None = None) -> DirectWriter | None:
        """A writer for this request's connection, or None when the server is not uvicorn-httptools. The
        connection carries this stream to its end (the guarded protocol lets its HTTP parser go)."""
        cycle = getattr(receive, "__self__", None)
        if cycle is None:
            return None
        for name in ("transport", "flow", "chunked_encoding", "disconnected", "response_started"):
            if not hasattr(cycle, name):
                return None
        if not hasattr(cycle.flow, "write_paused"):
            return None
        protocol = getattr(getattr(cycle, "on_response", None), "__self__", None)
        release = getattr(protocol, "release_parser", None)
        if release is not None:
            release(cycle)
        return LegacyDirectWriter(cycle, writes) if legacy else cls(cycle, writes)

    @property
    def disconnected(self) -> bool:
        return bool(self._cycle.disconnected)

    def write(self, message: Message) -> bool:
        """Write now if the connection takes it without blocking; False means: queue it instead."""
        cycle = self._cycle
        if cycle.disconnected or cycle.flow.write_paused or cycle.response_complete or not cycle.response_started:
            return False
        data = self._chunk(message) if cycle.chunked_encoding else self._frame(message)
        writes = self._writes
        if writes is not None and writes.holding:
            held = self._held
            if held is None:
                self._held = [data]
                writes._writers.append(self)  # noqa: SLF001 - its own batch
            else:
                held.append(data)
            return True
        cycle.transport.write(data)
        return True

    def release(self) -> None:
        """Write what was held (HeldWrites.release)."""
        held, self._held = self._held, None
        if held and not self._cycle.disconnected:
            self._cycle.transport.write(held[0] if len(held) == 1 else b"".join(held))


class LegacyDirectWriter(DirectWriter):
    """For `GET /server/events`: writes each message in the old chat's form (`Message.legacy_chunk`)."""

    __slots__ = ()

    _chunk = staticmethod(attrgetter("legacy_chunk"))
    _frame = staticmethod(attrgetter("legacy_frame"))


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
