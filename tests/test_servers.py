"""The app under other ASGI servers than `python -m service`: uvicorn with `--http h11`, and hypercorn.

There the direct-write path (uvicorn-httptools internals) is not available, and streams go through
sse-starlette's `EventSourceResponse` with nothing of uvicorn's: `http.disconnect` for clients that leave, its
pings, its send timeout, and each server's own shutdown. Each server runs as a real process, started the way
docs/python.md says (`service.app:create_app` as a factory, settings from the environment, the in-process broker).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from .sse import SSEStream, open_streams
from .support import ROOT, ServiceProcess, eventually

pytestmark = pytest.mark.timeout(60)

SERVERS = ["uvicorn-h11", "hypercorn"]


class ServerProcess(ServiceProcess):
    """The service's app under another server, as a real process (the same env and helpers as ServiceProcess)."""

    def __init__(self, tmp: Path, server: str, env: dict[str, str] | None = None) -> None:
        super().__init__(tmp, {"HEARTBEAT_INTERVAL": "0.5", "LOG_LEVEL": "warning", **(env or {})}, name=server)
        self.server = server

    def command(self) -> list[str]:
        if self.server == "uvicorn-h11":
            return [sys.executable, "-m", "uvicorn", "--http", "h11", "--factory", "service.app:create_app",
                    "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"]
        return [sys.executable, "-m", "hypercorn", "service.app:create_app()", "--bind", f"127.0.0.1:{self.port}",
                "--graceful-timeout", "1", "--log-level", "warning"]

    def start(self, wait_ready: bool = True) -> ServerProcess:
        log = open(self.log_path, "ab")
        # A session of its own: hypercorn serves from a spawned worker process, which a SIGKILL of the parent
        # alone would leave behind, still holding the port (kill() takes the whole group).
        self.proc = subprocess.Popen(self.command(), cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()
        if wait_ready:
            self.wait_ready()
        return self

    def kill(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
            self.proc = None


@contextlib.contextmanager
def serving(tmp: Path, server: str, **env: str) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp, server, env).start()
    try:
        yield proc
    finally:
        proc.kill()


@pytest.fixture(scope="module", params=SERVERS)
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server per kind for the tests that leave it running."""
    with serving(tmp_path_factory.mktemp(request.param), request.param) as proc:
        yield proc


@contextlib.asynccontextmanager
async def streams(*items: SSEStream) -> AsyncIterator[list[SSEStream]]:
    opened = await open_streams(list(items), timeout=10)
    try:
        yield opened
    finally:
        await asyncio.gather(*(s.close() for s in opened))


async def _publish(c: httpx.AsyncClient, channel: str, data: object, event: str | None = None) -> str:
    body: dict[str, object] = {"data": data}
    if event:
        body["event"] = event
    r = await c.post(f"/channels/{channel}/messages", json=body)
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


async def _streams_open(c: httpx.AsyncClient) -> float:
    for line in (await c.get("/metrics")).text.splitlines():
        if line.startswith("sse_streams_open "):
            return float(line.split()[1])
    raise AssertionError("no sse_streams_open in /metrics")


async def _until_streams_open(c: httpx.AsyncClient, n: int, timeout: float = 10) -> None:
    async def there() -> bool:
        return await _streams_open(c) == n

    await eventually(there, timeout, f"sse_streams_open {n}")


async def test_greeting_first_then_messages_through_sse_starlette(server: ServerProcess) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=5) as c, \
            SSEStream(f"{server.url}/channels/greet/events", keep_raw=True) as stream:
        assert stream.statuses == [200]
        headers = stream.response_headers
        assert headers["content-type"] == "text/event-stream; charset=utf-8"
        assert headers["cache-control"] == "no-cache" and headers["x-accel-buffering"] == "no"
        # sse-starlette's EventSourceResponse sets this; the lean response under uvicorn-httptools does not
        assert headers["connection"] == "keep-alive"
        assert stream.raw is not None
        first = bytes(stream.raw).split(b"\n\n")[0] + b"\n\n"
        assert first.startswith(b"id: 0\nevent: relay.hello\ndata: {"), first
        assert first.endswith(b"\nretry: 3000\n\n")
        ids = [await _publish(c, "greet", {"name": "ann", "text": f"m{i}"}, "chat") for i in range(3)]
        await stream.wait(lambda s: len(s.data("chat")) >= 3, 5)
        raw = bytes(stream.raw)[len(first):]
        assert b"\r" not in first + raw, "LF only"
        assert [b for b in raw.split(b"\n\n") if not b.startswith(b":")][:3] == [
            b'id: %s\nevent: chat\ndata: {"name":"ann","text":"m%d"}' % (i.encode(), n) for n, i in enumerate(ids)]


async def test_multi_channel_resume_and_the_old_chat_stream(server: ServerProcess) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=5) as c:
        async with streams(SSEStream(f"{server.url}/events?channel=a&channel=b"),
                           SSEStream(f"{server.url}/channels/a/events"), SSEStream(f"{server.url}/server/events")) as (
                multi, single, legacy):
            a1 = await _publish(c, "a", 1)
            b1 = await _publish(c, "b", 2)
            await _publish(c, "other", 3)
            a2 = await _publish(c, "a", 4)
            said = await _publish(c, "chat", {"name": "ann", "text": "hello old page", "ts": 1}, "chat")
            await _publish(c, "chat", [{"role": "user", "content": "from an old page"}])
            await multi.wait(lambda s: len(s.events) >= 3, 5)
            assert [(d["channel"], d["id"], d["data"]) for d in multi.data()] == [
                ("a", a1, 1), ("b", b1, 2), ("a", a2, 4)]
            assert multi.last_id == f"a={a2},b={b1}", "the cursor over both channels"
            await legacy.wait(lambda s: len(s.events) >= 2, 5)
            first = legacy.events[0]
            assert (first.event, first.id, first.data) == ("message", said, [{"role": "ann", "content": "hello old page"}])
            assert legacy.events[1].data == [{"role": "user", "content": "from an old page"}]
            await single.wait(lambda s: len(s.events) >= 2, 5)
        # Resume with Last-Event-ID, from a message and from the greeting of the multi-channel stream.
        b2 = await _publish(c, "b", 5)
        async with streams(SSEStream(f"{server.url}/channels/a/events", last_id=a1),
                           SSEStream(f"{server.url}/events?channel=a&channel=b", last_id=f"a={a1},b={b1}")) as (
                one, both):
            await one.wait(lambda s: len(s.events) >= 1, 5)
            await both.wait(lambda s: len(s.events) >= 2, 5)
            assert one.ids() == [a2]
            assert [(d["channel"], d["data"]) for d in both.data()] == [("a", 4), ("b", 5)]
            assert both.last_id == f"a={a2},b={b2}" and one.resets == both.resets == []


async def test_clients_that_leave_are_cleaned_up_and_quiet_streams_get_pings(server: ServerProcess) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=5) as c:
        await _until_streams_open(c, 0)
        opened = await open_streams([SSEStream(f"{server.url}/channels/leave{i}/events") for i in range(5)])
        await _until_streams_open(c, 5)
        # HEARTBEAT_INTERVAL=0.5: sse-starlette's ping task writes `: ping` comments on a quiet stream
        await opened[0].wait(lambda s: s.comments >= 2, 5)
        for s in opened:
            s.drop()  # the client goes away without a word: only `http.disconnect` tells the app
        await _until_streams_open(c, 0)
        for s in opened:
            await s.close()


@pytest.mark.parametrize("kind", SERVERS)
async def test_sigterm_ends_open_streams_and_the_server_exits(tmp_path: Path, kind: str) -> None:
    with serving(tmp_path, kind) as proc:
        paths = ["/channels/a/events", "/events?channel=a&channel=b", "/server/events"] * 2
        opened = [SSEStream(proc.url + p, keep_raw=True).start() for p in paths]
        async with httpx.AsyncClient(base_url=proc.url, timeout=5) as c:
            await _until_streams_open(c, len(paths))
        t0 = time.monotonic()
        proc.signal(signal.SIGTERM)
        await asyncio.wait_for(asyncio.gather(*(s.ended.wait() for s in opened)), 10)
        ended = time.monotonic() - t0
        tails = [bytes(s.raw or b"") for s in opened]
        code = await asyncio.to_thread(proc.wait, 10)
        exited = time.monotonic() - t0
        print(f"\n{kind}: {len(paths)} streams ended {ended:.2f}s after SIGTERM, process exited after {exited:.2f}s "
              f"with {code}")
        assert all(b"relay.hello" in t for t in tails)
        if kind == "uvicorn-h11":
            # uvicorn's exit is seen (sse-starlette's watcher, the relay's sweep): each stream ends with a retry hint;
            # uvicorn then re-raises the signal, so the exit status is SIGTERM's
            assert all(t.endswith(b"\n\n") and b"\nretry: " in t[-40:] for t in tails), tails
            assert code in (0, -signal.SIGTERM) and ended < 3
        else:
            # hypercorn tells an app nothing: it stops accepting, waits --graceful-timeout (1 s here) and cancels
            # what is still open; clients resume with Last-Event-ID
            assert code == 0 and ended < 5


@pytest.mark.parametrize("kind", SERVERS)
async def test_a_client_that_stops_reading_is_cut_off_by_the_send_timeout(tmp_path: Path, kind: str) -> None:
    """Its queue may hold everything (SUBSCRIBER_QUEUE_BYTES is large here), so only the write timeout ends it."""
    env = {"SEND_TIMEOUT": "1", "SUBSCRIBER_QUEUE_BYTES": str(1 << 30), "SUBSCRIBER_QUEUE_SIZE": "100000"}
    with serving(tmp_path, kind, **env) as proc:
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, ("127.0.0.1", proc.port))
            await loop.sock_sendall(sock, b"GET /channels/stall/events HTTP/1.1\r\nHost: x\r\n\r\n")
            got = b""
            while b"relay.hello" not in got:
                got += await asyncio.wait_for(loop.sock_recv(sock, 4096), 5)
            async with httpx.AsyncClient(base_url=proc.url, timeout=5) as c:
                await _until_streams_open(c, 1)
                pad = "x" * 60000
                deadline = time.monotonic() + 30
                sent = 0
                while await _streams_open(c) != 0:  # the client reads nothing: the server's writes block
                    assert time.monotonic() < deadline, f"still open after {sent} messages of 60 KB"
                    await _publish(c, "stall", {"i": sent, "pad": pad})
                    sent += 1
                # the others are not affected
                async with streams(SSEStream(f"{proc.url}/channels/stall/events")) as (fresh,):
                    await _publish(c, "stall", "after")
                    await fresh.wait(lambda s: s.data() == ["after"], 5)
            print(f"\n{kind}: a stalled client was cut off after {sent} messages of 60 KB")
        finally:
            sock.close()


async def test_a_later_server_in_the_same_process_streams_normally(tmp_path: Path) -> None:
    """sse-starlette's exit flag is process-wide once set; streams of a later server in the same process must
    not be ended by it. Two servers one after the other in one process (what a test runner or reloader does)."""
    script = tmp_path / "two_servers.py"
    script.write_text(_TWO_SERVERS)
    result = await asyncio.to_thread(subprocess.run, [sys.executable, str(script)], cwd=ROOT, capture_output=True,
                                     text=True, timeout=40, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert orjson.loads(result.stdout.strip().splitlines()[-1]) == {"first": 1, "second": 1}


_TWO_SERVERS = '''
import asyncio, os, signal, socket
import httpx, orjson, uvicorn
from service import Settings, create_app
from tests.sse import SSEStream  # the suite's SSE client and waiting (PYTHONPATH is the checkout)
from tests.support import eventually

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

async def one_server():
    port = free_port()
    app = create_app(Settings.from_env({}, public_channels=("*",), heartbeat_interval=0.5))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, http="h11", lifespan="on",
                                           log_level="warning"))
    task = asyncio.create_task(server.serve())
    await eventually(lambda: server.started, 10, "uvicorn started", every=0.01)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as c, \\
            SSEStream(f"http://127.0.0.1:{port}/channels/x/events") as stream:
        await c.post("/channels/x/messages", json={"data": 1})
        await stream.wait(lambda s: s.data() == [1], 5)
        got = len(stream.data())
    os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's handler takes it (and re-raises it at exit: ignored below)
    await asyncio.wait_for(task, 10)
    return got

async def main():
    signal.signal(signal.SIGTERM, lambda *_: None)
    first = await one_server()
    second = await one_server()
    print(orjson.dumps({"first": first, "second": second}).decode())

asyncio.run(main())
'''
