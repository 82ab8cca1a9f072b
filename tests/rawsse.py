"""A light EventSource for thousands of streams in one test process: one raw socket and one task per stream.

It behaves like a browser's EventSource where the tests need it to: it remembers the last `id:` it saw (from any
event, `relay.hello` included), and with `reconnect=True` it reconnects when the stream ends (to the next port
of its list, so a dead replica sends it to another) with `Last-Event-ID`. It records what a test asserts on:
every data event's id and JSON data in order, resets, the HTTP statuses it got, and how often it connected.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

__all__ = ["RawHTTP", "RawStream", "open_streams", "wait_all"]


@dataclass(eq=False)
class RawStream:
    ports: list[int]
    path: str
    reconnect: bool = False
    last_id: str | None = None
    retry_delay: float = 0.05
    source: str | None = None  # local address to connect from (another 127.0.0.0/8 address)
    digest: Callable[[bytes], Any] = orjson.loads  # what to keep of each event's data (big messages: a little)
    hello_id: str | None = None
    hellos: int = 0
    instance: str | None = None
    events: list[tuple[str, str | None, Any]] = field(default_factory=list)  # (event, id, data)
    received_at: list[float] = field(default_factory=list)  # time.time() of each of `events`
    resets: list[Any] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    connects: int = 0
    comments: int = 0
    error: BaseException | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None
    _writer: asyncio.StreamWriter | None = None
    _attempt: int = 0

    def start(self) -> RawStream:
        self._task = asyncio.create_task(self._run())
        return self

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
            transport = self._writer.transport
            transport.abort()

    def data(self, event: str | None = None) -> list[Any]:
        return [d for e, _, d in self.events if event is None or e == event]

    async def wait(self, predicate: Callable[[RawStream], bool], timeout: float) -> None:
        async def loop() -> None:
            while not predicate(self):
                if self.ended.is_set() and not self.reconnect:
                    raise AssertionError(f"stream ended (statuses {self.statuses}, error {self.error!r})")
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(loop(), timeout)

    async def _run(self) -> None:
        try:
            while True:
                port = self.ports[self._attempt % len(self.ports)]
                self._attempt += 1
                try:
                    await self._once(port)
                except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                    self.error = exc
                self.changed.set()
                if not self.reconnect:
                    return
                await asyncio.sleep(self.retry_delay)
        finally:
            self.ended.set()
            self.changed.set()

    async def _once(self, port: int) -> None:
        local = (self.source, 0) if self.source else None
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=local)
        self._writer = writer
        try:
            head = [f"GET {self.path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Accept: text/event-stream"]
            if self.last_id is not None:
                head.append(f"Last-Event-ID: {self.last_id}")
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
            raw = await reader.readuntil(b"\r\n\r\n")
            status = int(raw.split(b" ", 2)[1])
            self.statuses.append(status)
            self.changed.set()
            if status != 200:
                self.reconnect = False  # what EventSource does after a non-200
                return
            self.connects += 1
            chunked = b"transfer-encoding: chunked" in raw.lower()
            await self._parse(reader, chunked)
        finally:
            writer.close()
            self._writer = None

    async def _parse(self, reader: asyncio.StreamReader, chunked: bool) -> None:
        buf = b""
        event, eid, data = b"message", None, None
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
            buf += chunk
            if b"\n\n" not in buf:
                continue
            *blocks, buf = buf.split(b"\n\n")
            for block in blocks:
                event, eid, data = b"message", None, None
                for line in block.split(b"\n"):
                    if line.startswith(b"data: "):
                        data = line[6:]
                    elif line.startswith(b"id: "):
                        eid = line[4:].decode()
                    elif line.startswith(b"event: "):
                        event = line[7:]
                    elif line.startswith(b":"):
                        self.comments += 1
                if eid is not None:
                    self.last_id = eid
                if data is None:
                    continue
                name = event.decode()
                if name == "relay.hello":
                    self.hellos += 1
                    self.hello_id = eid
                    self.instance = orjson.loads(data)["instance"]
                elif name == "relay.reset":
                    self.resets.append(orjson.loads(data))
                else:
                    self.events.append((name, eid, self.digest(data)))
                    self.received_at.append(time.time())
            self.changed.set()


async def wait_all(streams: list[RawStream], predicate: Callable[[RawStream], bool], timeout: float,
                   what: str = "condition") -> None:
    """Wait until `predicate` holds for every stream; on timeout, say how many it holds for and why not."""
    deadline = time.monotonic() + timeout
    for s in streams:
        left = deadline - time.monotonic()
        try:
            await s.wait(predicate, max(0.01, left))
        except (TimeoutError, AssertionError):
            ok = sum(1 for x in streams if predicate(x))
            statuses = Counter(tuple(x.statuses) for x in streams if not predicate(x))
            errors = Counter(repr(x.error)[:80] for x in streams if x.error and not predicate(x))
            raise AssertionError(f"{what}: {ok}/{len(streams)} streams after {timeout}s; failing ones' statuses "
                                 f"{dict(statuses.most_common(3))}, errors {dict(errors.most_common(3))}") from None


async def open_streams(streams: list[RawStream], timeout: float = 60.0) -> list[RawStream]:
    """Start every stream at once and wait until each has its `relay.hello`."""
    for s in streams:
        s.start()
    await wait_all(streams, lambda s: s.hellos > 0, timeout, "relay.hello received")
    return streams


class RawHTTP:
    """One keep-alive HTTP/1.1 connection for publishing at a rate httpx cannot reach on a busy test box:
    requests are written raw and answers read by Content-Length. Reconnects by itself when the server closes."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: Any, headers: dict[str, str] | None = None,
                   timeout: float = 15.0) -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body); raises OSError (TimeoutError included) / IncompleteReadError when the
        connection fails mid-way or no answer comes within `timeout`."""
        try:
            return await asyncio.wait_for(self._post(path, body, headers), timeout)
        except TimeoutError:
            self.close()
            raise

    async def _post(self, path: str, body: Any, headers: dict[str, str] | None) -> tuple[int, dict[str, str], bytes]:
        if self._writer is None or self._writer.is_closing():
            self._reader, self._writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self._reader is not None
        payload = orjson.dumps(body)
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self._writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                           f"Content-Length: {len(payload)}\r\n{extra}\r\n".encode() + payload)
        try:
            head = await self._reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            fields = {}
            for line in head.decode("latin-1").split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name:
                    fields[name.strip().lower()] = value.strip()
            data = await self._reader.readexactly(int(fields.get("content-length", "0")))
        except BaseException:
            self.close()
            raise
        if fields.get("connection", "").lower() == "close":
            self.close()
        return status, fields, data

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None
