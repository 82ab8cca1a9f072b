"""At the scale a chat runs: thousands of streams over hundreds or thousands of rooms, on real processes.

- Rooms: thousands of streams opened at once into a thousand rooms on one instance; every stream gets every
  message of its room, once, in order, and Redis's own view of the subscriptions agrees with the hub's.
- Reconnect storm: one of three replicas is killed with `kill -9` under thousands of streams while every room
  keeps publishing; all its clients come back at the same moment with `Last-Event-ID`, spread over the other
  two: nothing lost, nothing doubled, nothing out of order, no non-200 answer, no room silent afterwards. Run
  twice: with clients that had received messages before the kill, and with clients that had received nothing
  but their greeting (quiet rooms: they resume from the `relay.hello` id).

The clients are raw sockets (`sse.SSEStream`) so that thousands fit on two cores next to the servers.
`-s` prints the figures.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import defaultdict
from pathlib import Path

import httpx
import orjson
import pytest
import redis

from .sse import SSEStream, open_streams, wait_all
from .support import RawHTTP, RedisServer, ServiceProcess

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(240)]


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


class RoomPublisher:
    """Publishes `{"room", "n"}` round the rooms over raw keep-alive HTTP (through `ports` in turn), keeping each
    room's order: one worker per group of rooms, each publish answered before the next in that room. A publish
    whose answer is lost is retried with the same Idempotency-Key, so it cannot appear twice."""

    def __init__(self, ports: list[int], rooms: list[str], workers: int = 16) -> None:
        self.ports = ports
        self.rooms = rooms
        self.workers = workers
        self.accepted: dict[str, list[tuple[int, str]]] = defaultdict(list)  # room -> (n, id)
        self.statuses: dict[int, int] = defaultdict(int)
        self.transport_errors = 0

    async def run(self, per_room: int, stop: asyncio.Event | None = None, pause: float = 0.0) -> None:
        await asyncio.gather(*(self._worker(i, per_room, stop, pause) for i in range(self.workers)))

    async def _worker(self, index: int, per_room: int, stop: asyncio.Event | None, pause: float) -> None:
        conns = [RawHTTP(p) for p in self.ports]
        mine = self.rooms[index::self.workers]
        try:
            for n in range(per_room):
                for room in mine:
                    if stop is not None and stop.is_set():
                        return
                    await self.publish(room, n, conns)
                if pause:
                    await asyncio.sleep(pause)
        finally:
            for c in conns:
                c.close()

    async def publish(self, room: str, n: int, conns: list[RawHTTP] | None = None) -> None:
        conns = conns or [RawHTTP(p) for p in self.ports]
        for attempt in range(200):
            conn = conns[(n + attempt) % len(conns)]
            try:
                status, headers, body = await conn.post(f"/channels/{room}/messages", {"data": {"room": room, "n": n}},
                                                        {"Idempotency-Key": f"{room}-{n}"})
            except (OSError, asyncio.IncompleteReadError):
                self.transport_errors += 1
                await asyncio.sleep(0.05)
                continue
            self.statuses[status] += 1
            if status == 202:
                self.accepted[room].append((n, orjson.loads(body)["id"]))
                return
            assert status in (503, 504) and headers.get("retry-after"), body
            await asyncio.sleep(0.05)
        raise AssertionError(f"{room} #{n} never accepted")


def check_exact(streams: list[SSEStream], room_of: dict[SSEStream, str],
                accepted: dict[str, list[tuple[int, str]]]) -> dict[str, int]:
    """Every stream got every accepted message of its room once, in order, with the ids the publishes got."""
    totals = {"streams": len(streams), "expected": 0, "delivered": 0, "lost": 0, "duplicates": 0,
              "out_of_order": 0, "unexpected": 0}
    for s in streams:
        want = [(n, i) for n, i in sorted(accepted.get(room_of[s], []))]
        got = [(e.data["n"], e.id) for e in s.events]
        totals["expected"] += len(want)
        totals["delivered"] += len(got)
        totals["duplicates"] += len(got) - len(set(got))
        totals["lost"] += len(set(want) - set(got))
        totals["unexpected"] += len(set(got) - set(want))
        ns = [n for n, _ in got]
        totals["out_of_order"] += sum(1 for a, b in zip(ns, ns[1:], strict=False) if a >= b)
    return totals


def _start(services: list[ServiceProcess], tmp_path: Path, redis_server: RedisServer, n: int,
           **env: str) -> list[ServiceProcess]:
    new = [ServiceProcess(tmp_path, {"REDIS_URL": redis_server.url, "LOG_LEVEL": "warning", "RETRY_MS": "200",
                                     "HEARTBEAT_INTERVAL": "5", **env}, name=f"r{len(services) + i}")
           for i in range(n)]
    services.extend(new)
    for s in new:
        s.start(wait_ready=False)
    for s in new:
        s.wait_ready()
    return new


async def test_thousands_of_rooms_opened_at_once_all_deliver(
    redis_server: RedisServer, services: list[ServiceProcess], tmp_path: Path
) -> None:
    rooms_n, per_room, messages = 1200, 5, 3  # 6,000 streams
    (svc,) = _start(services, tmp_path, redis_server, 1)
    rooms = [f"room_{i}" for i in range(rooms_n)]
    room_of: dict[SSEStream, str] = {}
    streams = []
    for r in rooms:
        for _ in range(per_room):
            s = SSEStream(f"{svc.url}/channels/{r}/events")
            room_of[s] = r
            streams.append(s)
    r = redis.Redis(port=redis_server.port)
    subscribes_before = r.info("commandstats").get("cmdstat_subscribe", {}).get("calls", 0)
    t0 = time.monotonic()
    await open_streams(streams, timeout=90)
    opened = time.monotonic() - t0
    # A burst of new rooms is subscribed in rounds of many rooms (redis_reader's gathering), not a round per room
    # or two: each round is four round trips and their bookkeeping, paid by every stream still waiting.
    subscribes = r.info("commandstats")["cmdstat_subscribe"]["calls"] - subscribes_before
    assert subscribes <= rooms_n / 4, f"{subscribes} SUBSCRIBE rounds for {rooms_n} new rooms"
    # Redis's own view: every room subscribed exactly once by this instance
    numsub = dict(r.pubsub_numsub(*[f"sse:{{{room}}}:live" for room in rooms]))
    assert sorted(set(numsub.values())) == [1], f"rooms not subscribed at Redis: {[k for k, v in numsub.items() if v != 1][:5]}"
    metrics = httpx.get(f"{svc.url}/metrics").text
    assert _metric(metrics, "sse_channels_active") == rooms_n
    assert _metric(metrics, "sse_broker_channels_pending") == 0
    assert _metric(metrics, "sse_broker_channels_repaired_total") == 0, "the reconciler found drift: a bug"
    assert _metric(metrics, "sse_streams_open") == len(streams)
    pub = RoomPublisher([svc.port], rooms)
    t1 = time.monotonic()
    await pub.run(messages)
    published = time.monotonic() - t1
    await wait_all(streams, lambda s: len(s.events) >= messages, 60, "all messages of the room")
    delivered = time.monotonic() - t1
    report = check_exact(streams, room_of, pub.accepted)
    print(f"\nrooms: {len(streams)} streams in {rooms_n} rooms opened in {opened:.1f}s ({subscribes} SUBSCRIBE rounds); "
          f"{rooms_n * messages} publishes in {published:.1f}s, {report['delivered']} deliveries in {delivered:.1f}s; "
          f"{report}")
    assert report["expected"] == len(streams) * messages
    assert report["lost"] == report["duplicates"] == report["out_of_order"] == report["unexpected"] == 0, report
    assert "Traceback" not in svc.log()
    await asyncio.gather(*(s.close() for s in streams))


@pytest.mark.parametrize("warm", [True, False], ids=["after-messages", "greeting-only"])
async def test_reconnect_storm_after_kill_loses_nothing(
    redis_server: RedisServer, services: list[ServiceProcess], tmp_path: Path, warm: bool
) -> None:
    rooms_n, per_room = 300, 10  # 3,000 streams on the replica that dies
    a, b, c = _start(services, tmp_path, redis_server, 3)
    rooms = [f"room_{i}" for i in range(rooms_n)]
    room_of: dict[SSEStream, str] = {}
    streams = []
    for i, room in enumerate(rooms):
        for j in range(per_room):
            # after the kill, half of them go to b, half to c (an EventSource behind a load balancer)
            order = [a, b, c] if (i + j) % 2 else [a, c, b]
            s = SSEStream([f"{x.url}/channels/{room}/events" for x in order], reconnect=True, retry_delay=0.2)
            room_of[s] = room
            streams.append(s)
    await open_streams(streams, timeout=90)
    assert all(s.instance == "r0" for s in streams)
    pub = RoomPublisher([b.port, c.port], rooms, workers=12)
    stop = asyncio.Event()
    publishing = asyncio.create_task(pub.run(40, stop, pause=0.05))
    if warm:
        await wait_all(streams, lambda s: len(s.events) >= 2, 60, "warm-up messages")
    a.kill()  # kill -9: every stream of the replica breaks at once
    killed_at = time.monotonic()
    quiet = sum(1 for s in streams if not s.events)  # streams whose only id was their greeting's
    await wait_all(streams, lambda s: s.connects >= 2, 60, "reconnected")
    storm = time.monotonic() - killed_at
    await asyncio.wait_for(publishing, 120)
    await wait_all(streams, lambda s: len(s.events) >= len(pub.accepted[room_of[s]]), 60, "caught up")
    report = check_exact(streams, room_of, pub.accepted)
    statuses = {code for s in streams for code in s.statuses}
    spread = {p: sum(1 for s in streams if s.instance == n) for p, n in (("b", "r1"), ("c", "r2"))}
    silent = [r for r in rooms if not pub.accepted[r]]
    print(f"\nreconnect storm ({'warm' if warm else 'greeting only'}): {len(streams)} streams back in {storm:.1f}s "
          f"(spread {spread}, {quiet} had no message before the kill), publishes {dict(pub.statuses)}; {report}")
    assert statuses == {200}, statuses
    assert not silent
    assert report["lost"] == report["duplicates"] == report["out_of_order"] == report["unexpected"] == 0, report
    if not warm:
        assert quiet >= len(streams) * 0.9, f"only {quiet} streams were quiet at the kill"
    # no room silent afterwards: one more message per room reaches every stream of it, and nothing else
    await asyncio.gather(*(pub.publish(room, 1000) for room in rooms))
    await wait_all(streams, lambda s: bool(s.events) and s.events[-1].data["n"] == 1000, 30, "the last message")
    report = check_exact(streams, room_of, pub.accepted)
    assert report["lost"] == report["duplicates"] == report["unexpected"] == 0, report
    await asyncio.gather(*(s.close() for s in streams))
