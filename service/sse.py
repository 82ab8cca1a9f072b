"""The SSE responses: a lean one with direct writes under uvicorn-httptools, sse-starlette's everywhere else.

Every byte they write is built by `wire` (sse-starlette's `ServerSentEvent`); this module decides how it is sent.

**Under uvicorn with httptools** (what `python -m service` runs, and uvicorn's default when httptools is
installed) a stream gets `SSEResponse`'s lean path: one coroutine per stream and shared timers instead of
sse-starlette's `EventSourceResponse`, which runs a task group of four tasks per stream (the body, pings, a
shutdown watcher, a disconnect listener) and an anyio lock around every write. With thousands of streams that
was most of the CPU of a fan-out and most of the memory of an idle stream (docs/performance.md). The lean path
keeps sse-starlette's behaviour:

- pings: the relay's heartbeat ticker gives a ping to streams that wrote nothing for an interval, and they write
  a comment; no timer per stream;
- disconnects: the relay sweeps the request cycles' `disconnected` flags twice a second (no task per stream);
- a write timeout (SEND_TIMEOUT), after which the connection is aborted, not flushed;
- shutdown: the relay closes every stream when the server begins to exit (`Relay._sweep`), or drains them.

And it adds the direct-write fast path: while a single-channel stream is caught up and parked, the hub writes the
message's pre-framed bytes (one HTTP chunk, built once per message) straight to the connection's transport, in
the dispatching task, instead of waking the stream's coroutine. It is used only when the transport is writable;
a client that falls behind gets the queued path, where flow control, batching and the slow-client cut-off apply.
The writer is the server adapter's (`connection.Edge.writer`; uvicorn's in `uvicorn_glue`). This module only
`attach`es it to the subscriber and `detach`es it at the end; when pings are due, when a disconnect is noticed and
when direct writes start is decided by the subscriber (`service/subscriber.py`'s docstring).

**Anywhere else** (uvicorn `--http h11`, hypercorn, any ASGI server, or a uvicorn whose internals changed: the edge
offers no writer, `connection.Edge`) the same stream body goes through sse-starlette's `EventSourceResponse`, with
nothing of uvicorn's: its ping task, its `send_timeout`, `http.disconnect` for a client that leaves, and its
shutdown handling (it sets our `shutdown_event` when it sees uvicorn exiting, and the stream ends with a `retry:`
hint). A server that cancels open requests at shutdown (hypercorn after `--graceful-timeout`) ends the streams that
way; clients resume with `Last-Event-ID`. The one thing kept from the lean path: the 200 goes out with the stream's
first bytes (the greeting), not before. That path is not the hot one, so it is sse-starlette's code, tested under
uvicorn-h11 and hypercorn (tests/test_servers.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Generator
from typing import Any, cast

import anyio
from sse_starlette import EventSourceResponse
from sse_starlette.sse import AppStatus
from starlette.types import Message as ASGIMessage
from starlette.types import Receive, Scope, Send

from . import wire
from .connection import Edge, PlainEdge
from .subscriber import Subscriber

__all__ = ["SSEResponse", "server_starting"]

log = logging.getLogger("service.sse")


def server_starting() -> None:
    """A server is starting in this process: forget an exit sse-starlette saw earlier.

    sse-starlette records a uvicorn exit in a process-wide flag (`AppStatus.should_exit`) that nothing resets, so
    after one server of a process has exited, every stream of the next one (a test suite's, an app that restarts
    its server) would end as soon as it opened. The relay starts with its server, so it resets the flag then.
    """
    AppStatus.should_exit = False


class _Farewell:
    """sse-starlette's `shutdown_event`, for one stream: when it sees the server exiting it calls `set()`, and the
    stream ends after what is queued, with a `retry:` hint (within `shutdown_grace_period`, before it cancels)."""

    __slots__ = ("_set", "sub")

    def __init__(self, sub: Subscriber) -> None:
        self.sub = sub
        self._set = False

    def set(self) -> None:
        self._set = True
        self.sub.close("shutdown")

    def is_set(self) -> bool:
        return self._set


class SSEResponse:
    """Streams `body` (the stream's frames, from `stream._events`): the lean path with direct writes under
    uvicorn-httptools, sse-starlette's `EventSourceResponse` elsewhere (see the module's docstring).

    A client that stops reading makes a write block; after `send_timeout` the stream ends and, where the server
    lets us reach its transport, the connection is aborted, not flushed (a graceful close would wait for the
    same client).
    """

    __slots__ = ("body", "edge", "headers", "legacy", "ping_interval", "send_timeout", "sub")

    def __init__(self, sub: Subscriber | None, body: AsyncIterator[bytes], headers: list[tuple[bytes, bytes]],
                 send_timeout: float, ping_interval: float = 15.0, legacy: bool = False,
                 edge: Edge | None = None) -> None:
        """`sub` None: a short stream that is not a subscriber (the `retry:` answer of a full instance).

        `headers` is shared by all streams (servers copy it), so an idle stream does not hold a list of its own.
        `legacy`: a stream of the old chat's contract (direct writes in its form). `edge`:
        the server as the relay sees it (connection.Edge): direct writes, aborting a connection.
        """
        self.sub = sub
        self.body = body
        self.headers = headers
        self.send_timeout = send_timeout
        self.ping_interval = ping_interval
        self.legacy = legacy
        self.edge = edge if edge is not None else PlainEdge()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sub = self.sub
        started = False
        try:
            if scope.get("method") == "HEAD":
                await send({"type": "http.response.start", "status": 200, "headers": self.headers})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            writer = self.edge.writer(receive, self.legacy)
            if writer is None:
                await self._through_sse_starlette(scope, receive, send)
                return
            if sub is not None:
                sub.attach(writer)
            send_timeout = self.send_timeout
            async for chunk in self.body:
                writer.flush()  # direct writes still held go first: this stream's own bytes follow them
                if not started:
                    # The status goes out with the first chunk (the greeting, normally): a client that has its
                    # 200 has its position, so whatever is published after it saw the 200 reaches it. A greeting
                    # that waits for Redis lets a ping go first (see stream._Opening.wait_live).
                    started = True
                    # Under uvicorn the head is written at once with the greeting, in one send
                    # (app._SendWithHeaders.start_stream); anywhere else they are ASGI messages.
                    start = getattr(send, "start_stream", None)
                    if start is not None and start(200, self.headers, chunk):
                        continue
                    await _within(send, {"type": "http.response.start", "status": 200, "headers": self.headers},
                                  send_timeout)
                await _within(send, {"type": "http.response.body", "body": chunk, "more_body": True}, send_timeout)
            writer.flush()
            if not started:
                await send({"type": "http.response.start", "status": 200, "headers": self.headers})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except TimeoutError:  # sse-starlette's SendTimeoutError is one too
            log.info("client stopped reading; connection aborted", extra={"path": scope.get("path")})
            if sub is not None:
                sub.close("stalled")
            self.edge.abort(receive)
        except (OSError, RuntimeError) as exc:
            # The peer went away mid-write (uvicorn's ClientDisconnected is an OSError; uvloop raises
            # RuntimeError for a write to a transport closed under us): this stream ends, nothing else does.
            log.debug("stream write failed; client gone", extra={"path": scope.get("path"), "error": str(exc)})
            if sub is not None:
                sub.close("gone")
        finally:
            if sub is not None:
                sub.detach()
            await _close(self.body)

    async def _through_sse_starlette(self, scope: Scope, receive: Receive, send: Send) -> None:
        sub = self.sub
        farewell = None
        if sub is not None:
            farewell = _Farewell(sub)
            sub.attach(None)  # EventSourceResponse pings and sees the client leave; the relay's timers leave it alone
        response = EventSourceResponse(
            self.body,
            headers={k.decode("latin-1"): v.decode("latin-1") for k, v in self.headers if k != b"content-type"},
            ping=self.ping_interval,
            sep=wire.SEP,
            ping_message_factory=wire.ping_event,
            send_timeout=self.send_timeout,
            client_close_handler_callable=self._client_left,
            # Duck-typed: sse-starlette only ever calls `set()` on it (and documents it for exactly this use).
            shutdown_event=cast(anyio.Event, farewell),
            shutdown_grace_period=self.send_timeout if farewell is not None else 0,
        )
        await response(scope, receive, _start_with_first_body(send))

    async def _client_left(self, message: ASGIMessage) -> None:
        if self.sub is not None:
            self.sub.close("gone")


async def _within(send: Send, message: ASGIMessage, timeout: float) -> None:
    """`await send(message)` under `timeout` (SEND_TIMEOUT), the timer armed only if the send has to wait.

    A send to a connection that takes the bytes (nearly every one: the server waits only while the client's
    socket buffer is full) completes without suspending; a timer armed and cancelled around each of those was a
    twentieth of a stream's opening. So the send is run up to its first suspension here, and only a send that
    does suspend is awaited on, from there, under `asyncio.timeout` (`_Resumed`)."""
    step = send(message).__await__()
    try:
        pending = step.send(None)
    except StopIteration:
        return
    async with asyncio.timeout(timeout):
        await _Resumed(step, pending)


class _Resumed:
    """The rest of an awaitable that already ran up to its first suspension (`pending`: what it yielded to the
    task), awaited as if it had been awaited from the start: every resumption, exception (a cancellation by the
    timeout) and close is handed on to it, as `yield from` would."""

    __slots__ = ("pending", "step")

    def __init__(self, step: Generator[Any, Any, Any], pending: Any) -> None:
        self.step, self.pending = step, pending

    def __await__(self) -> Generator[Any, Any, Any]:
        step, pending = self.step, self.pending
        while True:
            try:
                sent = yield pending
            except GeneratorExit:
                step.close()
                raise
            except BaseException as exc:  # noqa: BLE001 - handed on: the awaitable decides what it means
                try:
                    pending = step.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    pending = step.send(sent)
                except StopIteration as stop:
                    return stop.value


def _start_with_first_body(send: Send) -> Send:
    """Hold `http.response.start` back until the first body message, as the lean path does: the 200 goes out
    with the greeting, so a client that has its 200 has its position."""
    held: list[ASGIMessage] = []

    async def deferred(message: ASGIMessage) -> None:
        if message["type"] == "http.response.start":
            held.append(message)
            return
        if held:
            await send(held.pop())
        await send(message)

    return deferred


async def _close(body: AsyncIterator[bytes]) -> None:
    """Run the body's `finally` (unregistering the subscriber) even if it never started or was interrupted."""
    aclose = getattr(body, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()
