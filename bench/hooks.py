"""What the hooks cost: publish and stream-open rates with the authorization hook off, on with a warm cache, on
with no cache (every request asks the backend), and with the publish hook too (issue 27).

    .venv/bin/python -m bench.hooks                 # ~1 min; prints a table, asserts nothing
    .venv/bin/python -m bench.hooks --publishes 4000 --streams 2000 --connections 16 --runs 3

Each configuration gets a fresh relay (`python -m service`, one worker) on a private redis-server, in front of
tests/hook_backend.py (FastAPI, a cookie session, under uvicorn: one process). The load is closed-loop from this
process over raw keep-alive sockets: `--connections` publishers, each with a session of its own, publishing one
message after another to its own room; then `--streams` streams opened at once until every one is greeted: over
the publishers' sessions (decisions cached) or, for the cold row, each with a session never seen (no cache, and
nothing to coalesce: one hook call per stream). Rates are requests over wall time, on whatever else the machine runs:
compare rows of one run, not runs of different days.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=0.5).status_code < 500:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


@contextlib.contextmanager
def process(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "ab") as out:
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


async def _request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes, body: bytes) -> int:
    writer.write(head + body)
    response = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in response.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    await reader.readexactly(length)
    return int(response.split(b" ", 2)[1])


async def publishes(port: int, sessions: list[str], total: int) -> tuple[float, dict[int, int]]:
    """`total` publishes over one keep-alive connection per session; (publishes/s, statuses)."""
    statuses: dict[int, int] = {}
    per = total // len(sessions)

    async def one(i: int, session: str) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for n in range(per):
            body = orjson.dumps({"data": {"text": f"m{n}"}, "event": "chat"})
            head = (f"POST /channels/room-{i}/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: session={session}\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
            status = await _request(reader, writer, head, body)
            statuses[status] = statuses.get(status, 0) + 1
        writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(one(i, s) for i, s in enumerate(sessions)))
    return per * len(sessions) / (time.perf_counter() - started), statuses


async def opens(port: int, sessions: list[str], total: int) -> tuple[float, int]:
    """`total` streams opened at once, each read until its `relay.hello`, stream i with session i (cycling) on
    room i of the publishers' (cycling); (streams/s, greeted)."""
    writers: list[asyncio.StreamWriter] = []

    async def one(i: int) -> bool:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writers.append(writer)
        session = sessions[i % len(sessions)]
        writer.write(f"GET /channels/room-{i % 16}/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     f"Cookie: session={session}\r\n\r\n".encode())
        seen = b""
        while b"relay.hello" not in seen:
            chunk = await reader.read(4096)
            if not chunk:
                return False
            seen += chunk
        return seen.startswith(b"HTTP/1.1 200")

    started = time.perf_counter()
    greeted = sum(await asyncio.gather(*(asyncio.wait_for(one(i), 60) for i in range(total))))
    rate = total / (time.perf_counter() - started)
    for w in writers:
        w.close()
    return rate, greeted


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.hooks", description=__doc__.split("\n\n")[0])
    p.add_argument("--publishes", type=int, default=4000)
    p.add_argument("--streams", type=int, default=2000)
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--runs", type=int, default=1, help="runs of every configuration; the table shows medians")
    a = p.parse_args(argv)
    binary = shutil.which("redis-server")
    if binary is None:
        print("redis-server is not installed", file=sys.stderr)
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="bench-hooks-"))
    redis_port, backend_port = free_port(), free_port()
    env = {**os.environ, "RELAY_URL": "http://127.0.0.1:1", "ADMIN_API_KEY": "x" * 16, "CACHE_SECONDS": "60"}
    backend = [sys.executable, "-m", "uvicorn", "tests.hook_backend:app", "--host", "127.0.0.1", "--port",
               str(backend_port), "--log-level", "warning", "--no-access-log"]
    hook = f"http://127.0.0.1:{backend_port}/hooks"
    # cold: no cache, and every stream opened with a session of its own (nothing to coalesce either)
    configs = {
        "no hook (public channels)": {"PUBLIC_CHANNELS": "*"},
        "auth hook, warm cache": {"AUTH_HOOK_URL": f"{hook}/auth"},
        "auth hook, cold (no cache)": {"AUTH_HOOK_URL": f"{hook}/auth", "AUTH_HOOK_CACHE_SIZE": "0"},
        "auth hook warm + publish hook": {"AUTH_HOOK_URL": f"{hook}/auth", "PUBLISH_HOOK_URL": f"{hook}/publish"},
    }
    rows = []
    with process([binary, "--port", str(redis_port), "--save", "", "--appendonly", "no", "--dir", str(tmp)], env,
                 tmp / "redis.log"), process(backend, env, tmp / "backend.log"):
        wait_http(f"http://127.0.0.1:{backend_port}/stats")
        with httpx.Client() as client:
            sessions = [client.post(f"http://127.0.0.1:{backend_port}/login", json={"user": f"u{i}"}).json()["session"]
                        for i in range(a.connections + a.streams)]
        publishers, fresh = sessions[:a.connections], sessions[a.connections:]
        for name, extra in [(n, e) for _ in range(a.runs) for n, e in configs.items()]:
            port = free_port()
            relay_env = {**env, "PORT": str(port), "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
                         "PUBLIC_CHANNELS": "chat", "PUBLISH_RATE_LIMIT": "0", "MAX_STREAMS_PER_CLIENT": "0",
                         "MAX_CONNECTIONS_PER_CLIENT": "0", "LOG_LEVEL": "warning",
                         # long enough that the cold row measures the backend's throughput, not the refusals
                         "HOOK_TIMEOUT": "30", **extra}
            with process([sys.executable, "-m", "service"], relay_env, tmp / f"relay-{port}.log"):
                wait_http(f"http://127.0.0.1:{port}/readyz")
                calls_before = httpx.get(f"http://127.0.0.1:{backend_port}/stats").json()
                asyncio.run(publishes(port, publishers, len(publishers) * 10))  # warm-up (and the cache, if any)
                pub_rate, statuses = asyncio.run(publishes(port, publishers, a.publishes))
                cold = "AUTH_HOOK_CACHE_SIZE" in extra
                if not cold:
                    asyncio.run(opens(port, publishers, len(publishers)))  # the cache, for these sessions' rooms
                open_rate, greeted = asyncio.run(opens(port, fresh if cold else publishers, a.streams))
                calls_after = httpx.get(f"http://127.0.0.1:{backend_port}/stats").json()
            calls = (calls_after["auth_calls"] - calls_before["auth_calls"],
                     calls_after["publish_calls"] - calls_before["publish_calls"])
            rows.append((name, pub_rate, statuses, open_rate, greeted, calls))
            print(f"{name}: {pub_rate:,.0f} publishes/s {statuses}, {open_rate:,.0f} stream opens/s "
                  f"({greeted}/{a.streams} greeted), backend calls auth {calls[0]}, publish {calls[1]}", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    medians = {name: (statistics.median(r[1] for r in rows if r[0] == name),
                      statistics.median(r[3] for r in rows if r[0] == name),
                      max((r[5] for r in rows if r[0] == name), key=sum)) for name in configs}
    base_pub, base_open, _ = next(iter(medians.values()))
    print(f"\nmedians of {a.runs} run(s)")
    print("| configuration | publishes/s | vs no hook | stream opens/s | vs no hook | hook calls (auth, publish) |")
    print("|---|---|---|---|---|---|")
    for name, (pub_rate, open_rate, calls) in medians.items():
        print(f"| {name} | {pub_rate:,.0f} | {pub_rate / base_pub:.2f}x | {open_rate:,.0f} | "
              f"{open_rate / base_open:.2f}x | {calls[0]:,}, {calls[1]:,} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
