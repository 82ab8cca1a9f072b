"""The project's SSE fan-out load generator: asyncio + uvloop over raw sockets, one worker process per core.

What it measures, on one channel or on K channels (`--channels K`, e.g. chat rooms):
- N subscribers (`GET` with `Accept: text/event-stream`, HTTP/1.1) spread over P worker processes and over the
  K channels (subscriber j on channel j % K);
- a publisher that POSTs R messages/s for D seconds, message i to channel i % K (bounded: R*D messages, rounded
  up to whole rounds of K), over `--pub-conns` keep-alive connections (default 100) with `--pub-inflight`
  requests in flight on each (default 1: how real clients publish, one request at a time per connection), each
  connection bound to its own loopback source address (127.0.0.2 ...) when the target is on 127.0.0.1, so
  per-client limits see distinct clients; `--pipeline N` is the old shape, ONE connection with N requests
  HTTP/1.1-pipelined, which no real client produces. Each message's data carries its publish time and its
  sequence number, padded to ~100 bytes: `{"t":<time.time_ns()>,"s":<seq>,"r":<run id>,"p":"xx..."}`. A channel
  published over one connection (K >= connections: channel c over connection c % C) is numbered in its channel;
  one published over several (K < connections) is numbered per (channel, connection) and carries `"c":<conn>`,
  since the order the server accepts requests from different connections in is its own;
- per delivery: latency (arrival - publish time, same host clock), and per subscriber: deliveries, lost
  (sequence gaps never filled), duplicates, out-of-order arrivals, disconnects (per channel, or per channel and
  publishing connection);
- per publish: whether the publisher kept its rate, the statuses, the time to each answer (ack);
- its own CPU use (getrusage of every worker and of the coordinator, which is also the publisher), so a
  saturated generator is visible.

Frames are parsed in bulk: a socket read is cut at its last `\\n\\n`, and one compiled regex pulls the
`"t"`, `"s"`, `"r"` (and `"c"`) numbers out of every complete event; nothing else of the stream is decoded. The regex
also ignores HTTP chunk-size lines, so the same code reads uvicorn's chunked streams and Nchan's raw ones.

Targets: `--target relay` (this project: POST /channels/{ch}/messages with {"data": ...}, SSE at
/channels/{ch}/events) and `--target nchan` (POST <url>/pub/{ch} with the raw payload, SSE at <url>/sub/{ch});
`--sub-url`/`--pub-url` point it anywhere else (`{channel}` is replaced), `--header` adds e.g. auth.

    python -m bench.loadgen --target relay --url http://127.0.0.1:8000 -n 1000 -r 20 -d 10
    python -m bench.loadgen --target nchan --url http://127.0.0.1:8080 -n 5000 --find-max
    python -m bench.loadgen --target relay --url http://127.0.0.1:8000 -n 10000 --idle 30
    python -m bench.loadgen --target nchan --url http://127.0.0.1:8080 -n 5000 --channels 1000 --channel room -r 2000

Workers are `python -m bench.loadgen worker` processes driven over their stdin/stdout with JSON lines; they
inherit the CPU affinity of the process that starts them (`taskset -c 1 python -m bench.loadgen ...`).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import math
import os
import re
import resource
import ssl as ssl_module
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent

# `"t":<ns>,"s":<seq>,"r":<run>[,"c":<conn>]` as the publisher writes them (orjson keeps key order and compact
# form). `"c"` is there only when a channel is published over several connections: its sequence is then per
# (channel, connection), since the order in which the server accepts requests from different connections is the
# server's, not the generator's.
PAYLOAD_RE = re.compile(rb'"t":(\d+),"s":(\d+),"r":(\d+)(?:,"c":(\d+))?')
BUCKET_NS = 100_000  # latency histogram resolution: 0.1 ms
CAP = 100_000  # last bucket: >= 10 s
PAYLOAD_SIZE = 100


def raise_nofile() -> int:
    """Raise the soft open-files limit to the hard one (10k+ sockets); returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return soft
    return hard


def make_payload(t_ns: int, seq: int, rid: int, conn: int | None = None) -> bytes:
    """~100 bytes of JSON: publish time, sequence number, run id, the publishing connection when sequences are per
    connection, padding."""
    if conn is None:
        head = b'{"t":%d,"s":%d,"r":%d,"p":"' % (t_ns, seq, rid)
    else:
        head = b'{"t":%d,"s":%d,"r":%d,"c":%d,"p":"' % (t_ns, seq, rid, conn)
    return head + b"x" * max(1, PAYLOAD_SIZE - len(head) - 2) + b'"}'


# ---------------------------------------------------------------------------------------------------------
# Target description
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Endpoint:
    scheme: str
    host: str
    port: int
    path: str

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        u = urlsplit(url)
        if u.scheme not in ("http", "https"):
            raise ValueError(f"only http:// and https:// URLs are supported, not {url!r}")
        port = u.port or (443 if u.scheme == "https" else 80)
        path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        return cls(u.scheme, u.hostname or "127.0.0.1", port, path)

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        return self.host if self.port == default else f"{self.host}:{self.port}"


@dataclass
class Target:
    """Where to subscribe and publish; `pub_format` is `relay` ({"data": payload}) or `raw` (payload as body)."""

    name: str
    sub_url: str  # with `{channel}`
    pub_url: str
    pub_format: str = "relay"
    headers: list[str] = field(default_factory=list)

    @classmethod
    def relay(cls, base: str, name: str = "relay", headers: list[str] | None = None) -> Target:
        base = base.rstrip("/")
        return cls(name, base + "/channels/{channel}/events", base + "/channels/{channel}/messages", "relay",
                   headers or [])

    @classmethod
    def nchan(cls, base: str, name: str = "nchan", headers: list[str] | None = None) -> Target:
        base = base.rstrip("/")
        return cls(name, base + "/sub/{channel}", base + "/pub/{channel}", "raw", headers or [])

    def sub(self, channel: str) -> Endpoint:
        return Endpoint.parse(self.sub_url.replace("{channel}", channel))

    def pub(self, channel: str) -> Endpoint:
        return Endpoint.parse(self.pub_url.replace("{channel}", channel))


def _client_ssl(scheme: str) -> ssl_module.SSLContext | None:
    if scheme != "https":
        return None
    ctx = ssl_module.create_default_context()
    if os.environ.get("LOADGEN_INSECURE"):
        ctx.check_hostname = False
        ctx.verify_mode = ssl_module.CERT_NONE
    return ctx


# ---------------------------------------------------------------------------------------------------------
# Worker process: the subscribers
# ---------------------------------------------------------------------------------------------------------


class _Sub(asyncio.Protocol):
    """One SSE subscriber. All per-delivery work is in `data_received`, on bytes, in bulk."""

    __slots__ = (
        "ahead",
        "buf",
        "ch",
        "closed",
        "count",
        "done",
        "dups",
        "goal",
        "greet",
        "head",
        "measured",
        "missing",
        "nxt",
        "nxtc",
        "ooo",
        "opened",
        "status",
        "transport",
        "w",
        "warm",
    )

    def __init__(self, w: _Worker, ch: int = 0, greet: re.Pattern[bytes] | None = None) -> None:
        self.w = w
        self.ch = ch  # index of its channel; sequence numbers are per channel (or per channel and connection)
        self.goal = 0  # messages its channel gets in the measured step
        # `opened` waits for this in the stream's first bytes (the relay's `relay.hello` with its position), not
        # only for the response head: "open" is when a client could resume from where it joined.
        self.greet = greet
        self.transport: asyncio.Transport | None = None
        self.head: bytes | None = b""
        self.buf = b""
        self.nxt = 0  # next sequence number expected (one publishing connection per channel)
        # Next expected per publishing connection (`"c"` in the payload, several connections per channel), and
        # how far all of them are together (the sum of their `nxt`s), so "done" stays one comparison.
        self.nxtc: dict[bytes, int] = {}
        self.ahead = 0
        self.missing: set[Any] | None = None  # seq, or (conn, seq) when sequences are per connection
        self.count = 0
        self.dups = 0
        self.ooo = 0
        self.warm = 0
        self.done = False
        self.opened: asyncio.Future[int] = w.loop.create_future()
        self.closed = False
        self.measured = False
        self.status = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        w = self.w
        w.open_subs.discard(self)
        if not self.opened.done():
            self.opened.set_result(-1)
        if self.measured and w.measuring:
            w.disconnects += 1
        if w.all_closed is not None and not w.open_subs:
            w.all_closed.set()

    def data_received(self, data: bytes) -> None:
        if self.head is not None:
            head = self.head + data
            end = head.find(b"\r\n\r\n")
            if end < 0:
                self.head = head if len(head) < 65536 else b""
                return
            self.head = None
            try:
                self.status = int(head[9:12])
            except ValueError:
                self.status = 0
            if self.status != 200:
                if not self.opened.done():
                    self.opened.set_result(self.status)
                self.w.errors[f"HTTP {self.status}"] = self.w.errors.get(f"HTTP {self.status}", 0) + 1
                if self.transport is not None:
                    self.transport.close()
                return
            data = head[end + 4:]
            if self.greet is None and not self.opened.done():
                self.opened.set_result(self.status)
            if not data:
                return
        if self.greet is not None and not self.opened.done():
            if self.greet.search(self.buf + data if self.buf else data) is not None:
                self.opened.set_result(self.status)
        buf = self.buf + data if self.buf else data
        cut = buf.rfind(b"\n\n")
        if cut < 0:
            self.buf = buf if len(buf) < 1 << 20 else b""
            return
        self.buf = buf[cut + 2:]
        w = self.w
        w.last_rx = now = time.time_ns()
        rid = w.rid
        hist = w.hist
        for t, s, r, c in PAYLOAD_RE.findall(buf, 0, cut):
            if r != rid:
                if r == w.warm_rid and self.warm != w.warm_n:
                    self.warm = w.warm_n
                    w.warm_seen += 1
                    if w.warm_seen >= w.warm_goal and w.warm_evt is not None:
                        w.warm_evt.set()
                continue
            seq = int(s)
            if c:  # sequence per (channel, publishing connection)
                nxtc = self.nxtc
                n = nxtc.get(c, 0)
                if seq == n:
                    nxtc[c] = n + 1
                    self.ahead += 1
                elif seq > n:
                    if self.missing is None:
                        self.missing = set()
                    self.missing.update((c, k) for k in range(n, min(seq, n + 100_000)))
                    nxtc[c] = seq + 1
                    self.ahead += seq + 1 - n
                elif self.missing is not None and (c, seq) in self.missing:
                    self.missing.discard((c, seq))
                    self.ooo += 1
                else:
                    self.dups += 1
            else:
                n = self.nxt
                if seq == n:
                    self.nxt = n + 1
                elif seq > n:
                    if self.missing is None:
                        self.missing = set()
                    self.missing.update(range(n, min(seq, n + 100_000)))
                    self.nxt = seq + 1
                elif self.missing is not None and seq in self.missing:
                    self.missing.discard(seq)
                    self.ooo += 1
                else:
                    self.dups += 1
            self.count += 1
            b = (now - int(t)) // BUCKET_NS
            hist[b if b < CAP else CAP] += 1  # noqa: FURB136 - per delivery: no call
        if not self.done and self.measured and self.nxt + self.ahead >= self.goal and not self.missing:
            self.done = True
            w.done += 1
            if w.done >= w.done_goal and w.done_evt is not None:
                w.done_evt.set()


class _Worker:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.subs: list[_Sub] = []
        self.open_subs: set[_Sub] = set()
        self.errors: dict[str, int] = {}
        self.rid: bytes | None = None
        self.warm_rid: bytes | None = None
        self.warm_n = 0
        self.warm_seen = 0
        self.warm_goal = 0
        self.warm_evt: asyncio.Event | None = None
        self.hist = [0] * (CAP + 1)
        self.done = 0
        self.done_goal = 0
        self.done_evt: asyncio.Event | None = None
        self.measuring = False
        self.disconnects = 0
        self.last_rx = 0
        self.all_closed: asyncio.Event | None = None
        self._ru0: resource.struct_rusage | None = None
        self._t0 = 0.0

    # -- commands --------------------------------------------------------------------------------------------

    async def connect(self, assign: list[list[Any]], headers: list[str], timeout: float,
                      concurrency: int, greet: str | None = None) -> dict[str, Any]:
        """Have `n` open subscribers on each `[channel index, url, n]` of `assign` (reopens what was closed).

        A subscriber is open once its 200 head arrived, or with `greet` (a regex) once its stream's first bytes
        match it. Reports the seconds from the first connect to the last open, and how many were opened."""
        extra = "".join(f"{h}\r\n" for h in headers)
        greet_re = re.compile(greet.encode()) if greet else None
        t_start = self.loop.time()
        t_last = t_start
        self.subs = [s for s in self.subs if not s.closed]
        have: dict[int, int] = {}
        for s in self.subs:
            have[s.ch] = have.get(s.ch, 0) + 1
        todo: list[tuple[int, Endpoint, bytes]] = []
        for ch, url, n in assign:
            ep = Endpoint.parse(url)
            request = (f"GET {ep.path} HTTP/1.1\r\nHost: {ep.host_header}\r\nAccept: text/event-stream\r\n"
                       f"Cache-Control: no-cache\r\n{extra}\r\n").encode()
            todo += [(int(ch), ep, request)] * max(0, int(n) - have.get(int(ch), 0))
        sem = asyncio.Semaphore(concurrency)
        deadline = self.loop.time() + timeout

        async def one(ch: int, ep: Endpoint, request: bytes) -> bool:
            nonlocal t_last
            async with sem:
                sub = _Sub(self, ch, greet_re)
                left = deadline - self.loop.time()
                if left <= 0:
                    self._error("timeout")
                    return False
                try:
                    await asyncio.wait_for(
                        self.loop.create_connection(lambda: sub, ep.host, ep.port, ssl=_client_ssl(ep.scheme)), left)
                except (TimeoutError, OSError) as exc:
                    self._error(type(exc).__name__ + (f" {exc.errno}" if isinstance(exc, OSError) else ""))
                    return False
                assert sub.transport is not None
                if sub.closed or sub.transport.is_closing():  # closed by the server at once (a connection limit)
                    self._error("closed before request")
                    return False
                sub.transport.write(request)
                self.subs.append(sub)
                self.open_subs.add(sub)
                try:
                    status = await asyncio.wait_for(asyncio.shield(sub.opened), max(0.01, deadline - self.loop.time()))
                except TimeoutError:
                    self._error("no response")
                    sub.transport.close()
                    return False
                if status != 200:
                    if status == -1:
                        self._error("closed before response")
                    return False
                t_last = self.loop.time()
                return True

        results = await asyncio.gather(*(one(*t) for t in todo))
        failed = results.count(False)
        self.subs = [s for s in self.subs if not s.closed and s.status == 200]
        return {"open": len(self.subs), "failed": failed, "errors": dict(self.errors), "opened": len(todo) - failed,
                "open_s": t_last - t_start}

    def _error(self, key: str) -> None:
        self.errors[key] = self.errors.get(key, 0) + 1

    def warm_start(self, rid: int) -> dict[str, Any]:
        """From now on, count the subscribers that receive a marker of run `rid` (their subscription is live)."""
        self.warm_rid = str(rid).encode()
        self.warm_n += 1
        self.warm_seen = 0
        self.warm_goal = sum(1 for s in self.subs if not s.closed)
        self.warm_evt = asyncio.Event()
        return {"of": self.warm_goal}

    async def warm_wait(self, timeout: float) -> dict[str, Any]:
        """Wait (bounded) until every subscriber has a marker; report the channels whose subscribers have none."""
        if self.warm_evt is not None and self.warm_seen < self.warm_goal:
            try:
                await asyncio.wait_for(self.warm_evt.wait(), timeout)
            except TimeoutError:
                pass
        live = [s for s in self.subs if not s.closed]
        cold = sorted({s.ch for s in live if s.warm != self.warm_n})
        return {"warm": len(live) - sum(1 for s in live if s.warm != self.warm_n), "of": len(live), "cold": cold}

    def warm_end(self) -> dict[str, Any]:
        self.warm_evt = None
        self.warm_rid = None
        return {}

    @staticmethod
    def _goal(ch: int, sent: int, channels: int) -> int:
        """Messages channel `ch` gets when `sent` are published round-robin over `channels` (i -> i % channels)."""
        return sent // channels + (1 if ch < sent % channels else 0)

    @staticmethod
    def _goals_per_conn(sent: int, channels: int, conns: int) -> dict[tuple[int, bytes], int]:
        """Messages each (channel, connection) gets when message i goes to channel i % K over connection i % C
        (the publisher's rule when K < C): i and i + lcm(K, C) share both, so each pair has one residue."""
        period = math.lcm(channels, conns)
        full, rest = divmod(sent, period)
        return {(r % channels, str(r % conns).encode()): full + (1 if r < rest else 0) for r in range(period)}

    def measure(self, rid: int, goal: int, channels: int = 1, conns: int = 0) -> dict[str, Any]:
        self.rid = str(rid).encode()
        self.hist = [0] * (CAP + 1)
        self.done = 0
        self.disconnects = 0
        self.done_evt = asyncio.Event()
        live = [s for s in self.subs if not s.closed]
        self.done_goal = len(live)
        for s in self.subs:
            s.nxt = s.ahead = 0
            s.nxtc = {}
            s.missing = None
            s.count = s.dups = s.ooo = 0
            s.done = False
            s.measured = not s.closed
            s.goal = self._goal(s.ch, goal, channels)
        self.measuring = True
        self._ru0 = resource.getrusage(resource.RUSAGE_SELF)
        self._t0 = time.monotonic()
        return {"subs": len(live)}

    async def finish(self, goal: int, settle: float, channels: int = 1, conns: int = 0) -> dict[str, Any]:
        """Wait (bounded) until every subscriber has everything its channel got of the `goal` published, then
        report. `conns` > 0: sequences were per (channel, connection) over that many connections."""
        for s in self.subs:
            s.goal = self._goal(s.ch, goal, channels)
            if s.measured and not s.done and s.nxt + s.ahead >= s.goal and not s.missing:
                s.done = True
                self.done += 1
        if self.done < self.done_goal and self.done_evt is not None:
            try:
                await asyncio.wait_for(self.done_evt.wait(), settle)
            except TimeoutError:
                pass
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        wall = time.monotonic() - self._t0
        self.measuring = False
        self.rid = None
        assert self._ru0 is not None
        cpu = (ru1.ru_utime - self._ru0.ru_utime) + (ru1.ru_stime - self._ru0.ru_stime)
        lost = dups = ooo = count = complete = expected = 0
        per_conn = self._goals_per_conn(goal, channels, conns) if conns else {}
        for s in self.subs:
            if not s.measured:
                continue
            count += s.count
            dups += s.dups
            ooo += s.ooo
            lost += len(s.missing) if s.missing else 0
            if conns:  # what never came, per connection: past the last sequence number seen on it
                lost += sum(max(0, n - s.nxtc.get(c, 0)) for (ch, c), n in per_conn.items() if ch == s.ch)
            else:
                lost += max(0, s.goal - s.nxt)
            complete += s.done
            expected += s.goal
        hist = {i: c for i, c in enumerate(self.hist) if c}
        return {"subs": self.done_goal, "complete": complete, "deliveries": count, "expected": expected, "lost": lost,
                "duplicates": dups, "out_of_order": ooo, "disconnects": self.disconnects, "cpu_s": cpu, "wall_s": wall,
                "hist": hist}

    async def close(self, timeout: float) -> dict[str, Any]:
        self.all_closed = asyncio.Event()
        n = 0
        for s in self.subs:
            if not s.closed and s.transport is not None:
                s.transport.close()
                n += 1
        if self.open_subs:
            try:
                await asyncio.wait_for(self.all_closed.wait(), timeout)
            except TimeoutError:
                pass
        self.all_closed = None
        self.subs = []
        return {"closed": n, "still_open": len(self.open_subs)}

    async def quiet(self, idle: float, timeout: float) -> dict[str, Any]:
        """Wait until nothing has arrived for `idle` seconds (a backlog of an overloaded step drained)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            since = (time.time_ns() - self.last_rx) / 1e9
            if since >= idle:
                return {"quiet": True}
            await asyncio.sleep(min(idle - since + 0.01, 0.2))
        return {"quiet": False}


async def _worker_main() -> None:
    raise_nofile()
    loop = asyncio.get_running_loop()
    w = _Worker(loop)
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = sys.stdout.buffer

    def reply(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj).encode() + b"\n")
        out.flush()

    while True:
        line = await reader.readline()
        if not line:
            break
        cmd = json.loads(line)
        op = cmd.pop("cmd")
        try:
            if op == "connect":
                reply(await w.connect(**cmd))
            elif op == "warm_start":
                reply(w.warm_start(**cmd))
            elif op == "warm_wait":
                reply(await w.warm_wait(**cmd))
            elif op == "warm_end":
                reply(w.warm_end())
            elif op == "measure":
                reply(w.measure(**cmd))
            elif op == "finish":
                reply(await w.finish(**cmd))
            elif op == "quiet":
                reply(await w.quiet(**cmd))
            elif op == "close":
                reply(await w.close(**cmd))
            elif op == "exit":
                await w.close(2.0)
                reply({"bye": True})
                break
            else:
                reply({"error": f"unknown command {op}"})
        except Exception as exc:  # noqa: BLE001 - reported to the coordinator, which fails the run
            reply({"error": f"{type(exc).__name__}: {exc}"})


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run_async(coro: Any) -> Any:
    with asyncio.Runner(loop_factory=_new_loop) as runner:
        return runner.run(coro)


# ---------------------------------------------------------------------------------------------------------
# Coordinator: workers, publisher, aggregation
# ---------------------------------------------------------------------------------------------------------


class _WorkerHandle:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lock = asyncio.Lock()

    async def call(self, wait: float, /, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        async with self.lock:
            self.proc.stdin.write(json.dumps(cmd).encode() + b"\n")
            await self.proc.stdin.drain()
            line = await asyncio.wait_for(self.proc.stdout.readline(), wait)
        if not line:
            raise RuntimeError(f"load generator worker exited (code {self.proc.returncode})")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"load generator worker failed: {reply['error']}")
        return reply


_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.I)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding:[ \t]*chunked", re.I)


def _chunked_end(buf: bytes, pos: int) -> int:
    """Index just past a chunked body starting at `pos` (no trailers), or -1 while it is incomplete."""
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return -1
        size = int(buf[pos:eol].split(b";")[0].strip() or b"0", 16)
        pos = eol + 2 + size + 2
        if pos > len(buf):
            return -1
        if size == 0:
            return pos


def _responses(buf: bytes) -> tuple[list[int], bytes]:
    """The statuses of the complete HTTP/1.1 responses at the start of `buf`, and what is left of it; bodies are
    skipped by Content-Length or chunked framing, whichever the server used."""
    pos = 0
    statuses: list[int] = []
    while True:
        end = buf.find(b"\r\n\r\n", pos)
        if end < 0:
            break
        head = buf[pos:end]
        m = _CONTENT_LENGTH.search(head)
        if m:
            nxt = end + 4 + int(m.group(1))
            if nxt > len(buf):
                break
        elif _CHUNKED.search(head):
            nxt = _chunked_end(buf, end + 4)
            if nxt < 0:
                break
        else:
            nxt = end + 4
        try:
            statuses.append(int(head[9:12]))
        except ValueError:
            statuses.append(0)
        pos = nxt
    return statuses, buf[pos:]


def loopback_sources(host: str, n: int) -> list[str]:
    """`n` source addresses 127.0.0.2 ... 127.0.0.<n+1> when the target is on IPv4 loopback (Linux routes all of
    127/8 to `lo`), so per-address limits and a per-client rate limiter see `n` clients; none otherwise."""
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return []
    if n <= 0 or addr.version != 4 or not addr.is_loopback:
        return []
    return [f"127.0.0.{2 + k}" for k in range(min(n, 253))]


class _PubConn(asyncio.Protocol):
    """One keep-alive connection of a `_Publisher`: its queue of messages due, its requests in flight (at most
    the publisher's `inflight`), their answers. It sends its next due messages as soon as an answer frees a
    slot, from `data_received`, so a free connection never waits for the publisher's timer."""

    __slots__ = ("buf", "idx", "lost", "pending", "pub", "sent_at", "source", "transport", "used")

    def __init__(self, pub: _Publisher, idx: int, source: str | None) -> None:
        self.pub = pub
        self.idx = idx
        self.source = source
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.sent_at: deque[float] = deque()  # time.monotonic() each request in flight was written
        self.pending: deque[int] = deque()  # message numbers due on this connection, not yet written
        self.lost: str | None = None
        self.used = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.lost = f"connection closed ({type(exc).__name__}: {exc})" if exc else "connection closed by the server"
        pub = self.pub
        if self.idx < len(pub.conns) and pub.conns[self.idx] is self and pub.broken is None:
            pub.broken = self.lost
        pub.wake()

    def data_received(self, data: bytes) -> None:
        statuses, self.buf = _responses(self.buf + data if self.buf else data)
        if not statuses:
            return
        now = time.monotonic()
        self.used = now
        pub = self.pub
        sent_at = self.sent_at
        for st in statuses:
            pub.statuses.append(st)
            pub.acks.append(now - (sent_at.popleft() if sent_at else now))
        if self.pending:
            self.flush()
        if len(pub.statuses) >= pub.target or len(pub.statuses) >= pub.written:  # a no-op unless it waits
            pub.wake()

    def flush(self) -> None:
        """Write as many due messages as the window has room for, in one write."""
        tr = self.transport
        pub = self.pub
        k = min(len(self.pending), pub.inflight - len(self.sent_at))
        if k <= 0 or tr is None or tr.is_closing():
            return
        now = time.monotonic()
        t_ns = time.time_ns()
        batch = [self.pending.popleft() for _ in range(k)]
        make = pub.make
        tr.write(b"".join([make(j, t_ns) for j in batch]))
        self.sent_at.extend([now] * k)
        self.used = now
        pub.written += k
        pub.first_ns = pub.first_ns or t_ns
        pub.last_ns = t_ns
        if pub.rate:
            t0, rate = pub.t0, pub.rate
            pub.lags.extend([now - t0 - j / rate for j in batch])

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.transport = None
        self.buf = b""
        self.sent_at.clear()
        self.pending.clear()


class _Publisher:
    """POSTs over C keep-alive connections, at most `inflight` requests in flight on each: C = 100 and 1 in flight
    is how a pool of real clients (browsers, httpx, requests, aiohttp, nginx upstreams) publishes; C = 1 with 16 in
    flight is the HTTP/1.1-pipelined shape no real client has, kept as a secondary scenario.

    Each connection is bound to a source address of its own on loopback (127.0.0.2 ...), so a per-address limit
    or rate limiter sees distinct clients. Message i goes to channel i % K and is due at t0 + i/R; it is written
    on its connection as soon as that connection has a free slot, so a connection still waiting for an answer
    delays it, and that lag counts against "the publisher kept its rate", as it would for a real pool.

    Order stays exact: with K >= C, channel c is always published over connection c % C, numbered i // K in its
    channel (rooms: 1,000 rooms over 100 connections); with K < C (the one-channel publish path), message i goes
    over connection i % C and is numbered per (channel, connection), i // lcm(K, C), with `"c"` in its payload:
    the order in which the server accepts requests from different connections is its own, and is not checked.

    Light on purpose (it shares the generator's core): protocols, not streams; one timer for pacing (a sleep of
    at least 1 ms, uvloop's resolution), one write per connection per wake-up, answers parsed in bulk.
    """

    def __init__(self, target: Target, channels: list[str], conns: int = 100, inflight: int = 1,
                 sources: int = 100) -> None:
        eps = [target.pub(c) for c in channels]
        self.ep = eps[0]
        if any((e.scheme, e.host, e.port) != (self.ep.scheme, self.ep.host, self.ep.port) for e in eps):
            raise ValueError("all channels must be published to the same host")
        self.raw = target.pub_format == "raw"
        self.k = len(eps)
        self.c = max(1, conns)
        self.inflight = max(1, inflight)
        self.sources = loopback_sources(self.ep.host, min(sources, self.c))  # the addresses in use
        # Sequences per (channel, connection) only when a channel has several connections.
        self.per_conn = self.k < self.c
        self.period = math.lcm(self.k, self.c)
        extra = "".join(f"{h}\r\n" for h in target.headers)
        self.heads = [(f"POST {e.path} HTTP/1.1\r\nHost: {e.host_header}\r\n"
                       f"Content-Type: application/json\r\n{extra}Content-Length: ").encode() for e in eps]
        self.conns: list[_PubConn] = []
        self.statuses: list[int] = []
        self.acks: list[float] = []  # seconds from writing a request to reading its answer
        self.lags: list[float] = []  # seconds each message was written after it was due
        self.make: Callable[[int, int], bytes] = lambda j, t_ns: b""
        self.target = 0  # answers awaited
        self.written = 0
        self.first_ns = self.last_ns = 0
        self.t0 = 0.0
        self.rate: float | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.broken: str | None = None  # why a connection was lost while publishing

    @property
    def shape(self) -> str:
        """How the table and the log name this publisher."""
        if self.c == 1:
            return f"1 connection × {self.inflight} pipelined"
        return f"{self.c} conns × {self.inflight} in flight" + (f", {len(self.sources)} source addresses"
                                                                  if self.sources else "")

    def conn_of(self, i: int) -> int:
        """The connection message i is published over (see the class docstring)."""
        return i % self.c if self.per_conn else (i % self.k) % self.c

    def seq_of(self, i: int) -> int:
        """Message i's sequence number: in its channel, or in its (channel, connection) when `per_conn`."""
        return i // self.period if self.per_conn else i // self.k

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    # -- connections ------------------------------------------------------------------------------------------

    async def open(self) -> None:
        """Have C open connections. Servers close idle keep-alive connections (uvicorn's default after 5 s): one
        idle for over 2 s, or closed, or with answers still owed from a step that ended, is opened anew."""
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        while len(self.conns) < self.c:
            k = len(self.conns)
            self.conns.append(_PubConn(self, k, self.sources[k % len(self.sources)] if self.sources else None))
        stale = [c for c in self.conns if c.transport is None or c.transport.is_closing() or c.sent_at
                 or c.pending or now - c.used > 2.0]

        async def reopen(old: _PubConn) -> None:
            old.close()
            conn = _PubConn(self, old.idx, old.source)
            local = (conn.source, 0) if conn.source else None
            await asyncio.wait_for(loop.create_connection(lambda: conn, self.ep.host, self.ep.port,
                                                          ssl=_client_ssl(self.ep.scheme), local_addr=local), 10)
            conn.used = time.monotonic()
            self.conns[old.idx] = conn

        await asyncio.gather(*(reopen(c) for c in stale))

    async def close(self) -> None:
        for c in self.conns:
            c.close()
        self.conns = []

    def _request(self, ch: int, payload: bytes) -> bytes:
        body = payload if self.raw else b'{"data":' + payload + b"}"
        return self.heads[ch] + str(len(body)).encode() + b"\r\n\r\n" + body

    async def _wait(self, deadline: float) -> bool:
        """Until an answer or a lost connection wakes it; False once past `deadline` (time.monotonic()). No
        `wait_for` (a timer and a callback per wait): `_pump` keeps one timer for its deadline."""
        if time.monotonic() >= deadline:
            return False
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None
        return time.monotonic() < deadline

    async def _pump(self, count: int, conn_of: Callable[[int], int], make: Callable[[int, int], bytes],
                    rate: float | None, timeout: float) -> dict[str, Any]:
        """Publish messages 0..count-1 (`make(i, time_ns)`) over `conn_of(i)`, message i due at t0 + i/rate (all at
        once without a rate), then wait for every answer. Bounded by `timeout` (+5 s for the last answers)."""
        await self.open()
        clock = time.monotonic  # not loop.time(): uvloop's is in whole milliseconds
        loop = asyncio.get_running_loop()
        self.statuses, self.acks, self.lags = [], [], []
        self.make, self.rate = make, rate
        self.written = self.first_ns = self.last_ns = 0
        self.target = count
        self.broken = None
        errors: list[str] = []
        conns = self.conns
        self.t0 = t0 = clock()
        deadline = t0 + timeout
        alarm = loop.call_later(timeout, self.wake)  # ends a wait that is current then
        i = 0
        try:
            while i < count:
                if self.broken is not None:
                    errors.append(f"publisher stopped: {self.broken}")
                    break
                now = clock()
                if now >= deadline:
                    errors.append("publisher stopped: time limit")
                    break
                due = count if rate is None else min(count, int((now - t0) * rate) + 1)
                if due > i:
                    touched: dict[int, _PubConn] = {}
                    for j in range(i, due):
                        c = conns[conn_of(j)]
                        c.pending.append(j)
                        touched[c.idx] = c
                    i = due
                    for c in touched.values():
                        c.flush()
                else:
                    assert rate is not None
                    await asyncio.sleep(max(0.001, t0 + i / rate - now))
        finally:
            alarm.cancel()
        # The last answers (and the messages still queued behind them), bounded.
        alarm = loop.call_later(max(0.0, deadline + 5 - clock()), self.wake)
        try:
            while len(self.statuses) < i and any(c.transport is not None and (c.pending or c.sent_at)
                                                 for c in conns):
                if not await self._wait(deadline + 5):
                    break
        finally:
            alarm.cancel()
        lost = sorted({c.lost for c in conns if c.lost})
        if self.written < i:
            errors.append(f"{i - self.written} messages never written" + (f" ({lost[0]})" if lost else ""))
        if len(self.statuses) < self.written:
            errors.append(f"{self.written - len(self.statuses)} publish responses missing" +
                          (f" ({lost[0]})" if lost else ""))
        if lost:
            errors.append(f"{len(lost)} kinds of lost connection: {lost[:2]}")
        if errors:
            await self.close()
        span = (self.last_ns - self.first_ns) / 1e9 + (1 / rate if rate else 0.0)
        bad = [s for s in self.statuses if s not in (200, 201, 202)]
        lags = sorted(self.lags)
        acks = sorted(self.acks)
        return {
            "sent": i, "written": self.written, "accepted": len(self.statuses) - len(bad), "rejected": len(bad),
            "statuses": {str(s): bad.count(s) for s in set(bad)}, "errors": errors,
            "connections": self.c, "inflight": self.inflight, "sources": len(self.sources),
            "span_s": span, "achieved_rate": self.written / span if span > 0 else 0.0,
            "lag_p99_ms": lags[int(0.99 * (len(lags) - 1))] * 1000 if lags else 0.0,
            "lag_max_ms": lags[-1] * 1000 if lags else 0.0,
            "ack_p50_ms": acks[len(acks) // 2] * 1000 if acks else float("nan"),
            "ack_p99_ms": acks[int(0.99 * (len(acks) - 1))] * 1000 if acks else float("nan"),
        }

    async def send(self, items: list[tuple[int, bytes]], timeout: float = 10.0) -> list[int]:
        """Publish a few (channel index, payload) now (warm-up markers: not order-checked), each over its
        channel's connection; returns their statuses."""
        res = await self._pump(len(items), lambda j: items[j][0] % self.c, lambda j, _t: self._request(*items[j]),
                               None, timeout)
        if res["errors"]:
            raise OSError("; ".join(res["errors"]))
        return list(self.statuses)

    async def run(self, rid: int, rate: float, count: int, timeout: float) -> dict[str, Any]:
        """Publish `count` messages at `rate`/s round-robin over the channels, bounded by `timeout` overall."""
        k = self.k
        seq_of = self.seq_of
        if self.per_conn:
            c = self.c

            def make(i: int, t_ns: int) -> bytes:
                return self._request(i % k, make_payload(t_ns, seq_of(i), rid, i % c))
        else:
            def make(i: int, t_ns: int) -> bytes:
                return self._request(i % k, make_payload(t_ns, seq_of(i), rid))
        return await self._pump(count, self.conn_of, make, rate, timeout)


def percentiles(hist: dict[int, int], qs: tuple[float, ...] = (0.5, 0.9, 0.99, 0.999)) -> dict[str, float]:
    total = sum(hist.values())
    out: dict[str, float] = {}
    if not total:
        return {f"p{q * 100:g}": float("nan") for q in qs} | {"max": float("nan")}
    keys = sorted(hist)
    for q in qs:
        goal = q * total
        acc = 0
        for k in keys:
            acc += hist[k]
            if acc >= goal:
                out[f"p{q * 100:g}"] = (k + 0.5) * BUCKET_NS / 1e6 if k < CAP else float("inf")
                break
    out["max"] = (keys[-1] + 1) * BUCKET_NS / 1e6 if keys[-1] < CAP else float("inf")
    return out


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def step_limit(step: dict[str, Any]) -> str:
    """What a failed step ran into, the likeliest explanation first.

    Lost, doubled or reordered deliveries are the server's, whatever else happened. Then the generator's own
    CPU (a worker or the coordinator, which publishes, near a full core, or together near their cores), then the
    server process's CPU, then its core full (server + Redis + anything else there), then the generator's core
    full of other processes (a shared machine), then publishes answered slower than the rate, then latency."""
    gen, cpu = step["generator_cpu_pct"], step.get("cpu_pct", {})
    if step["lost"] or step["duplicates"] or step["out_of_order"] or step["disconnects"]:
        return "deliveries not intact"
    workers = gen.get("workers") or [gen["max_worker"]]
    if gen["max_worker"] >= 90 or gen["coordinator"] >= 90 or sum(workers) + gen["coordinator"] >= 90 * len(workers):
        return "generator"
    if (cpu.get("server") or 0) >= 90:
        return "server cpu"
    if (cpu.get("server_core_busy") or 0) >= 95:
        return "server core full"
    if (cpu.get("generator_core_busy") or 0) >= 95:
        return "generator core busy with other processes"
    if step["publish"]["achieved_rate"] < 0.95 * step["rate"] or step["publish"]["errors"] or step["publish"]["rejected"]:
        return "publish answers"
    return "latency"


def ramp_limit(steps: list[dict[str, Any]]) -> str | None:
    """What ended a ramp search: the lowest rate whose last step failed (a step that failed only on timing is
    run again; the retry decides), read from that step. None: every rate tried passed."""
    last = {s["rate"]: s for s in steps if "latency_ms" in s}
    failed = [r for r, s in last.items() if not s["ok"]]
    return step_limit(last[min(failed)]) if failed else None


class LoadGen:
    """Drive P worker processes and one publisher against one target, on one channel or on many.

    With several channels (`channel` a list), subscriber j listens on channel j % K and message i is published
    to channel i % K as that channel's message number i // K: every channel is a stream of its own, checked
    for loss, duplicates and order on its own.
    """

    def __init__(self, target: Target, channel: str | list[str], procs: int | None = None,
                 worker_prefix: list[str] | None = None, pub_conns: int = 100, pub_inflight: int = 1,
                 pub_sources: int = 100, log: Callable[[str], None] | None = None,
                 p99_limit_ms: float = 100.0, probes: dict[str, Callable[[], float]] | None = None) -> None:
        self.target = target
        # name -> cumulative CPU seconds (the server process, a core's busy time...): reported as % per step.
        self.probes = probes or {}
        self.channels = [channel] if isinstance(channel, str) else list(channel)
        if not self.channels:
            raise ValueError("at least one channel")
        self.channel = self.channels[0]
        self.procs = procs or len(os.sched_getaffinity(0))
        self.worker_prefix = worker_prefix or []
        self.p99_limit_ms = p99_limit_ms
        self.workers: list[_WorkerHandle] = []
        self.publisher = _Publisher(target, self.channels, pub_conns, pub_inflight, pub_sources)
        self.log = log or (lambda msg: None)
        self._rid = int(time.time() * 1000) % 1_000_000_000 * 10
        self.subscribers = 0

    def _next_rid(self) -> int:
        self._rid += 1
        return self._rid

    async def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        for _ in range(self.procs):
            proc = await asyncio.create_subprocess_exec(
                *self.worker_prefix, sys.executable, "-m", "bench.loadgen", "worker",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env, cwd=str(ROOT),
                limit=1 << 26,
            )
            self.workers.append(_WorkerHandle(proc))

    async def stop(self) -> None:
        await self.publisher.close()
        for w in self.workers:
            try:
                await w.call(10, cmd="exit")
            except (TimeoutError, RuntimeError, OSError, ConnectionError):
                pass
            if w.proc.returncode is None:
                try:
                    await asyncio.wait_for(w.proc.wait(), 5)
                except TimeoutError:
                    w.proc.kill()
                    await w.proc.wait()
        self.workers = []

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _all(self, wait: float, /, **cmd: Any) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(w.call(wait, **cmd) for w in self.workers)))

    async def _each(self, wait: float, per: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(w.call(wait, **c) for w, c in zip(self.workers, per))))

    async def connect(self, n: int, timeout: float = 60.0, concurrency: int = 256,
                      greet: str | None = None) -> dict[str, Any]:
        """Have exactly `n` open subscribers, subscriber j on channel j % K, in worker j % P (reopens what the
        server closed), at most `concurrency` being opened at once; a stream is open once its head arrived, or
        with `greet` (a regex) once its first bytes match it. Returns counts, errors, and `open_s`: the seconds
        from the first connect to the last stream open (the slowest worker's)."""
        k = len(self.channels)
        per: list[dict[int, int]] = [{} for _ in range(self.procs)]
        for j in range(n):
            d = per[j % self.procs]
            d[j % k] = d.get(j % k, 0) + 1
        t0 = time.monotonic()
        replies = await self._each(timeout + 10, [
            {"cmd": "connect", "headers": self.target.headers, "timeout": timeout,
             "concurrency": max(1, concurrency // self.procs), "greet": greet,
             "assign": [[c, self.target.sub_url.replace("{channel}", self.channels[c]), m] for c, m in d.items()]}
            for d in per])
        errors: dict[str, int] = {}
        for r in replies:
            for key, v in r["errors"].items():
                errors[key] = errors.get(key, 0) + v
        self.subscribers = sum(r["open"] for r in replies)
        return {"open": self.subscribers, "wanted": n, "failed": sum(r["failed"] for r in replies),
                "opened": sum(r["opened"] for r in replies), "open_s": max(r["open_s"] for r in replies),
                "errors": errors, "seconds": time.monotonic() - t0}

    async def close(self, timeout: float = 20.0) -> dict[str, Any]:
        replies = await self._all(timeout + 5, cmd="close", timeout=timeout)
        self.subscribers = 0
        return {"closed": sum(r["closed"] for r in replies), "still_open": sum(r["still_open"] for r in replies)}

    async def warm(self, timeout: float = 20.0) -> dict[str, Any]:
        """Until every subscriber has received a marker message (its subscription is live): rounds of one marker
        to every channel that still has a subscriber without one, every 100 ms or so; bounded by `timeout`."""
        rid = self._next_rid()
        of = sum(r["of"] for r in await self._all(10, cmd="warm_start", rid=rid))
        deadline = time.monotonic() + timeout
        cold = list(range(len(self.channels)))
        markers = rounds = 0
        warm = 0
        try:
            while cold and time.monotonic() < deadline:
                items = [(c, make_payload(time.time_ns(), rounds, rid)) for c in cold]
                try:
                    statuses: list[Any] = await self.publisher.send(items, max(1.0, deadline - time.monotonic()))
                except (TimeoutError, OSError, ValueError) as exc:
                    await self.publisher.close()
                    statuses = [f"{type(exc).__name__}: {exc}"]
                bad = [st for st in statuses if st not in (200, 201, 202)]
                if bad:
                    self.log(f"warm-up publishes answered {bad[:3]}")
                markers += len(items)
                rounds += 1
                replies = await self._all(15, cmd="warm_wait", timeout=0.1)
                cold = sorted({c for r in replies for c in r["cold"]})
                warm, of = sum(r["warm"] for r in replies), sum(r["of"] for r in replies)
        finally:
            await self._all(10, cmd="warm_end")
        return {"warm": warm, "of": of, "markers": markers, "rounds": rounds}

    async def run(self, rate: float, duration: float, settle: float = 5.0) -> dict[str, Any]:
        """One measured step: warm up, publish rate*duration messages, wait (bounded) for them, aggregate."""
        await self._all(settle + 15, cmd="quiet", idle=0.3, timeout=settle + 10)
        warm = await self.warm()
        nch = len(self.channels)
        count = max(1, math.ceil(rate * duration / nch)) * nch  # whole rounds: every channel gets as many
        rid = self._next_rid()
        conns = self.publisher.c if self.publisher.per_conn else 0
        subs = sum(r["subs"] for r in await self._all(10, cmd="measure", rid=rid, goal=count, channels=nch,
                                                      conns=conns))
        cpu0, t0 = cpu_seconds(), time.monotonic()
        probe0 = {k: f() for k, f in self.probes.items()}
        pub = await self.publisher.run(rid, rate, count, timeout=duration * 3 + 10)
        replies = await self._all(settle + 30, cmd="finish", goal=pub["sent"], settle=settle, channels=nch,
                                  conns=conns)
        wall = max(1e-9, time.monotonic() - t0)
        coord_cpu = (cpu_seconds() - cpu0) / wall
        cpu_s = {name: f() - probe0[name] for name, f in self.probes.items()}
        cpu_pct = {name: round(100 * v / wall, 1) for name, v in cpu_s.items()}
        hist: dict[int, int] = {}
        for r in replies:
            for k, v in r["hist"].items():
                hist[int(k)] = hist.get(int(k), 0) + v
        lat = percentiles(hist)
        deliveries = sum(r["deliveries"] for r in replies)
        expected = sum(r["expected"] for r in replies)
        worker_cpu = [100 * r["cpu_s"] / max(1e-9, r["wall_s"]) for r in replies]
        res: dict[str, Any] = {
            "target": self.target.name, "subscribers": subs, "channels": nch, "rate": rate, "duration": duration,
            "published": pub["sent"], "publish": pub, "publishes_per_s": pub["achieved_rate"],
            "publisher": self.publisher.shape,
            "deliveries": deliveries, "expected": expected,
            "lost": sum(r["lost"] for r in replies), "duplicates": sum(r["duplicates"] for r in replies),
            "out_of_order": sum(r["out_of_order"] for r in replies),
            "disconnects": sum(r["disconnects"] for r in replies),
            "complete_subscribers": sum(r["complete"] for r in replies),
            "deliveries_per_s": deliveries / pub["span_s"] if pub["span_s"] else 0.0,
            "latency_ms": lat,
            "generator_cpu_pct": {"workers": [round(c, 1) for c in worker_cpu], "max_worker": round(max(worker_cpu), 1),
                                  "coordinator": round(100 * coord_cpu, 1)},
            "cpu_pct": cpu_pct,
            "cpu_s": {name: round(v, 3) for name, v in cpu_s.items()},
            "wall_s": wall,
            "warm": warm,
        }
        res["generator_saturated"] = res["generator_cpu_pct"]["max_worker"] > 90 or res["generator_cpu_pct"]["coordinator"] > 90
        why = []
        if warm["warm"] < warm["of"]:
            why.append(f"only {warm['warm']}/{warm['of']} subscribers live before the step")
        if pub["errors"] or pub["rejected"]:
            why.append(f"publish errors {pub['errors'][:2]} rejected {pub['rejected']}")
        if pub["achieved_rate"] < 0.95 * rate:
            why.append(f"publisher reached {pub['achieved_rate']:.1f}/s of {rate:.1f}/s")
        if deliveries < expected or res["lost"]:
            why.append(f"{expected - deliveries} of {expected} deliveries missing ({res['lost']} lost)")
        if res["duplicates"] or res["out_of_order"]:
            why.append(f"{res['duplicates']} duplicates, {res['out_of_order']} out of order")
        if res["disconnects"]:
            why.append(f"{res['disconnects']} subscribers disconnected")
        if not lat["p99"] < self.p99_limit_ms:
            why.append(f"p99 {lat['p99']:.1f} ms >= {self.p99_limit_ms:g} ms")
        res["ok"] = not why
        res["why"] = "; ".join(why)
        return res

    async def find_sustained(self, n: int, start_rate: float, duration: float, max_steps: int = 6,
                             settle: float = 3.0, min_rate: float = 1.0, precision: float = 1.15,
                             confirm: bool = True,
                             on_step: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Ramp search for the highest publish rate at which every delivery arrives with p99 under the limit.

        Doubles from `start_rate` while steps pass, halves while they fail (not below `min_rate`), then bisects
        between the best passing and the lowest failing rate until they are within `precision`; at most
        `max_steps` rates are tried. With `confirm`, a step that failed only on timing (everything arrived, in
        order, once) is run once more before it counts as failed: on a shared machine one stall of another
        process should not end the search. A step that lost, duplicated or reordered anything is not retried.
        """
        best: dict[str, Any] | None = None
        failed: dict[float, dict[str, Any]] = {}
        steps: list[dict[str, Any]] = []
        rate = round(max(start_rate, min_rate), 2)
        for _ in range(max_steps):
            conn = await self.connect(n)
            if conn["open"] < n:
                steps.append({"rate": rate, "ok": False, "why": f"only {conn['open']}/{n} connected: {conn['errors']}"})
                break
            res = await self.run(rate, duration, settle)
            steps.append(res)
            if on_step:
                on_step(res)
            intact = not (res["lost"] or res["duplicates"] or res["out_of_order"] or res["disconnects"])
            if confirm and not res["ok"] and intact:
                res = await self.run(rate, duration, settle)
                res["retry_of_failed_step"] = True
                steps.append(res)
                if on_step:
                    on_step(res)
            if res["ok"]:
                if best is None or rate > best["rate"]:
                    best = res
            else:
                failed[rate] = res
            fail_rate = min(failed) if failed else None
            if best is not None and fail_rate is not None:
                if fail_rate / best["rate"] <= precision:
                    break
                rate = (best["rate"] + fail_rate) / 2
            elif best is not None:
                rate = best["rate"] * 2
            else:
                assert fail_rate is not None
                rate = fail_rate / 2
                if rate < min_rate:
                    break
            rate = round(rate, 2)
        out: dict[str, Any] = {"subscribers": n, "best": best, "steps": steps,
                               "deliveries_per_s": best["deliveries_per_s"] if best else 0.0,
                               "rate": best["rate"] if best else 0.0, "limited_by": None}
        limit = ramp_limit(steps)
        if limit is not None:
            out["limited_by"] = limit
            if best is None:
                above = failed[min(failed)]
                out["lowest_failed"] = {"rate": above["rate"], "deliveries_per_s": above["deliveries_per_s"],
                                        "p99_ms": above["latency_ms"]["p99"], "why": above["why"]}
        return out


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------


def _summary(res: dict[str, Any]) -> str:
    lat = res["latency_ms"]
    chans = f" in {res['channels']} channels" if res.get("channels", 1) > 1 else ""
    return (f"N={res['subscribers']}{chans} R={res['rate']:g}/s: {res['deliveries']}/{res['expected']} delivered, "
            f"{res['deliveries_per_s']:.0f}/s, lost {res['lost']}, dup {res['duplicates']}, "
            f"ooo {res['out_of_order']}, disc {res['disconnects']}; p50 {lat['p50']:.1f} ms p99 {lat['p99']:.1f} ms "
            f"max {lat['max']:.1f} ms; generator CPU {res['generator_cpu_pct']['workers']}% "
            f"(coordinator {res['generator_cpu_pct']['coordinator']}%)" + ("" if res["ok"] else f"  FAIL: {res['why']}"))


def _target_from_args(a: argparse.Namespace) -> Target:
    if a.target == "nchan":
        t = Target.nchan(a.url, headers=a.header)
    else:
        t = Target.relay(a.url, headers=a.header)
    if a.sub_url:
        t.sub_url = a.sub_url
    if a.pub_url:
        t.pub_url = a.pub_url
    if a.pub_format:
        t.pub_format = a.pub_format
    return t


async def _cli(a: argparse.Namespace) -> int:
    target = _target_from_args(a)
    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    channels: str | list[str] = a.channel if a.channels <= 1 else [f"{a.channel}_{i}" for i in range(a.channels)]
    conns, inflight = (1, a.pipeline) if a.pipeline else (a.pub_conns, a.pub_inflight)
    async with LoadGen(target, channels, a.procs, pub_conns=conns, pub_inflight=inflight, pub_sources=a.pub_sources,
                       log=log, p99_limit_ms=a.p99_limit) as lg:
        conn = await lg.connect(a.subscribers, timeout=a.connect_timeout)
        log(f"connected {conn['open']}/{a.subscribers} in {conn['seconds']:.1f}s errors={conn['errors']}")
        if a.idle is not None:
            print(json.dumps({"connected": conn}), flush=True)
            await asyncio.sleep(min(a.idle, 3600))
            await lg.close()
            return 0 if conn["open"] == a.subscribers else 1
        if conn["open"] < a.subscribers:
            return 1
        if a.find_max:
            out = await lg.find_sustained(a.subscribers, a.rate, a.duration, max_steps=a.max_steps,
                                          on_step=lambda r: log(_summary(r)))
            print(json.dumps(out if a.json else {"subscribers": out["subscribers"], "publishes_per_s": out["rate"],
                                                  "deliveries_per_s": round(out["deliveries_per_s"])}))
            return 0
        res = await lg.run(a.rate, a.duration, a.settle)
        print(json.dumps(res) if a.json else _summary(res))
        return 0 if res["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        run_async(_worker_main())
        return 0
    p = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", choices=("relay", "nchan"), default="relay",
                   help="URL layout and publish body of the target (default relay)")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="base URL of the target")
    p.add_argument("--sub-url", help="subscribe URL with {channel}, overrides the target's layout")
    p.add_argument("--pub-url", help="publish URL with {channel}, overrides the target's layout")
    p.add_argument("--pub-format", choices=("relay", "raw"), help='publish body: {"data": payload} or raw payload')
    p.add_argument("--header", action="append", default=[], help="extra request header 'Name: value' (repeatable)")
    p.add_argument("--channel", default="bench", help="channel name; with --channels K, the prefix of <name>_0..K-1")
    p.add_argument("--channels", type=int, default=1, metavar="K",
                   help="spread subscribers over K channels and publish round-robin over them (default 1)")
    p.add_argument("-n", "--subscribers", type=int, default=100)
    p.add_argument("-r", "--rate", type=float, default=10.0,
                   help="messages per second over all channels (start rate with --find-max)")
    p.add_argument("-d", "--duration", type=float, default=5.0, help="seconds of publishing (per step)")
    p.add_argument("--settle", type=float, default=5.0, help="max seconds to wait for late deliveries")
    p.add_argument("--procs", type=int, default=None, help="worker processes (default: cores available)")
    p.add_argument("--pub-conns", type=int, default=100, metavar="C",
                   help="publishing keep-alive connections (default 100)")
    p.add_argument("--pub-inflight", type=int, default=1,
                   help="publish requests in flight per connection (default 1: no pipelining, like real clients)")
    p.add_argument("--pub-sources", type=int, default=100,
                   help="loopback source addresses the connections are spread over, 127.0.0.2 ... (default 100; "
                        "0: the kernel's choice); only when the target is on IPv4 loopback")
    p.add_argument("--pipeline", type=int, default=0, metavar="N",
                   help="the old shape instead: ONE connection with N requests HTTP/1.1-pipelined")
    p.add_argument("--p99-limit", type=float, default=100.0, help="ms; a step with a higher p99 fails")
    p.add_argument("--find-max", action="store_true", help="ramp search for the max sustained rate")
    p.add_argument("--max-steps", type=int, default=6, help="rates tried by --find-max")
    p.add_argument("--idle", type=float, default=None, metavar="SECONDS", help="only connect and hold the streams")
    p.add_argument("--connect-timeout", type=float, default=60.0)
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    a = p.parse_args(argv)
    raise_nofile()
    return int(run_async(_cli(a)))


if __name__ == "__main__":
    raise SystemExit(main())
