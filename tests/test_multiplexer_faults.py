"""The multiplexer's fault branches, in-process, each named: scripted replies and scripted connection failures on
a fake socket (a real `asyncio.StreamReader` the test feeds, a writer that records or fails), no Redis.

What each branch must tell its callers, typed (`redis_errors.NotSent`, `MaybeSent`, `MaybeSentTimeout`) and
named by `classify` for what it is: nothing ran (503 `down`, `connect_timeout`), or it may have run (504
`connection_lost`, `timeout`), or Redis refused it (its own kind). tests/test_redis_wire.py drives the same
multiplexer against a real redis-server.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis import exceptions as rx

from service.broker.base import BrokerUnavailable, OutcomeUnknown
from service.broker.redis_errors import MaybeSent, MaybeSentTimeout, NotSent, classify
from service.broker.redis_multiplex import Multiplexer

pytestmark = pytest.mark.timeout(10)


class _Transport:
    def __init__(self) -> None:
        self.closing = False

    def is_closing(self) -> bool:
        return self.closing


class _Writer:
    def __init__(self) -> None:
        self.transport = _Transport()
        self.written: list[bytes] = []
        self.fail_next: Exception | None = None

    def write(self, data: bytes) -> None:
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            raise error
        self.written.append(bytes(data))


class FakeConnection:
    """What the multiplexer uses of a redis-py connection: `connect()`, the connected `_reader`/`_writer`, and
    `disconnect()`."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.fail = fail
        self._reader: asyncio.StreamReader | None = None
        self._writer: _Writer | None = None
        self.disconnected = False

    async def connect(self) -> None:
        if self.fail is not None:
            raise self.fail
        self._reader = asyncio.StreamReader()
        self._writer = _Writer()

    async def disconnect(self, nowait: bool = False) -> None:
        self.disconnected = True

    # the test's side of the socket
    def reply(self, data: bytes) -> None:
        assert self._reader is not None
        self._reader.feed_data(data)

    @property
    def commands(self) -> int:
        assert self._writer is not None
        return b"".join(self._writer.written).count(b"*")


class Factory:
    def __init__(self, *fails: Exception | None) -> None:
        self.fails = list(fails)
        self.made: list[FakeConnection] = []

    def __call__(self) -> Any:
        conn = FakeConnection(self.fails.pop(0) if self.fails else None)
        self.made.append(conn)
        return conn


async def _turn(n: int = 3) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def _written(conn: FakeConnection, n: int) -> None:
    async with asyncio.timeout(2):
        while conn._writer is None or conn.commands < n:
            await asyncio.sleep(0)


async def test_connect_refused_is_not_sent_and_named_down() -> None:
    mux = Multiplexer(Factory(rx.ConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused.")), 1.0)
    with pytest.raises(NotSent) as caught:
        await mux.call("PING")
    error = classify(caught.value, "publish")
    assert isinstance(error, BrokerUnavailable) and error.kind == "down"


async def test_connect_timeout_is_not_sent_and_named_connect_timeout() -> None:
    mux = Multiplexer(Factory(rx.TimeoutError("Timeout connecting to server")), 1.0)
    with pytest.raises(NotSent) as caught:
        await mux.call("PING")
    error = classify(caught.value, "publish")
    assert isinstance(error, BrokerUnavailable) and error.kind == "connect_timeout"


async def test_refused_credentials_are_named_auth_not_down() -> None:
    mux = Multiplexer(Factory(rx.AuthenticationError("invalid username-password pair")), 1.0)
    with pytest.raises(rx.AuthenticationError) as caught:
        await mux.call("PING")
    assert classify(caught.value, "publish").kind == "auth"


async def test_concurrent_callers_share_one_write_and_get_their_own_replies_in_order() -> None:
    factory = Factory()
    mux = Multiplexer(factory, 1.0)
    calls = [asyncio.ensure_future(mux.call("ECHO", str(i))) for i in range(5)]
    await _written(await _made(factory), 5)
    conn = factory.made[0]
    assert conn._writer is not None and len(conn._writer.written) == 1, "one write for the five"
    conn.reply(b"".join(b"$1\r\n%d\r\n" % i for i in range(5)))
    assert await asyncio.gather(*calls) == [b"%d" % i for i in range(5)]


async def _made(factory: Factory, count: int = 1) -> FakeConnection:
    """The `count`-th connection the multiplexer opened, once connected."""
    async with asyncio.timeout(2):
        while len(factory.made) < count or factory.made[count - 1]._reader is None:
            await asyncio.sleep(0)
    return factory.made[count - 1]


@pytest.mark.parametrize(("reply", "exception", "kind"), [
    (b"-ERR wrong number of arguments\r\n", rx.ResponseError, "error"),
    (b"-LOADING Redis is loading the dataset in memory\r\n", rx.BusyLoadingError, "loading"),
    (b"-NOSCRIPT No matching script\r\n", rx.NoScriptError, "error"),
    (b"-OOM command not allowed when used memory > 'maxmemory'\r\n", rx.OutOfMemoryError, "oom"),
    (b"-BUSY Redis is busy running a script\r\n", rx.ResponseError, "busy_script"),
    (b"-MOVED 3999 127.0.0.1:6381\r\n", rx.MovedError, "cluster"),
    (b"-ERR max number of clients reached\r\n", rx.ConnectionError, "down"),
])
async def test_an_error_reply_goes_to_its_caller_only_and_is_never_a_result(
    reply: bytes, exception: type[Exception], kind: str
) -> None:
    factory = Factory()
    mux = Multiplexer(factory, 1.0)
    before, failing, after = (asyncio.ensure_future(mux.call("PING")) for _ in range(3))
    conn = await _made(factory)
    await _written(conn, 3)
    conn.reply(b"+PONG\r\n" + reply + b"+PONG\r\n")
    assert await before == b"PONG"
    with pytest.raises(exception) as caught:
        await failing
    assert classify(caught.value, "publish").kind == kind
    assert await after == b"PONG", "the connection goes on"
    assert len(factory.made) == 1


async def test_an_error_inside_an_array_reply_is_an_error() -> None:
    factory = Factory()
    mux = Multiplexer(factory, 1.0)
    call = asyncio.ensure_future(mux.call("EVALSHA", "x", 0))
    conn = await _made(factory)
    await _written(conn, 1)
    conn.reply(b"*2\r\n$2\r\nid\r\n-LOADING Redis is loading\r\n")
    with pytest.raises(rx.BusyLoadingError):
        await call


async def test_readonly_fails_its_caller_drops_the_connection_and_in_flight_commands_are_unknown() -> None:
    factory = Factory()
    mux = Multiplexer(factory, 1.0)
    first, second = asyncio.ensure_future(mux.call("EVALSHA", "x", 0)), asyncio.ensure_future(mux.call("PING"))
    conn = await _made(factory)
    await _written(conn, 2)
    conn.reply(b"-READONLY You can't write against a read only replica.\r\n")
    with pytest.raises(rx.ReadOnlyError) as caught:
        await first
    assert classify(caught.value, "publish").kind == "readonly"
    with pytest.raises(MaybeSent) as unknown:
        await second
    assert isinstance(classify(unknown.value, "publish"), OutcomeUnknown)
    third = asyncio.ensure_future(mux.call("PING"))
    fresh = await _made(factory, 2)
    assert fresh is not conn, "the next call opens a new connection (Sentinel or DNS may point elsewhere)"
    await _written(fresh, 1)
    fresh.reply(b"+PONG\r\n")
    assert await third == b"PONG"


async def test_a_dropped_connection_tells_written_commands_from_unsent_ones() -> None:
    """Two commands written, then a write that fails with three more: the written two may have run (504), the
    three never left (503), and nothing of theirs is ever written later."""
    factory = Factory()
    mux = Multiplexer(factory, 1.0)
    written = [asyncio.ensure_future(mux.call("INCR", "a")) for _ in range(2)]
    conn = await _made(factory)
    await _written(conn, 2)
    assert conn._writer is not None
    conn._writer.fail_next = ConnectionResetError("reset by peer")
    unsent = [asyncio.ensure_future(mux.call("INCR", "b")) for _ in range(3)]
    results = await asyncio.gather(*written, *unsent, return_exceptions=True)
    assert [type(r) for r in results] == [MaybeSent] * 2 + [NotSent] * 3
    kinds = [classify(r, "publish") for r in results]  # type: ignore[arg-type]
    assert [type(k) for k in kinds] == [OutcomeUnknown] * 2 + [BrokerUnavailable] * 3
    assert [k.kind for k in kinds] == ["connection_lost"] * 2 + ["down"] * 3
    assert conn.commands == 2
    await _turn()
    assert conn.disconnected


async def test_the_server_closing_fails_what_waits_as_unknown_and_the_next_call_reconnects() -> None:
    factory = Factory()
    mux = Multiplexer(factory, 1.0)
    waiting = asyncio.ensure_future(mux.call("PING"))
    conn = await _made(factory)
    await _written(conn, 1)
    assert conn._reader is not None
    conn._reader.feed_eof()
    with pytest.raises(MaybeSent):
        await waiting
    again = asyncio.ensure_future(mux.call("PING"))
    fresh = await _made(factory, 2)
    await _written(fresh, 1)
    fresh.reply(b"+PONG\r\n")
    assert await again == b"PONG" and fresh is not conn


async def test_a_stalled_server_fails_what_waits_within_the_deadline_as_a_timeout() -> None:
    factory = Factory()
    mux = Multiplexer(factory, 0.2)
    waiting = [asyncio.ensure_future(mux.call("PING")) for _ in range(3)]
    conn = await _made(factory)
    await _written(conn, 3)
    loop = asyncio.get_running_loop()
    started = loop.time()
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(r, MaybeSentTimeout) for r in results), results
    assert loop.time() - started < 1.0
    error = classify(results[0], "publish")  # type: ignore[arg-type]
    assert isinstance(error, OutcomeUnknown) and error.kind == "timeout"
    late = asyncio.ensure_future(mux.call("PING"))
    fresh = await _made(factory, 2)
    assert fresh is not conn, "a late reply could no longer be matched: the connection was dropped"
    await _written(fresh, 1)
    fresh.reply(b"+PONG\r\n")
    assert await late == b"PONG"


async def test_a_reply_nobody_asked_for_drops_the_connection() -> None:
    factory = Factory()
    mux = Multiplexer(factory, 1.0)
    first = asyncio.ensure_future(mux.call("PING"))
    conn = await _made(factory)
    await _written(conn, 1)
    conn.reply(b"+PONG\r\n+STRAY\r\n")
    assert await first == b"PONG"
    await _turn(5)
    assert conn.disconnected
    again = asyncio.ensure_future(mux.call("PING"))
    fresh = await _made(factory, 2)
    await _written(fresh, 1)
    fresh.reply(b"+PONG\r\n")
    assert await again == b"PONG"


async def test_call_many_raises_its_first_error_after_every_reply_is_in() -> None:
    factory = Factory()
    mux = Multiplexer(factory, 1.0)
    batch = asyncio.ensure_future(mux.call_many([("PING",), ("BAD",), ("PING",)]))
    after = asyncio.ensure_future(mux.call("PING"))
    conn = await _made(factory)
    await _written(conn, 4)
    conn.reply(b"+PONG\r\n-ERR unknown command 'BAD'\r\n+PONG\r\n+AFTER\r\n")
    with pytest.raises(rx.ResponseError):
        await batch
    assert await after == b"AFTER", "the batch's replies were all consumed: the next caller gets its own"


async def test_a_caller_that_gave_up_has_its_reply_skipped() -> None:
    factory = Factory()
    mux = Multiplexer(factory, 1.0)
    gone = asyncio.ensure_future(mux.call("ECHO", "gone"))
    kept = asyncio.ensure_future(mux.call("ECHO", "kept"))
    conn = await _made(factory)
    await _written(conn, 2)
    gone.cancel()
    conn.reply(b"$4\r\ngone\r\n$4\r\nkept\r\n")
    assert await kept == b"kept"
    assert gone.cancelled()


async def test_an_argument_that_cannot_be_packed_queues_nothing_of_its_call() -> None:
    factory = Factory()
    mux = Multiplexer(factory, 1.0)
    ok = asyncio.ensure_future(mux.call("PING"))
    conn = await _made(factory)
    await _written(conn, 1)
    with pytest.raises(rx.DataError):
        await mux.call_many([("SET", "a", "1"), ("SET", "b", True)])
    conn.reply(b"+PONG\r\n")
    assert await ok == b"PONG"
    await _turn()
    assert conn.commands == 1, "neither SET was written"
