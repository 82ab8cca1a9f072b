"""Every error reply is an error: a Redis that answers `-LOADING` (restarted, still reading its AOF) and every other
error reply (MASTERDOWN, READONLY, BUSY, MOVED, ASK, `-ERR`) raise from the multiplexed connection and the
pub/sub reader, whatever class redis-py gives them, so nothing parses an error object as a result.

What a client sees while Redis loads: a publish gets `503 loading` with `Retry-After`; a stream that needs
history waits (200, pings, greeting and history once Redis answers). Never a 500: a browser's EventSource never
reconnects after one.

In-process tests use a scripted RESP server on loopback (it answers each command with what the test says); the
end-to-end test restarts a real redis-server whose AOF takes ~1-2 s to load under hundreds of resumes and
publishes against a real replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import orjson
import pytest
import redis
from redis import exceptions as rx
from redis.asyncio import Redis

from service.broker import BrokerError
from service.broker.redis import RedisBroker
from service.broker.redis_multiplex import Multiplexer
from service.message import parse_position

from .sse import SSEStream, wait_all
from .support import ADMIN, RawHTTP, RedisServer, ServiceProcess, eventually, eventually_blocking, free_port, serve

# -- a scripted RESP server ----------------------------------------------------------------------------------------


def _command(buf: bytearray) -> list[bytes] | None:
    """One RESP array of bulk strings from the front of `buf` (consumed), or None if incomplete."""
    if not buf:
        return None
    if not buf.startswith(b"*"):
        raise ValueError(f"not a RESP array: {bytes(buf[:20])!r}")
    end = buf.find(b"\r\n")
    if end < 0:
        return None
    count, pos, args = int(buf[1:end]), end + 2, []
    for _ in range(count):
        end = buf.find(b"\r\n", pos)
        if end < 0:
            return None
        size = int(buf[pos + 1:end])
        if len(buf) < end + 2 + size + 2:
            return None
        args.append(bytes(buf[end + 2:end + 2 + size]))
        pos = end + 2 + size + 2
    del buf[:pos]
    return args


class ScriptedRedis:
    """A loopback RESP server: `answer(command)` gives the raw reply of each command (handshake commands answered
    +OK). Enough for redis-py to connect and for the multiplexer and the reader to talk to."""

    def __init__(self, answer: Callable[[list[bytes]], bytes]) -> None:
        self.answer = answer
        self.port = free_port()
        self.seen: list[list[bytes]] = []
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def __aenter__(self) -> ScriptedRedis:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        buf = bytearray()
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                buf += data
                while (command := _command(buf)) is not None:
                    self.seen.append(command)
                    name = command[0].upper()
                    writer.write(b"+OK\r\n" if name in (b"CLIENT", b"SELECT", b"HELLO") else self.answer(command))
                await writer.drain()
        writer.close()


LOADING = b"-LOADING Redis is loading the dataset in memory\r\n"
ERROR_REPLIES = {
    "LOADING": (LOADING, rx.BusyLoadingError, "loading"),
    "MASTERDOWN": (b"-MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.\r\n",
                   rx.MasterDownError, "readonly"),
    "READONLY": (b"-READONLY You can't write against a read only replica.\r\n", rx.ReadOnlyError, "readonly"),
    "BUSY": (b"-BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSCRIPT.\r\n",
             rx.ResponseError, "busy_script"),
    "MOVED": (b"-MOVED 3999 127.0.0.1:6381\r\n", rx.MovedError, "cluster"),
    "ASK": (b"-ASK 3999 127.0.0.1:6381\r\n", rx.AskError, "cluster"),
    "ERR": (b"-ERR something else went wrong\r\n", rx.ResponseError, "error"),
    "MAXCLIENTS": (b"-ERR max number of clients reached\r\n", rx.ConnectionError, "down"),
}


def _client(url: str) -> Redis:
    return Redis.from_url(url, protocol=2, socket_connect_timeout=1, socket_timeout=1, health_check_interval=0)


@pytest.mark.parametrize("name", sorted(ERROR_REPLIES))
async def test_multiplexer_raises_every_error_reply(name: str) -> None:
    reply, cls, _ = ERROR_REPLIES[name]
    answers = {b"GET": reply, b"PING": b"+PONG\r\n", b"MGET": b"*2\r\n$1\r\n1\r\n" + reply}
    async with ScriptedRedis(lambda c: answers[c[0].upper()]) as server:
        client = _client(server.url)
        mux = Multiplexer(client.connection_pool.make_connection, 2.0)
        try:
            with pytest.raises(cls):
                await mux.call("GET", "k")
            with pytest.raises(cls):
                await mux.call_many([("PING",), ("GET", "k")])
            with pytest.raises(cls):  # an error inside an array reply is an error too
                await mux.call("MGET", "a", "b")
            assert await mux.call("PING") == b"PONG"  # the connection is still usable (READONLY: a new one)
        finally:
            await mux.aclose()
            await client.aclose()


@pytest.mark.parametrize("name", sorted(ERROR_REPLIES))
async def test_broker_names_every_error_reply_for_publish_and_history(name: str) -> None:
    reply, _, kind = ERROR_REPLIES[name]
    async with ScriptedRedis(lambda c: reply) as server:
        broker = RedisBroker(server.url, probe_interval=0.2)
        try:
            with pytest.raises(BrokerError) as published:
                await broker.publish("a", b"1")
            assert published.value.kind == kind, published.value
            position = parse_position("1700000000000-0-abc")
            with pytest.raises(BrokerError) as read:
                await broker.history("a", position, 16)
            assert read.value.kind == kind, read.value
        finally:
            await broker.close()


async def test_reader_ends_its_session_on_an_error_reply_and_comes_back() -> None:
    """The pub/sub reader treats `-LOADING` to its PING as a failed session (not connected), and connects once
    the server answers."""
    loading = True

    def answer(command: list[bytes]) -> bytes:
        if loading:
            return LOADING
        return b"+PONG\r\n" if command[0].upper() == b"PING" else b"-ERR not scripted\r\n"

    async with ScriptedRedis(answer) as server:
        broker = RedisBroker(server.url, probe_interval=0.2)

        class Sink:
            def dispatch(self, message: object) -> None: ...
            def reset(self, channel: str, reason: str, epoch: str | None = None) -> None: ...
            def established(self, channel: str, position: object) -> None: ...
            def hold_writes(self) -> None: ...
            def release_writes(self) -> None: ...

        await broker.start(Sink())
        try:
            await eventually(lambda: sum(1 for c in server.seen if c[0].upper() == b"PING") >= 2, 5,
                             "the reader retried after -LOADING")
            assert not broker.ready()
            loading = False
            await eventually(broker.ready, 10, "the reader connected once Redis answers")
        finally:
            await broker.close()


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


class FreshRedis:
    """Just enough of an empty Redis for a relay (pub/sub, tails, fills, history, presence), that answers
    `-LOADING` to history reads and publishes while `loading` is set."""

    def __init__(self) -> None:
        self.loading = False
        self.subscribed = 0

    def __call__(self, command: list[bytes]) -> bytes:
        name = command[0].upper()
        if name == b"PING":
            return b"+PONG\r\n"
        if name == b"SUBSCRIBE":
            out = b""
            for channel in command[1:]:
                self.subscribed += 1
                out += b"*3\r\n" + _bulk(b"subscribe") + _bulk(channel) + b":%d\r\n" % self.subscribed
            return out
        if name == b"EVALSHA":
            return b"-NOSCRIPT No matching script.\r\n"
        if name == b"XRANGE":
            return LOADING if self.loading else b"*0\r\n"
        if name == b"EVAL":
            script = command[1]
            if self.loading and b"XADD" in script:
                return LOADING
            if b"XINFO" in script:  # HISTORY_META_SCRIPT: no history at all
                return b"*6\r\n$0\r\n\r\n$0\r\n\r\n$0\r\n\r\n:0\r\n:0\r\n$0\r\n\r\n"
            if b"XREVRANGE" in script:  # TAIL_SCRIPT
                return b"*2\r\n$0\r\n\r\n$0\r\n\r\n"
            return b"*2\r\n:0\r\n:0\r\n" if b"ZRANGE" in script else b":1\r\n"  # presence
        return b"-ERR not scripted\r\n"


async def test_while_redis_loads_a_publish_gets_503_loading_and_a_resume_waits() -> None:
    """In-process, the relay's own answers: 503 `loading` with Retry-After; a resumed stream answered 200 that
    pings while its history cannot be read, then is greeted (here: reset, the scripted Redis has no history)."""
    fresh = FreshRedis()
    async with ScriptedRedis(fresh) as server, serve(redis_url=server.url, public_channels=("*",)) as served:
        async with SSEStream(f"{served.url}/channels/a/events"):  # the channel is live on this relay
            fresh.loading = True
            async with httpx.AsyncClient(base_url=served.url) as http:
                resp = await http.post("/channels/a/messages", json={"data": 1}, headers=ADMIN)
            assert resp.status_code == 503, resp.text
            assert resp.json()["error"]["code"] == "loading" and resp.headers["retry-after"], resp.text
            resumed = SSEStream(f"{served.url}/channels/a/events", last_id="1700000000000-0-abcdefgh").start()
            try:
                await resumed.wait(lambda s: s.statuses == [200] and s.comments >= 2, 10, "200 and pings")
                assert resumed.hellos == 0
                fresh.loading = False
                await resumed.wait(lambda s: s.hellos == 1 and s.resets, 10, "greeted once Redis answers")
            finally:
                await resumed.close()


# -- a real Redis loading its AOF ----------------------------------------------------------------------------------


class LoadingRedis(RedisServer):
    """A redis-server whose AOF is plain commands (no RDB preamble), so a million keys take ~1-2 s to load;
    `restart()` is `kill -9` and a new process on the same port and data, returned as soon as it accepts
    connections (still loading)."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp, extra=["--aof-use-rdb-preamble", "no"])

    def grow(self, keys: int = 1_000_000) -> None:
        admin = redis.Redis(port=self.port, socket_timeout=60)
        admin.execute_command("DEBUG", "POPULATE", keys, "filler", 100)
        admin.bgrewriteaof()
        eventually_blocking(lambda: admin.info("persistence")["aof_rewrite_in_progress"] == 0
                            and admin.info("persistence")["aof_rewrite_scheduled"] == 0, 60, "the AOF rewritten")
        admin.close()

    def restart(self) -> None:
        self.kill()
        binary = shutil.which("redis-server")
        assert binary is not None
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir), "--save", "",
                "--appendonly", "yes", "--appendfsync", "always", "--daemonize", "no", "--protected-mode", "no",
                "--loglevel", "warning", *self.extra]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def answer(self) -> bytes:
        """The first bytes of its answer to PING (b"" when nothing listens)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64)
        except OSError:
            return b""


def _seqs(stream: SSEStream) -> list[int]:
    """The `seq` of each message, from a single-channel stream's data or a multi-channel stream's envelope."""
    return [d["data"]["seq"] if "channel" in d else d["seq"] for d in stream.data("n")]


@pytest.fixture
def loading_redis(tmp_path: Path) -> AsyncIterator[LoadingRedis]:
    server = LoadingRedis(tmp_path / "redis")
    server.dir.mkdir()
    server.start()
    yield server  # type: ignore[misc]
    server.stop()


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_resumes_and_publishes_while_redis_loads_get_no_500_and_lose_nothing(
    loading_redis: LoadingRedis, services: list[ServiceProcess], tmp_path: Path
) -> None:
    svc = ServiceProcess(tmp_path, {"REDIS_URL": loading_redis.url, "HEARTBEAT_INTERVAL": "0.5",
                                    "REDIS_PROBE_INTERVAL": "0.5", "RETRY_MS": "200"}, name="loading")
    services.append(svc)
    svc.start()
    first = RawHTTP(svc.port)
    ids = []
    for i in range(3):
        status, _, body = await first.post("/channels/a/messages", {"data": {"seq": -3 + i}, "event": "n"})
        assert status == 202, body
        ids.append(orjson.loads(body)["id"])
    first.close()
    before = SSEStream(f"{svc.url}/events?channel=a&channel=b").start()
    await before.wait(lambda s: s.hellos == 1, 10, "greeted")
    loading_redis.grow()
    loading_redis.restart()

    statuses: Counter[int] = Counter()
    codes: Counter[str] = Counter()
    accepted: list[int] = []
    streams: list[SSEStream] = []
    loading_seen = 0
    loaded = asyncio.Event()

    async def publisher(k: int) -> None:
        conn = RawHTTP(svc.port)
        seq = k * 10_000
        try:
            while not loaded.is_set():
                seq += 1
                try:
                    status, headers, body = await conn.post("/channels/a/messages", {"data": {"seq": seq},
                                                                                     "event": "n"})
                except (OSError, asyncio.IncompleteReadError):
                    await asyncio.sleep(0.03)
                    continue
                statuses[status] += 1
                if status == 202:
                    accepted.append(seq)
                else:
                    codes[orjson.loads(body)["error"]["code"]] += 1
                    if status in (503, 504) and not headers.get("retry-after"):
                        codes["no Retry-After"] += 1
                await asyncio.sleep(0.03)
        finally:
            conn.close()

    async def resumer() -> None:
        while not loaded.is_set():
            streams.append(SSEStream(f"{svc.url}/channels/a/events", last_id=ids[0]).start())
            streams.append(SSEStream(f"{svc.url}/events?channel=a&channel=b", last_id=f"a={ids[0]}").start())
            await asyncio.sleep(0.03)

    async def watch() -> None:
        nonlocal loading_seen
        while True:
            answer = await asyncio.to_thread(loading_redis.answer)
            if answer.startswith(b"-LOADING"):
                loading_seen += 1
            elif answer.startswith(b"+PONG"):
                break
            await asyncio.sleep(0.02)
        # keep going a little after it loaded: the reader and the broker come back on their own time
        await asyncio.sleep(1.0)
        loaded.set()

    started = time.monotonic()
    await asyncio.wait_for(asyncio.gather(watch(), resumer(), *(publisher(k) for k in range(20))), 60)
    window = time.monotonic() - started
    assert loading_seen >= 5, f"Redis must have answered LOADING for a while (seen {loading_seen} times)"
    await wait_all(streams, lambda s: s.statuses != [], 30, "an answer")
    stream_statuses = Counter(s.statuses[0] for s in streams)
    print(f"\nloading window {window:.1f}s (LOADING seen {loading_seen}x): {len(streams)} resumes, statuses "
          f"{dict(stream_statuses)}; publishes {dict(statuses)}, refusal codes {dict(codes)}; accepted "
          f"{len(accepted)}")
    assert stream_statuses == {200: len(streams)}, stream_statuses
    assert statuses[500] == 0 and set(statuses) <= {202, 503, 504}, statuses
    assert codes["loading"] > 0 and codes["no Retry-After"] == 0, codes
    # every resume gets its history (the two messages after ids[0]) and every accepted publish, once, in order
    wanted = {-2, -1, *accepted}
    await wait_all(streams, lambda s: wanted <= set(_seqs(s)), 60, "history and every accepted message")
    await before.wait(lambda s: set(accepted) <= set(_seqs(s)), 30, "every accepted message")
    for s in streams:
        seqs = _seqs(s)
        assert seqs[:2] == [-2, -1] and len(seqs) == len(set(seqs)), seqs
        assert not s.resets, s.resets
    assert "Traceback" not in svc.log(), svc.log()
    await asyncio.gather(*(s.close() for s in [*streams, before]))
