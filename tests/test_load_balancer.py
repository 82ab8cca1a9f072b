"""The compose topology as processes on loopback: redis-server, three replicas, and Debian's nginx started with
the shipped deploy/nginx/nginx.conf (templated for addresses only: see `render_nginx_conf`).

300 SSE clients connect through nginx, messages are published through nginx, and every client must get every
message exactly once and in order, with the connections spread over all three replicas. The clients are raw
asyncio sockets (HTTP/1.1, chunked bodies de-chunked here): an httpx client per stream would cost more than
the replicas we are measuring.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import pytest

from .support import Nginx, RedisServer, ServiceProcess

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(150)]

CLIENTS = 300
MESSAGES = 20
REPLICAS = 3
HEARTBEAT = 1.0


@dataclass
class Topology:
    redis: RedisServer
    replicas: list[ServiceProcess]
    nginx: Nginx

    def logs(self) -> str:
        parts = [f"--- nginx error.log\n{self.nginx.log()}"]
        parts += [f"--- {r.name}\n{r.log()[-1500:]}" for r in self.replicas]
        return "\n".join(parts)


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    tmp = tmp_path_factory.mktemp("lb")
    redis = RedisServer(tmp / "redis")
    redis.dir.mkdir()
    redis.start()
    replicas: list[ServiceProcess] = []
    nginx: Nginx | None = None
    try:
        for i in range(REPLICAS):
            env = {
                "REDIS_URL": redis.url,
                "HEARTBEAT_INTERVAL": str(HEARTBEAT),
                "LOG_LEVEL": "warning",
                "DRAIN_GRACE": "2",
                "RETRY_MS": "500",
            }
            replicas.append(ServiceProcess(tmp, env=env, name=f"relay-{i + 1}").start(wait_ready=False))
        for r in replicas:
            r.wait_ready()
        nginx = Nginx([r.port for r in replicas])
        nginx.start()
        yield Topology(redis, replicas, nginx)
    finally:
        if nginx is not None:
            nginx.stop()
        for r in replicas:
            r.kill()
        redis.stop()


# -- a light SSE client: one socket, no library -----------------------------------------------------------------


@dataclass
class Received:
    id: str | None
    event: str
    data: Any
    at: float


@dataclass
class StreamClient:
    """One EventSource-like stream over a raw socket; parses events into `messages` as they arrive."""

    port: int
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    status: int | None = None
    response_headers: dict[str, str] = field(default_factory=dict)
    instance: str | None = None
    messages: list[Received] = field(default_factory=list)
    comments: list[float] = field(default_factory=list)
    error: BaseException | None = None
    hello: asyncio.Event = field(default_factory=asyncio.Event)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None
    _writer: asyncio.StreamWriter | None = None

    def start(self) -> StreamClient:
        self._task = asyncio.create_task(self._run())
        return self

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._writer is not None:
            self._writer.close()

    async def wait(self, predicate: Callable[[StreamClient], bool], timeout: float) -> None:
        async def loop() -> None:
            while not predicate(self):
                if self.ended.is_set():
                    raise AssertionError(f"stream ended early (status {self.status}, error {self.error!r})")
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(loop(), timeout)

    async def _run(self) -> None:
        try:
            reader, self._writer = await asyncio.open_connection("127.0.0.1", self.port)
            head = [
                f"GET {self.path} HTTP/1.1",
                f"Host: 127.0.0.1:{self.port}",
                "Accept: text/event-stream",
                "Cache-Control: no-cache",
                *(f"{k}: {v}" for k, v in self.headers.items()),
            ]
            self._writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
            await self._writer.drain()
            raw = await reader.readuntil(b"\r\n\r\n")
            status_line, *header_lines = raw.decode("latin-1").split("\r\n")
            self.status = int(status_line.split()[1])
            for line in header_lines:
                if line:
                    name, _, value = line.partition(":")
                    self.response_headers[name.strip().lower()] = value.strip()
            if self.status != 200:
                return
            chunked = self.response_headers.get("transfer-encoding", "").lower() == "chunked"
            await self._parse(self._chunks(reader) if chunked else self._raw(reader))
        except (OSError, asyncio.IncompleteReadError) as exc:
            self.error = exc
        finally:
            self.ended.set()
            self.changed.set()

    @staticmethod
    async def _chunks(reader: asyncio.StreamReader) -> Any:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                return
            data = await reader.readexactly(size + 2)
            yield data[:-2]

    @staticmethod
    async def _raw(reader: asyncio.StreamReader) -> Any:
        while chunk := await reader.read(65536):
            yield chunk

    async def _parse(self, chunks: Any) -> None:
        event, eid = "message", None
        data: list[str] = []
        buf = b""
        async for chunk in chunks:
            now = time.monotonic()
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for raw in lines:
                line = raw.decode().rstrip("\r")
                if line == "":
                    if data:
                        payload = orjson.loads("\n".join(data))
                        if event == "relay.hello":
                            self.instance = payload["instance"]
                            self.hello.set()
                        else:
                            self.messages.append(Received(eid, event, payload, now))
                    event, data, eid = "message", [], None
                elif line.startswith(":"):
                    self.comments.append(now)
                else:
                    name, _, value = line.partition(":")
                    value = value.removeprefix(" ")
                    if name == "data":
                        data.append(value)
                    elif name == "event":
                        event = value
                    elif name == "id":
                        eid = value
            self.changed.set()


def has_messages(n: int) -> Callable[[StreamClient], bool]:
    return lambda c: len(c.messages) >= n


async def open_clients(port: int, path: str, n: int, timeout: float = 30.0) -> list[StreamClient]:
    """Starts n streams and waits until every one has its `relay.hello` (it is subscribed from then on)."""
    clients = [StreamClient(port, path).start() for _ in range(n)]
    try:
        await asyncio.wait_for(
            asyncio.gather(*(c.wait(lambda c: c.hello.is_set(), timeout) for c in clients)), timeout
        )
    except (TimeoutError, AssertionError):
        greeted = sum(c.hello.is_set() for c in clients)
        statuses = Counter(c.status for c in clients)
        errors = Counter(repr(c.error) for c in clients if c.error)
        await asyncio.gather(*(c.close() for c in clients))
        raise AssertionError(
            f"{greeted}/{n} streams got relay.hello in {timeout}s; statuses {dict(statuses)}, "
            f"errors {dict(errors)}"
        ) from None
    return clients


async def publish(client: httpx.AsyncClient, channel: str, data: Any) -> str:
    resp = await client.post(f"/channels/{channel}/messages", json={"data": data})
    assert resp.status_code == 202, resp.text
    message_id: str = resp.json()["id"]
    return message_id


# -- the tests ----------------------------------------------------------------------------------------------


async def test_300_clients_through_nginx_get_every_message_in_order_spread_over_replicas(
    topology: Topology,
) -> None:
    channel = "lb-fanout"
    started = time.monotonic()
    clients = await open_clients(topology.nginx.port, f"/channels/{channel}/events", CLIENTS)
    connected_s = time.monotonic() - started
    try:
        # Which replica each stream landed on: the hello event and the response header must agree.
        for c in clients:
            assert c.status == 200
            assert c.response_headers.get("content-type", "").startswith("text/event-stream")
            assert c.response_headers.get("x-relay-instance") == c.instance
        spread = Counter(c.instance for c in clients)
        assert set(spread) == {r.name for r in topology.replicas}, spread
        for name, count in spread.items():
            assert count >= 0.2 * CLIENTS, f"{name} got {count}/{CLIENTS} streams: {dict(spread)}"

        async with httpx.AsyncClient(base_url=topology.nginx.url, timeout=10) as http:
            publish_started = time.monotonic()
            ids = [await publish(http, channel, {"seq": i}) for i in range(MESSAGES)]
        try:
            await asyncio.wait_for(
                asyncio.gather(*(c.wait(lambda c: len(c.messages) >= MESSAGES, 30) for c in clients)), 30
            )
        except (TimeoutError, AssertionError):
            short = [len(c.messages) for c in clients if len(c.messages) < MESSAGES]
            raise AssertionError(
                f"{len(short)} clients short of {MESSAGES} messages (got {short[:10]}...)\n{topology.logs()}"
            ) from None
        delivered_s = max(c.messages[MESSAGES - 1].at for c in clients) - publish_started

        # Let anything extra (a duplicate) arrive before judging "exactly once".
        await asyncio.sleep(3 * HEARTBEAT)
        expected = [{"seq": i} for i in range(MESSAGES)]
        for c in clients:
            assert [m.data for m in c.messages] == expected, (
                f"client on {c.instance}: {[m.data for m in c.messages]}"
            )
            assert [m.id for m in c.messages] == ids
        print(
            f"\n{CLIENTS} streams through nginx: connected in {connected_s:.2f}s, spread {dict(sorted(spread.items()))}; "
            f"{MESSAGES} messages x {CLIENTS} delivered {delivered_s:.2f}s after the first publish"
        )
    finally:
        await asyncio.gather(*(c.close() for c in clients))


async def test_events_arrive_promptly_through_nginx_not_when_a_buffer_fills(topology: Topology) -> None:
    """A small event must cross nginx at once: with buffering on it would wait for more bytes."""
    channel = "lb-latency"
    clients = await open_clients(topology.nginx.port, f"/channels/{channel}/events", 3)
    try:
        # Heartbeat comments (a few bytes each) come through on their own, every HEARTBEAT_INTERVAL.
        await clients[0].wait(lambda c: len(c.comments) >= 2, 5 * HEARTBEAT)
        gaps = [b - a for a, b in zip(clients[0].comments, clients[0].comments[1:])]
        assert max(gaps) < HEARTBEAT + 0.5, gaps

        latencies: list[float] = []
        async with httpx.AsyncClient(base_url=topology.nginx.url, timeout=10) as http:
            for i in range(10):
                sent = time.monotonic()
                await publish(http, channel, {"ping": i})
                await asyncio.gather(*(c.wait(has_messages(i + 1), 5) for c in clients))
                latencies += [c.messages[i].at - sent for c in clients]
        assert max(latencies) < 0.5, f"publish-to-receive through nginx: {sorted(latencies)}"
        print(
            f"\npublish -> event through nginx: median {statistics.median(latencies) * 1000:.1f} ms, "
            f"max {max(latencies) * 1000:.1f} ms ({len(latencies)} samples)"
        )
    finally:
        await asyncio.gather(*(c.close() for c in clients))


async def test_last_event_id_passes_through_nginx_and_resumes_on_any_replica(topology: Topology) -> None:
    channel = "lb-resume"
    async with httpx.AsyncClient(base_url=topology.nginx.url, timeout=10) as http:
        ids = [await publish(http, channel, {"n": i}) for i in range(10)]
    # Several resuming clients, so they land on more than one replica (least_conn spreads them).
    clients = [
        StreamClient(topology.nginx.port, f"/channels/{channel}/events", {"Last-Event-ID": ids[3]}).start()
        for _ in range(6)
    ]
    try:
        await asyncio.gather(*(c.wait(lambda c: len(c.messages) >= 6, 10) for c in clients))
        await asyncio.sleep(2 * HEARTBEAT)
        for c in clients:
            assert [m.id for m in c.messages] == ids[4:], f"resumed on {c.instance}"
            assert [m.data["n"] for m in c.messages] == list(range(4, 10))
        assert len({c.instance for c in clients}) >= 2
    finally:
        await asyncio.gather(*(c.close() for c in clients))


async def test_app_is_served_under_the_path_prefix_too(topology: Topology) -> None:
    async with httpx.AsyncClient(base_url=topology.nginx.url, timeout=10) as http:
        for path in ("/healthz", "/relay/healthz"):
            resp = await http.get(path)
            assert resp.status_code == 200, (path, resp.text)
            assert resp.headers["x-relay-instance"] in {r.name for r in topology.replicas}
        # The chat page and its assets, at the root (http://localhost:8080 in compose) and under the prefix.
        for prefix in ("/", "/relay/"):
            page = await http.get(prefix)
            assert page.status_code == 200 and "text/html" in page.headers["content-type"], prefix
            assert (await http.get(prefix + "static/app.js")).status_code == 200, prefix
        mid = (await http.post("/relay/channels/lb-prefix/messages", json={"data": "via prefix"})).json()[
            "id"
        ]
    client = StreamClient(topology.nginx.port, "/relay/channels/lb-prefix/events?last_event_id=0").start()
    try:
        await client.wait(lambda c: len(c.messages) >= 1, 10)
        assert (client.messages[0].id, client.messages[0].data) == (mid, "via prefix")
    finally:
        await client.close()


async def test_a_draining_replica_behind_nginx_hands_its_clients_over_without_loss(
    topology: Topology,
) -> None:
    """SIGTERM one replica: its streams end with `retry:`, reconnect through nginx with Last-Event-ID, and every
    message published during the drain still arrives exactly once, in order.

    Runs last in this module: it stops one of the three replicas.
    """
    channel = "lb-drain"
    n_clients, n_messages = 60, 30
    port = topology.nginx.port
    victim = topology.replicas[0]
    clients = await open_clients(port, f"/channels/{channel}/events", n_clients)
    assert any(c.instance == victim.name for c in clients), "no stream landed on the replica to drain"
    # Every client holds an id before the drain, so each reconnect can resume (as a browser's would).
    async with httpx.AsyncClient(base_url=topology.nginx.url, timeout=10) as http:
        ids = [await publish(http, channel, {"d": 0})]
        await asyncio.gather(*(c.wait(lambda c: len(c.messages) >= 1, 10) for c in clients))

    streams: dict[int, list[StreamClient]] = {id(c): [c] for c in clients}

    async def follow(first: StreamClient) -> None:
        """EventSource's loop: when a stream ends, wait the retry delay and reconnect with the last id seen."""
        chain = streams[id(first)]
        while True:
            await chain[-1].ended.wait()
            last = [m.id for s in chain for m in s.messages][-1]
            await asyncio.sleep(0.5)  # the relay's retry hint (RETRY_MS=500, jittered)
            chain.append(
                StreamClient(port, f"/channels/{channel}/events", {"Last-Event-ID": str(last)}).start()
            )

    followers = [asyncio.create_task(follow(c)) for c in clients]
    try:
        victim.signal(signal.SIGTERM)
        async with httpx.AsyncClient(base_url=topology.nginx.url, timeout=10) as http:
            for i in range(1, n_messages):
                ids.append(await publish(http, channel, {"d": i}))
                await asyncio.sleep(0.1)  # spread over the 2 s drain (DRAIN_GRACE=2)
        assert victim.wait(15) == 0, victim.log()

        def received(c: StreamClient) -> list[Received]:
            return [m for s in streams[id(c)] for m in s.messages]

        deadline = time.monotonic() + 20
        while not all(len(received(c)) >= n_messages for c in clients) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await asyncio.sleep(2 * HEARTBEAT)  # room for a duplicate to show up
        for c in clients:
            got = [m.id for m in received(c)]
            assert got == ids, (
                f"client first on {c.instance}: {len(got)}/{len(ids)} messages, in order: {got == ids}"
            )
        moved = [c for c in clients if len(streams[id(c)]) > 1]
        assert {c.instance for c in moved} == {victim.name}, "only the drained replica's clients reconnect"
        later = [s for c in moved for s in streams[id(c)][1:]]
        landed = Counter(s.instance for s in later if s.hello.is_set())
        turned_away = sum(1 for s in later if s.ended.is_set() and not s.hello.is_set())
        assert victim.name not in landed
        print(
            f"\ndrain behind nginx: {len(moved)} streams moved, resumed on {dict(landed)}, "
            f"{turned_away} reconnects turned away by the draining replica first"
        )
    finally:
        for t in followers:
            t.cancel()
        await asyncio.gather(*followers, return_exceptions=True)
        await asyncio.gather(*(s.close() for chain in streams.values() for s in chain))
