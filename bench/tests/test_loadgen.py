"""The load generator's accounting, through its public CLI, against a small Nchan-like server that misbehaves
on purpose: on one channel of three (or on one publishing connection of a channel) it drops a message, delivers
one late and one twice.

What must come out: those three faults counted exactly once per subscriber of that channel and nothing on the
other two (sequence numbers are per channel), every channel with its share of the subscribers, and responses
read whether they carry a Content-Length or a chunked body; for the publisher's shapes: the pipelined one on
one keep-alive connection, the many-connection one over its connections, each from a loopback source address
of its own, a channel on one connection when there are at least as many channels as connections, and, with one
channel over many connections, sequence numbers per (channel, connection), checked exactly per connection.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAYLOAD = re.compile(rb'"s":(\d+),"r":(\d+)')
CONN = re.compile(rb'"c":(\d+)')

pytestmark = pytest.mark.timeout(120)


class FaultyNchan:
    """`POST /pub/<ch>` (raw body) and `GET /sub/<ch>` (SSE, unchunked), like Nchan, in a thread of its own.

    Messages of the measured run (any run id after the first seen, which is the warm-up's) on `bad_channel`
    (and, with `bad_conn`, only those carrying `"c":<bad_conn>`): seq 2 is held back and sent after seq 3, seq 4
    is dropped, seq 5 is sent twice. It records where publishes came from: the peer address of every publishing
    connection, and per connection the channels and `"c"` values of the measured run.
    """

    def __init__(self, bad_channel: str, bad_conn: int | None = None) -> None:
        self.bad = bad_channel
        self.bad_conn = bad_conn
        self.subs: dict[str, list[asyncio.StreamWriter]] = {}
        self.subscribed: dict[str, int] = {}  # subscriptions ever made, per channel
        self.pub_connections = 0
        self.pub_peers: set[str] = set()
        # per publishing connection (in order of its first publish): channels and "c" values it carried
        self.conn_channels: list[set[str]] = []
        self.conn_tags: list[set[int]] = []
        self.published = 0
        self.first_rid: bytes | None = None
        self.held: bytes | None = None
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> FaultyNchan:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        server.close()
        for task in asyncio.all_tasks(self._loop):
            task.cancel()
        self._loop.run_until_complete(asyncio.sleep(0.05))
        self._loop.close()

    def _fan_out(self, channel: str, body: bytes, conn: int) -> None:
        frames = [body]
        m = PAYLOAD.search(body)
        if m:
            self.first_rid = self.first_rid or m.group(2)
            if m.group(2) != self.first_rid:
                self.conn_channels[conn].add(channel)
                tag = CONN.search(body)
                if tag:
                    self.conn_tags[conn].add(int(tag.group(1)))
        tag = CONN.search(body)
        on_bad_conn = self.bad_conn is None or (tag is not None and int(tag.group(1)) == self.bad_conn)
        if m and channel == self.bad and on_bad_conn:
            seq, rid = int(m.group(1)), m.group(2)
            if rid != self.first_rid:
                if seq == 2:
                    self.held, frames = body, []
                elif seq == 3 and self.held is not None:
                    frames = [body, self.held]
                elif seq == 4:
                    frames = []
                elif seq == 5:
                    frames = [body, body]
        for w in self.subs.get(channel, []):
            for f in frames:
                w.write(b"id: 1:0\ndata: " + f + b"\n\n")

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        counted = False
        conn = -1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                method, path = head.split(b" ", 2)[:2]
                channel = path.decode().rsplit("/", 1)[1]
                if method == b"GET":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n")
                    self.subs.setdefault(channel, []).append(writer)
                    self.subscribed[channel] = self.subscribed.get(channel, 0) + 1
                    await reader.read()  # until the subscriber leaves
                    self.subs[channel].remove(writer)
                    return
                if not counted:
                    counted = True
                    conn = self.pub_connections
                    self.pub_connections += 1
                    self.pub_peers.add(writer.get_extra_info("peername")[0])
                    self.conn_channels.append(set())
                    self.conn_tags.append(set())
                length = int(re.search(rb"content-length: *(\d+)", head, re.I).group(1))  # type: ignore[union-attr]
                body = await reader.readexactly(length)
                self.published += 1
                if self.published % 2:
                    writer.write(b"HTTP/1.1 202 Accepted\r\nContent-Length: 8\r\n\r\nqueued 1")
                else:
                    writer.write(b"HTTP/1.1 202 Accepted\r\nTransfer-Encoding: chunked\r\n\r\n8\r\nqueued 1\r\n0\r\n\r\n")
                self._fan_out(channel, body, conn)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
def faulty() -> Iterator[FaultyNchan]:
    with FaultyNchan(bad_channel="room_1") as server:
        yield server


@pytest.mark.parametrize("shape", [["--pipeline", "16"], ["--pub-conns", "3"], ["--pub-conns", "2"]],
                         ids=["one-pipelined-connection", "a-connection-per-channel", "two-connections-three-channels"])
def test_accounting_per_channel_through_the_cli(faulty: FaultyNchan, shape: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.loadgen", "--target", "nchan", "--url", f"http://127.0.0.1:{faulty.port}",
         "--channel", "room", "--channels", "3", "-n", "6", "-r", "60", "-d", "1", "--settle", "1", "--procs", "1",
         "--json", *shape],
        cwd=ROOT, capture_output=True, text=True, timeout=90, check=False)
    assert proc.stdout.strip(), proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    context = json.dumps({k: v for k, v in res.items() if k != "publish"})[:2000] + proc.stderr[-2000:]
    assert proc.returncode == 1, context  # the step failed: something was lost
    # 60 messages round-robin over 3 channels: 20 each, numbered 0..19 in their channel; 2 subscribers each.
    assert (res["subscribers"], res["channels"], res["published"]) == (6, 3, 60), context
    assert res["publish"]["accepted"] == 60 and not res["publish"]["errors"], context
    assert res["expected"] == 6 * 20, context
    # The two subscribers of room_1 each: seq 4 lost, seq 2 out of order, seq 5 twice; the others intact.
    assert (res["lost"], res["out_of_order"], res["duplicates"], res["disconnects"]) == (2, 2, 2, 0), context
    assert res["deliveries"] == 120 - 2 + 2, context
    assert res["complete_subscribers"] == 4, context
    assert not res["ok"] and "1 lost" not in res["why"] and "2 lost" in res["why"], context
    # Subscribers spread evenly; every publish (warm-up markers included) on the shape's connections, each from
    # a source address of its own; a channel's messages all on one connection (c % C), numbered in the channel.
    assert faulty.subscribed == {"room_0": 2, "room_1": 2, "room_2": 2}, faulty.subscribed
    conns = 1 if shape[0] == "--pipeline" else int(shape[1])
    assert faulty.pub_connections == conns, faulty.pub_connections
    assert faulty.pub_peers == {f"127.0.0.{2 + k}" for k in range(conns)}, faulty.pub_peers
    assert sorted(map(sorted, faulty.conn_channels)) == sorted(
        sorted(f"room_{c}" for c in range(3) if c % conns == k) for k in range(conns)), faulty.conn_channels
    assert all(not tags for tags in faulty.conn_tags), faulty.conn_tags


def test_one_channel_over_many_connections_is_checked_per_connection() -> None:
    """1 channel, 10 connections, one request in flight each: message i over connection i % 10, numbered per
    connection, `"c"` in its payload. The server's faults on connection 3's messages (seq 2 late, 4 dropped, 5
    doubled) are counted exactly, once per subscriber, and nothing else is: the interleaving of the ten
    connections at the server is not a fault."""
    with FaultyNchan(bad_channel="solo", bad_conn=3) as faulty:
        proc = subprocess.run(
            [sys.executable, "-m", "bench.loadgen", "--target", "nchan", "--url", f"http://127.0.0.1:{faulty.port}",
             "--channel", "solo", "-n", "4", "-r", "200", "-d", "1", "--settle", "1", "--procs", "1",
             "--pub-conns", "10", "--pub-inflight", "1", "--json"],
            cwd=ROOT, capture_output=True, text=True, timeout=90, check=False)
    assert proc.stdout.strip(), proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    context = json.dumps({k: v for k, v in res.items() if k != "publish"})[:2000] + proc.stderr[-2000:]
    assert proc.returncode == 1, context
    assert (res["subscribers"], res["channels"], res["published"]) == (4, 1, 200), context
    assert res["publish"]["accepted"] == 200 and not res["publish"]["errors"], context
    assert (res["publish"]["connections"], res["publish"]["inflight"]) == (10, 1), context
    assert res["expected"] == 4 * 200, context
    assert (res["lost"], res["out_of_order"], res["duplicates"], res["disconnects"]) == (4, 4, 4, 0), context
    assert res["deliveries"] == 800 - 4 + 4, context
    assert res["complete_subscribers"] == 0, context  # each misses connection 3's seq 4
    # Ten connections, ten source addresses; each connection carried one "c", its own, on the one channel.
    assert faulty.pub_connections == 10, faulty.pub_connections
    assert faulty.pub_peers == {f"127.0.0.{k}" for k in range(2, 12)}, faulty.pub_peers
    assert sorted(t for tags in faulty.conn_tags for t in tags) == list(range(10)), faulty.conn_tags
    assert all(len(tags) == 1 for tags in faulty.conn_tags), faulty.conn_tags
    assert all(chs == {"solo"} for chs in faulty.conn_channels), faulty.conn_channels


def test_a_clean_server_passes(faulty: FaultyNchan) -> None:
    """The same server, with the faults on a channel nobody uses: a passing step, exit status 0."""
    faulty.bad = "nobody"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.loadgen", "--target", "nchan", "--url", f"http://127.0.0.1:{faulty.port}",
         "--channel", "room", "--channels", "4", "-n", "8", "-r", "80", "-d", "1", "--settle", "1", "--procs", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=90, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    # 80 messages, 20 per channel, 2 subscribers per channel.
    assert "N=8 in 4 channels R=80/s: 160/160 delivered" in proc.stdout, proc.stdout
    assert "lost 0, dup 0, ooo 0, disc 0" in proc.stdout, proc.stdout
