"""Clients that stop reading: they are cut off within a bounded memory cost, the others are not slowed down, and
the stalled ones resume later with nothing lost.

50 stalled clients (small receive buffers, so the stall reaches the server quickly) on 50 channels carrying
8 KB messages, each channel also read by 2 healthy clients. The service's RSS is sampled throughout.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import statistics
import time
from pathlib import Path

import httpx
import orjson
import pytest

from service.config import Settings

from .sse import SSEStream, dechunk, open_streams, parse_frames, wait_all
from .support import RawHTTP, RedisServer, ServiceProcess

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(180)]

CHANNELS, MESSAGES, PAD = 50, 300, 8000
QUEUE_BYTES = Settings().subscriber_queue_bytes  # the default: a stalled stream pins at most this much of messages
# What the stalled streams may cost: each its queue plus what the transport takes before it pauses writing (uvloop's
# 64 KiB high-water mark, plus the write that crossed it), plus a fixed allowance for the interpreter's own churn
# (allocator arenas, Redis read buffers). Without the cut-off each would pin all 300 x 8 KB = 2.4 MB: 120 MiB.
RSS_BOUND_MB = CHANNELS * (QUEUE_BYTES + 128 * 1024) / 2**20 + 16


def _rss_mb(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    m = re.search(r"VmRSS:\s+(\d+) kB", text)
    assert m
    return int(m.group(1)) / 1024


class StalledClient:
    """Connects, takes its greeting, then reads nothing more until `drain()`."""

    def __init__(self, port: int, channel: str) -> None:
        self.port, self.channel = port, channel
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.buf = b""

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        self.sock.setblocking(False)
        await loop.sock_connect(self.sock, ("127.0.0.1", self.port))
        await loop.sock_sendall(self.sock, f"GET /channels/{self.channel}/events HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        while b"relay.hello" not in self.buf:
            self.buf += await loop.sock_recv(self.sock, 4096)

    async def drain(self) -> tuple[list[tuple[str, int]], bool]:
        """Read what reached us before the server cut the connection: (id, i) of complete events, and whether
        the connection was indeed closed by the server."""
        loop = asyncio.get_running_loop()
        closed = False
        deadline = time.monotonic() + 15  # pings would keep an uncut stream busy for ever
        while time.monotonic() < deadline:
            try:
                chunk = await asyncio.wait_for(loop.sock_recv(self.sock, 65536), 5)
            except (ConnectionResetError, BrokenPipeError):
                closed = True
                break
            except TimeoutError:
                break
            if not chunk:
                closed = True
                break
            self.buf += chunk
        self.sock.close()
        body = self.buf.split(b"\r\n\r\n", 1)[1]
        # complete events only: the last one may have been cut mid-frame
        events = [(str(e.id), int(e.data["i"])) for e in parse_frames(dechunk(body)) if e.event == "n"]
        return events, closed


async def test_stalled_clients_are_cut_off_in_bounded_memory_and_resume_without_loss(
    redis_server: RedisServer, services: list[ServiceProcess], tmp_path: Path
) -> None:
    svc = ServiceProcess(tmp_path, {"REDIS_URL": redis_server.url, "SEND_TIMEOUT": "2", "HEARTBEAT_INTERVAL": "2",
                                    "LOG_LEVEL": "warning"}, name="slow")
    services.append(svc)
    svc.start()
    assert svc.proc is not None
    channels = [f"heavy_{i}" for i in range(CHANNELS)]
    readers = await open_streams([SSEStream(f"{svc.url}/channels/{c}/events") for c in channels for _ in range(2)])
    stalled = [StalledClient(svc.port, c) for c in channels]
    await asyncio.gather(*(s.open() for s in stalled))
    rss_start = _rss_mb(svc.proc.pid)
    peak = rss_start
    sampling = True

    async def sample() -> None:
        nonlocal peak
        while sampling:
            peak = max(peak, _rss_mb(svc.proc.pid))  # type: ignore[union-attr]
            await asyncio.sleep(0.05)

    sampler = asyncio.create_task(sample())
    pad = "x" * PAD
    ids: dict[str, list[str]] = {c: [] for c in channels}

    async def publish(k: int) -> None:
        conn = RawHTTP(svc.port)
        for i in range(MESSAGES):
            for channel in channels[k::10]:
                status, _, body = await conn.post(f"/channels/{channel}/messages",
                                                  {"data": {"i": i, "t": time.time(), "pad": pad}, "event": "n"})
                assert status == 202, body
                ids[channel].append(orjson.loads(body)["id"])
        conn.close()

    t0 = time.monotonic()
    await asyncio.gather(*(publish(k) for k in range(10)))
    published = time.monotonic() - t0
    await wait_all(readers, lambda s: len(s.events) >= MESSAGES, 60, "healthy readers got everything")
    sampling = False
    await sampler
    # healthy readers: everything, in order, on time
    latencies = []
    for r in readers:
        assert r.ids() == ids[r.channel]
        latencies += [e.at - e.data["t"] for e in r.events]
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99)]
    # stalled clients: cut off by the service (queue full or write timeout), then resume with their last id
    async with httpx.AsyncClient() as c:
        metrics = (await c.get(f"{svc.url}/metrics")).text
    cut = sum(float(m.group(1)) for m in re.finditer(
        r'^sse_streams_closed_total\{reason="(?:slow|stalled)"\} ([0-9.e+]+)$', metrics, re.M))
    drained = await asyncio.gather(*(s.drain() for s in stalled))
    before: dict[SSEStream, list[str]] = {}  # the ids a stalled client got before it was cut off
    for s, (events, closed) in zip(stalled, drained, strict=True):
        assert closed, f"{s.channel}: the stalled connection was never closed by the service"
        last = events[-1][0] if events else None
        before[SSEStream(f"{svc.url}/channels/{s.channel}/events", last_id=last)] = [i for i, _ in events]
    resumed = await open_streams(list(before))
    await wait_all(resumed, lambda s: len(before[s]) + len(s.events) >= MESSAGES, 30, "resumed")
    for stream in resumed:
        got = before[stream] + stream.ids()
        assert got == ids[stream.channel], f"{stream.channel}: {len(got)} ids, {len(set(got))} distinct"
    growth = peak - rss_start
    print(f"\nstalled clients: {CHANNELS} stalled + {len(readers)} readers, {CHANNELS * MESSAGES} x {PAD} B published "
          f"in {published:.1f}s; readers p50 {statistics.median(latencies) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms; "
          f"{int(cut)} cut off as slow; RSS {rss_start:.0f} -> peak {peak:.0f} MiB (+{growth:.1f}); "
          f"all {CHANNELS} resumed without loss")
    assert growth < RSS_BOUND_MB, f"RSS grew {growth:.1f} MiB (bound {RSS_BOUND_MB:.0f} MiB)"
    assert cut == CHANNELS, f"{cut} streams cut off as slow or stalled, expected {CHANNELS}"
    assert p99 < 1.0, f"healthy readers' p99 {p99:.3f}s"
    await asyncio.gather(*(s.close() for s in readers + resumed))
    assert os.path.exists(svc.log_path)
