"""The HTTP/1.1 connection the standalone server runs: uvicorn's httptools protocol plus the edge guards.

uvicorn does not do these by itself; each is a small part of its own, composed onto `HttpToolsProtocol` by
`guarded_protocol`. Every part names the uvicorn internals it uses (`needs`), and they are checked when this
module is imported: a uvicorn that moved one of them gets that part left out, with one warning, and the
connection behaves as stock uvicorn does there. tests/test_edge.py holds each part to its promise, and
`test_every_part_finds_the_uvicorn_internals_it_needs` fails the suite if one was left out.

The parts:
- `RequestDeadline` (REQUEST_TIMEOUT): a new connection must deliver a whole request, headers and body, within
  the deadline, and so must each later request on a keep-alive connection from its first byte. Otherwise it is
  answered 408 (JSON) and closed; the app, if it was waiting for the body, sees a disconnect. uvicorn sets no
  timer before a request completes, so half-sent requests (slowloris) were held for ever.
- `AddressCap` (MAX_CONNECTIONS_PER_CLIENT): open connections per client address, trusted proxies exempt
  (their clients are counted by the per-client limits, by the address the proxy reports). Over the cap a
  connection is closed at once, so one address cannot take the process's file descriptors. The count is taken
  in `connection_made` and given back in `connection_lost`, which runs for every connection that ends:
  `NoUpgrade` makes sure no connection is handed to another protocol, where it would never run.
- `SendBuffer` (SEND_BUFFER_BYTES): a fixed kernel send buffer. With autotuning a client that stops reading
  absorbs up to `tcp_wmem` max (4 MiB on Linux) before the server sees backpressure; with a fixed buffer a stall
  reaches the stream's bounded queue and write timeout after a few hundred KiB.
- `StreamConnection`: a connection whose request became a stream reads no further request. Its HTTP parser goes
  (~900 bytes per idle stream), requests pipelined behind the stream are dropped unanswered (as on any
  connection that closes: a client sends them again), later bytes are read and ignored (uvicorn wrote a 400
  into the middle of the stream), and the connection closes when the stream ends.
- `EveryRequestLearnsOfTheClose`: when the client goes, every request of the connection that has not answered
  is marked disconnected: the one running (a stream, a publish waiting for Redis) and those pipelined behind it.
  uvicorn marks only the request it parsed last: a stream with a request pipelined behind it was never ended, and
  its writes failed on a closed transport, in the Redis reader that made them.
- `NoUpgrade`: the service speaks SSE over HTTP/1.1 and offers no WebSocket. uvicorn would hand an upgrade
  request's transport to its WebSocket protocol; the HTTP protocol's `connection_lost` then never runs and
  every count taken for the connection leaks. Here an `Upgrade` header is ignored (RFC 9110 §7.8 lets a server
  do so): the request is answered as plain HTTP and the connection closes after the answer, since the parser
  reads nothing after an upgrade request.
- `OneWritePerAnswer`: an answer's head and body go out in one send (uvicorn writes them separately: two
  system calls per publish).
- `JsonErrors`: what uvicorn answers itself for bytes that are not HTTP (400) is the service's JSON error body,
  like every other error, and comes after the answers of the requests parsed before those bytes.
- `HalfClose`: a client that half-closes after its requests gets their answers before the connection closes.
- `LeanStart`: uvicorn's per-connection set-up without the per-connection lookups of what is the same for every
  connection of a server (its loggers, its config).
- `LightEvents` and `_Pipeline`: lighter stand-ins for uvicorn's per-connection `asyncio.Event`s and `deque`
  (~1.9 KiB less per idle stream, docs/performance.md).

Requests pipelined on one connection are served one after another, as uvicorn serves them: no client the
service's users run pipelines (browsers, httpx, requests, aiohttp and nginx's upstreams send one request at a
time per connection), and concurrent publishes from many connections already share Redis round trips in the
multiplexer.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Container, Iterable
from typing import Any, ClassVar

import httptools
from uvicorn.logging import TRACE_LOG_LEVEL
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.protocols.utils import get_local_addr, get_remote_addr, is_ssl

from .edge import BAD_REQUEST_ANSWER, TIMED_OUT_ANSWER, AddressCounts, Deadlines
from .uvicorn_glue import CorkedWrites, LightEvent, unix_send_buffer

__all__ = ["PARTS", "Part", "guarded_protocol", "missing_internals"]

log = logging.getLogger("service.server")




def _names(cls: type, *methods: str) -> set[str]:
    """What `cls` offers: its class attributes, and the attribute names its `methods` use (where uvicorn sets
    its instance attributes: `__init__`, `connection_made`)."""
    names = set(dir(cls))
    for method in methods:
        code = getattr(getattr(cls, method, None), "__code__", None)
        if code is not None:
            names.update(code.co_names)
    return names


_CLASSES: dict[str, type] = {"protocol": HttpToolsProtocol, "cycle": RequestResponseCycle, "flow": FlowControl}
_OFFERED = {
    "protocol": _names(HttpToolsProtocol, "__init__", "connection_made"),
    "cycle": _names(RequestResponseCycle, "__init__"),
    "flow": _names(FlowControl, "__init__"),
}


class _Guards:
    """What the parts keep per connection, in one object under one attribute of the protocol (`guards`).

    uvicorn's protocol sets 28 instance attributes; CPython (3.11+) keeps such an instance's `__dict__` as a
    compact table of values under keys shared by all instances of the class, up to 30 keys. Each attribute a part
    added of its own pushed the protocol past that, and every connection then got a dict of its own: ~1.3 KiB
    more per connection, an eighth of an idle stream's memory. tests/test_edge.py holds the count."""

    __slots__ = ("address", "due", "refusal", "running")

    def __init__(self) -> None:
        self.address: str | None = None  # AddressCap: the address counted for this connection
        self.due: float | None = None  # RequestDeadline: when the request under way must be complete
        self.running: Any = None  # EveryRequestLearnsOfTheClose: the request cycle running
        self.refusal = False  # JsonErrors: a 400 waits for the answers before it


class Part:
    """One guard. `needs` maps "protocol", "cycle" or "flow" to the uvicorn names the part reads or overrides.

    Every part sits above uvicorn's protocol, and this base right under the parts: a connection whose parser a
    part let go (`parser` None: answered 408, carrying a stream, after an upgrade request) drops what it reads
    instead of feeding it to a parser that is not there. Its state is in `guards` (see `_Guards`)."""

    needs: ClassVar[dict[str, tuple[str, ...]]] = {}
    # "protocol.__init__" (say) -> every name that uvicorn method uses: a part that does that method's work
    # instead of calling it is left out when the method changes.
    mirrors: ClassVar[dict[str, tuple[str, ...]]] = {}
    # uvicorn's, as the parts use them
    parser: Any
    cycle: Any
    transport: Any
    flow: Any
    loop: asyncio.AbstractEventLoop
    client: tuple[str, int] | None
    pipeline: Any
    guards: _Guards

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.guards = _Guards()

    def data_received(self, data: bytes) -> None:
        if self.parser is None:
            return
        super().data_received(data)  # type: ignore[misc]


def missing_internals(part: type[Part]) -> list[str]:
    """The uvicorn internals `part` needs that this uvicorn does not have, and the uvicorn methods it stands in
    for that are no longer the code it was written against (empty: the part is used)."""
    missing = [f"{where}.{name}" for where, names in part.needs.items() for name in names
               if name not in _OFFERED[where]]
    for where, names in part.mirrors.items():
        owner, method = where.split(".")
        code = getattr(getattr(_CLASSES[owner], method, None), "__code__", None)
        if code is None or set(code.co_names) != set(names):
            missing.append(f"{where} (changed)")
    return missing


class LightEvents(Part):
    """uvicorn's flow-control event and each request's message event as `LightEvent`s."""

    needs: ClassVar[dict[str, tuple[str, ...]]] = {
        "protocol": ("connection_made", "on_headers_complete", "flow", "cycle"),
        "flow": ("_is_writable_event",), "cycle": ("message_event",)}

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        flow: Any = self.flow
        if isinstance(getattr(flow, "_is_writable_event", None), asyncio.Event):
            flow._is_writable_event = LightEvent(flow._is_writable_event.is_set())  # noqa: SLF001

    def on_headers_complete(self) -> None:
        before: Any = self.cycle
        super().on_headers_complete()  # type: ignore[misc]
        cycle: Any = self.cycle
        if cycle is not before and type(getattr(cycle, "message_event", None)) is asyncio.Event:
            # Nothing waits on it yet (the request's task has not run): the lighter event takes its place.
            cycle.message_event = LightEvent(cycle.message_event.is_set())


class _Pipeline(list):  # type: ignore[type-arg]
    """uvicorn's queue of pipelined requests (`protocol.pipeline`) as a list: uvicorn calls `appendleft`, `pop`
    and truth on it, and it holds a few requests at most (reading pauses behind them); an empty `deque` costs ~700
    bytes per connection, an empty list 56."""

    __slots__ = ()

    def appendleft(self, item: Any) -> None:
        self.insert(0, item)

    def popleft(self) -> Any:
        return self.pop(0)


class LightPipeline(Part):
    needs: ClassVar[dict[str, tuple[str, ...]]] = {"protocol": ("pipeline",)}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        pipeline = getattr(self, "pipeline", None)
        if isinstance(pipeline, deque) and not pipeline:
            self.pipeline = _Pipeline()


class SendBuffer(Part):
    needs: ClassVar[dict[str, tuple[str, ...]]] = {"protocol": ("connection_made",)}
    send_buffer: ClassVar[int] = 0

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        unix_send_buffer(transport, self.send_buffer)  # a TCP connection has it from its listener


class LeanStart(Part):
    """uvicorn's per-connection set-up (`__init__`, `connection_made`) with what is the same for every
    connection of a server looked up once, not per connection: its loggers (two `getLogger` calls under the
    logging lock and a walk of the handlers), the config's settings. Flow control and the pipeline are built
    light at once (`LightEvent`, `_Pipeline`) instead of being built heavy and replaced. Same attributes, same
    values, same order (the instance's shared-key dict): tests/test_units.py compares it with uvicorn's own on the
    same connection. uvicorn's set-up was ~24 µs of the ~135 µs a stream's connection cost the server in a
    reconnect storm; this takes ~4 µs off it (what is left is mostly system calls: the two addresses)."""

    needs: ClassVar[dict[str, tuple[str, ...]]] = {
        "flow": ("_transport", "read_paused", "write_paused", "_is_writable_event")}
    mirrors: ClassVar[dict[str, tuple[str, ...]]] = {
        "protocol.__init__": (
            "AttributeError", "HttpRequestParser", "access_log", "access_logger", "app", "app_state",
            "asgi_version", "asyncio", "client", "config", "connections", "cycle", "deque", "expect_100_continue",
            "flow", "getLogger", "get_event_loop", "hasHandlers", "headers", "httptools", "limit_concurrency",
            "load", "loaded", "loaded_app", "logger", "logging", "loop", "parser", "pipeline", "root_path",
            "scheme", "scope", "server", "server_state", "set_dangerous_leniencies", "tasks", "timeout_keep_alive",
            "timeout_keep_alive_task", "transport", "ws_protocol_class"),
        "protocol.connection_made": (
            "FlowControl", "TRACE_LOG_LEVEL", "add", "client", "connections", "flow", "get_local_addr",
            "get_remote_addr", "is_ssl", "level", "log", "logger", "scheme", "server", "transport"),
        "flow.__init__": ("Event", "_is_writable_event", "_transport", "asyncio", "read_paused", "set",
                          "write_paused"),
    }
    per_config: ClassVar[dict[Any, tuple[Any, ...]]]
    server: tuple[str, int | None] | None
    scheme: str | None

    def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        shared = self.per_config.get(config)
        if shared is None:
            if not config.loaded:
                config.load()
            access_logger = logging.getLogger("uvicorn.access")
            shared = self.per_config[config] = (
                config.loaded_app, logging.getLogger("uvicorn.error"), access_logger, access_logger.hasHandlers(),
                config.ws_protocol_class, config.root_path, config.asgi_version, config.limit_concurrency,
                config.timeout_keep_alive)
        (app, logger, access_logger, access_log, ws_protocol_class, root_path, asgi_version, limit_concurrency,
         timeout_keep_alive) = shared
        # In uvicorn's order (HttpToolsProtocol.__init__).
        self.config = config
        self.app = app
        self.loop = _loop or asyncio.get_event_loop()
        self.logger = logger
        self.access_logger = access_logger
        self.access_log = access_log
        self.parser = parser = httptools.HttpRequestParser(self)
        try:
            parser.set_dangerous_leniencies(lenient_data_after_close=True)
        except AttributeError:  # httptools < 0.6.3
            pass
        self.ws_protocol_class = ws_protocol_class
        self.root_path = root_path
        self.asgi_version = asgi_version
        self.limit_concurrency = limit_concurrency
        self.app_state = app_state
        self.timeout_keep_alive_task = None
        self.timeout_keep_alive = timeout_keep_alive
        self.server_state = server_state
        self.connections = server_state.connections
        self.tasks = server_state.tasks
        self.transport = None
        self.flow = None
        self.server = None
        self.client = None
        self.scheme = None
        self.pipeline = _Pipeline()
        self.scope = None
        self.headers = None
        self.expect_100_continue = False
        self.cycle = None
        self.guards = _Guards()  # (Part.__init__, which this one stands in for)

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.connections.add(self)
        self.transport = transport
        flow: Any = object.__new__(FlowControl)  # FlowControl.__init__'s state, with the light event
        flow._transport = transport  # noqa: SLF001
        flow.read_paused = False
        flow.write_paused = False
        flow._is_writable_event = LightEvent(True)  # noqa: SLF001
        self.flow = flow
        self.server = get_local_addr(transport)
        self.client = get_remote_addr(transport)
        self.scheme = "https" if is_ssl(transport) else "http"
        logger = self.logger
        if logger.level <= TRACE_LOG_LEVEL:
            prefix = f"{self.client[0]}:{self.client[1]} - " if self.client else ""
            logger.log(TRACE_LOG_LEVEL, "%sHTTP connection made", prefix)



class AddressCap(Part):
    needs: ClassVar[dict[str, tuple[str, ...]]] = {"protocol": ("connection_made", "connection_lost", "client")}
    open_by_address: ClassVar[AddressCounts]

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        counted = self.open_by_address.take(self.client[0] if self.client else None)
        if counted is False:
            transport.abort()
            return
        self.guards.address = counted or None

    def connection_lost(self, exc: Exception | None) -> None:
        guards = self.guards
        address, guards.address = guards.address, None
        if address is not None:
            self.open_by_address.give_back(address)
        super().connection_lost(exc)  # type: ignore[misc]


class RequestDeadline(Part):
    needs: ClassVar[dict[str, tuple[str, ...]]] = {
        "protocol": ("connection_made", "connection_lost", "on_message_begin", "on_message_complete", "loop",
                     "transport", "cycle", "parser", "timeout_keep_alive_task", "timeout_keep_alive",
                     "timeout_keep_alive_handler"),
        "cycle": ("response_started", "response_complete", "disconnected", "message_event", "more_body")}
    request_timeout: ClassVar[float] = 30.0
    deadlines: ClassVar[Deadlines]

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        if not transport.is_closing():
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)  # type: ignore[misc]

    def on_message_begin(self) -> None:
        super().on_message_begin()  # type: ignore[misc]
        if self.guards.due is None:  # (the first request of a connection keeps the connection's deadline)
            self._arm()

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()  # type: ignore[misc]
        cycle: Any = self.cycle
        uvicorn: Any = self
        if (cycle is not None and cycle.response_complete and self.parser is not None
                and uvicorn.timeout_keep_alive_task is None and not self.transport.is_closing()):
            # Answered before its body was in (a 413): idle from now on. uvicorn armed its keep-alive timer at the
            # answer and cancelled it when the rest of the body came, leaving the connection without any deadline.
            uvicorn.timeout_keep_alive_task = self.loop.call_later(uvicorn.timeout_keep_alive,
                                                                   uvicorn.timeout_keep_alive_handler)

    def release_parser(self, cycle: Any) -> None:
        """The request became a stream (StreamConnection): once its request is whole, nothing more is read and no
        deadline is kept."""
        if not (cycle.more_body or cycle.disconnected):
            self._disarm()
        release = getattr(super(), "release_parser", None)
        if release is not None:
            release(cycle)

    @property
    def due(self) -> float | None:
        """When the request under way must be whole (`deadlines.Timed`)."""
        return self.guards.due

    def _arm(self) -> None:
        self.guards.due = self.loop.time() + self.request_timeout
        self.deadlines.add(self)

    def _disarm(self) -> None:
        guards = self.guards
        if guards.due is not None:
            guards.due = None
            self.deadlines.waiting.pop(self, None)

    def timed_out(self) -> None:
        """Past the deadline (`Deadlines.sweep`): a 408, or an abort when an answer is half out."""
        self.guards.due = None
        transport: asyncio.Transport = self.transport
        if transport.is_closing():
            return
        cycle: Any = self.cycle
        self.parser = None  # nothing more of this connection is read: it is answered and closes
        if cycle is not None and not cycle.response_complete:
            # The app waits for a body that does not come: it sees a disconnect, and whatever it answers then
            # is not written (uvicorn's `send` drops writes to a disconnected cycle).
            cycle.disconnected = True
            cycle.message_event.set()
            if cycle.response_started:
                transport.abort()  # an answer is half out: a 408 cannot follow it
                return
        transport.write(TIMED_OUT_ANSWER)
        transport.close()


class EveryRequestLearnsOfTheClose(Part):
    """When the connection is lost, every request of it that has not answered is told so: the one running and
    those pipelined behind it. uvicorn marks only the request it parsed last; the one running (a publish waiting
    for Redis, a stream) then wrote its answer to a closed transport, and uvloop raised in the app."""

    needs: ClassVar[dict[str, tuple[str, ...]]] = {
        "protocol": ("_start_asgi_task", "connection_lost", "pipeline"),
        "cycle": ("disconnected", "response_complete", "message_event")}

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        self.guards.running = cycle
        super()._start_asgi_task(cycle, app)  # type: ignore[misc]

    def connection_lost(self, exc: Exception | None) -> None:
        guards = self.guards
        for cycle in (guards.running, *(c for c, _ in self.pipeline or ())):
            if cycle is not None and not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()
        guards.running = None
        super().connection_lost(exc)  # type: ignore[misc]


class _Cork(CorkedWrites):
    """A request's cork (`uvicorn_glue.CorkedWrites`), given as its cycle's transport by `OneWritePerAnswer`."""

    __slots__ = ("_handover", "_held", "transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self._held = None
        self._handover = None


class OneWritePerAnswer(Part):
    """Each request's answer is written through a `_Cork`: its head and body in one send. A stream's request
    gets the real transport back when it becomes a stream (`StreamConnection.release_parser`): the direct writes
    batch themselves."""

    needs: ClassVar[dict[str, tuple[str, ...]]] = {
        "protocol": ("_start_asgi_task", "transport"), "cycle": ("transport",)}

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        if type(cycle.transport) is not _Cork:
            cycle.transport = _Cork(cycle.transport)
        super()._start_asgi_task(cycle, app)  # type: ignore[misc]


class StreamConnection(Part):
    needs: ClassVar[dict[str, tuple[str, ...]]] = {
        "protocol": ("data_received", "parser", "pipeline", "cycle", "flow"),
        "cycle": ("keep_alive", "more_body", "disconnected"),
        "flow": ("resume_reading",)}

    def release_parser(self, cycle: Any) -> None:
        """`cycle` streams from now on (called by `uvicorn_glue.DirectWriter.attach`)."""
        # uvicorn flags the request it parsed last when the connection is lost: from now on that is the stream.
        self.cycle = cycle
        cork = cycle.transport
        if type(cork) is _Cork:
            # A stream writes to the connection itself (its writer batches), once its head has gone out corked
            # with its first bytes: one send, not two, for each stream opened.
            cork.hand_over(cycle)
        if cycle.more_body or cycle.disconnected:
            return  # its body is still coming in: the parser stays until the connection closes
        self.pipeline.clear()
        cycle.keep_alive = False
        self.parser = None
        # Read (and drop) what comes: bytes left unread in the socket would turn the close into a reset.
        self.flow.resume_reading()


class NoUpgrade(Part):
    needs: ClassVar[dict[str, tuple[str, ...]]] = {
        "protocol": ("_should_upgrade_to_ws", "_unsupported_upgrade_warning", "data_received", "cycle", "parser"),
        "cycle": ("keep_alive",)}

    def _should_upgrade_to_ws(self) -> bool:
        return False

    def _unsupported_upgrade_warning(self) -> None:
        # Called when the parser stops at an upgrade request: nothing after it on this connection is HTTP, so the
        # connection closes once the request is answered (uvicorn's own warning is not logged per request).
        cycle: Any = self.cycle
        if cycle is not None:
            cycle.keep_alive = False
        self.parser = None  # later bytes are read and dropped (see data_received)


class JsonErrors(Part):
    """Bytes that are not HTTP get the service's JSON 400, after the answers of every request parsed before
    them, in order (uvicorn wrote its plain-text 400 at once and closed: the answers of publishes already
    running or queued were lost, though their messages were published)."""

    needs: ClassVar[dict[str, tuple[str, ...]]] = {
        "protocol": ("send_400_response", "on_response_complete", "transport", "cycle", "pipeline", "parser"),
        "cycle": ("response_complete", "keep_alive")}

    def send_400_response(self, msg: str) -> None:
        transport: asyncio.Transport = self.transport
        if transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            self.guards.refusal = True  # after the answers still to come (see on_response_complete)
            self.parser = None
            return
        self._refuse()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        guards = self.guards
        if guards.refusal and not self.pipeline and self.cycle.response_complete:
            guards.refusal = False
            self._refuse()

    def _refuse(self) -> None:
        """The 400, after the last answer: that answer may still be corked (its send waits for the end of the loop's
        turn, and uvloop delivers the bad bytes before it), so it goes out first."""
        cycle = self.cycle
        cork = cycle.transport if cycle is not None else None
        if type(cork) is _Cork:
            cork.flush()
        transport: asyncio.Transport = self.transport
        if not transport.is_closing():
            transport.write(BAD_REQUEST_ANSWER)
            transport.close()


class HalfClose(Part):
    """A client that half-closes (`shutdown(SHUT_WR)`) after sending its requests still gets their answers,
    then the connection closes (uvicorn let the transport close at once: the answers of publishes that ran
    were lost). A stream's connection that half-closes is a client gone, as before."""

    needs: ClassVar[dict[str, tuple[str, ...]]] = {
        "protocol": ("eof_received", "cycle", "pipeline", "parser"), "cycle": ("response_complete", "keep_alive")}

    def eof_received(self) -> bool | None:
        cycle = self.cycle
        if self.parser is None or cycle is None or cycle.response_complete:
            return None  # nothing in flight, or a stream: close
        # The last request parsed closes the connection after its answer; nothing more can be read.
        cycle.keep_alive = False
        self.parser = None
        return True


# Outermost first: the deadline and the cap see a connection before the others, and the cap gives its count
# back after the others have run their `connection_lost`.
PARTS: tuple[type[Part], ...] = (AddressCap, RequestDeadline, EveryRequestLearnsOfTheClose, OneWritePerAnswer,
                                 StreamConnection, NoUpgrade, JsonErrors, HalfClose, SendBuffer, LightEvents,
                                 LightPipeline, LeanStart)

_USABLE: tuple[type[Part], ...] = ()
for _part in PARTS:
    _missing = missing_internals(_part)
    if _missing:
        log.warning("uvicorn changed: %s left out, the connection behaves as stock uvicorn's there",
                    _part.__name__, extra={"missing": _missing})
    else:
        _USABLE += (_part,)


def guarded_protocol(request_timeout: float, max_per_client: int, trusted: Container[str], send_buffer: int = 0,
                     parts: Iterable[type[Part]] | None = None) -> type[HttpToolsProtocol]:
    """A protocol class for `uvicorn.Config(http=...)`: the usable `parts` (default: all of them) composed onto
    uvicorn's, with a request deadline, a per-address cap (addresses `in trusted` exempt: a
    `clients.TrustedProxies`) and a fixed send buffer (`send_buffer` 0: the kernel's autotuning). Each call has
    its own per-address counts."""
    chosen = tuple(p for p in (_USABLE if parts is None else parts) if p in _USABLE)
    namespace: dict[str, Any] = {
        "request_timeout": request_timeout, "send_buffer": send_buffer,
        "open_by_address": AddressCounts(max_per_client, trusted),
        "deadlines": Deadlines(request_timeout), "per_config": {},
        "__doc__": "uvicorn's httptools protocol with the service's edge guards (service/uvicorn_protocol.py).",
    }
    return type("GuardedHttpToolsProtocol", (*chosen, HttpToolsProtocol), namespace)
