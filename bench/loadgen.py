"""The project's SSE fan-out load generator: asyncio + uvloop over raw sockets, one worker process per core.

What it measures, on one channel or on K channels (`--channels K`, e.g. chat rooms):
- N subscribers (`GET` with `Accept: text/event-stream`, HTTP/1.1) spread over P worker processes and over the
  K channels (subscriber j on channel j % K);
- a publisher that POSTs R messages/s for D seconds over ONE keep-alive connection, HTTP/1.1-pipelined (up to
  `--pipeline` requests in flight), message i to channel i % K (bounded: R*D messages, rounded up to whole
  rounds of K); each message's data carries its publish time and its sequence number in its channel, padded to
  ~100 bytes: `{"t":<time.time_ns()>,"s":<seq>,"r":<run id>,"p":"xx..."}`;
- per delivery: latency (arrival - publish time, same host clock), and per subscriber: deliveries, lost
  (sequence gaps never filled), duplicates, out-of-order arrivals, disconnects (sequences are per channel);
- per publish: whether the publisher kept its rate, the statuses, the time to each answer (ack);
- its own CPU use (getrusage of every worker and of the coordinator, which is also the publisher), so a
  saturated generator is visible.

Frames are parsed in bulk: a socket read is cut at its last `\\n\\n`, and one compiled regex pulls the
`"t"`, `"s"` and `"r"` numbers out of every complete event; nothing else of the stream is decoded. The regex
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

# `"t":<ns>,"s":<seq>,"r":<run>` as the publisher writes them (orjson keeps key order and compact form).
PAYLOAD_RE = re.compile(rb'"t":(\d+),"s":(\d+),"r":(\d+)')
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


def make_payload(t_ns: int, seq: int, rid: int) -> bytes:
    head = b'{"t":%d,"s":%d,"r":%d,"p":"' % (t_ns, seq, rid)
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
        "buf",
        "ch",
        "closed",
        "count",
        "done",
        "dups",
        "goal",
        "head",
        "measured",
        "missing",
        "nxt",
        "ooo",
        "opened",
        "status",
        "transport",
        "w",
        "warm",
    )

    def __init__(self, w: _Worker, ch: int = 0) -> None:
        self.w = w
        self.ch = ch  # index of its channel; sequence numbers are per channel
        self.goal = 0  # messages its channel gets in the measured step
        self.transport: asyncio.Transport | None = None
        self.head: bytes | None = b""
        self.buf = b""
        self.nxt = 0
        self.missing: set[int] | None = None
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
            if not self.opened.done():
                self.opened.set_result(self.status)
            if self.status != 200:
                self.w.errors[f"HTTP {self.status}"] = self.w.errors.get(f"HTTP {self.status}", 0) + 1
                if self.transport is not None:
                    self.transport.close()
                return
            data = head[end + 4:]
            if not data:
                return
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
        for t, s, r in PAYLOAD_RE.findall(buf, 0, cut):
            if r != rid:
                if r == w.warm_rid and self.warm != w.warm_n:
                    self.warm = w.warm_n
                    w.warm_seen += 1
                    if w.warm_seen >= w.warm_goal and w.warm_evt is not None:
                        w.warm_evt.set()
                continue
            seq = int(s)
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
        if not self.done and self.measured and self.nxt >= self.goal and not self.missing:
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
                      concurrency: int) -> dict[str, Any]:
        """Have `n` open subscribers on each `[channel index, url, n]` of `assign` (reopens what was closed)."""
        extra = "".join(f"{h}\r\n" for h in headers)
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
            async with sem:
                sub = _Sub(self, ch)
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
                return True

        results = await asyncio.gather(*(one(*t) for t in todo))
        failed = results.count(False)
        self.subs = [s for s in self.subs if not s.closed and s.status == 200]
        return {"open": len(self.subs), "failed": failed, "errors": dict(self.errors)}

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

    def measure(self, rid: int, goal: int, channels: int = 1) -> dict[str, Any]:
        self.rid = str(rid).encode()
        self.hist = [0] * (CAP + 1)
        self.done = 0
        self.disconnects = 0
        self.done_evt = asyncio.Event()
        live = [s for s in self.subs if not s.closed]
        self.done_goal = len(live)
        for s in self.subs:
            s.nxt = 0
            s.missing = None
            s.count = s.dups = s.ooo = 0
            s.done = False
            s.measured = not s.closed
            s.goal = self._goal(s.ch, goal, channels)
        self.measuring = True
        self._ru0 = resource.getrusage(resource.RUSAGE_SELF)
        self._t0 = time.monotonic()
        return {"subs": len(live)}

    async def finish(self, goal: int, settle: float, channels: int = 1) -> dict[str, Any]:
        """Wait (bounded) until every subscriber has everything its channel got of the `goal` published, then
        report."""
        for s in self.subs:
            s.goal = self._goal(s.ch, goal, channels)
            if s.measured and not s.done and s.nxt >= s.goal and not s.missing:
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
        for s in self.subs:
            if not s.measured:
                continue
            count += s.count
            dups += s.dups
            ooo += s.ooo
            lost += (len(s.missing) if s.missing else 0) + max(0, s.goal - s.nxt)
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


class _PubConn(asyncio.Protocol):
    """One connection of a `_Publisher`; callbacks of a connection the publisher has replaced are ignored."""

    def __init__(self, pub: _Publisher) -> None:
        self.pub = pub
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.pub.conn is self:
            self.pub.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.pub.conn is self:
            self.pub.data_received(data)


class _Publisher:
    """POSTs on ONE keep-alive connection, in order, up to `pipeline` requests in flight (HTTP/1.1 pipelining).

    Message i goes to channel i % K of its K channels, with sequence number i // K there, so with one channel
    the order of publishing is the sequence order, and with many every channel's messages are still sent in
    their order: out-of-order deliveries are the server's, never the generator's.

    Light on purpose (it shares the generator's core): a protocol, not streams; every message already due is
    written in one `write`, and the responses of a read are parsed in one pass; pacing sleeps at least 1 ms
    (uvloop's timer resolution), so at high rates messages leave in small batches, each stamped with the time
    it was actually written.
    """

    def __init__(self, target: Target, channels: list[str], pipeline: int) -> None:
        eps = [target.pub(c) for c in channels]
        self.ep = eps[0]
        if any((e.scheme, e.host, e.port) != (self.ep.scheme, self.ep.host, self.ep.port) for e in eps):
            raise ValueError("all channels must be published to the same host (one connection)")
        self.raw = target.pub_format == "raw"
        self.pipeline = max(1, pipeline)
        # A full window is refilled once a quarter of it is answered, in one write: the server still has 3/4 of
        # the window queued, and the generator pays one wake-up and one loopback write per few publishes.
        self.refill = max(1, self.pipeline // 4)
        extra = "".join(f"{h}\r\n" for h in target.headers)
        self.heads = [(f"POST {e.path} HTTP/1.1\r\nHost: {e.host_header}\r\n"
                       f"Content-Type: application/json\r\n{extra}Content-Length: ").encode() for e in eps]
        self.conn: _PubConn | None = None
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.sent_at: deque[float] = deque()  # loop time each request in flight was written
        self.statuses: list[int] = []
        self.acks: list[float] = []  # seconds from writing a request to reading its response
        self.waiter: asyncio.Future[None] | None = None
        self.lost: str | None = None
        self.used = 0.0

    # -- the connection's events -------------------------------------------------------------------------------

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.conn = None
        self.lost = f"connection closed ({type(exc).__name__}: {exc})" if exc else "connection closed by the server"
        self._wake()

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        pos = 0
        now = time.monotonic()
        got = False
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
                status = int(head[9:12])
            except ValueError:
                status = 0
            self.statuses.append(status)
            self.acks.append(now - (self.sent_at.popleft() if self.sent_at else now))
            pos = nxt
            got = True
        self.buf = buf[pos:]
        if got:
            self.used = now
            if len(self.sent_at) <= self.pipeline - self.refill:
                self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    # -- driving ----------------------------------------------------------------------------------------------

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        # Servers close idle keep-alive connections (uvicorn after a few seconds): start anew after a pause.
        if self.transport is not None and (time.monotonic() - self.used > 2.0 or self.sent_at):
            await self.close()
        if self.transport is None or self.transport.is_closing():
            await self.close()
            conn = _PubConn(self)
            await asyncio.wait_for(loop.create_connection(lambda: conn, self.ep.host, self.ep.port,
                                                          ssl=_client_ssl(self.ep.scheme)), 10)
            self.conn, self.transport = conn, conn.transport
            self.buf = b""
            self.sent_at.clear()
            self.lost = None
        self.used = time.monotonic()

    async def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.conn = self.transport = None
        self.sent_at.clear()
        self.buf = b""

    def _request(self, ch: int, payload: bytes) -> bytes:
        body = payload if self.raw else b'{"data":' + payload + b"}"
        return self.heads[ch] + str(len(body)).encode() + b"\r\n\r\n" + body

    async def _wait(self, deadline: float) -> bool:
        """Until a response arrives or the connection is lost; False once past `deadline` (time.monotonic()).

        No `wait_for` (a timer and a callback per response): `_pump` keeps one timer for its deadline, which wakes
        whatever wait is current."""
        if time.monotonic() >= deadline:
            return False
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None
        return time.monotonic() < deadline

    async def _pump(self, count: int, make: Callable[[int, int], bytes], rate: float | None,
                    timeout: float) -> dict[str, Any]:
        """Write `count` requests (`make(i, time_ns)`), request i due at t0 + i/rate (all at once without a rate)
        but never more than `pipeline` unanswered; then wait for every response. Bounded by `timeout` (+5 s for
        the last answers)."""
        await self.open()
        clock = time.monotonic  # not loop.time(): uvloop's is in whole milliseconds
        self.statuses, self.acks = [], []
        lags: list[float] = []
        errors: list[str] = []
        t0 = clock()
        deadline = t0 + timeout
        alarm = asyncio.get_running_loop().call_later(timeout, self._wake)  # ends a wait that is current then
        first_ns = last_ns = 0
        i = 0
        try:
            while i < count:
                tr = self.transport
                if tr is None or tr.is_closing():
                    errors.append(f"publisher stopped: {self.lost or 'connection closed'}")
                    break
                now = clock()
                if now >= deadline:
                    errors.append("publisher stopped: time limit")
                    break
                due = count if rate is None else min(count, int((now - t0) * rate) + 1)
                k = min(due - i, self.pipeline - len(self.sent_at))
                if k > 0:
                    last_ns = time.time_ns()
                    first_ns = first_ns or last_ns
                    tr.write(b"".join([make(j, last_ns) for j in range(i, i + k)]))
                    self.sent_at.extend([now] * k)
                    if rate is not None:
                        lags.extend([now - t0 - j / rate for j in range(i, i + k)])
                    i += k
                elif due > i:  # the window is full: wait for an answer
                    if not await self._wait(deadline):
                        errors.append("publisher stopped: time limit (server not answering publishes)")
                        break
                else:
                    assert rate is not None
                    await asyncio.sleep(max(0.001, t0 + i / rate - now))
        finally:
            alarm.cancel()
        alarm = asyncio.get_running_loop().call_later(max(0.0, deadline + 5 - clock()), self._wake)
        try:
            while len(self.statuses) < i and self.transport is not None:
                if not await self._wait(deadline + 5):
                    break
        finally:
            alarm.cancel()
        if len(self.statuses) < i:
            errors.append(f"{i - len(self.statuses)} publish responses missing" +
                          (f" ({self.lost})" if self.lost else ""))
            await self.close()
        span = (last_ns - first_ns) / 1e9 + (1 / rate if rate else 0.0)
        bad = [s for s in self.statuses if s not in (200, 201, 202)]
        lags.sort()
        acks = sorted(self.acks)
        return {
            "sent": i, "accepted": len(self.statuses) - len(bad), "rejected": len(bad),
            "statuses": {str(s): bad.count(s) for s in set(bad)}, "errors": errors,
            "span_s": span, "achieved_rate": i / span if span > 0 else 0.0,
            "lag_p99_ms": lags[int(0.99 * (len(lags) - 1))] * 1000 if lags else 0.0,
            "lag_max_ms": lags[-1] * 1000 if lags else 0.0,
            "ack_p50_ms": acks[len(acks) // 2] * 1000 if acks else float("nan"),
            "ack_p99_ms": acks[int(0.99 * (len(acks) - 1))] * 1000 if acks else float("nan"),
        }

    async def send(self, items: list[tuple[int, bytes]], timeout: float = 10.0) -> list[int]:
        """Publish a few (channel index, payload) now, as fast as the window allows; returns their statuses."""
        res = await self._pump(len(items), lambda j, _t: self._request(*items[j]), None, timeout)
        if res["errors"]:
            raise OSError("; ".join(res["errors"]))
        return list(self.statuses)

    async def run(self, rid: int, rate: float, count: int, timeout: float) -> dict[str, Any]:
        """Publish `count` messages at `rate`/s round-robin over the channels, bounded by `timeout` overall."""
        k = len(self.heads)
        return await self._pump(count, lambda i, t_ns: self._request(i % k, make_payload(t_ns, i // k, rid)),
                                rate, timeout)


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
                 worker_prefix: list[str] | None = None, pipeline: int = 16, log: Callable[[str], None] | None = None,
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
        self.pipeline = pipeline
        self.p99_limit_ms = p99_limit_ms
        self.workers: list[_WorkerHandle] = []
        self.publisher = _Publisher(target, self.channels, pipeline)
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

    async def connect(self, n: int, timeout: float = 60.0, concurrency: int = 256) -> dict[str, Any]:
        """Have exactly `n` open subscribers, subscriber j on channel j % K, in worker j % P (reopens what the
        server closed); returns counts and errors."""
        k = len(self.channels)
        per: list[dict[int, int]] = [{} for _ in range(self.procs)]
        for j in range(n):
            d = per[j % self.procs]
            d[j % k] = d.get(j % k, 0) + 1
        t0 = time.monotonic()
        replies = await self._each(timeout + 10, [
            {"cmd": "connect", "headers": self.target.headers, "timeout": timeout,
             "concurrency": max(1, concurrency // self.procs),
             "assign": [[c, self.target.sub_url.replace("{channel}", self.channels[c]), m] for c, m in d.items()]}
            for d in per])
        errors: dict[str, int] = {}
        for r in replies:
            for key, v in r["errors"].items():
                errors[key] = errors.get(key, 0) + v
        self.subscribers = sum(r["open"] for r in replies)
        return {"open": self.subscribers, "wanted": n, "failed": sum(r["failed"] for r in replies),
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
        subs = sum(r["subs"] for r in await self._all(10, cmd="measure", rid=rid, goal=count, channels=nch))
        cpu0, t0 = cpu_seconds(), time.monotonic()
        probe0 = {k: f() for k, f in self.probes.items()}
        pub = await self.publisher.run(rid, rate, count, timeout=duration * 3 + 10)
        replies = await self._all(settle + 30, cmd="finish", goal=pub["sent"], settle=settle, channels=nch)
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
    async with LoadGen(target, channels, a.procs, pipeline=a.pipeline, log=log, p99_limit_ms=a.p99_limit) as lg:
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
    p.add_argument("--pipeline", type=int, default=16, help="publish requests in flight on the one connection")
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
