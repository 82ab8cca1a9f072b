"""The HTTP edge: one client's bytes never reach another client's delivery.

Each test here is one way a crafted or unlucky connection broke the edge (issue "One client's bytes never reach
another client's delivery"), reproduced with raw sockets against `python -m service` on a real redis-server:

1. a stream with a request pipelined behind it, then the client leaves: the stream must end, and publishes to its
   channel must reach everyone else without the Redis reader reconnecting;
2. WebSocket upgrade requests must give back their per-address connection slot;
3. a 431 in a pipeline must not reorder the publishes around it (the rate limiter on);
4. the answers of published messages are written even when a parser error or a half-close follows them;
5. `REDIS_URL=unix://...` publishes;
6. a body that never completes gets a 408.

Then the edge fuzzer: hypothesis writes byte-level request sequences (pipelined, segmented, with junk, oversize
headers, conflicting lengths, upgrades, half-closes and aborts) while honest streams read beside it, and after
each case checks that the honest streams got every message once and in order, that no Redis reader reconnected,
that open streams, the per-address count and the process's file descriptors are back to their baseline, and that
nothing answered 500. A longer run: `EDGE_FUZZ_EXAMPLES=2000 EDGE_FUZZ_SHRINK=1 pytest tests/test_edge.py -k fuzz
--hypothesis-seed=N` (docs/security.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from .sse import SSEStream, open_streams, wait_all
from .support import RedisServer, ServiceProcess, eventually_blocking, free_port

pytestmark = [pytest.mark.timeout(180), pytest.mark.redis]


# -- raw HTTP ------------------------------------------------------------------------------------------------------


def publish_bytes(channel: str, data: object, extra: str = "") -> bytes:
    body = orjson.dumps({"data": data})
    return (f"POST /channels/{channel}/messages HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n{extra}\r\n").encode() + body


def connect(port: int, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def read_all(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Everything the server writes until it closes the connection (or `timeout`)."""
    sock.settimeout(timeout)
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, ConnectionResetError):
            break
        if not chunk:
            break
        out += chunk
    return out


def answers(raw: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """The complete answers (status, headers, body) in `raw`, in order; answers with a content-length only."""
    found = []
    at = 0
    while (m := re.compile(rb"HTTP/1\.1 (\d{3}) [^\r]*\r\n((?:[^\r]+\r\n)*)\r\n").match(raw, at)) is not None:
        headers = {k.strip().lower(): v.strip() for k, _, v in
                   (line.decode("latin-1").partition(":") for line in m.group(2).split(b"\r\n") if line)}
        length = int(headers.get("content-length", "0"))
        body = raw[m.end():m.end() + length]
        found.append((int(m.group(1)), headers, body))
        at = m.end() + length
    return found


def greeted_then_gone(port: int, request: bytes) -> None:
    """Send `request` (a stream's, maybe with more behind it), read until the stream's greeting, and leave."""
    sock = connect(port)
    sock.sendall(request)
    sock.settimeout(5)
    seen = b""
    while b"relay.hello" not in seen:
        chunk = sock.recv(65536)
        assert chunk, f"closed before the greeting: {seen!r}"
        seen += chunk
    sock.close()


def statuses(raw: bytes) -> list[int]:
    return [int(s) for s in re.findall(rb"HTTP/1\.1 (\d{3}) ", raw)]


class RawStream:
    """A light SSE reader on a blocking socket: what the kernel holds is read when the test asks."""

    def __init__(self, port: int, path: str) -> None:
        self.sock = connect(port)
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nhost: t\r\n\r\n".encode())
        self.raw = b""

    def pump(self, timeout: float = 0.05) -> None:
        self.sock.settimeout(timeout)
        try:
            while chunk := self.sock.recv(1 << 20):
                self.raw += chunk
        except (TimeoutError, BlockingIOError):
            pass

    def data(self) -> list[object]:
        return [orjson.loads(d) for d in re.findall(rb"\ndata: ([^\n]*)\n\n", self.raw.replace(b"\r\n", b"\n"))
                if not d.startswith(b'{"instance"')]

    def wait_for(self, predicate: object, timeout: float = 10.0, what: str = "data") -> None:
        def done() -> bool:
            self.pump()
            return bool(predicate(self))  # type: ignore[operator]

        eventually_blocking(done, timeout, lambda: f"{what}: got {self.raw[-400:]!r}", every=0.01)

    def close(self) -> None:
        self.sock.close()


def metric(svc: ServiceProcess, name: str) -> float:
    text = httpx.get(svc.url + "/metrics", timeout=5).text
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def history(redis: RedisServer, channel: str) -> list[object]:
    """The channel's Stream in Redis, as published (the `d` field of each entry), oldest first."""
    import redis as redis_py

    with redis_py.Redis(port=redis.port, protocol=2) as client:
        return [orjson.loads(fields[b"d"]) for _, fields in client.xrange(f"sse:{{{channel}}}:log")]


def open_fds(svc: ServiceProcess) -> int:
    assert svc.proc is not None
    return len(os.listdir(f"/proc/{svc.proc.pid}/fd"))


def _alive(sock: socket.socket) -> bool:
    """Whether a readable idle connection is still open (a refused one reads EOF or a reset)."""
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.setblocking(True)


def client_sockets(svc: ServiceProcess) -> int:
    """The process's file descriptors that are client connections (sockets on its HTTP port, not listening):
    what a leaked connection holds, apart from the Redis connections its pools open as they need them."""
    assert svc.proc is not None
    inodes = set()
    for name in os.listdir(f"/proc/{svc.proc.pid}/fd"):
        try:
            target = os.readlink(f"/proc/{svc.proc.pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                if local_port == svc.port and fields[3] != "0A" and fields[9] in inodes:
                    count += 1
    return count


# The service's own connection (service/http11.py, the default) and uvicorn's with the guards (HTTP_PROTOCOL=uvicorn)
# keep the same promises; the fuzzer and the scale test run the default.
PROTOCOLS = ["sse-relay", "uvicorn"]


def replica(tmp: Path, redis: RedisServer, services: list[ServiceProcess], **env: str) -> ServiceProcess:
    svc = ServiceProcess(tmp, {"REDIS_URL": redis.url, "HEARTBEAT_INTERVAL": "30", **env})
    services.append(svc)
    return svc.start()


# -- 1. the stream with a request pipelined behind it ----------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_stream_with_a_request_pipelined_behind_it_ends_when_its_client_leaves_and_costs_nobody_else(
    redis_server: RedisServer, services: list[ServiceProcess], tmp_path: Path, protocol: str
) -> None:
    """Before: the stream was never ended (uvicorn flagged the request parsed last), every later publish to its
    channel raised in the Redis reader on the dead transport, the reader reconnected once per publish, and the
    honest subscribers of the channel lost most messages."""
    svc = replica(tmp_path, redis_server, services, HTTP_PROTOCOL=protocol)
    honest = [RawStream(svc.port, "/channels/pubZ/events") for _ in range(6)]
    other = RawStream(svc.port, "/channels/other/events")
    for s in (*honest, other):
        s.wait_for(lambda s: b"relay.hello" in s.raw, what="greeting")
    reconnects = metric(svc, "sse_broker_reconnects_total")
    for _ in range(3):
        greeted_then_gone(svc.port, b"GET /channels/pubZ/events HTTP/1.1\r\nHost: x\r\n\r\n"
                                    b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    eventually_blocking(lambda: metric(svc, "sse_streams_open") == 7, 5, "the three zombie streams ended")
    with httpx.Client(base_url=svc.url, timeout=5) as client:
        for n in range(10):
            assert client.post("/channels/pubZ/messages", json={"data": n}).status_code == 202
    for s in honest:
        s.wait_for(lambda s: len(s.data()) >= 10, what="ten messages")
        assert s.data() == list(range(10)), "every message once, in order"
    assert metric(svc, "sse_broker_reconnects_total") == reconnects, "the Redis reader never reconnected"
    late = RawStream(svc.port, "/channels/late/events")
    late.wait_for(lambda s: b"relay.hello" in s.raw, 2, "a new stream is greeted at once")
    for s in (*honest, other, late):
        s.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_stream_whose_socket_dies_under_a_direct_write_is_ended_alone(
    redis_server: RedisServer, services: list[ServiceProcess], tmp_path: Path, protocol: str
) -> None:
    """Clients reset their connections (RST, not FIN) while messages flow: each costs its own stream only."""
    svc = replica(tmp_path, redis_server, services, HTTP_PROTOCOL=protocol)
    honest = RawStream(svc.port, "/channels/reset/events")
    honest.wait_for(lambda s: b"relay.hello" in s.raw, what="greeting")
    doomed = [RawStream(svc.port, "/channels/reset/events") for _ in range(20)]
    for s in doomed:
        s.wait_for(lambda s: b"relay.hello" in s.raw, what="greeting")
    reconnects = metric(svc, "sse_broker_reconnects_total")
    with httpx.Client(base_url=svc.url, timeout=5) as client:
        for n in range(40):
            if n == 5:
                for s in doomed:  # an abortive close: the next write to it fails
                    s.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    s.close()
            assert client.post("/channels/reset/messages", json={"data": n}).status_code == 202
    honest.wait_for(lambda s: len(s.data()) >= 40, what="every message")
    assert honest.data() == list(range(40))
    assert metric(svc, "sse_broker_reconnects_total") == reconnects
    eventually_blocking(lambda: metric(svc, "sse_streams_open") == 1, 5, "the reset streams ended")
    honest.close()


# -- 2. upgrades give back their slot ---------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_websocket_upgrade_requests_give_back_their_connection_slot(
    redis_server: RedisServer, services: list[ServiceProcess], tmp_path: Path, protocol: str
) -> None:
    """Before: uvicorn handed the connection to its WebSocket protocol, our `connection_lost` never ran, and five
    upgrade requests locked the address out for good with MAX_CONNECTIONS_PER_CLIENT=5."""
    svc = replica(tmp_path, redis_server, services, MAX_CONNECTIONS_PER_CLIENT="5", HTTP_PROTOCOL=protocol)
    upgrade = (b"GET /channels/u/events HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
               b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
    for path in (b"/healthz", b"/nowhere", b"/channels/u/messages"):
        for _ in range(6):
            sock = connect(svc.port)
            sock.sendall(upgrade.replace(b"/channels/u/events", path))
            raw = read_all(sock, 5)
            sock.close()
            assert raw.startswith(b"HTTP/1.1 ") and b" 101 " not in raw.split(b"\r\n")[0], raw[:200]
            assert b"connection: close" in raw.lower(), "the connection closes after the answer"
    for _ in range(3):  # an upgrade request to a stream: answered as a plain stream, then the client leaves
        greeted_then_gone(svc.port, upgrade)
    eventually_blocking(lambda: metric(svc, "sse_streams_open") == 0, 5, "the streams ended")
    baseline = open_fds(svc)
    socks = [connect(svc.port) for _ in range(5)]
    for sock in socks:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_all(sock, 1).startswith(b"HTTP/1.1 200"), "all five slots are free again"
    sixth = connect(svc.port)
    sixth.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert read_all(sixth, 2) == b"", "and the cap still holds"
    for sock in (*socks, sixth):
        sock.close()
    eventually_blocking(lambda: client_sockets(svc) == 0 and open_fds(svc) <= baseline, 5,
                        lambda: f"no file descriptor left behind: {open_fds(svc)} open, {baseline} before")


# -- 3 and 4. pipelines: order kept, every answer written ------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_refused_request_in_a_pipeline_does_not_reorder_the_publishes_around_it(
    redis_server: RedisServer, services: list[ServiceProcess], tmp_path: Path, protocol: str
) -> None:
    """Before: a 431 passed its turn at once, and the publish behind it raced the one ahead through the rate
    limiter's Redis call (5 of 20 pipelines reordered)."""
    svc = replica(tmp_path, redis_server, services, PUBLISH_RATE_LIMIT="100000", MAX_HEADER_BYTES="4096", HTTP_PROTOCOL=protocol)
    big = "x-big: " + "a" * 8000 + "\r\n"
    inversions = 0
    for run in range(20):
        channel = f"order{run}"
        requests = [publish_bytes(channel, 0), publish_bytes(channel, -1, big),
                    *(publish_bytes(channel, i) for i in range(1, 8))]
        sock = connect(svc.port)
        sock.sendall(b"".join(requests) + b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        got = answers(read_all(sock, 10))
        sock.close()
        assert [s for s, _, _ in got] == [202, 431, *[202] * 7, 200], got
        ids = [orjson.loads(body)["id"] for status, _, body in got if status == 202]
        keys = [tuple(int(p) for p in i.split("-")[:2]) for i in ids]
        inversions += sum(1 for a, b in zip(keys, keys[1:], strict=False) if b <= a)
        assert history(redis_server, channel) == list(range(8))
    assert inversions == 0


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_answers_of_published_messages_are_written_before_a_parser_error_or_a_half_close(
    redis_server: RedisServer, services: list[ServiceProcess], tmp_path: Path, protocol: str
) -> None:
    """Before: answers held for pipelined publishes were discarded by a parser error (30 published, `[400]`
    read) or a half-close (3 published, no answer)."""
    svc = replica(tmp_path, redis_server, services, HTTP_PROTOCOL=protocol)
    sock = connect(svc.port)
    sock.sendall(b"".join(publish_bytes("ans", i) for i in range(30)) + b"THIS IS NOT HTTP\r\n\r\n")
    got = answers(read_all(sock, 10))
    sock.close()
    assert [s for s, _, _ in got] == [202] * 30 + [400]
    assert orjson.loads(got[-1][2])["error"]["code"] == "bad_request", "uvicorn's 400 is our JSON error"
    assert got[-1][1]["content-type"] == "application/json"
    sock = connect(svc.port)
    sock.sendall(b"".join(publish_bytes("half", i) for i in range(3)))
    sock.shutdown(socket.SHUT_WR)
    got = answers(read_all(sock, 10))
    sock.close()
    assert [s for s, _, _ in got] == [202] * 3, "every message published was answered"
    assert history(redis_server, "half") == [0, 1, 2]
    assert history(redis_server, "ans") == list(range(30))


# -- 5. a unix socket ------------------------------------------------------------------------------------------


def test_redis_over_a_unix_socket_publishes_and_streams(services: list[ServiceProcess], tmp_path: Path) -> None:
    """Before: every publish got 503 client_error (redis-py's unix connection refuses `socket_keepalive`)."""
    (tmp_path / "redis").mkdir()
    path = tmp_path / "redis" / "redis.sock"
    redis = RedisServer(tmp_path / "redis", extra=["--unixsocket", str(path), "--unixsocketperm", "700"])
    redis.start()
    try:
        svc = ServiceProcess(tmp_path, {"REDIS_URL": f"unix://{path}", "HEARTBEAT_INTERVAL": "30"})
        services.append(svc)
        svc.start()
        assert httpx.get(svc.url + "/healthz/broker", timeout=5).status_code == 200
        stream = RawStream(svc.port, "/channels/u/events")
        stream.wait_for(lambda s: b"relay.hello" in s.raw, what="greeting")
        resp = httpx.post(svc.url + "/channels/u/messages", json={"data": "over a unix socket"}, timeout=5)
        assert resp.status_code == 202, resp.text
        stream.wait_for(lambda s: s.data() == ["over a unix socket"], what="the message")
        stream.close()
    finally:
        redis.stop()


# -- 6. the request deadline -----------------------------------------------------------------------------------


def _send_buffers(port: int) -> list[int]:
    """The kernel send buffer (`ss`'s skmem `tb`, bytes) of each established connection the server on `port` holds."""
    import subprocess

    out = subprocess.run(["ss", "-tmnH", "state", "established", f"( sport = :{port} )"], capture_output=True,
                         text=True, check=True, timeout=10).stdout
    return [int(tb) for tb in re.findall(r"\btb(\d+)", out)]


@pytest.mark.parametrize(("workers", "protocol"), [("1", "sse-relay"), ("2", "sse-relay"), ("1", "uvicorn")])
def test_every_stream_connection_gets_the_fixed_send_buffer(
    redis_server: RedisServer, services: list[ServiceProcess], tmp_path: Path, workers: str, protocol: str
) -> None:
    """SEND_BUFFER_BYTES bounds what a client that stops reading absorbs before the stream's queue and write
    timeout see it: every accepted connection carries it (Linux reports twice the size set; it is set on the
    listening socket, which the kernel copies to each connection), in both of the server's set-ups and under either
    HTTP_PROTOCOL; with 0 the kernel's autotuning is left alone."""
    fixed = replica(tmp_path, redis_server, services, SEND_BUFFER_BYTES="65536", WORKERS=workers,
                    HTTP_PROTOCOL=protocol)
    auto = replica(tmp_path, redis_server, services, SEND_BUFFER_BYTES="0", WORKERS=workers, HTTP_PROTOCOL=protocol)
    n = 1000  # streams in 200 rooms: every one, not a sample
    for svc in (fixed, auto):
        socks = [connect(svc.port) for _ in range(n)]
        for i, sock in enumerate(socks):
            sock.sendall(b"GET /channels/sndbuf%d/events HTTP/1.1\r\nhost: t\r\n\r\n" % (i % 200))
        for sock in socks:
            sock.settimeout(5)
            assert sock.recv(4096).startswith(b"HTTP/1.1 200"), "every stream answered"
        buffers = _send_buffers(svc.port)
        assert len(buffers) == n, len(buffers)
        if svc is fixed:
            assert buffers == [2 * 65536] * n
        else:
            assert 2 * 65536 not in buffers
        for sock in socks:
            sock.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_body_that_never_completes_is_answered_408(
    redis_server: RedisServer, services: list[ServiceProcess], tmp_path: Path, protocol: str
) -> None:
    """Before: headers in, body short, past REQUEST_TIMEOUT: the connection closed with no answer."""
    svc = replica(tmp_path, redis_server, services, REQUEST_TIMEOUT="1", HTTP_PROTOCOL=protocol)
    cases = [
        b"POST /channels/slow/messages HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
        b"content-length: 100\r\n\r\n{\"data\":",
        b"POST /channels/slow/messages HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n5\r\n{\"dat",
        b"POST /channels/slow/messages HTTP/1.1\r\nhost: t\r\nx-slow: ",  # headers never finish
        publish_bytes("slow", 1) + b"POST /channels/slow/messages HTTP/1.1\r\nhost: t\r\ncontent-length: 9\r\n\r\n",
    ]
    for raw in cases:
        sock = connect(svc.port)
        started = time.monotonic()
        sock.sendall(raw)
        got = answers(read_all(sock, 5))
        took = time.monotonic() - started
        sock.close()
        assert got and got[-1][0] == 408, (raw, got)
        assert orjson.loads(got[-1][2])["error"]["code"] == "request_timeout"
        assert 0.9 < took < 3, took
    assert history(redis_server, "slow") == [1], "nothing of a request that never arrived was published"


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_keep_alive_connections_deadline_runs_from_each_requests_first_byte(
    redis_server: RedisServer, services: list[ServiceProcess], tmp_path: Path, protocol: str
) -> None:
    """The deadline is a time moved per request, its timer set only when none is pending (uvicorn_protocol
    RequestDeadline._arm): a timer set for an earlier request must neither cut a later one short nor close an idle
    keep-alive connection between requests (idle is KEEPALIVE_TIMEOUT's business)."""
    svc = replica(tmp_path, redis_server, services, REQUEST_TIMEOUT="1", HTTP_PROTOCOL=protocol)
    sock = connect(svc.port)
    try:
        sock.sendall(publish_bytes("lazy", 1))
        got = answers(_read_until(sock, 1))
        assert [a[0] for a in got] == [202]
        # Idle past the first request's deadline (set at the connection's start): still open, still served.
        time.sleep(1.6)
        sock.sendall(publish_bytes("lazy", 2))
        got = answers(_read_until(sock, 1))
        assert [a[0] for a in got] == [202], "an idle keep-alive connection was closed by a stale deadline"
        # 0.7 s idle, then a request that never completes: its 408 comes a whole REQUEST_TIMEOUT after its first
        # byte, not when a timer set before it fires.
        time.sleep(0.7)
        started = time.monotonic()
        sock.sendall(b"POST /channels/lazy/messages HTTP/1.1\r\nhost: t\r\ncontent-length: 20\r\n\r\n{")
        got = answers(read_all(sock, 5))
        took = time.monotonic() - started
    finally:
        sock.close()
    assert [a[0] for a in got] == [408]
    assert 0.9 < took < 3, took
    assert history(redis_server, "lazy") == [1, 2]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_an_idle_keep_alive_connection_closes_after_keepalive_timeout_and_not_before(
    redis_server: RedisServer, services: list[ServiceProcess], tmp_path: Path, protocol: str
) -> None:
    """KEEPALIVE_TIMEOUT runs from the last answer: a connection idle that long is closed (cleanly, EOF), one that
    sends its next request in time is served, however many requests it has sent."""
    svc = replica(tmp_path, redis_server, services, KEEPALIVE_TIMEOUT="1", REQUEST_TIMEOUT="8", HTTP_PROTOCOL=protocol)
    sock = connect(svc.port)
    try:
        for n in range(4):  # each within the timeout: the connection stays
            sock.sendall(publish_bytes("idle", n))
            assert [a[0] for a in answers(_read_until(sock, 1))] == [202]
            time.sleep(0.5)
        sock.sendall(publish_bytes("idle", 4))
        assert [a[0] for a in answers(_read_until(sock, 1))] == [202]
        idle = _seconds_until_closed(sock)
    finally:
        sock.close()
    # KEEPALIVE_TIMEOUT is kept to within a quarter of itself (edge.Deadlines): before, a 1 s keep-alive swept once
    # a second closed up to 2 s late, and a proxy's request rarely met the close it must survive (test_balancers)
    assert 0.9 < idle < 1.7, idle
    assert history(redis_server, "idle") == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_connection_answered_before_its_body_arrived_is_idle_once_the_body_is_in(
    redis_server: RedisServer, services: list[ServiceProcess], tmp_path: Path, protocol: str
) -> None:
    """A publish whose declared length is over MAX_MESSAGE_BYTES is answered 413 at once; the client still sends the
    body (HTTP/1.1 clients do), and from then on the connection is idle: KEEPALIVE_TIMEOUT closes it. (Before, no
    deadline was left once the body was in, and the connection stayed open until the client closed it.)"""
    svc = replica(tmp_path, redis_server, services, KEEPALIVE_TIMEOUT="1", REQUEST_TIMEOUT="8",
                  MAX_MESSAGE_BYTES="1024", HTTP_PROTOCOL=protocol)
    body = b'{"data": "' + b"x" * 2000 + b'"}'
    head = (b"POST /channels/early/messages HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n" % len(body))
    sock = connect(svc.port)
    try:
        sock.sendall(head)
        got = answers(_read_until(sock, 1))
        assert [a[0] for a in got] == [413]
        if got[0][1].get("connection") == "close":
            return  # (the service may also close after such an answer: nothing is left to idle)
        sock.sendall(body)
        idle = _seconds_until_closed(sock)
    finally:
        sock.close()
    assert 0.9 < idle < 1.7, idle
    assert history(redis_server, "early") == []


def _seconds_until_closed(sock: socket.socket, timeout: float = 5.0) -> float:
    """How long until the server closes the connection (cleanly: EOF, nothing more written)."""
    started = time.monotonic()
    sock.settimeout(timeout)
    assert sock.recv(1) == b"", "the server closed the idle connection"
    return time.monotonic() - started


async def test_thousands_of_idle_keep_alive_connections_all_close_and_give_back_their_slots(
    redis_server: RedisServer, services: list[ServiceProcess], tmp_path: Path
) -> None:
    """A replica's keep-alive clients all go quiet at once (2,000 connections from one address, one publish each
    over 200 rooms): every one is closed by the one deadline sweep within KEEPALIVE_TIMEOUT and a second, and every
    slot of MAX_CONNECTIONS_PER_CLIENT comes back, so the same 2,000 can connect and publish again."""
    n, rooms = 2000, 200
    svc = replica(tmp_path, redis_server, services, KEEPALIVE_TIMEOUT="1", REQUEST_TIMEOUT="8",
                  MAX_CONNECTIONS_PER_CLIENT=str(n))

    async def publish_then_idle(i: int, round_: int) -> float:
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        try:
            writer.write(publish_bytes(f"kroom{i % rooms}", round_))
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 202 "), head[:200]
            length = int(re.search(rb"content-length: (\d+)", head, re.I).group(1))  # type: ignore[union-attr]
            await reader.readexactly(length)
            answered = time.monotonic()
            assert await reader.read(1) == b"", "closed cleanly, nothing more written"
            return time.monotonic() - answered
        finally:
            writer.close()

    async with asyncio.timeout(90):
        for round_ in range(2):  # the second round needs every slot the first one took
            idles = await asyncio.gather(*(publish_then_idle(i, round_) for i in range(n)))
            assert 0.9 < min(idles) and max(idles) < 3.0, (min(idles), max(idles))
    eventually_blocking(lambda: client_sockets(svc) == 0, 5, "no connection left open")
    for r in range(rooms):
        assert history(redis_server, f"kroom{r}") == [0] * (n // rooms) + [1] * (n // rooms)


def _read_until(sock: socket.socket, count: int, timeout: float = 5.0) -> bytes:
    """What the server wrote until `count` answers are complete (the connection stays open)."""
    sock.settimeout(timeout)
    raw = b""
    deadline = time.monotonic() + timeout
    while len(answers(raw)) < count and time.monotonic() < deadline:
        chunk = sock.recv(65536)
        if not chunk:
            break
        raw += chunk
    return raw


# -- the edge fuzzer -----------------------------------------------------------------------------------------------

CHANNELS = ("fz0", "fz1", "fz2")
CAP = 20  # MAX_CONNECTIONS_PER_CLIENT of the fuzzed replica
HONEST_CHANNELS = ("fz0", "calm")  # one the fuzzer also hits, one it never names


class Edge:
    """A replica on a real Redis, the honest streams beside it, and the baselines the invariants return to."""

    def __init__(self, svc: ServiceProcess) -> None:
        self.svc = svc
        # no pooled connection of ours stays open: the client sockets counted are the honest streams alone
        self.client = httpx.Client(base_url=svc.url, timeout=5, headers={"Connection": "close"})
        self.honest = [RawStream(svc.port, f"/channels/{c}/events") for c in HONEST_CHANNELS for _ in range(2)]
        for s in self.honest:
            s.wait_for(lambda s: b"relay.hello" in s.raw, what="greeting")
        self.sent: dict[str, list[object]] = {c: [] for c in HONEST_CHANNELS}
        self.fuzz_published: list[object] = []
        self.reconnects = metric(svc, "sse_broker_reconnects_total")
        self.streams = metric(svc, "sse_streams_open")
        self.sockets = len(self.honest)  # the honest streams' connections, once the set-up's requests are gone
        eventually_blocking(lambda: client_sockets(svc) == self.sockets, 5, "only the honest streams connected")
        self.cases = 0
        self.last_probe = ""
        self.answered: dict[int, int] = {}

    def _slots_back(self) -> bool:
        """Beside the honest streams, exactly as many connections as the cap allows are taken: of `free + 1`
        idle connections the server closes one at once (waited for with select, before anything is sent, so no
        answered connection frees a slot meanwhile), and the others are served."""
        free = CAP - len(self.honest)
        socks = [connect(self.svc.port) for _ in range(free + 1)]
        try:
            readable, _, _ = select.select(socks, [], [], 2.0)  # the refused one: EOF or a reset
            refused = [sock for sock in readable if not _alive(sock)]
            for sock in socks:
                if sock not in refused:
                    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            served = [read_all(sock, 2).startswith(b"HTTP/1.1 200") for sock in socks if sock not in refused]
        finally:
            for sock in socks:
                sock.close()
        self.last_probe = f"{len(refused)} refused and {served.count(True)} served of {len(socks)} (free: {free})"
        return len(refused) == 1 and served.count(True) == free

    def check(self) -> None:
        """The invariants, after each case."""
        self.cases += 1
        for channel in HONEST_CHANNELS:
            marker = f"{channel}-{self.cases}-{secrets.token_hex(3)}"
            assert self.client.post(f"/channels/{channel}/messages", json={"data": marker}).status_code == 202
            self.sent[channel].append(marker)
        for s, channel in zip(self.honest, [c for c in HONEST_CHANNELS for _ in range(2)], strict=True):
            want = self.sent[channel]
            s.wait_for(lambda s, w=want: [d for d in s.data() if d in w][-1:] == w[-1:], 10, "the marker")
            got = [d for d in s.data() if isinstance(d, str) and d.startswith(f"{channel}-")]
            assert got == want, "every honest message once, in order"
        assert metric(self.svc, "sse_broker_reconnects_total") == self.reconnects, "no Redis reader reconnected"
        eventually_blocking(lambda: metric(self.svc, "sse_streams_open") == self.streams, 5,
                            "open streams back to the baseline")
        eventually_blocking(lambda: client_sockets(self.svc) == self.sockets, 5,
                            lambda: f"client sockets back to {self.sockets}: {client_sockets(self.svc)}")
        # the per-address count is back: beside the honest streams, exactly as many connections as the cap
        # (20) allows are served, and the next one is refused
        eventually_blocking(self._slots_back, 5, lambda: f"the per-address count back: {self.last_probe}")
        log = self.svc.log()
        assert "Traceback" not in log and "Exception in ASGI application" not in log, log


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    tmp = tmp_path_factory.mktemp("edge")
    (tmp / "redis").mkdir()
    redis = RedisServer(tmp / "redis", port=free_port())
    redis.start()
    svc = ServiceProcess(tmp, {"REDIS_URL": redis.url, "HEARTBEAT_INTERVAL": "30", "REQUEST_TIMEOUT": "1",
                               "MAX_CONNECTIONS_PER_CLIENT": str(CAP), "MAX_HEADER_BYTES": "2048",
                               "MAX_MESSAGE_BYTES": "4096", "PUBLISH_RATE_LIMIT": "100000",
                               "MAX_STREAMS_PER_CLIENT": "0"}, name="edge")
    try:
        svc.start()
        edge = Edge(svc)
        yield edge
        for s in edge.honest:
            s.close()
        edge.client.close()
        print(f"\nedge fuzzer: {edge.cases} cases, answers by status {dict(sorted(edge.answered.items()))}")
    finally:
        svc.stop()
        redis.stop()


_paths = st.sampled_from([
    *(f"/channels/{c}/events" for c in CHANNELS), *(f"/channels/{c}/messages" for c in CHANNELS),
    "/events?channel=fz0&channel=fz1", "/server/events", "/server/send", "/healthz", "/publish", "/nowhere",
    "/channels/fz0/events?last_event_id=99999999999999999999-0", "/" + "a" * 3000,
])
_methods = st.sampled_from(["GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "G\x00T", "CONNECT"])
_header = st.one_of(
    st.sampled_from([
        "Connection: Upgrade\r\nUpgrade: websocket", "Connection: close", "Connection: keep-alive",
        "Transfer-Encoding: chunked", "Content-Length: 5", "Content-Length: 5\r\nContent-Length: 7",
        "Content-Length: -1", "Content-Length: 99999999999999999999", "Transfer-Encoding: chunked\r\nContent-Length: 3",
        "Expect: 100-continue", "Last-Event-ID: 0-0", "Content-Type: application/json", "X-Big: " + "b" * 4000,
        "Host: x", "Host: x\r\nHost: y", "Bad Header Line", "X-Nul: \x00", "Last-Event-ID: fz0=1-0,fz1=2-0",
    ]),
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40).map(lambda t: f"X-F: {t}"),
)
_body = st.one_of(
    st.just(b""), st.just(b'{"data": "fuzz"}'), st.just(b'{"messages": [{"role": "user", "content": "x"}]}'),
    st.just(b"5\r\n{\"dat\r\n0\r\n\r\n"), st.binary(max_size=300),
)


@st.composite
def _request(draw: st.DrawFn) -> bytes:
    line = f"{draw(_methods)} {draw(_paths)} {draw(st.sampled_from(['HTTP/1.1', 'HTTP/1.0', 'HTTP/9', '']))}"
    headers = draw(st.lists(_header, max_size=4))
    body = draw(_body)
    if draw(st.booleans()) and body and not any("Length" in h or "chunked" in h for h in headers):
        headers.append(f"Content-Length: {len(body)}")
    head = "\r\n".join([line, *headers]) + "\r\n\r\n"
    return head.encode("latin-1", "replace") + body


_valid = st.sampled_from([
    publish_bytes("fz0", "fuzz"), publish_bytes("fz1", "fuzz"), publish_bytes("fz0", "x" * 5000),
    b"GET /channels/fz0/events HTTP/1.1\r\nHost: x\r\n\r\n", b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /events?channel=fz0&channel=fz2 HTTP/1.1\r\nHost: x\r\nLast-Event-ID: fz0=1-0\r\n\r\n",
    b"POST /server/send HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 47\r\n\r\n"
    b'{"messages": [{"role": "user", "content": "x"}]}'[:47],
    b"GET /channels/fz1/events HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
])


@st.composite
def _case(draw: st.DrawFn) -> tuple[list[bytes], str]:
    """Requests (well-formed ones, generated ones, junk) pipelined in one byte string, cut into segments."""
    parts = st.one_of(_valid, _valid, _request(), st.binary(min_size=1, max_size=200))
    data = b"".join(draw(st.lists(parts, min_size=1, max_size=6)))
    cuts = sorted(draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=6, unique=True)))
    segments = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True) if data[a:b]]
    ending = draw(st.sampled_from(["read", "half-close", "abort", "close"]))
    return segments, ending


EXAMPLES = int(os.environ.get("EDGE_FUZZ_EXAMPLES", "60"))


@settings(max_examples=EXAMPLES, deadline=None, database=None,
          # each case is a real connection and a round of checks: shrinking a failure can take many minutes, so
          # it is left to the longer run (EDGE_FUZZ_SHRINK=1)
          phases=[Phase.explicit, Phase.reuse, Phase.generate, *([Phase.shrink] if os.environ.get("EDGE_FUZZ_SHRINK")
                                                                  else [])],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.data_too_large])
@given(case=_case())
def test_edge_fuzzer_one_clients_bytes_never_reach_another_clients_delivery(
    edge: Edge, case: tuple[list[bytes], str]
) -> None:
    segments, ending = case
    sock = connect(edge.svc.port)
    try:
        for segment in segments:
            try:
                sock.sendall(segment)
            except (BrokenPipeError, ConnectionResetError):
                break  # the server closed on an earlier segment: as a client would, stop sending
        if ending == "half-close":
            with contextlib.suppress(OSError):  # the server may have closed already (a 400, a 408)
                sock.shutdown(socket.SHUT_WR)
        elif ending == "abort":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        raw = read_all(sock, 0.3) if ending in ("read", "half-close") else b""
    finally:
        sock.close()
    for status in statuses(raw):
        edge.answered[status] = edge.answered.get(status, 0) + 1
        assert status < 500, raw[:500]
    edge.check()


# -- at the scale users run ------------------------------------------------------------------------------------


async def _zombie(port: int, channel: str, ending: str) -> None:
    """A stream's request with another pipelined behind it, the greeting read, then the client gone."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET /channels/{channel}/events HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
                 .encode())
    seen = b""
    async with asyncio.timeout(30):
        while b"relay.hello" not in seen:
            chunk = await reader.read(65536)
            assert chunk, "the zombie's stream was greeted"
            seen += chunk
    if ending == "abort":
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    writer.close()


async def test_thousands_of_honest_streams_in_hundreds_of_rooms_lose_nothing_to_hundreds_of_dead_clients(
    redis_server: RedisServer, services: list[ServiceProcess], tmp_path: Path
) -> None:
    """2,000 honest streams in 500 rooms, and 500 clients that each open a stream in one of those rooms with a
    request pipelined behind it and then vanish (closed or reset), while messages go round the rooms. Every
    honest stream gets every message of its room once and in order, the Redis reader never reconnects, and the
    dead clients' streams all end."""
    rooms, per_room, rounds = 500, 4, 4
    svc = replica(tmp_path, redis_server, services, HEARTBEAT_INTERVAL="10")
    room_of = {SSEStream(f"{svc.url}/channels/room{r}/events"): f"room{r}" for r in range(rooms) for _ in range(per_room)}
    streams = await open_streams(list(room_of), timeout=90)
    reconnects = metric(svc, "sse_broker_reconnects_total")
    sem = asyncio.Semaphore(100)

    async def zombie(r: int) -> None:
        async with sem:
            await _zombie(svc.port, f"room{r}", "abort" if r % 2 else "close")

    async def publish_round(client: httpx.AsyncClient, n: int) -> None:
        async def one(r: int) -> None:
            async with sem:
                resp = await client.post(f"/channels/room{r}/messages", json={"data": n})
                assert resp.status_code == 202, resp.text

        await asyncio.gather(*(one(r) for r in range(rooms)))

    limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
    async with httpx.AsyncClient(base_url=svc.url, timeout=20, limits=limits) as client:
        await publish_round(client, 0)
        await asyncio.gather(*(zombie(r) for r in range(rooms)))  # every room gets a dead client
        for n in range(1, rounds):
            await publish_round(client, n)
    await wait_all(streams, lambda s: len(s.events) >= rounds, 60, "every message of its room")
    wrong = [s for s in streams if s.data() != list(range(rounds))]
    assert not wrong, f"{len(wrong)} streams lost, doubled or reordered messages, e.g. {wrong[0].data()}"
    assert metric(svc, "sse_broker_reconnects_total") == reconnects, "the Redis reader never reconnected"
    eventually_blocking(lambda: metric(svc, "sse_streams_open") == len(streams), 10, "every dead client's stream ended")
    await asyncio.gather(*(s.close() for s in streams))
