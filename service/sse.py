"""The SSE responses: one lean ASGI response per stream, and the direct-write fast path.

Every byte they write is built by `wire` (sse-starlette's `ServerSentEvent`); this module decides how it is sent.

Why not sse-starlette's `EventSourceResponse` on this path: per stream it runs a task group of four tasks (the
body, pings, a shutdown watcher, a disconnect listener) and an anyio lock around every write. With thousands
of streams that is most of the CPU of a fan-out and most of the memory of an idle stream (see README's
performance section). This response keeps its behaviour (pings, disconnect detection, a write timeout, ending
streams at shutdown) with one coroutine per stream and shared timers:

- pings: the relay's heartbeat ticker marks streams that wrote nothing for an interval, and they write a
  comment; no timer per stream;
- disconnects: under uvicorn the relay sweeps the request cycles' `disconnected` flags once a second (no task
  per stream); elsewhere a task waits for `http.disconnect`, as sse-starlette's does;
- shutdown: the relay closes every stream when the server begins to exit (`Relay.watch_server_exit`).

The direct-write fast path: while a single-channel stream is caught up and parked, the hub writes the message's
pre-framed bytes (one HTTP chunk, built once per message) straight to the connection's transport, in the
dispatching task, instead of waking the stream's coroutine. It is used only when the transport is writable; a
client that falls behind gets the queued path, where flow control, batching and the slow-client cut-off apply.
It reaches into uvicorn's httptools request cycle (`transport`, `flow`, `chunked_encoding`, `disconnected`);
when those are not there (another server, another uvicorn), `DirectWriter.attach` answers None and every
message takes the ordinary ASGI path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from starlette.types import Receive, Scope, Send

from .message import Message
from .subscriber import Subscriber

__all__ = ["DirectWriter", "SSEResponse"]

log = logging.getLogger("service.sse")


class DirectWriter:
    """Writes pre-framed messages to a uvicorn (httptools) connection without going through `send`."""

    __slots__ = ("_cycle",)

    def __init__(self, cycle: Any) -> None:
        self._cycle = cycle

    @classmethod
    def attach(cls, receive: Receive) -> DirectWriter | None:
        cycle = getattr(receive, "__self__", None)
        if cycle is None:
            return None
        for name in ("transport", "flow", "chunked_encoding", "disconnected", "response_started"):
            if not hasattr(cycle, name):
                return None
        if not hasattr(cycle.flow, "write_paused"):
            return None
        return cls(cycle)

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


def _abort_via(receive: Receive) -> None:
    """Drop the connection without flushing: a graceful close would wait for a client that does not read.

    uvicorn's `receive` is a bound method of its request cycle, which holds the transport; elsewhere the
    server's own timeouts have to do this.
    """
    transport = getattr(getattr(receive, "__self__", None), "transport", None)
    if transport is not None and hasattr(transport, "abort"):
        transport.abort()


class SSEResponse:
    """Streams `body` (the stream's chunks, from `stream._events`) with a write timeout on every chunk.

    A client that stops reading makes a write block; after `send_timeout` the connection is aborted, not
    flushed (a graceful close would wait for the same client).
    """

    __slots__ = ("body", "headers", "send_timeout", "sub")

    def __init__(self, sub: Subscriber | None, body: AsyncIterator[bytes], headers: list[tuple[bytes, bytes]],
                 send_timeout: float) -> None:
        """`sub` None: a short stream that is not a subscriber (the `retry:` answer of a full instance).

        `headers` is shared by all streams (servers copy it), so an idle stream does not hold a list of its own.
        """
        self.sub = sub
        self.body = body
        self.headers = headers
        self.send_timeout = send_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sub = self.sub
        listener = None
        started = False
        try:
            if scope.get("method") == "HEAD":
                await send({"type": "http.response.start", "status": 200, "headers": self.headers})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            if sub is not None:
                sub.writer = DirectWriter.attach(receive)
                if sub.writer is None:
                    # Elsewhere than uvicorn a task waits for `http.disconnect`; under uvicorn the relay's
                    # twice-a-second sweep reads the request cycle's flag instead (no task per stream).
                    listener = asyncio.get_running_loop().create_task(self._listen_for_disconnect(receive))
            async for chunk in self.body:
                async with asyncio.timeout(self.send_timeout):
                    if not started:
                        # The status goes out with the first chunk (the greeting, normally): a client that has
                        # its 200 has its position, so whatever is published after it saw the 200 reaches it.
                        # A greeting that waits for Redis lets a ping go first (see stream._pinging).
                        started = True
                        await send({"type": "http.response.start", "status": 200, "headers": self.headers})
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            if not started:
                await send({"type": "http.response.start", "status": 200, "headers": self.headers})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except TimeoutError:
            log.info("client stopped reading; connection aborted", extra={"path": scope.get("path")})
            if sub is not None:
                sub.close("stalled")
            _abort_via(receive)
        except OSError:
            pass  # the peer went away mid-write (uvicorn's ClientDisconnected is an OSError)
        finally:
            if sub is not None:
                sub.direct = sub.writer = None
            if listener is not None:
                listener.cancel()
            await _close(self.body)

    async def _listen_for_disconnect(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect" and self.sub is not None:
                self.sub.close("gone")
                return


async def _close(body: AsyncIterator[bytes]) -> None:
    """Run the body's `finally` (unregistering the subscriber) even if it never started or was interrupted."""
    aclose = getattr(body, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()
