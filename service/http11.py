"""The service's own HTTP/1.1 connection (HTTP_PROTOCOL=sse-relay, the default): httptools' parser and an ASGI
request cycle, with the edge's guards as its own behaviour rather than parts composed onto uvicorn's protocol.

Why our own: in a reconnect storm a replica's work is opening streams, and uvicorn's per-connection machinery
(its protocol's 28 attributes, a `FlowControl`, a request cycle of 20 attributes with an `asyncio.Event`, a
keep-alive timer set and cancelled per request, the parts' `super()` chains on every callback) cost ~50 µs of the
~120 µs a stream's opening took the server, where the least a Python server does (uvloop, httptools, a scope and a
task) is ~32 µs (docs/performance.md, `bench/conncost.py`). Here a connection is one slotted object that is also its
own flow control and its own cork, a request one slotted `Cycle`, and every deadline (a request's, an idle
keep-alive's) a float swept once a second for the whole server instead of a timer per request.

uvicorn still runs the server around it (sockets, workers, lifespan, signals, the `date` header): `uvicorn.Config(
http=http11_protocol(...))`. What the connection promises is what `uvicorn_protocol`'s guarded protocol promised
(HTTP_PROTOCOL=uvicorn keeps that one), held by the same tests (tests/test_edge.py, tests/test_pipelining.py,
tests/test_direct_answers.py, which also compares the bytes of every answer with uvicorn's):
- a whole request within REQUEST_TIMEOUT from its first byte (the first from the connection's start), else a JSON
  408 and a close (a disconnect for an app waiting for the body, an abort when its answer is half out);
- at most MAX_CONNECTIONS_PER_CLIENT open connections per address, trusted proxies exempt; more are aborted;
- a fixed kernel send buffer (SEND_BUFFER_BYTES);
- a connection whose request became a stream reads no further request: its parser goes, what comes is dropped,
  and it closes when the stream ends;
- when the client goes, every request of the connection not yet answered learns it (the one running and those
  pipelined behind it);
- no upgrade: an `Upgrade` request is answered as plain HTTP, then the connection closes;
- an answer's head and body in one send (the writes of one turn of the loop are corked), a stream's head with its
  greeting;
- bytes that are not HTTP get the service's JSON 400, after the answers of the requests parsed before them;
- a client that half-closes after its requests gets their answers;
- pipelined requests are served one after another, in order; an idle keep-alive connection closes after
  KEEPALIVE_TIMEOUT.
The request cycle keeps the names uvicorn's has (`transport`, `flow`, `scope`, `keep_alive`, `response_started`,
...) so `uvicorn_glue`'s direct answers and direct writes serve both protocols unchanged.
"""

from __future__ import annotations

import asyncio
import http
import logging
import re
import urllib.parse
from collections.abc import Container
from typing import Any, ClassVar

import httptools

from .edge import BAD_REQUEST_ANSWER, TIMED_OUT_ANSWER, AddressCounts, Deadlines
from .uvicorn_glue import CorkedWrites, LightEvent, register_direct_cycle, unix_send_buffer

__all__ = ["Connection", "Cycle", "http11_protocol"]

log = logging.getLogger("service.server")

# uvicorn's: a body buffered past this pauses reading until the app takes it (flow_control.HIGH_WATER_LIMIT)
HIGH_WATER = 65536
# uvicorn's checks of the header lines an app sends through ASGI (direct answers are the service's own lines)
_HEADER_NAME = re.compile(b'[\x00-\x1f\x7f()<>@,;:\\[\\]={} \t\\\\"]')
_HEADER_VALUE = re.compile(b"[\x00-\x08\x0a-\x1f\x7f]")


def _status_line(status: int) -> bytes:
    try:
        phrase = http.HTTPStatus(status).phrase.encode()
    except ValueError:
        phrase = b""
    return b"HTTP/1.1 %d %s\r\n" % (status, phrase)


_STATUS = {status: _status_line(status) for status in range(100, 600)}


_500_HEAD = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"21"), (b"connection", b"close")]


def _nothing() -> None:
    return None


class Cycle:
    """One request and its answer, as ASGI sees them (`run_asgi`, `receive`, `send`). Its connection is both its
    `transport` (a corked writer) and its `flow` (`write_paused`, `drain`, `resume_reading`); a stream's cycle gets
    the real transport once its head is out (`Connection.release_parser`)."""

    __slots__ = ("body", "chunked_encoding", "default_headers", "disconnected", "expected_content_length", "flow",
                 "keep_alive", "message_event", "more_body", "on_response", "response_complete", "response_started",
                 "scope", "transport", "waiting_for_100_continue")

    def __init__(self, scope: dict[str, Any], connection: Connection, default_headers: list[tuple[bytes, bytes]],
                 expect_100_continue: bool, keep_alive: bool) -> None:
        self.scope = scope
        self.transport: Any = connection
        self.flow = connection
        self.default_headers = default_headers
        self.message_event = LightEvent()
        self.on_response = connection.on_response_complete
        self.disconnected = False
        self.keep_alive = keep_alive
        self.waiting_for_100_continue = expect_100_continue
        self.body = bytearray()
        self.more_body = True
        self.response_started = False
        self.response_complete = False
        self.chunked_encoding: bool | None = None
        self.expected_content_length = 0

    async def run_asgi(self, app: Any) -> None:
        try:
            result = await app(self.scope, self.receive, self.send)
        except BaseException as exc:
            log.error("Exception in ASGI application", exc_info=exc)
            if not self.response_started:
                await self._send_500()
            else:
                self.transport.close()
        else:
            if result is not None:
                log.error("ASGI callable should return None, but returned %r.", result)
                self.transport.close()
            elif not self.response_started and not self.disconnected:
                log.error("ASGI callable returned without starting response.")
                await self._send_500()
            elif not self.response_complete and not self.disconnected:
                log.error("ASGI callable returned without completing response.")
                self.transport.close()
        finally:
            self.on_response = _nothing

    async def _send_500(self) -> None:
        await self.send({"type": "http.response.start", "status": 500, "headers": _500_HEAD})
        await self.send({"type": "http.response.body", "body": b"Internal Server Error", "more_body": False})

    async def send(self, message: Any) -> None:
        """uvicorn's `send`, to the byte (tests/test_direct_answers.py compares them)."""
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()
        if self.disconnected:
            return
        kind = message["type"]
        if not self.response_started:
            if kind != "http.response.start":
                raise RuntimeError(f"Expected ASGI message 'http.response.start', but got '{kind}'.")
            self.response_started = True
            self.waiting_for_100_continue = False
            status = message["status"]
            content = [_STATUS[status]]
            closing = False
            for name, value in (*self.default_headers, *message.get("headers", ())):
                if _HEADER_NAME.search(name):
                    raise RuntimeError("Invalid HTTP header name.")
                if _HEADER_VALUE.search(value):
                    raise RuntimeError("Invalid HTTP header value.")
                name = name.lower()
                if name == b"content-length" and self.chunked_encoding is None:
                    self.expected_content_length = int(value.decode())
                    self.chunked_encoding = False
                elif name == b"transfer-encoding" and value.lower() == b"chunked":
                    self.expected_content_length = 0
                    self.chunked_encoding = True
                elif name == b"connection" and b"close" in [t.lower().strip() for t in value.split(b",")]:
                    self.keep_alive = False
                    closing = True
                content += (name, b": ", value, b"\r\n")
            if not self.keep_alive and not closing:
                content.append(b"connection: close\r\n")
            if self.chunked_encoding is None and self.scope["method"] != "HEAD" and status not in (204, 304):
                self.chunked_encoding = True
                content.append(b"transfer-encoding: chunked\r\n")
            content.append(b"\r\n")
            self.transport.write(b"".join(content))
        elif not self.response_complete:
            if kind != "http.response.body":
                raise RuntimeError(f"Expected ASGI message 'http.response.body', but got '{kind}'.")
            body = message.get("body", b"")
            more_body = message.get("more_body", False)
            if self.scope["method"] == "HEAD":
                self.expected_content_length = 0
            elif self.chunked_encoding:
                chunk = b"%x\r\n%s\r\n" % (len(body), body) if body else b""
                if not more_body:
                    chunk += b"0\r\n\r\n"
                if chunk:
                    self.transport.write(chunk)
            else:
                if len(body) > self.expected_content_length:
                    raise RuntimeError("Response content longer than Content-Length")
                self.expected_content_length -= len(body)
                if body:
                    self.transport.write(body)
            if not more_body:
                if self.expected_content_length != 0:
                    raise RuntimeError("Response content shorter than Content-Length")
                self.response_complete = True
                self.message_event.set()
                if not self.keep_alive:
                    self.transport.close()
                self.on_response()
        else:
            raise RuntimeError(f"Unexpected ASGI message '{kind}' sent, after response already completed.")

    async def receive(self) -> dict[str, Any]:
        if self.waiting_for_100_continue and not self.transport.is_closing():
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.waiting_for_100_continue = False
        if not self.disconnected and not self.response_complete:
            self.flow.resume_reading()
            await self.message_event.wait()
            self.message_event.clear()
        if self.disconnected or self.response_complete:
            return {"type": "http.disconnect"}
        message = {"type": "http.request", "body": bytes(self.body), "more_body": self.more_body}
        self.body = bytearray()
        return message


register_direct_cycle(Cycle)


class Connection(CorkedWrites, asyncio.Protocol):
    """One client connection. The class is made per server by `http11_protocol` (its settings and counts are
    class attributes); uvicorn builds one per accepted socket with `(config, server_state, app_state)`."""

    __slots__ = ("_handover", "_held", "address", "app_state", "client", "cycle", "due", "expect_100_continue",
                 "headers", "idle", "loop", "parser", "pipeline", "read_paused", "refusal", "running", "scheme",
                 "server", "server_state", "transport", "url", "write_paused", "writable")

    # set per server by http11_protocol
    request_timeout: ClassVar[float]
    keepalive_timeout: ClassVar[float]
    send_buffer: ClassVar[int]
    open_by_address: ClassVar[AddressCounts]
    deadlines: ClassVar[Deadlines]
    bad_requests: ClassVar[list[int]]  # answered 400, for the log
    app: Any = None  # the config's, read by the server's first connection
    root_path: str = ""
    asgi_version: str = "3.0"

    def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        if self.app is None:  # the server's first connection (a class serves one server, one config)
            if not config.loaded:
                config.load()
            cls = type(self)
            cls.app, cls.root_path, cls.asgi_version = config.loaded_app, config.root_path, config.asgi_version
        self.loop = _loop or asyncio.get_event_loop()
        self.server_state = server_state
        self.app_state = app_state
        self.parser: Any = httptools.HttpRequestParser(self)
        try:
            self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
        except AttributeError:  # httptools < 0.6.3
            pass
        self.transport: Any = None
        self.client: tuple[str, int] | None = None
        self.server: tuple[str, int | None] | None = None
        self.scheme = "http"
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.expect_100_continue = False
        self.cycle: Cycle | None = None  # the request parsed last
        self.running: Cycle | None = None  # the request whose app runs
        self.pipeline: list[Cycle] | None = None  # requests parsed behind the running one
        self.read_paused = False
        self.write_paused = False
        self.writable: LightEvent | None = None  # made when someone waits for the drain
        self.due: float | None = None
        self.idle = False  # the deadline is the keep-alive's, not a request's
        self.address: str | None = None  # counted against MAX_CONNECTIONS_PER_CLIENT
        self.refusal = False  # a 400 waits for the answers before it
        self._held: list[bytes] | None = None  # the cork (CorkedWrites)
        self._handover: Cycle | None = None  # a stream waiting for the cork's send to get the real transport

    # the connection, as asyncio sees it

    def connection_made(self, transport: Any) -> None:
        self.server_state.connections.add(self)
        self.transport = transport
        # The addresses the transport took at accept (uvloop and asyncio keep both), not uvicorn's helpers: they
        # build a socket object per connection to ask the kernel again (~13 us of a stream's ~240 us opening).
        peer = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        if isinstance(peer, tuple):  # TCP: (host, port), and two more fields over IPv6
            self.client = (str(peer[0]), int(peer[1]))
            self.server = (str(local[0]), int(local[1])) if isinstance(local, tuple) else None
        else:  # a Unix socket: no client address, the server is its path
            self.server = (local, None) if isinstance(local, str) and local else None
            unix_send_buffer(transport, self.send_buffer)  # a TCP connection has it from its listener
        if transport.get_extra_info("sslcontext"):
            self.scheme = "https"
        counted = self.open_by_address.take(self.client[0] if self.client else None)
        if counted is False:
            transport.abort()
            return
        self.address = counted or None
        self._arm(self.request_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server_state.connections.discard(self)
        address, self.address = self.address, None
        if address is not None:
            self.open_by_address.give_back(address)
        self._disarm()
        # Every request not answered learns the client is gone: the one running, those behind it, the last parsed.
        for cycle in (self.running, *(self.pipeline or ()), self.cycle):
            if cycle is not None and not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()
        self.running = None
        self.pipeline = None
        self._held = None
        self.resume_writing()
        if exc is None:
            self.transport.close()
        self.parser = None

    def eof_received(self) -> bool | None:
        """A client that half-closes after its requests still gets their answers; a stream's is a client gone."""
        cycle = self.cycle
        if self.parser is None or cycle is None or cycle.response_complete:
            return None
        cycle.keep_alive = False  # the last request parsed closes the connection after its answer
        self.parser = None
        return True

    def data_received(self, data: bytes) -> None:
        parser = self.parser
        if parser is None:
            return  # answered 408, carrying a stream, after an upgrade request or a 400: dropped
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # No WebSocket here: the request is answered as plain HTTP; nothing after it is HTTP, so the connection
            # closes after the answer (RFC 9110 §7.8 lets a server ignore `Upgrade`).
            if self.cycle is not None:
                self.cycle.keep_alive = False
            self.parser = None
        except httptools.HttpParserError:
            self._bad_request()

    # the parser's callbacks

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self.expect_100_continue = False
        if self.due is None or self.idle:
            self._arm(self.request_timeout)  # (a connection's first request keeps the connection's deadline)

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        value = value.rstrip(b" \t")  # llhttp keeps trailing whitespace, which RFC 9110 §5.5 excludes
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        http_version = parser.get_http_version()
        url = httptools.parse_url(self.url)
        raw_path = url.path
        path = raw_path.decode("ascii")
        if "%" in path:
            path = urllib.parse.unquote(path)
        root_path = self.root_path
        scope = {
            "type": "http",
            "asgi": {"version": self.asgi_version, "spec_version": "2.3"},
            "http_version": http_version,
            "server": self.server,
            "client": self.client,
            "scheme": self.scheme,
            "root_path": root_path,
            "headers": self.headers,
            "state": self.app_state.copy(),
            "method": parser.get_method().decode("ascii"),
            "path": root_path + path if root_path else path,
            "raw_path": root_path.encode("ascii") + raw_path if root_path else raw_path,
            "query_string": url.query or b"",
        }
        cycle = Cycle(scope, self, self.server_state.default_headers, self.expect_100_continue,
                      http_version != "1.0" and parser.should_keep_alive())
        before, self.cycle = self.cycle, cycle
        if before is None or before.response_complete:
            self._start(cycle)
        else:  # pipelined behind one still answering: its turn comes in on_response_complete
            self.pause_reading()
            if self.pipeline is None:
                self.pipeline = [cycle]
            else:
                self.pipeline.append(cycle)

    def on_body(self, body: bytes) -> None:
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            return
        cycle.body += body
        if len(cycle.body) > HIGH_WATER:
            self.pause_reading()
        cycle.message_event.set()

    def on_message_complete(self) -> None:
        self._disarm()
        cycle = self.cycle
        if cycle is None:
            return
        if cycle.response_complete:
            # Answered before its body was in (a 413, say): the connection is idle from now on.
            if self.parser is not None and not self.transport.is_closing():
                self._arm(self.keepalive_timeout, idle=True)
            return
        cycle.more_body = False
        cycle.message_event.set()

    # the requests

    def _start(self, cycle: Cycle) -> None:
        self.running = cycle
        task = self.loop.create_task(cycle.run_asgi(self.app))
        tasks = self.server_state.tasks
        task.add_done_callback(tasks.discard)
        tasks.add(task)

    def on_response_complete(self) -> None:
        """The running request has answered (its cycle calls this): the next pipelined one starts, or the connection
        waits for the next request, idle for at most KEEPALIVE_TIMEOUT."""
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.resume_reading()
        pipeline = self.pipeline
        if pipeline:
            self._start(pipeline.pop(0))
            return
        if self.refusal and self.cycle is not None and self.cycle.response_complete:
            self.refusal = False
            self._refuse()
        elif self.due is None and self.parser is not None:
            self._arm(self.keepalive_timeout, idle=True)

    def release_parser(self, cycle: Cycle) -> None:
        """`cycle` streams from now on (`uvicorn_glue.DirectWriter.attach`): once its request is whole nothing more
        is read (its parser goes: ~900 bytes per idle stream), no deadline is kept, requests pipelined behind it
        are dropped unanswered (a client sends them again), and the connection closes when the stream ends. Its
        head goes out corked with its first bytes, then it writes to the connection's transport itself."""
        self.cycle = cycle
        self.hand_over(cycle)
        if cycle.more_body or cycle.disconnected:
            return  # its body is still coming in: the parser stays until the connection closes
        self._disarm()
        self.pipeline = None
        cycle.keep_alive = False
        self.parser = None
        self.resume_reading()  # read (and drop) what comes: unread bytes would turn the close into a reset

    def shutdown(self) -> None:
        """The server is stopping (uvicorn calls this): an idle connection closes, a busy one after its answer."""
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            self.transport.close()
        else:
            cycle.keep_alive = False

    # deadlines

    def _arm(self, seconds: float, idle: bool = False) -> None:
        self.due = self.loop.time() + seconds
        self.idle = idle
        self.deadlines.add(self)

    def _disarm(self) -> None:
        if self.due is not None:
            self.due = None
            self.idle = False
            self.deadlines.waiting.pop(self, None)

    def timed_out(self) -> None:
        """Past the deadline (`Deadlines.sweep`): an idle keep-alive closes; a request gets a 408, or an abort
        when its answer is half out."""
        self.due = None
        transport = self.transport
        if transport.is_closing():
            return
        if self.idle:
            self.idle = False
            transport.close()
            return
        self.parser = None  # nothing more of this connection is read: it is answered and closes
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # The app waits for a body that does not come: it sees a disconnect, and whatever it answers then is
            # not written (`send` drops writes to a disconnected cycle).
            cycle.disconnected = True
            cycle.message_event.set()
            if cycle.response_started:
                self.abort()  # an answer is half out: a 408 cannot follow it
                return
        self.flush()
        transport.write(TIMED_OUT_ANSWER)
        transport.close()

    # bytes that are not HTTP

    def _bad_request(self) -> None:
        if self.transport.is_closing():
            return
        refused = self.bad_requests[0] = self.bad_requests[0] + 1
        if refused == 1 or refused % 1000 == 0:
            log.warning("request refused: not valid HTTP/1.1 (answered 400 and closed)",
                        extra={"client": self.client[0] if self.client else None, "refused_total": refused})
        self.parser = None
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            self.refusal = True  # after the answers still to come (on_response_complete)
            return
        self._refuse()

    def _refuse(self) -> None:
        self._disarm()
        self.flush()  # the last answer may still be corked: it goes first
        transport = self.transport
        if not transport.is_closing():
            transport.write(BAD_REQUEST_ANSWER)
            transport.close()

    # flow control: the cycle's `flow`

    def pause_reading(self) -> None:
        if not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.writable is not None:
            self.writable.clear()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.writable is not None:
            self.writable.set()

    async def drain(self) -> None:
        if not self.write_paused:
            return
        if self.writable is None:
            self.writable = LightEvent()
        await self.writable.wait()


def http11_protocol(request_timeout: float, keepalive_timeout: float, max_per_client: int, trusted: Container[str],
                    send_buffer: int = 0) -> type[Connection]:
    """A protocol class for `uvicorn.Config(http=...)`, with its own per-address counts and deadlines."""
    namespace: dict[str, Any] = {
        "__slots__": (), "request_timeout": request_timeout, "keepalive_timeout": keepalive_timeout,
        "send_buffer": send_buffer, "open_by_address": AddressCounts(max_per_client, trusted),
        "deadlines": Deadlines(min(request_timeout, keepalive_timeout)), "bad_requests": [0],
        "__doc__": Connection.__doc__,
    }
    return type("Http11Connection", (Connection,), namespace)
