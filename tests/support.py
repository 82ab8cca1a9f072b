"""Test support: real redis-server and uvicorn processes on free loopback ports, and a streaming SSE reader.

Nothing here touches the shared Redis on 6379: every test Redis is our own process in a temp dir, which the
tests may kill and restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import uvicorn

ROOT = Path(__file__).resolve().parent.parent


async def wait_until(changed: asyncio.Event, condition: Callable[[], bool], timeout: float) -> None:
    """Await `condition`, re-checked each time `changed` is set (by whoever changes what it looks at)."""
    async def loop() -> None:
        while not condition():
            changed.clear()
            await changed.wait()
    await asyncio.wait_for(loop(), timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


class RedisServer:
    """A redis-server of the test's own; `kill()` is `kill -9`, `start()` brings it back on the same port/data."""

    def __init__(self, tmp: Path, port: int | None = None, appendonly: bool = True, extra: list[str] | None = None):
        self.port = port or free_port()
        self.dir = tmp
        self.appendonly = appendonly
        self.extra = extra or []
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: run `bash .ci/run` or `apt-get install redis-server`")
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir), "--save", "",
                "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "always",
                "--daemonize", "no", "--protected-mode", "no", "--loglevel", "warning",
                "--enable-debug-command", "local", *self.extra]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return
            time.sleep(0.02)
        raise TimeoutError(f"redis-server did not start on {self.port}")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc = None


class ServiceProcess:
    """`python -m service` as a real process; stderr goes to a log file the test can show on failure."""

    def __init__(self, tmp: Path, env: dict[str, str] | None = None, name: str = "svc") -> None:
        self.port = free_port()
        self.name = name
        self.log_path = tmp / f"{name}-{self.port}.log"
        self.env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(self.port), "INSTANCE_ID": name,
                    "LOG_LEVEL": "info",
                    # permissive unless a test says otherwise: tests use many channels from one address
                    "PUBLIC_CHANNELS": "*", "PUBLISH_RATE_LIMIT": "0", "MAX_STREAMS_PER_CLIENT": "0",
                    "MAX_CONNECTIONS_PER_CLIENT": "0",
                    **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait_ready: bool = True) -> ServiceProcess:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=self.env,
                                     stdout=log, stderr=subprocess.STDOUT)
        log.close()
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                # ready, and its Redis connections up (readiness alone does not wait for the broker)
                if (httpx.get(self.url + "/readyz", timeout=0.5).status_code == 200
                        and httpx.get(self.url + "/healthz/broker", timeout=0.5).status_code == 200):
                    return
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@dataclass
class Event:
    event: str
    data: str
    id: str | None
    at: float = 0.0  # time.time() when parsed, for latency figures

    def json(self) -> Any:
        return orjson.loads(self.data)


@dataclass
class SSEReader:
    """Reads one SSE stream in a background task, collecting events; tests await conditions with deadlines.

    On a `Last-Event-ID`-aware reconnect (`reconnect=True`) it behaves like a browser's EventSource: when the
    stream ends it reconnects (to `urls` in turn, so a dead replica sends it to the next) with the last id.
    """

    urls: list[str]
    reconnect: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    comments: int = 0
    connects: int = 0
    last_id: str | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    statuses: list[int] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _connected: asyncio.Event = field(default_factory=asyncio.Event)

    def start(self) -> SSEReader:
        self._task = asyncio.create_task(self._run())
        return self

    @staticmethod
    async def open_all(readers: list[SSEReader], timeout: float = 10.0) -> list[SSEReader]:
        """Start every reader, then wait until each has its stream open."""
        for r in readers:
            r.start()
        for r in readers:
            await r.wait_connected(timeout)
        return readers

    async def __aenter__(self) -> SSEReader:
        self.start()
        await self.wait_connected()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def wait_connected(self, timeout: float = 10.0) -> None:
        await asyncio.wait_for(self._connected.wait(), timeout)

    def data_events(self, name: str = "message") -> list[Event]:
        return [e for e in self.events if e.event == name]

    async def wait_for(self, predicate: Callable[[SSEReader], bool], timeout: float = 10.0) -> None:
        try:
            await wait_until(self._changed, lambda: predicate(self), timeout)
        except TimeoutError:
            raise AssertionError(f"condition not met in {timeout}s; got {len(self.events)} events") from None

    async def wait_count(self, n: int, name: str = "message", timeout: float = 10.0) -> None:
        await self.wait_for(lambda r: len(r.data_events(name)) >= n, timeout)

    async def _run(self) -> None:
        attempt = 0
        async with httpx.AsyncClient(timeout=httpx.Timeout(5.0, read=None)) as client:
            while True:
                url = self.urls[attempt % len(self.urls)]
                attempt += 1
                headers = {"Accept": "text/event-stream", **self.headers}
                if self.last_id is not None:
                    headers["Last-Event-ID"] = self.last_id
                try:
                    async with client.stream("GET", url, headers=headers) as resp:
                        self.statuses.append(resp.status_code)
                        if resp.status_code != 200:
                            break
                        self.connects += 1
                        await self._parse(resp)
                except (httpx.TransportError, OSError):
                    pass
                self._changed.set()
                if not self.reconnect:
                    break
                await asyncio.sleep(0.05)
        self.ended.set()
        self._changed.set()

    async def _parse(self, resp: httpx.Response) -> None:
        event, data, eid = "message", [], None
        buf = b""
        async for chunk in resp.aiter_bytes():
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for raw in lines:
                line = raw.decode()
                if line == "":
                    if data:
                        if eid is not None:
                            self.last_id = eid
                        self.events.append(Event(event, "\n".join(data), eid, time.time()))
                        self._connected.set()
                        self._changed.set()
                    event, data, eid = "message", [], None
                elif line.startswith(":"):
                    self.comments += 1
                    self._changed.set()
                else:
                    name, _, value = line.partition(":")
                    value = value[1:] if value.startswith(" ") else value
                    if name == "data":
                        data.append(value)
                    elif name == "event":
                        event = value
                    elif name == "id":
                        eid = value
                    elif name == "retry":
                        self._connected.set()


@contextlib.asynccontextmanager
async def running_app(app: Any) -> AsyncIterator[str]:
    """Serve an ASGI app with a real uvicorn server in this event loop; yields its base URL."""
    port = free_port()
    # proxy_headers off as in `python -m service`: uvicorn would otherwise rewrite the client address from
    # X-Forwarded-For for loopback peers, and the relay's own TRUST_PROXY_HEADERS would not be what is tested.
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on",
                            timeout_graceful_shutdown=2, proxy_headers=False)
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(task, 10)


@dataclass
class Publisher:
    """Publishes numbered messages through `urls` in turn, retrying 503s and refused connections like a real
    producer would. `accepted` holds (seq, id) of every 202; `uncertain` the seqs whose answer was lost."""

    urls: list[str]
    channel: str = "room"
    accepted: list[tuple[int, str]] = field(default_factory=list)
    uncertain: set[int] = field(default_factory=set)
    rejected_503: int = 0
    refused: int = 0
    _seq: int = 0
    _accepted_changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait_accepted(self, n: int, timeout: float = 20.0) -> None:
        await wait_until(self._accepted_changed, lambda: len(self.accepted) >= n, timeout)

    async def publish_one(self, client: httpx.AsyncClient, deadline: float = 20.0) -> str:
        seq = self._seq
        self._seq += 1
        end = time.monotonic() + deadline
        attempt = seq
        while time.monotonic() < end:
            url = self.urls[attempt % len(self.urls)]
            attempt += 1
            try:
                resp = await client.post(f"{url}/channels/{self.channel}/messages",
                                         json={"data": {"seq": seq, "t": time.time()}, "event": "n"})
            except httpx.ConnectError:
                self.refused += 1
                await asyncio.sleep(0.05)
                continue
            except httpx.TransportError:
                self.uncertain.add(seq)  # the request may have been published before the answer was lost
                await asyncio.sleep(0.05)
                continue
            if resp.status_code == 202:
                self.accepted.append((seq, resp.json()["id"]))
                self._accepted_changed.set()
                return str(resp.json()["id"])
            assert resp.status_code == 503, resp.text
            assert resp.headers.get("retry-after"), "503 must carry Retry-After"
            self.rejected_503 += 1
            await asyncio.sleep(0.05)
        raise AssertionError(f"message {seq} not accepted within {deadline}s")

    async def run(self, count: int, interval: float, stop: asyncio.Event | None = None) -> None:
        """Publish up to `count` messages, one per `interval`, until `stop` is set."""
        async with httpx.AsyncClient(timeout=5.0) as client:
            for _ in range(count):
                if stop is not None and stop.is_set():
                    return
                await self.publish_one(client)
                await asyncio.sleep(interval)


def delivery_report(reader: SSEReader, publisher: Publisher, event: str = "n") -> dict[str, int]:
    """Exact counts for one subscriber against what the publisher got accepted."""
    got = [(e.json()["seq"], e.id) for e in reader.data_events(event)]
    got = [g for g in got if g[0] not in publisher.uncertain]
    expected = [a for a in publisher.accepted if a[0] not in publisher.uncertain]
    seen: set[tuple[int, str | None]] = set()
    duplicates = 0
    for g in got:
        if g in seen:
            duplicates += 1
        seen.add(g)
    received_expected = [g for g in got if g in set(expected)]
    out_of_order = sum(1 for a, b in zip(received_expected, received_expected[1:]) if a[0] > b[0])
    lost = len(set(expected) - seen)
    unexpected = len([g for g in got if g not in set(expected)])
    return {"accepted": len(expected), "delivered": len(got), "lost": lost, "duplicates": duplicates,
            "out_of_order": out_of_order, "unexpected": unexpected}


class StallingProxy:
    """A TCP proxy whose `stall()` turns every open connection into a silent black hole (a half-open path):
    nothing is forwarded in either direction and nothing is closed. New connections work normally."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = free_port()
        self._server: asyncio.AbstractServer | None = None
        self._generation = 0
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    def stall(self) -> None:
        self._generation += 1

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in self._writers:
            w.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        generation = self._generation
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self._writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(65536):
                if self._generation != generation:
                    continue  # swallowed: the path is dead but nobody is told
                dst.write(data)
                await dst.drain()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)
