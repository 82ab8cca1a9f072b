"""The multiplexed command connection and its wire format, against a real redis-server: replies reach their own
callers in order, an error reply fails only its caller, a stalled server fails what waits within the deadline
and the next call works on a new connection, READONLY drops the connection, and our packing is byte for byte
redis-py's."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st
from redis import exceptions as rx
from redis.asyncio import Redis
from redis.asyncio.connection import Connection

from service.broker.base import BrokerUnavailable, OutcomeUnknown
from service.broker.redis import RedisBroker
from service.broker.redis_connect import RedisOptions, RedisTarget
from service.broker.redis_errors import NotSent, classify
from service.broker.redis_multiplex import Multiplexer
from service.broker.redis_wire import RespIO, pack

from .support import RedisServer
from .test_broker_contract import Collect, _ready, _want

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]


def _client(server: RedisServer) -> Redis:
    client = RedisTarget(server.url, RedisOptions(command_timeout=0.5)).command_client()
    assert isinstance(client, Redis)
    return client


@given(st.lists(st.one_of(st.binary(max_size=40), st.text(max_size=40), st.integers(), st.floats(allow_nan=False)),
                min_size=1, max_size=8))
def test_pack_is_byte_for_byte_what_redis_py_sends(args: list[object]) -> None:
    conn = Connection()
    assert pack(["SET", *args]) == b"".join(conn.pack_command("SET", *args))


def test_pack_refuses_booleans_like_redis_py() -> None:
    with pytest.raises(rx.DataError):
        pack(["SET", "k", True])


async def test_the_connection_of_our_declared_redis_py_exposes_its_streams(redis_server: RedisServer) -> None:
    """RespIO reads redis-py 8.1's connection internals: a release that moves them fails here, not in production."""
    conn = _client(redis_server).connection_pool.make_connection()
    await conn.connect()
    try:
        io = RespIO(conn)
        io.write(pack(["PING"]) + pack(["ECHO", b"x" * 100_000]) + pack(["NOSUCHCOMMAND"]))
        replies: list[object] = []
        while len(replies) < 3:
            replies += await io.read()
        assert replies[:2] == [b"PONG", b"x" * 100_000]
        assert isinstance(replies[2], rx.ResponseError)
    finally:
        await conn.disconnect()


async def test_replies_go_to_their_callers_and_an_error_only_to_its_own(redis_server: RedisServer) -> None:
    client = _client(redis_server)
    mux = Multiplexer(client.connection_pool.make_connection, 2.0)
    try:
        calls = [mux.call("ECHO", f"m{i}") for i in range(200)]
        calls.insert(100, mux.call("EVAL", "return redis.error_reply('ERR nope')", 0))
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert isinstance(results[100], rx.ResponseError) and "nope" in str(results[100])
        del results[100]
        assert results == [f"m{i}".encode() for i in range(200)]
        with pytest.raises(rx.NoScriptError):
            await mux.call("EVALSHA", "0" * 40, 0)
        assert await mux.call_many([("SET", "a", 1), ("INCR", "a"), ("GET", "a")]) == [b"OK", 2, b"2"]
        # A command that cannot be packed fails its call before any of it is sent: nothing of it runs, and the
        # replies of later calls still reach their own callers.
        with pytest.raises(rx.DataError):
            await mux.call_many([("INCR", "a"), ("SET", "a", True)])
        assert await mux.call_many([("INCR", "a"), ("ECHO", "after")]) == [3, b"after"]
    finally:
        await mux.aclose()
        await client.aclose()


async def test_a_stalled_server_fails_what_waits_within_the_deadline_and_the_next_call_reconnects(
        redis_server: RedisServer) -> None:
    client = _client(redis_server)
    mux = Multiplexer(client.connection_pool.make_connection, 0.5)
    try:
        assert await mux.call("PING") == b"PONG"
        started = time.monotonic()
        stalled = asyncio.gather(mux.call("DEBUG", "SLEEP", "1.5"), mux.call("PING"), return_exceptions=True)
        first, second = await asyncio.wait_for(stalled, 5)
        took = time.monotonic() - started
        assert isinstance(first, rx.TimeoutError) and isinstance(second, rx.TimeoutError), (first, second)
        assert 0.45 <= took < 1.2, f"timed out after {took:.2f}s, the deadline is 0.5s"
        # A new connection, queued behind the sleep like everyone: it answers once Redis does (in ~1 s, within
        # the deadline of 0.5 s only if the sleep is over: a second timeout is allowed, a third is not). Its
        # handshake may be what times out (the connection cannot even open during the sleep): NotSent then.
        for attempt in range(3):
            try:
                assert await mux.call("PING") == b"PONG"
                break
            except (rx.TimeoutError, NotSent):
                assert attempt < 2, "the multiplexer never answered again after the stall"
    finally:
        await mux.aclose()
        await client.aclose()


async def test_a_connection_dropped_by_the_server_fails_what_waits_and_the_next_call_reconnects(
        redis_server: RedisServer) -> None:
    client = _client(redis_server)
    mux = Multiplexer(client.connection_pool.make_connection, 2.0)
    try:
        await mux.call("CLIENT", "SETNAME", "victim")
        waiting = asyncio.ensure_future(mux.call("BLPOP", "never", 0))
        await asyncio.sleep(0)  # the BLPOP is written at the end of this tick
        with redis.Redis(port=redis_server.port) as admin:
            assert "victim" in {c["name"] for c in admin.client_list()}
            admin.execute_command("CLIENT", "KILL", "SKIPME", "yes")  # every connection but admin's
        with pytest.raises(rx.ConnectionError):
            await asyncio.wait_for(waiting, 5)
        assert await mux.call("PING") == b"PONG"
    finally:
        await mux.aclose()
        await client.aclose()


async def test_readonly_drops_the_connection_so_the_next_call_finds_the_primary(tmp_path: Path) -> None:
    primary = RedisServer(tmp_path / "p")
    replica = RedisServer(tmp_path / "r")
    for server in (primary, replica):
        server.dir.mkdir()
        server.start()
    try:
        with redis.Redis(port=replica.port) as r:
            r.replicaof("127.0.0.1", primary.port)
        client = _client(replica)
        mux = Multiplexer(client.connection_pool.make_connection, 2.0)
        try:
            await mux.call("CLIENT", "SETNAME", "first")
            with pytest.raises(rx.ReadOnlyError):
                await mux.call("SET", "k", "v")
            # The next call opens a new connection (here to the same replica, promoted meanwhile).
            with redis.Redis(port=replica.port) as r:
                r.replicaof("NO", "ONE")
            assert await mux.call("CLIENT", "GETNAME") is None
            assert await mux.call("SET", "k", "v") == b"OK"
        finally:
            await mux.aclose()
            await client.aclose()
    finally:
        primary.stop()
        replica.stop()


async def test_a_quiet_subscription_answers_its_probes_and_is_never_taken_for_half_open(
        redis_server: RedisServer) -> None:
    """A channel with nothing to say: every probe interval the reader PINGs, Redis answers at once, which leaves
    the connection idle for exactly one interval again. That must count as answered: 20 intervals of quiet, not
    one reconnect (a session taken for stale drops the live subscriptions and buffers messages while it refills)."""
    broker = RedisBroker(redis_server.url, probe_interval=0.1)
    sink = Collect()
    await broker.start(sink)
    try:
        await _ready(broker)
        await _want(broker, "quiet")
        with redis.Redis(port=redis_server.port) as admin:
            pings_before = admin.info("commandstats").get("cmdstat_ping", {}).get("calls", 0)
            await asyncio.sleep(2.0)  # the quiet itself is what is tested: 20 probe intervals
            pings = admin.info("commandstats").get("cmdstat_ping", {}).get("calls", 0) - pings_before
        assert pings >= 5, f"only {pings} probes in 2 s with a 0.1 s interval: the probe is not running"
        assert broker.stats()["reconnects"] == 0, "a quiet connection that answers its PINGs was taken for stale"
        await broker.publish("quiet", b'"still here"')
        await sink.wait_count(1)
        assert bytes(sink.messages[0].data) == b'"still here"'
    finally:
        await broker.close()


async def test_a_broken_connection_tells_written_commands_from_unsent_ones(redis_server: RedisServer) -> None:
    """When the connection breaks, a command already on the wire may have run (outcome unknown: 504, retry with
    the key), but one still waiting to be written cannot have: that is "not published" (503), never unknown."""
    client = _client(redis_server)
    mux = Multiplexer(client.connection_pool.make_connection, 2.0)
    try:
        await mux.call("PING")
        written = asyncio.ensure_future(mux.call("BLPOP", "never", 0))
        await asyncio.sleep(0)  # its write goes out at the end of this tick
        await asyncio.sleep(0)
        # A call on an open connection is queued at once; its flush is scheduled for the end of the tick, not run
        unsent = [asyncio.ensure_future(mux.call("INCR", "counted")) for _ in range(3)]
        mux.reset("a sibling connection was found dead")
        results = await asyncio.wait_for(asyncio.gather(written, *unsent, return_exceptions=True), 5)
        kinds = [classify(r, "publish") for r in results]
        assert isinstance(kinds[0], OutcomeUnknown), kinds[0]
        assert all(isinstance(k, BrokerUnavailable) and k.kind == "down" for k in kinds[1:]), kinds
        assert await mux.call("GET", "counted") is None  # and indeed none of them ran
    finally:
        await mux.aclose()
        await client.aclose()
