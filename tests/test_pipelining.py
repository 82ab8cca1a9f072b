"""Pipelined publishes: they run at once, their answers come back in request order.

uvicorn serves the requests pipelined on a connection one after another, so a publisher that pipelines waited
one Redis round trip per message. The guarded protocol (uvicorn_glue.guarded_protocol) starts the publishes of a
pipeline together and holds each answer until those before it are out. What a client must still see:

- answers in request order, each complete, whatever order the publishes finished in;
- anything else pipelined (a probe, a stream, a publish after `Connection: close`) served as uvicorn would:
  after the answers ahead of it, and never after a request that asked to close the connection;
- a drain or a request deadline that comes while answers are held closes the connection only after them;
- at scale, through a real redis-server: every message published once, in order per channel, and delivered to
  every stream of its room once, in order.

The first tests drive the protocol class itself (an app whose requests finish when the test says, a transport
that records writes); the last ones run `python -m service` over a real redis-server and raw sockets.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import uvicorn
from uvicorn.server import ServerState

from service.uvicorn_glue import guarded_protocol

from .sse import SSEStream, open_streams, wait_all
from .support import RedisServer, ServiceProcess

pytestmark = pytest.mark.timeout(120)


# -- the protocol, driven by hand ------------------------------------------------------------------------------


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False
        self.reading = True

    def write(self, data: Any) -> None:
        assert not self.closed, "written after close"
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    @property
    def output(self) -> bytes:
        return b"".join(self.writes)


class _App:
    """Answers `POST /p/<name>` and `GET /g/<name>` with `<name>`, once the test releases `<name>`."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.gates: dict[str, asyncio.Future[None]] = {}
        self.bodies: dict[str, bytes] = {}

    def gate(self, name: str) -> asyncio.Future[None]:
        if name not in self.gates:
            self.gates[name] = asyncio.get_running_loop().create_future()
        return self.gates[name]

    def release(self, *names: str) -> None:
        for name in names:
            self.gate(name).set_result(None)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        name = scope["path"].rsplit("/", 1)[1]
        self.started.append(name)
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        self.bodies[name] = message["body"]
        await self.gate(name)
        body = name.encode()
        await send({"type": "http.response.start", "status": 202, "headers": [(b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})


def _post(name: str, extra: bytes = b"") -> bytes:
    return b"POST /p/%s HTTP/1.1\r\nhost: t\r\ncontent-length: 2\r\n%s\r\n{}" % (name.encode(), extra)


def _get(name: str) -> bytes:
    return b"GET /g/%s HTTP/1.1\r\nhost: t\r\n\r\n" % name.encode()


def _answers(output: bytes) -> list[str]:
    """The bodies of the answers, in the order they were written (each must be complete)."""
    names = []
    for match in re.finditer(rb"HTTP/1.1 (\d+) [^\r]*\r\n(.*?)\r\n\r\n", output, re.S):
        headers = dict(line.split(b": ", 1) for line in match.group(2).split(b"\r\n"))
        length = int(headers[b"content-length"])
        start = match.end()
        names.append(output[start:start + length].decode() if match.group(1) == b"202" else match.group(1).decode())
    return names


async def _turns(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


@pytest.fixture
async def conn() -> AsyncIterator[tuple[Any, _Transport, _App]]:
    app = _App()
    proto_class = guarded_protocol(request_timeout=0.3, max_per_client=0, trusted=(),
                                   overlap=lambda scope: scope["method"] == "POST", max_overlap=4)
    config = uvicorn.Config(app, http=proto_class, log_config=None, proxy_headers=False, lifespan="off")
    config.load()
    proto = proto_class(config=config, server_state=ServerState(), app_state={})  # type: ignore[call-arg]
    transport = _Transport()
    proto.connection_made(transport)
    yield proto, transport, app
    if not transport.closed:
        proto.connection_lost(None)
    for gate in app.gates.values():
        if not gate.done():
            gate.set_result(None)
    await _turns()
    assert not proto.tasks, "every request's task ended"


async def test_pipelined_publishes_start_together_and_answer_in_request_order(conn: Any) -> None:
    proto, transport, app = conn
    proto.data_received(b"".join(_post(str(i)) for i in range(1, 5)))
    await _turns()
    assert app.started == ["1", "2", "3", "4"], "every publish of the pipeline runs at once"
    app.release("4", "3", "2")
    await _turns()
    assert transport.output == b"", "nothing may overtake the first answer"
    app.release("1")
    await _turns()
    assert _answers(transport.output) == ["1", "2", "3", "4"]
    assert len(transport.writes) == 1, "the answers that were waiting go out in one send"
    assert not transport.closed and transport.reading
    # the connection carries on as before
    proto.data_received(_post("5"))
    await _turns()
    app.release("5")
    await _turns()
    assert _answers(transport.output)[-1] == "5"


async def test_a_request_that_may_not_overlap_waits_for_the_answers_ahead_of_it(conn: Any) -> None:
    proto, transport, app = conn
    proto.data_received(_post("1") + _get("g") + _post("3") + _post("4"))
    await _turns()
    assert app.started == ["1"], "a GET pipelined behind a publish waits its turn, and so does all behind it"
    app.release("3", "4", "g")
    await _turns()
    assert app.started == ["1"]
    app.release("1")
    await _turns()
    assert app.started == ["1", "g", "3", "4"], "once it runs, the publishes behind it start together"
    assert _answers(transport.output) == ["1", "g", "3", "4"]


async def test_at_most_max_overlap_run_ahead_and_the_rest_follow_in_order(conn: Any) -> None:
    proto, transport, app = conn
    proto.data_received(b"".join(_post(str(i)) for i in range(1, 9)))
    await _turns()
    assert app.started == ["1", "2", "3", "4"], "max_overlap=4 at once"
    assert len(proto.pipeline) == 4, "the rest wait in uvicorn's queue"
    app.release(*[str(i) for i in range(8, 0, -1)])
    await _turns(20)
    assert app.started == [str(i) for i in range(1, 9)]
    assert _answers(transport.output) == [str(i) for i in range(1, 9)]
    assert transport.reading and not proto.pipeline


async def test_nothing_after_a_request_that_closes_the_connection_runs(conn: Any) -> None:
    proto, transport, app = conn
    proto.data_received(_post("1") + _post("2", b"connection: close\r\n") + _post("3") + _post("4"))
    await _turns()
    assert app.started == ["1", "2"]
    app.release("2", "1")
    await _turns()
    assert _answers(transport.output) == ["1", "2"] and transport.closed
    assert "3" not in app.bodies and "4" not in app.bodies, "requests after 'connection: close' are never served"


async def test_a_drain_closes_the_connection_after_the_held_answers(conn: Any) -> None:
    proto, transport, app = conn
    proto.data_received(_post("1") + _post("2") + _post("3"))
    await _turns()
    app.release("2", "3")
    await _turns()
    proto.shutdown()  # what uvicorn does to every connection when it stops
    await _turns()
    assert not transport.closed, "answers of publishes that ran are still owed"
    app.release("1")
    await _turns()
    assert _answers(transport.output) == ["1", "2", "3"] and transport.closed


async def test_a_request_deadline_answers_408_after_the_held_answers(conn: Any) -> None:
    proto, transport, app = conn
    proto.data_received(_post("1") + _post("2") + b"POST /p/3 HTTP/1.1\r\nhost:")  # the third never completes
    await _turns()
    app.release("2")
    await asyncio.sleep(0.5)  # past request_timeout=0.3 of the third request
    assert not transport.closed and transport.output == b""
    proto.data_received(b" t\r\ncontent-length: 2\r\n\r\n{}")  # too late: it was answered 408
    await _turns()
    app.release("1")
    await _turns()
    assert _answers(transport.output) == ["1", "2", "408"] and transport.closed
    assert app.started == ["1", "2"], "the late request never ran"


async def test_a_client_that_leaves_with_publishes_in_flight_leaves_nothing_behind(conn: Any) -> None:
    proto, transport, app = conn
    proto.data_received(_post("1") + _post("2") + _post("3"))
    await _turns()
    transport.closed = True
    proto.connection_lost(None)
    app.release("1", "2", "3")
    await _turns()
    assert transport.writes == []
    assert not proto.tasks, "every request's task ended"


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
    command in flight): the pipeline's order must survive both."""
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
    """A stream's connection lets its HTTP parser go (uvicorn_glue: ~900 bytes per idle stream): a request
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


async def test_after_an_answer_that_closes_the_connection_the_requests_behind_it_stop(conn: Any) -> None:
    """A held request whose answer closes the connection (here: its app fails, uvicorn answers 500 and closes):
    the requests started behind it are never answered, see a disconnect, and leave no task behind."""
    proto, transport, app = conn
    original = app.__call__
    seen_after_close: list[str] = []

    async def first_fails(scope: Any, receive: Any, send: Any) -> None:
        name = scope["path"].rsplit("/", 1)[1]
        if name == "1":
            await receive()
            await app.gate("1")
            raise RuntimeError("boom")
        if name == "2":
            await receive()
            await app.gate("2")
            seen_after_close.append((await receive())["type"])  # what the connection says now
            return
        await original(scope, receive, send)

    proto.app = first_fails
    proto.data_received(_post("1") + _post("2") + _post("3"))
    await _turns()
    app.release("1")
    await _turns()
    assert _answers(transport.output) == ["500"] and transport.closed
    app.release("2", "3")
    async with asyncio.timeout(2):
        while proto.tasks:
            await asyncio.sleep(0)
    assert seen_after_close == ["http.disconnect"], "a request behind the close is told the connection is gone"
    assert _answers(transport.output) == ["500"], "nothing is written after the close"
