"""The pub/sub reader's fault branches, in-process, each named: a scripted Redis behind a fake socket (a real
`asyncio.StreamReader` the server feeds, a writer whose bytes the server parses as RESP commands), no Redis and no
fakeredis.

What a user of the relay cares about in each branch: every channel a stream wants ends up subscribed and filled
(so no message is lost unnoticed), a channel nobody wants ends up unsubscribed, and any failure of the connection
(refused, closed, half-open, an error reply, a SUBSCRIBE never confirmed) ends in a fresh session that subscribes
everything again and asks the broker to fill each channel's gap. tests/test_broker_resilience.py and the
process-level fault tests drive the same reader against a real redis-server.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, cast

import hiredis
import pytest
from redis import exceptions as rx
from redis._parsers.base import BaseParser
from redis.asyncio import Redis
from redis.crc import key_slot

from service.broker import redis_reader
from service.broker.base import BrokerError, BrokerUnavailable
from service.broker.redis_reader import Reader
from service.broker.redis_wire import pack

pytestmark = pytest.mark.timeout(15)

PROBE = 0.15  # seconds between probes: half-open is detected within 2 * PROBE (plus a loop turn)


# -- the fake socket and the scripted server -----------------------------------------------------------------------


class _Transport:
    def __init__(self, conn: FakeConnection) -> None:
        self._conn = conn

    def is_closing(self) -> bool:
        return self._conn.closed


class _Writer:
    """The client's side of the socket: every write is one write (recorded) and goes to the server's parser."""

    def __init__(self, conn: FakeConnection) -> None:
        self._conn = conn
        self.transport = _Transport(conn)

    def write(self, data: bytes) -> None:
        if self._conn.closed:
            raise ConnectionResetError("the socket is closed")
        self._conn.writes.append(bytes(data))
        self._conn.server.receive(self._conn, bytes(data))


class FakeConnection:
    """What the reader uses of a redis-py connection: `connect()`, `send_command` and `read_response(timeout=...)`
    with redis-py's semantics (a timeout given is None back, an error reply is raised, a closed socket is a
    ConnectionError), `pack_commands`/`send_packed_command`, `disconnect()`, and the connected `_reader`/`_writer`
    that `redis_wire.wire_io` reads and writes in bulk."""

    def __init__(self, server: FakeRedis) -> None:
        self.server = server
        self._reader: asyncio.StreamReader | None = None
        self._writer: _Writer | None = None
        self.closed = False
        self.disconnected = False
        self.writes: list[bytes] = []  # one item per write on the socket
        self.commands: list[list[bytes]] = []  # what the server parsed, in order
        self.channels: set[bytes] = set()  # the server's view: what this connection is subscribed to
        self.silent = False  # the server answers nothing more on this connection (half-open)
        self.paused = False  # replies are queued (in order) until `resume`
        self.backlog: list[bytes] = []
        self._parser = hiredis.Reader()

    async def connect(self) -> None:
        await self.server.accept(self)
        self._reader = asyncio.StreamReader()
        self._writer = _Writer(self)

    async def send_command(self, *args: Any, **kwargs: Any) -> None:
        await self.send_packed_command(pack(args))

    async def read_response(self, timeout: float | None = None) -> Any:
        assert self._reader is not None
        parser = hiredis.Reader(replyError=BaseParser.parse_error)
        try:
            async with asyncio.timeout(timeout):
                while (reply := parser.gets()) is False:
                    line = await self._reader.readline()  # never past this reply: the rest is wire_io's
                    if not line:
                        raise rx.ConnectionError("Connection closed by server.")
                    parser.feed(line)
        except TimeoutError:
            return None  # redis-py: "user requested timeout, return None"
        if isinstance(reply, Exception):  # redis-py raises every error reply (LOADING is a ConnectionError)
            raise reply
        return reply

    def pack_commands(self, commands: Iterable[tuple[Any, ...]]) -> list[bytes]:
        return [pack(c) for c in commands]

    async def send_packed_command(self, command: bytes | list[bytes], check_health: bool = True) -> None:
        if self._writer is None or self.closed:
            raise rx.ConnectionError("Error while writing to socket. Connection closed.")
        self._writer.write(command if isinstance(command, bytes) else b"".join(command))

    async def disconnect(self, nowait: bool = False) -> None:
        self.disconnected = True
        self.closed = True

    # -- the server's side of the socket

    def deliver(self, data: bytes) -> None:
        if self.closed or self.silent:
            return
        if self.paused:
            self.backlog.append(data)
            return
        assert self._reader is not None
        self._reader.feed_data(data)

    def resume(self) -> None:
        self.paused = False
        backlog, self.backlog = self.backlog, []
        for data in backlog:
            self.deliver(data)

    def drop(self) -> None:
        """The server (or a middlebox) closes the connection: the reader sees EOF."""
        assert self._reader is not None
        self.closed = True
        self._reader.feed_eof()

    def parse(self, data: bytes) -> list[list[bytes]]:
        self._parser.feed(data)
        out = []
        while (command := self._parser.gets()) is not False:
            out.append(command)
        return out

    def sent(self, verb: bytes) -> list[list[bytes]]:
        """The arguments of every `verb` command written on this connection."""
        return [c[1:] for c in self.commands if c[0].upper() == verb]


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


class FakeRedis:
    """Answers what a reader writes like a Redis 7 would in RESP2, or fails as the test scripts it."""

    def __init__(self) -> None:
        self.connections: list[FakeConnection] = []
        self.attempts: list[float] = []  # monotonic time of every connect attempt
        self.refuse = 0  # connect attempts still to refuse
        self.connect_stall: float | None = None  # an unreachable host: connect waits this long, then times out
        self.silent_connects = 0  # connections still to accept and then never answer (a black-holed path)
        self.confirm = True  # False: SUBSCRIBE is swallowed, never confirmed
        self.error_on: dict[bytes, bytes] = {}  # verb -> error reply (answered once instead of the command)
        self.delay = 0.0  # every reply comes this much later
        self.pause_on: set[bytes] = set()  # verbs whose reply (and everything after) waits for `resume`

    async def accept(self, conn: FakeConnection) -> None:
        self.attempts.append(time.monotonic())
        if self.refuse:
            self.refuse -= 1
            raise rx.ConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused.")
        if self.connect_stall is not None:
            await asyncio.sleep(self.connect_stall)
            raise rx.TimeoutError("Timeout connecting to server")
        self.connections.append(conn)
        if self.silent_connects:
            self.silent_connects -= 1
            conn.silent = True

    def receive(self, conn: FakeConnection, data: bytes) -> None:
        for command in conn.parse(data):
            conn.commands.append(command)
            verb = command[0].upper()
            if verb in self.pause_on:
                self.pause_on.discard(verb)
                conn.paused = True
            answer = self._answer(conn, verb, command[1:])
            if not answer:
                continue
            if self.delay:
                asyncio.get_running_loop().call_later(self.delay, conn.deliver, answer)
            else:
                conn.deliver(answer)

    def _answer(self, conn: FakeConnection, verb: bytes, args: list[bytes]) -> bytes:
        if verb in self.error_on:
            return self.error_on.pop(verb)
        if verb == b"PING":
            return b"*2\r\n$4\r\npong\r\n$0\r\n\r\n" if conn.channels else b"+PONG\r\n"
        if verb in (b"SUBSCRIBE", b"SSUBSCRIBE"):
            if not self.confirm:
                return b""
            out = []
            for channel in args:
                conn.channels.add(channel)
                out.append(b"*3\r\n" + _bulk(verb.lower()) + _bulk(channel) + b":%d\r\n" % len(conn.channels))
            return b"".join(out)
        if verb in (b"UNSUBSCRIBE", b"SUNSUBSCRIBE"):
            out = []
            for channel in args:
                conn.channels.discard(channel)
                out.append(b"*3\r\n" + _bulk(verb.lower()) + _bulk(channel) + b":%d\r\n" % len(conn.channels))
            return b"".join(out)
        return b"+OK\r\n"

    def publish(self, live_key: str, payload: bytes, kind: bytes = b"message") -> int:
        """PUBLISH (or SPUBLISH with kind=b"smessage"): the number of connections it reached."""
        key = live_key.encode()
        reached = 0
        for conn in self.connections:
            if key in conn.channels and not conn.closed:
                conn.deliver(b"*3\r\n" + _bulk(kind) + _bulk(key) + _bulk(payload))
                reached += 1
        return reached

    def drop_subscription(self, conn: FakeConnection, live_key: str) -> None:
        """Cluster: the slot moved, the node drops the sharded subscription on its own (an unsolicited reply)."""
        key = live_key.encode()
        conn.channels.discard(key)
        conn.deliver(b"*3\r\n" + _bulk(b"sunsubscribe") + _bulk(key) + b":%d\r\n" % len(conn.channels))

    @property
    def current(self) -> FakeConnection:
        return self.connections[-1]


class _Pool:
    def __init__(self, server: FakeRedis) -> None:
        self._server = server

    def make_connection(self) -> FakeConnection:
        return FakeConnection(self._server)


class FakeClient:
    """The part of redis-py's `Redis` the reader touches."""

    def __init__(self, server: FakeRedis) -> None:
        self.connection_pool = _Pool(server)
        self.closed = False

    async def aclose(self) -> None:
        self.closed = True


# -- the broker's side: hooks that record ------------------------------------------------------------------------


class Hooks:
    """`ReaderHooks` as the broker implements them, recording every call; prepare/fill can be made to fail or wait."""

    def __init__(self) -> None:
        self.payloads: list[tuple[str, bytes]] = []
        self.prepared: list[list[str]] = []
        self.prepared_at: list[float] = []
        self.began: list[list[str]] = []
        self.filled: list[list[str]] = []
        self.released: list[str] = []  # `unsubscribed` calls
        self.moved: list[str] = []
        self.sessions: list[bool] = []  # `session_ended(was_connected)` calls
        self.prepare_failures = 0
        self.fill_failures = 0
        self.prepare_gate: asyncio.Event | None = None

    def live_key(self, channel: str) -> str:
        return f"sse:{{{channel}}}:live"

    def channel_of(self, live_key: bytes) -> str | None:
        if not live_key.startswith(b"sse:{") or not live_key.endswith(b"}:live"):
            return None
        return live_key[5:-6].decode()

    def slot_of(self, channel: str) -> int:
        return key_slot(self.live_key(channel).encode())

    def on_payload(self, channel: str, payload: bytes) -> None:
        self.payloads.append((channel, payload))

    async def prepare(self, channels: list[str]) -> None:
        self.prepared.append(list(channels))
        self.prepared_at.append(time.monotonic())
        if self.prepare_gate is not None:
            await self.prepare_gate.wait()
        if self.prepare_failures:
            self.prepare_failures -= 1
            raise BrokerUnavailable("the command pool stayed busy", kind="pool_busy")

    def begin_fill(self, channels: list[str]) -> None:
        self.began.append(list(channels))

    async def fill(self, channels: list[str]) -> None:
        if self.fill_failures:
            self.fill_failures -= 1
            raise BrokerError("history read timed out", kind="timeout")
        self.filled.append(list(channels))

    def unsubscribed(self, channel: str) -> None:
        self.released.append(channel)

    def slot_moved(self, channel: str) -> None:
        self.moved.append(channel)

    def session_ended(self, reader: Reader, was_connected: bool) -> None:
        self.sessions.append(was_connected)

    def all_filled(self) -> set[str]:
        return {c for batch in self.filled for c in batch}


# -- helpers ---------------------------------------------------------------------------------------------------


async def until(condition: Callable[[], bool], what: str, timeout: float = 3.0) -> None:
    """Wait for `condition`, polled every few milliseconds, at most `timeout` seconds."""
    try:
        async with asyncio.timeout(timeout):
            while not condition():
                await asyncio.sleep(0.005)
    except TimeoutError:
        raise AssertionError(f"not within {timeout}s: {what}") from None


async def stays(condition: Callable[[], bool], what: str, seconds: float) -> None:
    """`condition` holds throughout `seconds` (for what must NOT happen, a bounded watch is all there is)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert condition(), what
        await asyncio.sleep(0.01)


def live_keys(hooks: Hooks, channels: Iterable[str]) -> set[bytes]:
    return {hooks.live_key(c).encode() for c in channels}


class Rig:
    def __init__(self) -> None:
        self.server = FakeRedis()
        self.hooks = Hooks()
        self.client = FakeClient(self.server)
        self._reader: Reader | None = None

    def start(self, channels: Iterable[str] = (), probe: float = PROBE, sharded: bool = False) -> Reader:
        self._reader = Reader(self.hooks, cast(Redis, self.client), "fake:1", probe, sharded)
        for channel in channels:
            self._reader.assign(channel)
        self._reader.start()
        return self._reader

    @property
    def reader(self) -> Reader:
        assert self._reader is not None
        return self._reader

    async def live(self, channels: Iterable[str], connections: int = 1) -> FakeConnection:
        """Wait until the `connections`-th connection is up and carries `channels` (confirmed and filled)."""
        wanted = set(channels)
        await until(lambda: len(self.server.connections) >= connections and wanted <= self.reader.live
                    and self.reader.connected, f"{len(wanted)} channels live on connection {connections}")
        conn = self.server.connections[connections - 1]
        assert live_keys(self.hooks, wanted) <= conn.channels
        return conn

    async def stop(self) -> None:
        if self._reader is not None:
            async with asyncio.timeout(5):
                await self._reader.stop()


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    rig = Rig()
    yield rig
    await rig.stop()
    assert rig.client.closed or rig._reader is None, "stop() closes the client"


def _errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [str(getattr(r, "error", "")) for r in caplog.records if r.name == "service.broker.redis"]


# -- connecting and subscribing ----------------------------------------------------------------------------------


async def test_connects_pings_then_subscribes_every_assigned_channel_in_bulk(rig: Rig) -> None:
    """1200 channels assigned before the connection is up: one PING, then rounds of at most 1000 channels (one
    prepare, one begin_fill, one fill each), each written as one write of SUBSCRIBE commands of at most 500."""
    channels = [f"room-{i}" for i in range(1200)]
    reader = rig.start(channels)
    conn = await rig.live(channels)
    assert conn.commands[0] == [b"PING"], "the session starts with a PING answered before subscribing"
    subscribes = conn.sent(b"SUBSCRIBE")
    assert sorted(len(s) for s in subscribes) == [200, 500, 500]
    assert set().union(*subscribes) == live_keys(rig.hooks, channels)
    assert sorted(len(b) for b in rig.hooks.prepared) == [200, 1000]
    assert rig.hooks.began == rig.hooks.prepared and rig.hooks.filled == rig.hooks.prepared
    subscribe_writes = [w for w in conn.writes if b"SUBSCRIBE" in w]
    assert len(subscribe_writes) == 2, "each round's SUBSCRIBE commands go out in one write"
    assert reader.connected and reader.not_live == 0 and rig.hooks.sessions == []


async def test_a_channel_assigned_while_connected_is_subscribed_prepared_and_filled(rig: Rig) -> None:
    rig.start(["a"])
    conn = await rig.live(["a"])
    rig.reader.assign("b")
    await rig.live(["a", "b"])
    assert conn.sent(b"SUBSCRIBE") == [[b"sse:{a}:live"], [b"sse:{b}:live"]]
    assert rig.hooks.prepared == [["a"], ["b"]] and rig.hooks.filled == [["a"], ["b"]]


async def test_new_channels_trickling_in_during_a_burst_are_gathered_into_few_rounds_a_lone_one_goes_at_once(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reconnect storm opens new rooms one by one while the loop is busy: each is gathered into the next round
    rather than given one of its own (a round is four round trips and their bookkeeping). A channel wanted after a
    quiet spell is not held back. The windows are stretched here (50 ms gathering, a burst while a round ended
    within 0.3 s) so that timing noise cannot decide the test."""
    monkeypatch.setattr(redis_reader, "_GATHER_S", 0.05)
    monkeypatch.setattr(redis_reader, "_BURST_S", 0.3)
    rig.start(["first"])
    await rig.live(["first"])
    rounds_before = len(rig.hooks.prepared)
    trickle = [f"storm-{i}" for i in range(200)]
    for channel in trickle:  # ~200 ms of new channels, one every millisecond
        rig.reader.assign(channel)
        await asyncio.sleep(0.001)
    await rig.live(trickle)
    rounds = len(rig.hooks.prepared) - rounds_before
    assert rounds <= 20, f"{rounds} rounds for 200 channels arriving over ~200 ms"
    await asyncio.sleep(0.35)  # quiet: no round within _BURST_S
    assigned = time.monotonic()
    rig.reader.assign("lone")
    await rig.live(["lone"])
    assert rig.hooks.prepared[-1] == ["lone"]
    assert rig.hooks.prepared_at[-1] - assigned < 0.025, "a lone new channel is not held for the gathering window"


async def test_sharded_subscribes_one_ssubscribe_per_slot_never_mixing_slots(rig: Rig) -> None:
    """On a Cluster a sharded command must not mix slots: SSUBSCRIBE per slot, hash-tagged channels of one slot
    share one command."""
    first = rig.hooks.slot_of("room-0")
    twin = next(f"room-{i}" for i in range(1, 100_000) if rig.hooks.slot_of(f"room-{i}") == first)
    channels = ["room-0", twin, "a", "b"]
    slots = {rig.hooks.slot_of(c) for c in channels}
    assert len(slots) == 3
    rig.start(channels, sharded=True)
    conn = await rig.live(channels)
    commands = conn.sent(b"SSUBSCRIBE")
    assert conn.sent(b"SUBSCRIBE") == []
    assert len(commands) == len(slots)
    for names in commands:
        assert len({key_slot(n) for n in names}) == 1
    assert sorted(len(names) for names in commands) == [1, 1, 2], "channels of one slot share a command"


async def test_sharded_delivers_smessage_to_on_payload(rig: Rig) -> None:
    rig.start(["a"], sharded=True)
    await rig.live(["a"])
    assert rig.server.publish("sse:{a}:live", b"payload", kind=b"smessage") == 1
    await until(lambda: rig.hooks.payloads == [("a", b"payload")], "the smessage delivered")


async def test_a_node_dropping_a_sharded_subscription_on_its_own_is_a_moved_slot(rig: Rig) -> None:
    """An unsolicited SUNSUBSCRIBE (the slot migrated or failed over): hooks.slot_moved, and the reader no longer
    carries the channel (the broker routes it to the new owner); the connection stays up."""
    reader = rig.start(["a", "b"], sharded=True)
    conn = await rig.live(["a", "b"])
    rig.server.drop_subscription(conn, "sse:{a}:live")
    await until(lambda: rig.hooks.moved == ["a"], "slot_moved('a')")
    assert "a" not in reader.assigned and "a" not in reader.live and reader.live == {"b"}
    assert rig.hooks.released == [], "slot_moved, not unsubscribed"
    assert reader.check() == 0, "not drift: the channel is no longer this reader's"
    assert len(rig.server.connections) == 1 and rig.hooks.sessions == []


# -- messages ------------------------------------------------------------------------------------------------------


async def test_a_message_reaches_on_payload_for_its_channel(rig: Rig) -> None:
    rig.start(["a", "b"])
    await rig.live(["a", "b"])
    rig.server.publish("sse:{b}:live", b"for b")
    rig.server.publish("sse:{a}:live", b"for a")
    await until(lambda: len(rig.hooks.payloads) == 2, "two payloads")
    assert rig.hooks.payloads == [("b", b"for b"), ("a", b"for a")]


async def test_a_message_split_across_socket_reads_arrives_whole(rig: Rig) -> None:
    rig.start(["a"])
    conn = await rig.live(["a"])
    payload = b"x" * 5000
    data = b"*3\r\n" + _bulk(b"message") + _bulk(b"sse:{a}:live") + _bulk(payload)
    for i in range(0, len(data), 7):
        conn.deliver(data[i:i + 7])
        await asyncio.sleep(0)
    await until(lambda: rig.hooks.payloads == [("a", payload)], "the whole payload")


async def test_a_message_of_a_foreign_pubsub_channel_is_ignored(rig: Rig) -> None:
    """Something else publishing on the connection's channels (not ours by name) is skipped, not a failure."""
    rig.start(["a"])
    conn = await rig.live(["a"])
    conn.deliver(b"*3\r\n" + _bulk(b"message") + _bulk(b"other:thing") + _bulk(b"?"))
    rig.server.publish("sse:{a}:live", b"after")
    await until(lambda: rig.hooks.payloads == [("a", b"after")], "the next message of ours")
    assert len(rig.server.connections) == 1 and rig.hooks.sessions == []


# -- releasing -----------------------------------------------------------------------------------------------------


async def test_release_of_a_live_channel_unsubscribes_it_and_says_so(rig: Rig) -> None:
    reader = rig.start(["a", "b"])
    conn = await rig.live(["a", "b"])
    reader.release("a")
    await until(lambda: rig.hooks.released == ["a"], "hooks.unsubscribed('a')")
    await until(lambda: conn.channels == {b"sse:{b}:live"}, "UNSUBSCRIBE reached the server")
    assert conn.sent(b"UNSUBSCRIBE") == [[b"sse:{a}:live"]]
    assert reader.live == {"b"} and reader.assigned == {"b"}
    assert rig.server.publish("sse:{a}:live", b"late") == 0


async def test_release_of_a_channel_not_yet_subscribed_says_unsubscribed_at_once_and_sends_nothing(rig: Rig) -> None:
    rig.server.refuse = 1_000  # never connects
    reader = rig.start(["a"])
    reader.release("a")
    assert rig.hooks.released == ["a"]
    assert reader.assigned == set()
    await until(lambda: len(rig.server.attempts) >= 2, "a retry")
    assert rig.server.connections == []


async def test_release_while_subscribe_is_in_flight_ends_unsubscribed(rig: Rig) -> None:
    """Released after SUBSCRIBE went out but before Redis confirmed it: the confirmation is awaited, then an
    UNSUBSCRIBE follows; the channel is never live and the server ends without it."""
    rig.server.pause_on = {b"SUBSCRIBE"}
    reader = rig.start(["a"], probe=1.0)
    await until(lambda: bool(rig.server.connections) and rig.server.current.sent(b"SUBSCRIBE") != [],
                "SUBSCRIBE written")
    conn = rig.server.current
    reader.release("a")
    assert rig.hooks.released == [], "still subscribed in this session: unsubscribed only once UNSUBSCRIBE is sent"
    conn.resume()
    await until(lambda: rig.hooks.released == ["a"], "hooks.unsubscribed('a')")
    await until(lambda: conn.channels == set(), "the server no longer sends it")
    assert conn.sent(b"UNSUBSCRIBE") == [[b"sse:{a}:live"]]
    assert "a" not in reader.live and reader.not_live == 0
    await stays(lambda: "a" not in reader.live and conn.channels == set(), "stays unsubscribed", 0.1)


async def test_release_then_assign_while_subscribe_is_in_flight_ends_live_without_unsubscribing(rig: Rig) -> None:
    rig.server.pause_on = {b"SUBSCRIBE"}
    reader = rig.start(["a"], probe=1.0)
    await until(lambda: bool(rig.server.connections) and rig.server.current.sent(b"SUBSCRIBE") != [],
                "SUBSCRIBE written")
    conn = rig.server.current
    reader.release("a")
    reader.assign("a")
    conn.resume()
    await rig.live(["a"])
    assert conn.sent(b"UNSUBSCRIBE") == [] and rig.hooks.released == []
    assert len(conn.sent(b"SUBSCRIBE")) == 1


async def test_assign_again_while_unsubscribe_is_in_flight_ends_subscribed(rig: Rig) -> None:
    """UNSUBSCRIBE written, its reply not in yet, the channel wanted again: a new SUBSCRIBE follows, and the channel
    counts as confirmed only after both replies (replies come in command order)."""
    reader = rig.start(["a"], probe=1.0)
    conn = await rig.live(["a"])
    rig.server.pause_on = {b"UNSUBSCRIBE"}
    reader.release("a")
    await until(lambda: conn.sent(b"UNSUBSCRIBE") != [], "UNSUBSCRIBE written")
    reader.assign("a")
    await until(lambda: len(conn.sent(b"SUBSCRIBE")) == 2, "SUBSCRIBE written again")
    await asyncio.sleep(0.05)
    assert "a" not in reader.live, "not confirmed while the UNSUBSCRIBE's reply is still to come"
    conn.resume()
    await rig.live(["a"])
    assert conn.channels == {b"sse:{a}:live"}
    assert rig.hooks.released == ["a"] and rig.hooks.filled == [["a"], ["a"]]


async def test_release_while_prepare_runs_never_subscribes_the_channel(rig: Rig) -> None:
    rig.hooks.prepare_gate = asyncio.Event()
    reader = rig.start(["a", "b"], probe=1.0)
    await until(lambda: rig.hooks.prepared != [], "prepare called")
    reader.release("a")
    assert rig.hooks.released == ["a"], "not subscribed yet: unsubscribed at once"
    rig.hooks.prepare_gate.set()
    conn = await rig.live(["b"])
    assert conn.sent(b"SUBSCRIBE") == [[b"sse:{b}:live"]]
    assert reader.live == {"b"}


# -- connection failures ---------------------------------------------------------------------------------------


async def test_connect_refused_ends_the_session_backs_off_and_retries_until_it_connects(rig: Rig) -> None:
    rig.server.refuse = 3
    reader = rig.start(["a"])
    await rig.live(["a"])
    assert rig.hooks.sessions == [False, False, False], "session_ended(was_connected=False) per refused attempt"
    gaps = [b - a for a, b in zip(rig.server.attempts, rig.server.attempts[1:])]
    assert len(gaps) == 3
    for i, gap in enumerate(gaps):  # jitter is 0.5x..1.5x of a backoff that doubles from _BACKOFF_MIN
        assert gap >= redis_reader._BACKOFF_MIN * 2 ** i * 0.5 - 0.01, gaps
    assert reader.connected


async def test_connect_timing_out_ends_the_session_and_retries(rig: Rig) -> None:
    rig.server.connect_stall = 0.05
    rig.start(["a"])
    await until(lambda: len(rig.hooks.sessions) >= 2, "two failed attempts")
    assert set(rig.hooks.sessions) == {False}
    rig.server.connect_stall = None
    await rig.live(["a"])


async def test_no_answer_to_the_first_ping_is_a_failed_connect(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    """Connected but the first PING is never answered (a server stuck loading, a black-holed path): the session
    is stale within two probe intervals, was never up, and is retried."""
    caplog.set_level(logging.DEBUG, logger="service.broker.redis")
    rig.server.silent_connects = 1
    started = time.monotonic()
    rig.start(["a"])
    await until(lambda: rig.hooks.sessions == [False], "session_ended(was_connected=False)")
    assert time.monotonic() - started >= 2 * PROBE - 0.02
    assert any("no answer to PING" in e for e in _errors_logged(caplog))
    await rig.live(["a"], connections=2)


async def test_an_error_reply_to_the_first_ping_is_a_failed_connect(rig: Rig) -> None:
    rig.server.error_on = {b"PING": b"-LOADING Redis is loading the dataset in memory\r\n"}
    rig.start(["a"])
    await rig.live(["a"], connections=2)
    assert rig.hooks.sessions == [False]
    assert rig.server.connections[0].sent(b"SUBSCRIBE") == []


async def test_a_dropped_connection_resubscribes_everything_and_asks_for_every_gap_to_be_filled(rig: Rig) -> None:
    """The server closes mid-session: session_ended(was_connected=True); the next session subscribes every assigned
    channel again, and prepare/begin_fill/fill get each of them (the gap while down is read from the Streams)."""
    channels = ["a", "b", "c"]
    reader = rig.start(channels)
    first = await rig.live(channels)
    rig.hooks.prepared.clear()
    rig.hooks.began.clear()
    rig.hooks.filled.clear()
    first.drop()
    await until(lambda: rig.hooks.sessions == [True], "session_ended(was_connected=True)")
    second = await rig.live(channels, connections=2)
    assert first.disconnected, "the old connection is closed"
    assert {c for b in rig.hooks.prepared for c in b} == set(channels)
    assert {c for b in rig.hooks.began for c in b} == set(channels)
    assert rig.hooks.all_filled() == set(channels)
    assert second.channels == live_keys(rig.hooks, channels)
    assert rig.hooks.released == [], "a blink is not a release"
    rig.server.publish("sse:{c}:live", b"after")
    await until(lambda: rig.hooks.payloads == [("c", b"after")], "messages flow on the new connection")
    assert reader.connected


async def test_a_channel_released_while_disconnected_is_not_resubscribed(rig: Rig) -> None:
    reader = rig.start(["a", "b"])
    first = await rig.live(["a", "b"])
    rig.server.refuse = 2
    first.drop()
    await until(lambda: len(rig.hooks.sessions) >= 2, "down for a while")
    reader.release("a")
    second = await rig.live(["b"], connections=2)
    assert second.channels == {b"sse:{b}:live"}
    assert rig.hooks.released == ["a"]


async def test_half_open_no_answer_to_the_probe_restarts_the_session(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    """The path goes silent (a NAT forgot the connection): nothing at all comes back. One probe interval of quiet
    sends a PING; one more without an answer ends the session, which starts again and resubscribes."""
    reader = rig.start(["a"])
    first = await rig.live(["a"])
    first.silent = True
    went_silent = time.monotonic()
    await until(lambda: rig.hooks.sessions == [True], "session_ended(was_connected=True)", timeout=2)
    took = time.monotonic() - went_silent
    assert 2 * PROBE - 0.05 <= took <= 4 * PROBE + 0.3, took
    assert first.sent(b"PING")[1:], "a probe PING went out on the silent connection"
    assert any("no answer from Redis" in e for e in _errors_logged(caplog))
    await rig.live(["a"], connections=2)
    assert reader.connected


async def test_a_quiet_but_healthy_connection_is_probed_and_kept(rig: Rig) -> None:
    """No messages for many probe intervals, every probe PING answered (in subscribed mode: a `pong` array):
    the session stays up."""
    rig.start(["a"])
    conn = await rig.live(["a"])
    await stays(lambda: len(rig.server.connections) == 1 and rig.hooks.sessions == [], "no restart", 6 * PROBE)
    assert len(conn.sent(b"PING")) >= 4, "probed while quiet"


async def test_a_slow_server_answering_within_the_probe_window_is_kept(rig: Rig) -> None:
    rig.server.delay = PROBE / 3
    rig.start(["a"])
    await rig.live(["a"])
    await stays(lambda: len(rig.server.connections) == 1 and rig.hooks.sessions == [], "no restart", 6 * PROBE)


async def test_an_error_reply_on_the_subscriber_connection_starts_a_new_session(
        rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    """Redis refuses the SUBSCRIBE (an ACL without the channel): the error reply ends the session; the next one
    subscribes again (here allowed)."""
    rig.server.error_on = {b"SUBSCRIBE": b"-NOPERM this user has no permissions to access one of the channels\r\n"}
    rig.start(["a"])
    await rig.live(["a"], connections=2)
    assert rig.hooks.sessions == [True]
    assert any("NoPermissionError" in e for e in _errors_logged(caplog))
    assert rig.server.connections[0].disconnected


async def test_subscribe_never_confirmed_is_stale_and_starts_a_new_session(
        rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    """PINGs answered, the SUBSCRIBE never: after the confirmation deadline (max(2 probes, 2 s)) the session is
    stale, so a channel never sits 'subscribed' without Redis having said so."""
    rig.server.confirm = False
    reader = rig.start(["a"])
    await until(lambda: rig.hooks.sessions == [True], "session_ended(was_connected=True)", timeout=4)
    assert "a" not in reader.live
    assert rig.hooks.filled == [], "never filled: never confirmed"
    assert any("_Stale" in e and "did not confirm" in e for e in _errors_logged(caplog))
    rig.server.confirm = True
    await rig.live(["a"], connections=2)


# -- restart -------------------------------------------------------------------------------------------------------


async def test_restart_ends_a_live_session_and_reconnects_at_once(
        rig: Rig, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The Sentinel master moved: the session ends with the given reason, the next starts without backoff (a
    minimum backoff of 3 s here would show), resubscribes and refills everything."""
    monkeypatch.setattr(redis_reader, "_BACKOFF_MIN", 3.0)
    reader = rig.start(["a", "b"])
    first = await rig.live(["a", "b"])
    rig.hooks.filled.clear()
    reader.restart(ConnectionError("the Sentinel master moved"))
    await rig.live(["a", "b"], connections=2)
    assert rig.server.attempts[1] - rig.server.attempts[0] < 1.0
    assert first.disconnected and rig.hooks.sessions == [True]
    assert rig.hooks.all_filled() == {"a", "b"}
    assert any(getattr(r, "reason", None) == "the Sentinel master moved" for r in caplog.records)


async def test_restart_while_backing_off_cuts_the_wait_short(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redis_reader, "_BACKOFF_MIN", 3.0)  # the wait after a failure: 1.5 s .. 4.5 s
    rig.server.refuse = 1
    reader = rig.start(["a"])
    await until(lambda: rig.hooks.sessions == [False], "the first attempt refused")
    await asyncio.sleep(0.05)
    reader.restart(ConnectionError("the Sentinel master moved"))
    asked = time.monotonic()
    await rig.live(["a"])
    assert rig.server.attempts[1] - asked < 0.5


async def test_restart_while_a_connect_hangs_abandons_it_at_once(rig: Rig) -> None:
    """The master moved while the reader was connecting to the old one, which hangs: the restart ends that
    attempt at once (a bug found here: it waited for the connect timeout, 2 s by default, during a failover)."""
    rig.server.connect_stall = 2.0
    reader = rig.start(["a"])
    await until(lambda: len(rig.server.attempts) == 1, "connecting")
    rig.server.connect_stall = None
    reader.restart(ConnectionError("the Sentinel master moved"))
    await until(lambda: len(rig.server.connections) == 1, "connected to the new master within 0.5 s", timeout=0.5)


# -- the reconciler and local failures -------------------------------------------------------------------------------


async def test_check_requeues_a_channel_wanted_but_not_subscribed_and_counts_it(rig: Rig) -> None:
    """Drift (the reader's record of a subscription lost, here forced): `check` queues it again, counts it in
    `repaired`, and the worker subscribes and fills it on the same connection."""
    reader = rig.start(["a", "b"])
    conn = await rig.live(["a", "b"])
    assert reader.check() == 0, "nothing to repair when every assigned channel is live"
    reader.live.discard("a")
    reader._subscribed.discard("a")
    reader._confirmed.discard("a")
    assert reader.not_live == 1
    assert reader.check() == 1
    assert reader.repaired == 1
    await rig.live(["a", "b"])
    assert conn.sent(b"SUBSCRIBE")[-1] == [b"sse:{a}:live"]
    assert rig.hooks.filled[-1] == ["a"]
    assert reader.check() == 0 and reader.repaired == 1
    assert len(rig.server.connections) == 1


async def test_check_forgets_a_live_channel_no_longer_assigned(rig: Rig) -> None:
    reader = rig.start(["a"])
    await rig.live(["a"])
    reader.assigned.discard("a")  # drift the other way: live without being wanted (not on its way out)
    assert reader.check() == 0
    assert reader.live == set()


async def test_check_while_disconnected_counts_nothing_in_flight_as_drift(rig: Rig) -> None:
    rig.server.refuse = 1_000
    reader = rig.start(["a", "b"])
    await until(lambda: len(rig.hooks.sessions) >= 1, "one failed attempt")
    assert reader.check() == 0, "pending channels are on their way"
    assert reader.not_live == 2


async def test_prepare_failing_defers_the_channels_with_backoff_and_keeps_the_connection(rig: Rig) -> None:
    """A local failure preparing (the command pool busy): the channels go back to pending and are retried with
    a growing delay on the same connection until they are live."""
    rig.hooks.prepare_failures = 2
    reader = rig.start(["a", "b"])
    conn = await rig.live(["a", "b"])
    assert len(rig.hooks.prepared) == 3
    assert conn.sent(b"SUBSCRIBE") and len(conn.sent(b"SUBSCRIBE")) == 1, "subscribed once, after the retries"
    assert len(rig.server.connections) == 1 and rig.hooks.sessions == []
    assert reader.repaired == 0


async def test_prepare_failing_waits_longer_each_time(rig: Rig) -> None:
    rig.hooks.prepare_failures = 3
    rig.start(["a"])
    await rig.live(["a"])
    times = rig.hooks.prepared_at
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert len(gaps) == 3
    for i, gap in enumerate(gaps):  # 0.1 s doubling, jitter 0.5x..1.5x
        assert gap >= 0.1 * 2 ** i * 0.5 - 0.01, gaps


async def test_fill_failing_keeps_the_subscription_and_fills_again(rig: Rig) -> None:
    """The history read fails after the subscription is confirmed: the channel stays subscribed (buffered by the
    broker), is not live yet, and is filled again without another SUBSCRIBE."""
    rig.hooks.fill_failures = 2
    reader = rig.start(["a"])
    conn = await rig.live(["a"])
    assert rig.hooks.filled == [["a"]]
    assert len(conn.sent(b"SUBSCRIBE")) == 1 and rig.hooks.sessions == []
    assert reader.check() == 0


async def test_stop_closes_the_connection_and_the_client(rig: Rig) -> None:
    reader = rig.start(["a"])
    conn = await rig.live(["a"])
    await reader.stop()
    assert conn.disconnected and rig.client.closed and not reader.connected
