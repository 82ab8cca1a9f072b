"""One Redis connection carrying many commands in flight, replies matched to callers in order.

Why: a publish through redis-py's client costs ~110 µs of CPU (pool checkout, command packing, response
callbacks, release) against ~40 µs for the same EVALSHA written and read on a connection directly, and every
publish pays a separate write and read. Here the commands of everything awaiting at the same moment are packed
and written together at the end of the event loop's tick and their replies read by one task: concurrent
publishes share a write, a read and a round trip (~9 µs each measured in batches of 50). The I/O is redis_wire's
(no task, timeout scope or error string per command), and deadlines are one timer per connection: replies come
in order, so the oldest command still unanswered is the only one whose deadline can be the first to pass.

Failure semantics, typed (`redis_errors.NotSent`, `MaybeSent`, `MaybeSentTimeout`; `classify` reads the types,
not the messages):
- connecting fails: the callers get `NotSent` (its cause is redis-py's connect error): nothing ran;
- the connection drops, or the oldest unanswered command passes its deadline (`timeout` after it was queued):
  every caller whose command was written gets `MaybeSent` / `MaybeSentTimeout`: their commands may have run;
  callers whose command was still waiting to be written get `NotSent`: nothing of theirs ran. The connection is
  dropped (a late reply could no longer be matched) and the next call opens a new one;
- an error reply goes to its own caller only, raised as the exception redis-py's parser makes of it, whatever
  its class: `-LOADING` is a `BusyLoadingError`, a ConnectionError and not a ResponseError, and `-ERR max number
  of clients` a plain ConnectionError, yet each is Redis refusing the command, never a result (`error_reply`,
  which also catches an error inside an array reply). READONLY also drops the connection (as redis-py's Sentinel
  connection does), so the next call finds the primary.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from redis import exceptions as rx
from redis.asyncio.connection import AbstractConnection

from .redis_errors import MaybeSent, MaybeSentTimeout, NotSent
from .redis_wire import WireIO, error_reply, pack, wire_io

__all__ = ["Multiplexer"]


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class Multiplexer:
    def __init__(self, make_connection: Callable[[], AbstractConnection], timeout: float) -> None:
        self._make = make_connection
        self._timeout = timeout
        self._conn: AbstractConnection | None = None
        self._io: WireIO | None = None
        # The loop the connection was opened on, kept with it: Python 3.11's `asyncio.get_running_loop()` makes a
        # getpid system call each time (a fork check), once per publish here before.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connecting: asyncio.Future[WireIO] | None = None
        self._pending: deque[tuple[asyncio.Future[Any], float]] = deque()  # (caller, deadline) in reply order
        self._outbox: list[bytes] = []
        self._unsent = 0  # the last this-many entries of _pending are still in _outbox: never written
        self._flush_scheduled = False
        self._watchdog: asyncio.TimerHandle | None = None
        self._reader: asyncio.Task[None] | None = None
        self._generation = 0

    def call(self, *args: Any) -> Awaitable[Any]:
        """Send one command; its reply, awaited (raising redis-py's exceptions, see the module docstring). Not a
        coroutine while connected: the command is queued at once and its reply's future handed back, one frame
        less under every publish."""
        io = self._io
        if io is not None:
            return self._queue(io, [args])[0]
        return self._call_connecting(args)

    async def _call_connecting(self, args: tuple[Any, ...]) -> Any:
        io = await self._connect()
        return await self._queue(io, [args])[0]

    async def call_many(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send commands back to back (nothing of anyone else's between them: Redis runs them in this order);
        return their replies. The first error reply is raised after all replies are in."""
        io = self._io if self._io is not None else await self._connect()
        futures = self._queue(io, commands)
        # No shield: a caller that is cancelled cancels its own futures only; the reader skips a reply whose
        # future is done.
        await asyncio.gather(*futures, return_exceptions=True)
        for future in futures:
            error = future.exception()
            if error is not None:
                raise error
        return [f.result() for f in futures]

    def _queue(self, io: WireIO, commands: list[tuple[Any, ...]]) -> list[asyncio.Future[Any]]:
        if io is not self._io:  # it broke while this caller waited for it to open: nothing of this call was sent
            raise NotSent("Error while writing to Redis: the connection was lost while opening")
        loop = self._loop
        assert loop is not None  # set with `_io`
        deadline = loop.time() + self._timeout
        # A command that cannot be packed raises here, before anything of this call is queued or written.
        self._outbox.extend([pack(args) for args in commands])
        self._unsent += len(commands)
        futures: list[asyncio.Future[Any]] = []
        for _ in commands:
            future: asyncio.Future[Any] = loop.create_future()
            future.add_done_callback(_retrieve)  # a caller that gave up must not leave an unretrieved exception
            futures.append(future)
            self._pending.append((future, deadline))
        if self._watchdog is None:
            self._watchdog = loop.call_at(deadline, self._check_deadline)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush, io, self._generation)
        return futures

    def reset(self, reason: str) -> None:
        """Drop the connection (a sibling connection to the same server was found dead): the next call opens a
        new one; callers still waiting get a ConnectionError (their commands may have run)."""
        if self._conn is not None or self._pending:
            self._break(MaybeSent(f"Connection closed: {reason}"))

    async def aclose(self) -> None:
        self._break(MaybeSent("Connection closed: the client is closing"))
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader

    async def _connect(self) -> WireIO:
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
        connecting = self._connecting
        try:
            return await asyncio.shield(connecting)
        finally:
            if connecting.done():
                self._connecting = None

    async def _open(self) -> WireIO:
        conn = self._make()
        try:
            await conn.connect()  # type: ignore[no-untyped-call]
        except (rx.ConnectionError, rx.TimeoutError, OSError) as exc:
            if isinstance(exc, (rx.AuthenticationError, rx.AuthorizationError, rx.ResponseError)):
                raise  # Redis answered the handshake: refused credentials or settings, named as such
            raise NotSent(f"Error connecting to Redis: {exc}") from exc
        io = wire_io(conn)
        self._generation += 1
        self._conn, self._io, self._loop = conn, io, asyncio.get_running_loop()
        self._reader = self._loop.create_task(self._read(io, self._generation), name="redis-multiplex-reader")
        return io

    def _flush(self, io: WireIO, generation: int) -> None:
        self._flush_scheduled = False
        if generation != self._generation or not self._outbox:
            return
        data = b"".join(self._outbox)
        self._outbox.clear()
        unsent, self._unsent = self._unsent, 0
        try:
            io.write(data)
        except Exception as exc:  # noqa: BLE001 - the connection is unusable; every waiting caller is told
            self._break(MaybeSent(f"Connection closed: {exc}"), unsent)

    def _check_deadline(self) -> None:
        self._watchdog = None
        if not self._pending:
            return
        deadline = self._pending[0][1]
        loop = asyncio.get_running_loop()
        if loop.time() >= deadline:
            self._break(MaybeSentTimeout(f"Redis did not answer within {self._timeout}s"))
        else:
            self._watchdog = loop.call_at(deadline, self._check_deadline)

    async def _read(self, io: WireIO, generation: int) -> None:
        pending = self._pending
        try:
            while True:
                for reply in await io.read():
                    if not pending:
                        raise MaybeSent("Connection closed: a reply nobody asked for")
                    future = pending.popleft()[0]
                    if future.done():
                        continue
                    error = error_reply(reply)
                    if error is not None:
                        future.set_exception(error)
                        if isinstance(error, rx.ReadOnlyError):
                            # A replica now (a failover): the next connection finds the primary (Sentinel asks
                            # for it; DNS may point elsewhere). What is still in flight may have run nowhere or
                            # here; its callers are told it is unknown, as for any dropped connection.
                            raise MaybeSent("Connection closed: Redis answered READONLY (a replica now)")
                    else:
                        future.set_result(reply)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a broken connection: fail what waits, reconnect on next call
            if generation == self._generation:
                self._break(MaybeSent(f"Connection closed: {exc}") if not isinstance(exc, MaybeSent) else exc)

    def _break(self, error: Exception, unsent: int | None = None) -> None:
        """Drop the connection. Callers whose command was written get `error` (it may have run); callers whose
        command never left the outbox (the last `unsent` of them) are told it was not sent, which the broker
        names "down", not "outcome unknown": nothing of theirs can have run."""
        conn, self._conn, self._io = self._conn, None, None
        self._generation += 1
        self._outbox.clear()
        if unsent is None:
            unsent = self._unsent
        self._unsent = 0
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        pending, self._pending = self._pending, deque()
        written = len(pending) - unsent
        not_sent = NotSent(f"Error while writing to Redis: not sent, the connection broke first ({error})")
        for i, (future, _) in enumerate(pending):
            if not future.done():
                future.set_exception(error if i < written else not_sent)
        if conn is not None:
            asyncio.get_running_loop().create_task(conn.disconnect(nowait=True))
        reader, self._reader = self._reader, None
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
