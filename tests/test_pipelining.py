"""Pipelined requests: served one after another, as uvicorn serves them, answers in request order.

No client the service's users run pipelines (docs/api.md), but HTTP/1.1 allows it and the edge must stay right
under it. What a client that pipelines sees:

- answers in request order, each complete;
- nothing served after a request that asked to close the connection;
- a request pipelined behind a stream is never served (the stream's connection reads no further request);
- at scale, through a real redis-server: every message published once, in order per channel, and delivered to
  every stream of its room once, in order.

Each test runs `python -m service` and talks to it over raw sockets.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from .sse import SSEStream, open_streams, wait_all
from .support import RedisServer, ServiceProcess

pytestmark = pytest.mark.timeout(120)


# -- a real service over a real redis-server -------------------------------------------------------------------


async def _pipeline(port: int, requests: list[bytes], timeout: float = 60.0) -> list[tuple[int, dict[str, str], bytes]]:
    """Write every request at once on one connection; read the answers (status, headers, body) in order."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answers: list[tuple[int, dict[str, str], bytes]] = []
    try:
        writer.write(b"".join(requests))
        async with asyncio.timeout(timeout):
            while len(answers) < len(requests):
                status_line = await reader.readline()
                if not status_line:
                    break  # closed
                headers: dict[str, str] = {}
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.decode().partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                answers.append((int(status_line.split()[1]), headers, body))
    finally:
        writer.close()
    return answers


def _publish(channel: str, data: Any, extra: str = "") -> bytes:
    body = orjson.dumps({"data": data})
    return (f"POST /channels/{channel}/messages HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n{extra}\r\n").encode() + body


@pytest.mark.redis
async def test_thousands_of_pipelined_publishes_over_hundreds_of_rooms_arrive_once_and_in_order(
    redis_server: RedisServer, services: list[ServiceProcess], tmp_path: Path
) -> None:
    rooms, per_room, publishers, per_publisher = 400, 5, 4, 1500  # 2,000 streams; 6,000 publishes
    svc = ServiceProcess(tmp_path, {"REDIS_URL": redis_server.url, "HEARTBEAT_INTERVAL": "5"})
    services.append(svc)
    svc.start()
    room_of: dict[SSEStream, str] = {}
    for r in range(rooms):
        for _ in range(per_room):
            room_of[SSEStream(f"{svc.url}/channels/room_{r}/events")] = f"room_{r}"
    streams = list(room_of)
    await open_streams(streams)
    # each publisher pipelines all its messages at once, round the rooms; the sequence number is per publisher
    requests = [[_publish(f"room_{(p * 7 + i) % rooms}", {"p": p, "i": i}) for i in range(per_publisher)]
                for p in range(publishers)]
    started = time.perf_counter()
    results = await asyncio.gather(*(_pipeline(svc.port, reqs) for reqs in requests))
    took = time.perf_counter() - started
    for p, answers in enumerate(results):
        assert [status for status, _, _ in answers] == [202] * per_publisher, "every publish answered 202"
        channels = [orjson.loads(body)["channel"] for _, _, body in answers]
        assert channels == [f"room_{(p * 7 + i) % rooms}" for i in range(per_publisher)], \
            "answers in request order"
    expected: dict[str, list[tuple[int, int]]] = {}
    for p in range(publishers):
        for i in range(per_publisher):
            expected.setdefault(f"room_{(p * 7 + i) % rooms}", []).append((p, i))
    await wait_all(streams, lambda s: len(s.events) >= len(expected[room_of[s]]), 30,
                   "every message of its room")
    lost = duplicated = out_of_order = 0
    for s in streams:
        got = [(d["p"], d["i"]) for d in s.data()]
        want = expected[room_of[s]]
        lost += len(set(want) - set(got))
        duplicated += len(got) - len(set(got))
        # each publisher's messages to a room keep their order (the order of its pipeline)
        for p in range(publishers):
            mine = [i for q, i in got if q == p]
            out_of_order += sum(1 for a, b in zip(mine, mine[1:], strict=False) if b <= a)
    print(f"\n{publishers * per_publisher} pipelined publishes answered in {took:.2f}s "
          f"({publishers * per_publisher / took:,.0f}/s); {sum(len(s.events) for s in streams)} deliveries to "
          f"{len(streams)} streams: lost {lost}, duplicated {duplicated}, out of order {out_of_order}")
    assert (lost, duplicated, out_of_order) == (0, 0, 0)
    await asyncio.gather(*(s.close() for s in streams))


async def test_a_mixed_pipeline_is_served_in_order_and_stops_at_connection_close(
    services: list[ServiceProcess], tmp_path: Path
) -> None:
    svc = ServiceProcess(tmp_path, {"HEARTBEAT_INTERVAL": "5"})  # the embedded broker
    services.append(svc)
    svc.start()
    stream = (await open_streams([SSEStream(f"{svc.url}/channels/mix/events")]))[0]
    legacy = orjson.dumps({"messages": [{"role": "user", "content": "old page"}]})
    requests = [
        _publish("mix", 1),
        b"GET /healthz HTTP/1.1\r\nhost: t\r\n\r\n",
        _publish("mix", 2, "idempotency-key: k-2\r\n"),
        b"POST /channels/mix/messages HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
        b"content-length: 5\r\n\r\n{oops",
        _publish("mix", 2, "idempotency-key: k-2\r\n"),  # the same key again: not published twice
        _publish("bad!channel", 0),
        b"POST /server/send HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
        % (len(legacy), legacy),
        _publish("mix", 3, "connection: close\r\n"),
        _publish("mix", 4),  # after 'connection: close': never served
    ]
    answers = await _pipeline(svc.port, requests, timeout=20)
    statuses = [status for status, _, _ in answers]
    assert statuses == [202, 200, 202, 400, 202, 400, 200, 202], statuses
    assert orjson.loads(answers[4][2])["duplicate"] is True
    assert all(h["content-type"].startswith("application/json") for _, h, _ in answers)
    # a last message on a connection of its own: once it is in, anything published before it would be too
    assert [status for status, _, _ in await _pipeline(svc.port, [_publish("mix", 5)])] == [202]
    await stream.wait(lambda s: 5 in s.data(), 10)
    assert stream.data() == [1, 2, 3, 5], "each publish once, in order; nothing after the close"
    await stream.close()


@pytest.mark.redis
async def test_pipelined_publishes_keep_their_order_through_the_rate_limiter_and_a_one_command_budget(
    redis_server: RedisServer, services: list[ServiceProcess], tmp_path: Path
) -> None:
    """Every publish waits twice before its command is queued (the Redis rate limiter's round trip, a budget of one
    command in flight): the pipeline's order survives both."""
    svc = ServiceProcess(tmp_path, {"REDIS_URL": redis_server.url, "PUBLISH_RATE_LIMIT": "100000",
                                    "REDIS_POOL_SIZE": "1", "HEARTBEAT_INTERVAL": "5"})
    services.append(svc)
    svc.start()
    streams = await open_streams([SSEStream(f"{svc.url}/channels/line/events") for _ in range(3)])
    per = 600
    results = await asyncio.gather(*(_pipeline(svc.port, [_publish("line", {"p": p, "i": i}) for i in range(per)])
                                     for p in range(2)))
    assert all([status for status, _, _ in answers] == [202] * per for answers in results)
    for answers in results:
        ids = [orjson.loads(body)["id"] for _, _, body in answers]
        keys = [tuple(int(v) for v in i.split("-")[:2]) for i in ids]
        assert keys == sorted(keys), "each connection's publishes got ids in request order"
    await wait_all(streams, lambda s: len(s.events) >= 2 * per, 30, "every message")
    for s in streams:
        for p in range(2):
            assert [d["i"] for d in s.data() if d["p"] == p] == list(range(per))
    await asyncio.gather(*(s.close() for s in streams))


async def test_a_stream_connection_reads_no_further_request_and_closes_when_the_stream_ends(
    services: list[ServiceProcess], tmp_path: Path
) -> None:
    """A stream's connection lets its HTTP parser go (uvicorn_protocol.StreamConnection: ~900 bytes per idle stream): a request
    pipelined behind the stream, or any bytes after it, are never read, the stream goes on, and the connection
    closes when the stream ends (here: the server drains) instead of serving what was pipelined."""
    svc = ServiceProcess(tmp_path, {"HEARTBEAT_INTERVAL": "5", "DRAIN_GRACE": "1"})
    services.append(svc)
    svc.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
    writer.write(b"GET /channels/p/events HTTP/1.1\r\nhost: t\r\n\r\nGET /healthz HTTP/1.1\r\nhost: t\r\n\r\n")
    seen = b""
    async with asyncio.timeout(10):
        while b"relay.hello" not in seen:
            seen += await reader.read(65536)
        for n, junk in enumerate((b"", b"NOT HTTP AT ALL\r\n\r\n")):
            writer.write(junk)
            assert [s for s, _, _ in await _pipeline(svc.port, [_publish("p", f"m{n}")])] == [202]
            while f'"m{n}"'.encode() not in seen:
                seen += await reader.read(65536)
        svc.signal(15)  # drain: the stream ends with a retry hint
        while chunk := await reader.read(65536):
            seen += chunk
    writer.close()
    assert b"retry:" in seen.split(b'"m1"', 1)[1], "the stream ended as a drain ends it"
    assert seen.count(b"HTTP/1.1 ") == 1, "the request pipelined behind the stream was never served"
