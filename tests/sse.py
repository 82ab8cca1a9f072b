"""The suite's one SSE client, and the parser it reads with.

`SSEStream` is a light EventSource: one raw socket and one task per stream, so that thousands fit in one test
process next to the servers. It behaves like a browser's where the tests need it to: it sends the last `id:` it
saw (from any event, `relay.hello` included) as `Last-Event-ID`, and with `reconnect=True` it connects again when
the stream ends (to the next URL of its list, so a dead replica sends it to another), giving up after a non-200
as EventSource does (`persistent=True`: not even then, as behind a load balancer that may answer 502 for a
moment). It records what tests assert on: every event in order, the relay's greetings and resets apart, the
comments (pings), the HTTP statuses and response headers, how often it connected, and, with `keep_raw`, the body
bytes exactly as they came (de-chunked) for `parse_strict`.

The wire format, as read here: blocks end with a blank line; `field: value` lines, a `data:` line per line of
data, `:` comments; lines end with LF (what the relay writes, which `parse_strict` checks). The same block parser
serves the stream, `parse_frames` (bytes a test read by other means: a client that stopped reading) and
`parse_strict` (every frame exactly as the relay promises to write it, failing on anything else).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import orjson

from .support import Changes, eventually

__all__ = ["Event", "SSEStream", "StreamInThread", "dechunk", "open_streams", "parse_frames", "parse_strict",
           "wait_all"]

HELLO, RESET = "relay.hello", "relay.reset"
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Event:
    event: str
    id: str | None
    data: Any  # the JSON value (or what the stream's `digest` keeps of the data)
    at: float = 0.0  # time.time() when it was read


# -- the wire format ----------------------------------------------------------------------------------------------


def _fields(block: bytes) -> tuple[str, str | None, bytes | None, int, int | None]:
    """One block's (event name, id, data, comment lines, retry); data is None when the block has no `data:`."""
    event, eid, data, comments, retry = "message", None, None, 0, None
    for line in block.split(b"\n"):
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            continue
        if line[:1] == b":":
            comments += 1
            continue
        name, _, value = line.partition(b":")
        if value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            data = value if data is None else data + b"\n" + value
        elif name == b"event":
            event = value.decode("utf-8", "replace")
        elif name == b"id":
            eid = value.decode("utf-8", "replace")
        elif name == b"retry" and value.isdigit():
            retry = int(value)
    return event, eid, data, comments, retry


def parse_frames(raw: bytes, digest: Callable[[bytes], Any] = orjson.loads) -> list[Event]:
    """Every complete event of an SSE body, the relay's own included (what follows the last blank line is an
    event still being written, or cut off)."""
    events = []
    for block in raw.split(b"\n\n")[:-1]:
        event, eid, data, _, _ = _fields(block)
        if data is not None:
            events.append(Event(event, eid, orjson.loads(data) if event.startswith("relay.") else digest(data)))
    return events


_ONE_ID = rb"(?:0|\d{1,20}-\d{1,20}(?:-[0-9a-z]{1,16})?)"
_ID_RE = re.compile(_ONE_ID + rb"|[A-Za-z0-9_.:-]+=" + _ONE_ID + rb"(?:,[A-Za-z0-9_.:-]+=" + _ONE_ID + rb")*")
_NAME_RE = re.compile(rb"[A-Za-z0-9_.:/-]{1,64}")


def parse_strict(raw: bytes) -> list[Event]:
    """Parse an SSE byte stream the way the relay promises to write it, failing on anything else.

    Lines end with LF; an event is optional `id:`, optional `event:`, one `data:` line of JSON;
    other blocks are `retry:` or `:` comments. A forged field would show up as a second `data:`/`event:`/`id:`
    line, an unknown field, a stray CR, or data that is not JSON.
    """
    cr = raw.find(b"\r")
    assert cr < 0, f"a CR in the stream (SSE parsers break the line there): {raw[max(0, cr - 300):cr + 100]!r}"
    blocks = raw.split(b"\n\n")
    blocks.pop()  # what follows the last blank line is an event still being written
    events = []
    for block in blocks:
        seen: set[str] = set()
        for line in block.split(b"\n"):
            if line.startswith(b":"):
                continue
            name, sep, value = line.partition(b": ")
            assert sep, f"malformed line {line[:120]!r}"
            key = name.decode("ascii", "replace")
            assert key in ("retry", "id", "event", "data"), f"unexpected field {line[:120]!r}"
            assert key not in seen, f"field {key!r} twice in one event: {block[:200]!r}"
            seen.add(key)
            if key == "retry":
                assert value.isdigit(), line
            elif key == "id":
                assert _ID_RE.fullmatch(value), f"malformed id {value[:120]!r}"
            elif key == "event":
                assert _NAME_RE.fullmatch(value), f"malformed event name {value[:120]!r}"
        if "data" in seen:
            event, eid, data, _, _ = _fields(block)
            assert data is not None
            events.append(Event(event, eid, orjson.loads(data)))  # raises on anything that is not one JSON value
        else:
            assert seen <= {"retry"}, f"an event without data: {block[:200]!r}"
    return events


def dechunk(body: bytes) -> bytes:
    """The data of a chunked HTTP/1.1 body, as far as it goes (a cut-off last chunk gives what it has)."""
    out = bytearray()
    at = 0
    while True:
        end = body.find(b"\r\n", at)
        if end < 0:
            break
        size = int(body[at:end].split(b";")[0], 16)
        if size == 0:
            break
        out += body[end + 2:end + 2 + size]
        at = end + 2 + size + 2
    return bytes(out)


# -- the client ---------------------------------------------------------------------------------------------------


def _target(url: str) -> tuple[str, int, str]:
    parts = urlsplit(url)
    assert parts.scheme == "http" and parts.hostname, f"an http:// URL: {url}"
    return parts.hostname, parts.port or 80, (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


class SSEStream:
    """One EventSource-like stream over a raw socket, read in a task of its own (see the module's docstring).

    What it received: `events`, the messages (every event but the relay's `relay.hello` and `relay.reset`, which
    are counted in `hellos`, `hello_id`, `instances` and `resets`); `all_events`, every event in order, the relay's
    own included; `comments`, `statuses`, `response_headers` (of the last response), `connects` (200s), `error`
    (why the last connection ended, if it failed), `raw` (with `keep_raw`). `changed` is notified on each of
    those, `ended` set (and `ended_at`, time.monotonic()) when it will not connect again.
    """

    def __init__(self, urls: str | Sequence[str], *, headers: dict[str, str] | None = None,
                 last_id: str | None = None, reconnect: bool = False, persistent: bool = False,
                 retry_delay: float = 0.05, source: str | None = None,
                 digest: Callable[[bytes], Any] = orjson.loads, keep_raw: bool = False,
                 changed: Changes | None = None) -> None:
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        self._targets = [_target(u) for u in self.urls]
        self.headers = headers or {}
        self.last_id = last_id
        self.reconnect = reconnect
        self.persistent = persistent  # reconnect after a non-200 too
        self.retry_delay = retry_delay
        self.source = source  # local address to connect from (another 127.0.0.0/8 address)
        self.digest = digest  # what to keep of each message's data (big messages: a little)
        self.events: list[Event] = []
        self.all_events: list[Event] = []
        self.hellos = 0
        self.hello_id: str | None = None
        self.instances: list[str] = []  # of each greeting: the replica of each connection
        self.resets: list[Any] = []
        self.comments = 0
        self.comments_at: list[float] = []  # time.time() of each
        self.retry: int | None = None
        self.raw: bytearray | None = bytearray() if keep_raw else None
        self.statuses: list[int] = []
        self.response_headers: dict[str, str] = {}
        self.connects = 0
        self.error: BaseException | None = None
        self.changed = changed or Changes()
        self.ended = asyncio.Event()
        self.ended_at: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._refused = False

    def __repr__(self) -> str:
        return (f"<SSEStream {self.urls[0]}: statuses {self.statuses}, {self.hellos} hellos, {len(self.events)} "
                f"events, {self.comments} comments, error {self.error!r}>")

    @property
    def path(self) -> str:
        return self._targets[0][2]

    @property
    def channel(self) -> str:
        """The channel of a `/channels/<name>/events` stream."""
        parts = self.path.split("?")[0].split("/")
        assert parts[1] == "channels", self.path
        return parts[2]

    @property
    def instance(self) -> str | None:
        """The replica that greeted it last."""
        return self.instances[-1] if self.instances else None

    def named(self, event: str) -> list[Event]:
        """The events of that name, the relay's own (`relay.hello`, `relay.reset`, ...) included."""
        return [e for e in self.all_events if e.event == event]

    def data(self, event: str | None = None) -> list[Any]:
        """The data of the messages (of that name)."""
        return [e.data for e in self.events if event is None or e.event == event]

    def ids(self, event: str | None = None) -> list[str | None]:
        """The ids of the messages (of that name)."""
        return [e.id for e in self.events if event is None or e.event == event]

    # -- lifecycle

    def start(self) -> SSEStream:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aenter__(self) -> SSEStream:
        self.start()
        await self.wait(lambda s: s.hellos > 0, 10, "relay.hello")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._writer is not None:
            self._writer.close()

    def drop(self) -> None:
        """Cut the connection now (as a network blip would); with `reconnect` it comes back with its last id."""
        if self._writer is not None:
            self._writer.transport.abort()

    # -- waiting

    async def wait(self, predicate: Callable[[SSEStream], object], timeout: float = 10.0,
                   what: str = "condition") -> None:
        """Until `predicate(self)` holds, re-checked on every change; fails at once if the stream ends first."""
        def check() -> bool:
            if predicate(self):
                return True
            if self.ended.is_set():
                raise AssertionError(f"{what}: the stream ended first: {self!r}")
            return False

        await eventually(check, timeout, lambda: f"{what}: {self!r}", on=self.changed)

    async def wait_count(self, n: int, event: str = "message", timeout: float = 10.0) -> None:
        """Until it has `n` events of that name."""
        await self.wait(lambda s: len(s.named(event)) >= n, timeout, f"{n} {event!r} events")

    # -- reading

    async def _run(self) -> None:
        attempt = 0
        try:
            while True:
                host, port, path = self._targets[attempt % len(self._targets)]
                attempt += 1
                try:
                    await self._once(host, port, path)
                except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
                    self.error = exc
                self.changed.notify()
                if not self.reconnect or self._refused:
                    return
                await asyncio.sleep(self.retry_delay)
        finally:
            self.ended_at = time.monotonic()
            self.ended.set()
            self.changed.notify()

    async def _once(self, host: str, port: int, path: str) -> None:
        local = (self.source, 0) if self.source else None
        reader, writer = await asyncio.open_connection(host, port, local_addr=local)
        self._writer = writer
        try:
            head = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}", "Accept: text/event-stream",
                    "Cache-Control: no-cache", *(f"{k}: {v}" for k, v in self.headers.items())]
            if self.last_id is not None:
                head.append(f"Last-Event-ID: {self.last_id}")
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
            status_line, *lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            self.response_headers = {}
            for line in lines:
                name, _, value = line.partition(":")
                if name:
                    self.response_headers[name.strip().lower()] = value.strip()
            status = int(status_line.split(" ", 2)[1])
            self.statuses.append(status)
            self.changed.notify()
            if status != 200:
                self._refused = not self.persistent  # what EventSource does after a non-200
                return
            self.connects += 1
            await self._read(reader, self.response_headers.get("transfer-encoding", "").lower() == "chunked")
        finally:
            writer.close()
            self._writer = None

    async def _read(self, reader: asyncio.StreamReader, chunked: bool) -> None:
        buf = b""
        while True:
            if chunked:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    return
                chunk = (await reader.readexactly(size + 2))[:-2]
            else:
                chunk = await reader.read(65536)
                if not chunk:
                    return
            if self.raw is not None:
                self.raw += chunk
            buf += chunk
            if b"\n\n" in buf:
                *blocks, buf = buf.split(b"\n\n")
                now = time.time()
                for block in blocks:
                    self._block(block, now)
            self.changed.notify()

    def _block(self, block: bytes, now: float) -> None:
        event, eid, data, comments, retry = _fields(block)
        if comments:
            self.comments += comments
            self.comments_at += [now] * comments
        if retry is not None:
            self.retry = retry
        if eid is not None:
            self.last_id = eid
        if data is None:
            return
        if event == HELLO:
            e = Event(event, eid, orjson.loads(data), now)
            self.hellos += 1
            self.hello_id = eid
            self.instances.append(e.data["instance"])
        elif event == RESET:
            e = Event(event, eid, orjson.loads(data), now)
            self.resets.append(e.data)
        else:
            e = Event(event, eid, self.digest(data), now)
            self.events.append(e)
        self.all_events.append(e)


async def wait_all(streams: Sequence[SSEStream], predicate: Callable[[SSEStream], object], timeout: float,
                   what: str = "condition") -> None:
    """`SSEStream.wait` for every stream under one deadline (each re-checked on its own changes: thousands of
    streams cost no more than one); on failure, says for how many it holds and why not for the others."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        for s in streams:
            await s.wait(predicate, max(0.01, deadline - loop.time()), what)
    except AssertionError:
        failing = [x for x in streams if not predicate(x)]
        statuses = Counter(tuple(x.statuses) for x in failing)
        errors = Counter(repr(x.error)[:80] for x in failing if x.error)
        raise AssertionError(f"{what}: {len(streams) - len(failing)}/{len(streams)} streams after {timeout}s; "
                             f"failing ones' statuses {dict(statuses.most_common(3))}, errors "
                             f"{dict(errors.most_common(3))}, e.g. {failing[:1]}") from None


async def open_streams(streams: Sequence[SSEStream], timeout: float = 60.0) -> list[SSEStream]:
    """Start every stream at once and wait until each has its `relay.hello` (it is subscribed from then on)."""
    for s in streams:
        s.start()
    await wait_all(streams, lambda s: s.hellos > 0, timeout, "relay.hello received")
    return list(streams)


class StreamInThread:
    """An `SSEStream` read by an event loop of its own in a thread, for sync tests: hypothesis runs each example
    in the test's thread, which would starve a stream read by the test's own loop. A context manager; `wait`
    blocks the caller until the stream's own `wait` returns."""

    def __init__(self, stream: SSEStream) -> None:
        self.stream = stream
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def __enter__(self) -> StreamInThread:
        self._thread.start()
        self.run(self.stream.__aenter__())
        return self

    def __exit__(self, *exc: object) -> None:
        self.run(self.stream.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def wait(self, predicate: Callable[[SSEStream], object], timeout: float = 10.0, what: str = "condition") -> None:
        self.run(self.stream.wait(predicate, timeout, what), timeout + 5)

    def snapshot(self) -> bytes:
        """The body so far (`keep_raw`), read in the stream's own thread."""
        async def copy() -> bytes:
            assert self.stream.raw is not None, "keep_raw=True"
            return bytes(self.stream.raw)

        return self.run(copy())
