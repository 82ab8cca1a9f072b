"""What the core needs of the server it runs under, as small protocols: the server's adapter implements them.

The core (relay, hub, subscriber, stream, sse) never imports a server's internals. It asks its `Edge` for three
things: a writer to a stream's connection for direct writes (None: the stream goes through sse-starlette's
response), a way to drop a connection without flushing (a client that stopped reading), and whether the server
has begun to exit on its own; and, as a shortcut, a request's body when all of it is there. `app.create_app` and
`server.serve` wire uvicorn's adapter in (`uvicorn_glue.UvicornEdge`); a relay built without one gets
`PlainEdge`, which offers none of them and runs everywhere on plain ASGI.

Direct writes are batched by the writer itself: what is written to a connection during one turn of the event
loop goes out in one send at the end of that turn (the messages of one read from Redis reach each client in one
send), so nothing above the writer holds or releases anything. A stream that writes on its own (its queued path,
a ping, its end) calls `flush()` first, so its bytes never pass direct writes still held.
"""

from __future__ import annotations

from typing import Protocol

from starlette.types import Receive

from .message import Message

__all__ = ["Edge", "PlainEdge", "StreamWriter"]


class StreamWriter(Protocol):
    """A stream's connection, for the hub's direct writes."""

    @property
    def disconnected(self) -> bool: ...

    def write(self, message: Message) -> bool:
        """Take the message now if the connection takes it without blocking; False means not written (queue it,
        or, when `disconnected` became true, the client is gone). Never raises: a failed write costs this client
        alone."""

    def flush(self) -> None:
        """Send what this writer holds now (the stream is about to write itself)."""


class Edge(Protocol):
    """The server, as the core sees it."""

    def writer(self, receive: Receive, legacy: bool) -> StreamWriter | None:
        """A writer to the connection of the request `receive` belongs to, or None where the server offers none.
        `legacy`: a stream of the old chat's contract (messages in its form). The connection then carries this
        stream to its end."""

    def abort(self, receive: Receive) -> None:
        """Drop the request's connection without flushing (a graceful close would wait for a client that does
        not read); does nothing where the server does not let us."""

    def exiting(self) -> bool:
        """Whether the server running this process has begun to exit (its streams must end: it waits for them)."""

    def whole_body(self, receive: Receive) -> bytes | None:
        """The request's body, taken at once when it has arrived in full and nothing of it was read yet; None:
        read it with `receive` (a publish's body is small and has nearly always arrived with its headers)."""


class PlainEdge:
    """Any ASGI server: no direct writes (streams go through sse-starlette's response, with its own pings,
    disconnect detection and shutdown handling), no abort, no exit signal to read."""

    def writer(self, receive: Receive, legacy: bool) -> StreamWriter | None:
        return None

    def abort(self, receive: Receive) -> None:
        return None

    def exiting(self) -> bool:
        return False

    def whole_body(self, receive: Receive) -> bytes | None:
        return None
