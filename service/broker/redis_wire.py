"""RESP on a connection redis-py opened: commands packed and written without awaiting, replies parsed in bulk.

redis-py does the connecting (TCP or TLS, AUTH, SELECT, the RESP2 handshake: every option set explicitly in
redis_connect). After that, the two hot connections of an instance (the multiplexed command connection and the
pub/sub reader) do their own I/O, because redis-py's per-command path costs more than the command:
`send_packed_command` wraps each write in `asyncio.wait_for` (a new Task per write) and `read_response` opens a
timeout scope and formats an error string per reply. Here a write is one `transport.write`, a read returns every
complete reply the socket delivered (hiredis parses them in C), and deadlines are the caller's business (one
timer per connection, not one per command: see Multiplexer).

It uses the connection's stream reader and writer, which redis-py 8.1 keeps in `_reader`/`_writer` (our
declared range is `redis>=8.1,<8.2`; tests/test_redis_wire.py fails if they move) and nothing else of its internals.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

import hiredis
from redis import exceptions as rx
from redis._parsers.base import BaseParser
from redis.asyncio.connection import AbstractConnection

__all__ = ["ClientIO", "RespIO", "WireIO", "error_reply", "pack", "wire_io"]

_READ_SIZE = 65536


def _arg(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bool):  # before int: redis-py refuses booleans too, a True is almost always a bug
        raise rx.DataError(f"invalid argument {value!r}: convert booleans to bytes, str or a number first")
    if isinstance(value, (int, float)):
        return repr(value).encode()
    if isinstance(value, memoryview):
        return value.tobytes()
    raise rx.DataError(f"invalid argument of type {type(value).__name__}: use bytes, str, int or float")


def pack(args: tuple[Any, ...] | list[Any]) -> bytes:
    """One command as a RESP2 array of bulk strings, packed by hiredis in C (a publish's 16 arguments took ~4 us
    in Python, ~1 us here; tests/test_redis_wire.py holds it byte for byte to redis-py's own packing). What hiredis
    refuses (a bool, None, any other type) is raised as redis-py's DataError, naming the argument."""
    try:
        packed: bytes = hiredis.pack_command(args if type(args) is tuple else tuple(args))
        return packed
    except TypeError:
        for value in args:
            _arg(value)  # raises the DataError naming the argument
        raise


def error_reply(reply: Any) -> Exception | None:
    """The error a parsed reply is, or None for a result.

    hiredis hands every error reply back as the exception `BaseParser.parse_error` makes of it, and those are
    not all ResponseErrors (`-LOADING` is a `BusyLoadingError`, a ConnectionError; `-ERR max number of clients
    reached` a plain ConnectionError): any exception object in the reply stream is Redis refusing the command.
    An array with an error among its elements (a script that returned one in a table, EXEC) is refused too, with
    that error: its other elements would be parsed as a result. Only the top level is searched (a publish's answer
    has two elements, a history page at most HISTORY_PAGE_ENTRIES): no reply this service reads nests deeper."""
    if isinstance(reply, Exception):
        return reply
    if type(reply) is list:
        for item in reply:
            if isinstance(item, Exception):
                return item
    return None


class WireIO(Protocol):
    def write(self, data: bytes) -> None: ...

    async def read(self) -> list[Any]: ...


def wire_io(conn: AbstractConnection) -> WireIO:
    """The I/O of a connected connection: our own over a real socket, redis-py's calls over anything else (fakeredis
    in unit tests hands out parsed replies, not bytes)."""
    if isinstance(conn._reader, asyncio.StreamReader):  # noqa: SLF001
        return RespIO(conn)
    return ClientIO(conn)


class RespIO:
    """The byte stream of one connected redis-py connection."""

    def __init__(self, conn: AbstractConnection) -> None:
        reader, writer = conn._reader, conn._writer  # noqa: SLF001 - see the module docstring
        if reader is None or writer is None:
            raise rx.ConnectionError("Connection closed: not connected")
        self._reader = reader
        self._writer = writer
        # Error replies become redis-py's exception classes (NoScriptError, MovedError, OutOfMemoryError, ...):
        # redis_errors.classify names failures by those classes.
        self._parser = hiredis.Reader(protocolError=rx.InvalidResponse, replyError=BaseParser.parse_error)

    def write(self, data: bytes) -> None:
        """Queue bytes on the socket (the kernel usually takes them at once). Nothing is awaited: what is
        pending is bounded by the callers (REDIS_POOL_SIZE commands) and a stalled server is caught by their
        deadline, not by a write that blocks."""
        if self._writer.transport.is_closing():
            raise rx.ConnectionError("Connection closed: the socket is closing")
        self._writer.write(data)

    async def read(self) -> list[Any]:
        """Every complete reply buffered now, at least one (waiting for the socket if need be). An error reply
        is returned as its exception, not raised. Raises ConnectionError when the server closes."""
        parser = self._parser
        replies: list[Any] = []
        while True:
            reply = parser.gets()
            if reply is not False:
                replies.append(reply)
                continue
            if replies:
                return replies
            try:
                data = await self._reader.read(_READ_SIZE)
            except OSError as exc:
                raise rx.ConnectionError(f"Connection closed: {exc}") from exc
            if not data:
                raise rx.ConnectionError("Connection closed by server.")
            parser.feed(data)


class ClientIO:
    """The same two calls through redis-py's connection API, one reply per read: for connections without a socket
    (fakeredis). Not used against a real server."""

    def __init__(self, conn: AbstractConnection) -> None:
        self._conn = conn

    def write(self, data: bytes) -> None:
        writer = self._conn._writer  # noqa: SLF001
        if writer is None:
            raise rx.ConnectionError("Connection closed: not connected")
        writer.writelines([data])

    async def read(self) -> list[Any]:
        try:
            return [await self._conn.read_response()]
        except (rx.ResponseError, rx.BusyLoadingError) as exc:  # error replies, as RespIO returns them
            return [exc]
