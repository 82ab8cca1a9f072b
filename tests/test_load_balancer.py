"""The compose topology as processes on loopback: redis-server, three replicas, and Debian's nginx started with
the shipped deploy/nginx/nginx.conf (templated for addresses only: see `render_nginx_conf`).

300 SSE clients connect through nginx, messages are published through nginx, and every client must get every
message exactly once and in order, with the connections spread over all three replicas. The clients are the
suite's raw-socket SSEStreams: an httpx client per stream would cost more than the replicas we are measuring.
"""

from __future__ import annotations

import asyncio
import signal
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from .sse import SSEStream, open_streams, wait_all
from .support import Changes, Nginx, RedisServer, ServiceProcess, eventually

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


# -- clients ------------------------------------------------------------------------------------------------


async def open_clients(nginx: Nginx, path: str, n: int, timeout: float = 30.0,
                       changed: Changes | None = None) -> list[SSEStream]:
    """Starts n streams through nginx and waits until every one has its `relay.hello` (it is subscribed from then
    on). `changed`: one notifier for all of them."""
    clients = [SSEStream(nginx.url + path, changed=changed) for _ in range(n)]
    try:
        await open_streams(clients, timeout)
    except AssertionError:
        await asyncio.gather(*(c.close() for c in clients))
        raise
    return clients


def has_events(n: int) -> Callable[[SSEStream], bool]:
    return lambda c: len(c.events) >= n


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
    clients = await open_clients(topology.nginx, f"/channels/{channel}/events", CLIENTS)
    connected_s = time.monotonic() - started
    try:
        # Which replica each stream landed on: the hello event and the response header must agree.
        for c in clients:
            assert c.statuses == [200]
            assert c.response_headers.get("content-type", "").startswith("text/event-stream")
            assert c.response_headers.get("x-relay-instance") == c.instance
        spread = Counter(c.instance for c in clients)
        assert set(spread) == {r.name for r in topology.replicas}, spread
        for name, count in spread.items():
            assert count >= 0.2 * CLIENTS, f"{name} got {count}/{CLIENTS} streams: {dict(spread)}"

        async with httpx.AsyncClient(base_url=topology.nginx.url, timeout=10) as http:
            publish_started = time.time()
            ids = [await publish(http, channel, {"seq": i}) for i in range(MESSAGES)]
            try:
                await wait_all(clients, lambda c: len(c.events) >= MESSAGES, 30, f"{MESSAGES} messages")
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{topology.logs()}") from None
            delivered_s = max(c.events[MESSAGES - 1].at for c in clients) - publish_started
            # A last message: order per channel means anything extra (a duplicate) arrives before it.
            end = await publish(http, channel, "end")
            await wait_all(clients, lambda c: end in c.ids(), 30, "the last message")
        expected = [{"seq": i} for i in range(MESSAGES)]
        for c in clients:
            assert c.data() == [*expected, "end"], f"client on {c.instance}: {c.data()}"
            assert c.ids() == [*ids, end]
        print(
            f"\n{CLIENTS} streams through nginx: connected in {connected_s:.2f}s, spread {dict(sorted(spread.items()))}; "
            f"{MESSAGES} messages x {CLIENTS} delivered {delivered_s:.2f}s after the first publish"
        )
    finally:
        await asyncio.gather(*(c.close() for c in clients))


async def test_events_arrive_promptly_through_nginx_not_when_a_buffer_fills(topology: Topology) -> None:
    """A small event must cross nginx at once: with buffering on it would wait for more bytes."""
    channel = "lb-latency"
    clients = await open_clients(topology.nginx, f"/channels/{channel}/events", 3)
    try:
        # Heartbeat comments (a few bytes each) come through on their own, every HEARTBEAT_INTERVAL.
        await clients[0].wait(lambda c: c.comments >= 2, 5 * HEARTBEAT, "two heartbeats")
        gaps = [b - a for a, b in zip(clients[0].comments_at, clients[0].comments_at[1:])]
        assert max(gaps) < HEARTBEAT + 0.5, gaps

        latencies: list[float] = []
        async with httpx.AsyncClient(base_url=topology.nginx.url, timeout=10) as http:
            for i in range(10):
                sent = time.time()
                await publish(http, channel, {"ping": i})
                await asyncio.gather(*(c.wait(has_events(i + 1), 5) for c in clients))
                latencies += [c.events[i].at - sent for c in clients]
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
            SSEStream(f"{topology.nginx.url}/channels/{channel}/events", last_id=ids[3]).start() for _ in range(6)
        ]
        try:
            await wait_all(clients, lambda c: len(c.events) >= 6, 10, "the 6 after the resume point")
            # A last message: order per channel means anything extra (a duplicate) arrives before it.
            end = await publish(http, channel, {"end": True})
            await wait_all(clients, lambda c: end in c.ids(), 10, "the last message")
            for c in clients:
                assert c.ids() == [*ids[4:], end], f"resumed on {c.instance}"
                assert c.data() == [*({"n": n} for n in range(4, 10)), {"end": True}]
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
    client = SSEStream(f"{topology.nginx.url}/relay/channels/lb-prefix/events?last_event_id=0").start()
    try:
        await client.wait(lambda c: len(c.events) >= 1, 10)
        assert (client.events[0].id, client.events[0].data) == (mid, "via prefix")
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
    url = f"{topology.nginx.url}/channels/{channel}/events"
    victim = topology.replicas[0]
    changes = Changes()  # of every stream of this test, for waits over all of them
    clients = await open_clients(topology.nginx, f"/channels/{channel}/events", n_clients, changed=changes)
    assert any(c.instance == victim.name for c in clients), "no stream landed on the replica to drain"
    # Every client holds an id before the drain, so each reconnect can resume (as a browser's would).
    async with httpx.AsyncClient(base_url=topology.nginx.url, timeout=10) as http:
        ids = [await publish(http, channel, {"d": 0})]
        await wait_all(clients, lambda c: len(c.events) >= 1, 10, "the first message")

    streams: dict[int, list[SSEStream]] = {id(c): [c] for c in clients}

    async def follow(first: SSEStream) -> None:
        """EventSource's loop: when a stream ends, wait the retry delay and reconnect with the last id seen."""
        chain = streams[id(first)]
        while True:
            await chain[-1].ended.wait()
            last = [e.id for s in chain for e in s.events][-1]
            await asyncio.sleep(0.5)  # the relay's retry hint (RETRY_MS=500, jittered)
            chain.append(SSEStream(url, last_id=str(last), changed=changes).start())

    def received(c: SSEStream) -> list[str | None]:
        return [e.id for s in streams[id(c)] for e in s.events]

    followers = [asyncio.create_task(follow(c)) for c in clients]
    try:
        victim.signal(signal.SIGTERM)
        async with httpx.AsyncClient(base_url=topology.nginx.url, timeout=10) as http:
            for i in range(1, n_messages):
                ids.append(await publish(http, channel, {"d": i}))
                await asyncio.sleep(0.1)  # spread over the 2 s drain (DRAIN_GRACE=2)
            assert victim.wait(15) == 0, victim.log()
            await eventually(lambda: all(len(received(c)) >= n_messages for c in clients), 20,
                             lambda: f"{n_messages} messages at every client "
                                     f"(short: {[len(received(c)) for c in clients if len(received(c)) < n_messages]})",
                             on=changes)
            # A last message: order per channel means anything extra (a duplicate) arrives before it.
            end = await publish(http, channel, {"d": "end"})
            await eventually(lambda: all(end in received(c) for c in clients), 20, "the last message everywhere",
                             on=changes)
        for c in clients:
            got = received(c)
            assert got == [*ids, end], (
                f"client first on {c.instance}: {len(got)}/{len(ids) + 1} messages, in order: {got == [*ids, end]}"
            )
        moved = [c for c in clients if len(streams[id(c)]) > 1]
        assert {c.instance for c in moved} == {victim.name}, "only the drained replica's clients reconnect"
        later = [s for c in moved for s in streams[id(c)][1:]]
        landed = Counter(s.instance for s in later if s.hellos)
        turned_away = sum(1 for s in later if s.ended.is_set() and not s.hellos)
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
