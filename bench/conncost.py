"""What one connection costs a server, and how much of it is the HTTP layer: the reference points behind
docs/performance.md's reading of the `open` scenario.

    # a server to measure, on core 0 (or the service itself: `taskset -c 0 python -m service`)
    taskset -c 0 .venv/bin/python -m bench.conncost serve floor 8802     # uvloop, answers from data_received
    taskset -c 0 .venv/bin/python -m bench.conncost serve lean 8803      # + httptools and a task per request
    taskset -c 0 .venv/bin/python -m bench.conncost serve uvicorn 8804   # uvicorn + httptools, a two-send ASGI app
    # the clients, on core 1: N connections (1,000 being opened at once), each sends one GET and waits for the
    # first bytes of its answer, then stays open; prints the server's CPU per connection (/proc/<pid>/stat)
    taskset -c 1 .venv/bin/python -m bench.conncost measure 8803 / 10000
    taskset -c 1 .venv/bin/python -m bench.conncost measure 8000 '/channels/r{i}/events' 10000   # {i}: N/5 rooms

Every server answers the same bytes: a 200 head and one SSE event, and keeps the connection open. They are
reference points, not alternatives to the service: they do nothing a stream needs (no routing, no limits, no
subscription, no greeting).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from typing import Any

_ANSWER = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\nevent: hi\r\ndata: x\r\n\r\n"


class _Floor(asyncio.Protocol):
    """uvloop alone: the answer written from `data_received`."""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(_ANSWER)


class _Lean(asyncio.Protocol):
    """What any Python HTTP server has to do at least: an httptools parser per connection, the request's URL and
    headers collected, a scope, and a task per request that writes the answer and then waits."""

    tasks: set[asyncio.Task[None]] = set()

    def __init__(self) -> None:
        import httptools

        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_message_complete(self) -> None:
        scope = {"type": "http", "method": self.parser.get_method().decode(), "path": self.url.decode(),
                 "headers": self.headers}
        task = asyncio.get_running_loop().create_task(self._run(scope))
        self.tasks.add(task)

    async def _run(self, scope: dict[str, Any]) -> None:
        self.transport.write(_ANSWER)
        await asyncio.get_running_loop().create_future()  # a stream: open until the process ends


async def _asgi(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    await send({"type": "http.response.body", "body": b"event: hi\r\ndata: x\r\n\r\n", "more_body": True})
    await asyncio.get_running_loop().create_future()


def serve(kind: str, port: int) -> None:
    import uvloop

    if kind == "uvicorn":
        import uvicorn

        uvicorn.run(_asgi, host="127.0.0.1", port=port, loop="uvloop", http="httptools", log_level="warning",
                    lifespan="off", backlog=4096, access_log=False, proxy_headers=False)
        return
    factory = _Floor if kind == "floor" else _Lean

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", port, backlog=4096)
        await server.serve_forever()

    uvloop.run(main())


def _listener_pid(port: int) -> int:
    out = subprocess.run(["ss", "-ltnpH", f"( sport = :{port} )"], capture_output=True, text=True, check=True).stdout
    start = out.find("pid=")
    if start < 0:
        raise SystemExit(f"nothing listens on 127.0.0.1:{port} (or ss cannot see its process: run as its user)")
    return int(out[start + 4:].split(",", 1)[0])


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _measure(port: int, path: str, n: int, at_once: int) -> tuple[float, float]:
    loop = asyncio.get_running_loop()
    rooms = max(1, n // 5)
    kept: list[Any] = []
    gate = asyncio.Semaphore(at_once)

    class Client(asyncio.Protocol):
        def __init__(self, answered: asyncio.Future[None]) -> None:
            self.answered = answered

        def data_received(self, data: bytes) -> None:
            if not self.answered.done():
                self.answered.set_result(None)

        def connection_lost(self, exc: Exception | None) -> None:
            if not self.answered.done():
                self.answered.set_exception(ConnectionError("closed before an answer"))

    async def one(i: int) -> None:
        async with gate:
            answered: asyncio.Future[None] = loop.create_future()
            transport, _ = await loop.create_connection(lambda: Client(answered), "127.0.0.1", port)
            target = path.replace("{i}", str(i % rooms))
            transport.write(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n".encode())
            await asyncio.wait_for(answered, 60)
            kept.append(transport)

    pid = _listener_pid(port)
    cpu, wall = _cpu_seconds(pid), time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    cpu, wall = _cpu_seconds(pid) - cpu, time.perf_counter() - wall
    for transport in kept:
        transport.close()
    await asyncio.sleep(0.5)
    return cpu, wall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.conncost", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    s = sub.add_parser("serve", help="a reference server on 127.0.0.1:PORT")
    s.add_argument("kind", choices=("floor", "lean", "uvicorn"))
    s.add_argument("port", type=int)
    m = sub.add_parser("measure", help="N connections to 127.0.0.1:PORT, the server's CPU per connection")
    m.add_argument("port", type=int)
    m.add_argument("path", help="the request's path; {i} becomes a room number (N/5 rooms)")
    m.add_argument("n", type=int)
    m.add_argument("--at-once", type=int, default=1000)
    a = parser.parse_args(argv)
    if a.what == "serve":
        serve(a.kind, a.port)
        return 0
    import uvloop

    cpu, wall = uvloop.run(_measure(a.port, a.path, a.n, a.at_once))
    print(f"{a.n} connections to :{a.port}{a.path}: {wall:.2f} s until all answered, server CPU "
          f"{cpu / a.n * 1e6:.0f} µs per connection")
    return 0


if __name__ == "__main__":
    sys.exit(main())
