"""One SSE stream: its position from the first byte, resume from history page by page, then live messages.

Phases of a stream, and why (`_events`; phases 1 to 4 are `_Opening`'s methods, the live loop is `_events`'s own):

1. Join and wait for live (`join`, then `wait_live` unless every channel is live already). Joined to the hub,
   every message dispatched for its channels is queued for it. Then it waits until the broker has each channel
   live (a new channel is subscribed in the background; during a Redis outage this waits, sending pings, until
   Redis answers). Only then is the broker's position of a
   channel a promise: every message after it will be dispatched here. A stream whose 200 went out while it waited
   (with a ping) is owed everything published after it joined: the broker is told (`Broker.owe`), and the
   position it establishes for the channel comes no later than that moment.
2. Read first pages (`read_first_pages`): for a resume, the first page of history after the cursor of each
   channel; the greeting's id depends on whether it could be honoured.
3. Greet (`greeting`): `relay.hello`, carrying an `id:`: the stream's position. A fresh stream's position is the
   broker's position of each channel (no Redis read: the cursor of what was dispatched); a resumed one's is the
   cursor it came with. A browser's EventSource reconnects with the last `id:` it saw, whatever event carried
   it, so a client that drops before any message resumes from its greeting and misses nothing ("exactly once
   from the first byte").
4. Replay (`replay`): history after the cursor, one bounded page at a time, each written (under the
   connection's flow control) before the next is read. A cursor that cannot be honoured (trimmed away, another
   epoch, ahead of the channel, malformed) gets `relay.reset` and then everything retained.
5. Live loop: `Subscriber.go_live` (direct writes may start), then whatever queued since phase 1, minus what the
   position or history already covered (`floors`), then messages as they come (`Subscriber.next_batch`), until
   the subscriber is closed; then its farewell (`_farewell`).

Pings, disconnects, direct writes and who ends a stream are the subscriber's to decide (service/subscriber.py).

A stream is never refused with a non-200 for a passing condition: a browser's EventSource stops reconnecting for
good after one, so a draining or full instance answers 200, a `retry:` hint, and ends.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from operator import attrgetter

from . import wire
from .broker import BrokerError, Page
from .hub import RESET_EVENT
from .message import START, Message, MessageId, Position, parse_position
from .relay import Relay
from .sse import SSEResponse
from .subscriber import Subscriber

__all__ = ["HELLO_EVENT", "RESET_EVENT", "UNAVAILABLE_EVENT", "open_stream", "parse_cursor", "refuse_stream"]

log = logging.getLogger("service.stream")

HELLO_EVENT = "relay.hello"
EXPIRED_EVENT = "relay.expired"  # the token the stream was opened with expired; the stream ends
UNAVAILABLE_EVENT = "relay.unavailable"  # the stream could not be authorized now (hook down): retry later
_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no")]


def parse_cursor(raw: str | None, channels: tuple[str, ...]) -> tuple[dict[str, Position], bool]:
    """Positions per channel from a Last-Event-ID, and whether it was malformed.

    Single-channel streams use plain ids (`1700000000000-0-k2x9ab01`); multi-channel streams write a cursor of
    the form `a=<id>,b=<id>`. A plain id given to a multi-channel stream applies to every channel.
    """
    if raw is None or raw.strip() == "":
        return {}, False
    raw = raw.strip()
    if len(raw) > 64 * (len(channels) + 1) + 256:
        return {}, True
    if "=" not in raw:
        position = parse_position(raw)
        return ({c: position for c in channels}, False) if position is not None else ({}, True)
    positions: dict[str, Position] = {}
    for part in raw.split(","):
        name, _, value = part.partition("=")
        position = parse_position(value)
        if position is None or name not in channels:
            return {}, True
        positions[name] = position
    return positions, False


# What a stream writes of each message: its frame, or for the old chat's stream its form of it (both built once
# per message, see message.Message). attrgetter: a C call, no Python frame per delivery.
_FRAME = attrgetter("frame")
_LEGACY_FRAME = attrgetter("legacy_frame")


def open_stream(
    relay: Relay, channels: tuple[str, ...], last_event_id: str | None, client: str,
    expires_at: float | None = None, user: str | None = None, legacy: bool = False,
) -> SSEResponse:
    """A stream of `channels`. `legacy`: the old chat's `GET /server/events`, which shows the page's `chat`
    events in the old form (`Message.legacy_chunk`)."""
    settings = relay.settings
    refusal = relay.admit()
    if refusal is not None:
        log.info("stream turned away", extra={"reason": refusal, "client": client})
        return SSEResponse(None, _once(wire.retry(relay.jittered_retry_ms())), _HEADERS, settings.send_timeout,
                           settings.heartbeat_interval)
    sub = Subscriber(channels, settings.subscriber_queue_size, client, user, settings.subscriber_queue_bytes)
    if log.isEnabledFor(logging.DEBUG):  # not even its `extra` dict per stream otherwise
        log.debug("stream opened", extra={"channels": channels, "client": client, "resume": last_event_id})
    return SSEResponse(sub, _events(relay, sub, last_event_id, expires_at, legacy), _HEADERS, settings.send_timeout,
                       settings.heartbeat_interval, legacy, relay.edge)


def refuse_stream(relay: Relay, reason: str, message: str) -> SSEResponse:
    """A stream that cannot be decided on now (the authorization hook timed out, is down, busy or answered
    garbage): `200`, a `relay.unavailable` event saying why, a jittered `retry:`, and the end. An EventSource
    then reconnects by itself after the delay (a 503 would make it give up for good, and a browser tab would
    stay dead after a backend blip); the jitter spreads the reconnects of a whole crowd. Nothing is
    subscribed and no `id:` is sent, so the client's resume position is untouched."""
    retry = relay.jittered_retry_ms()
    log.info("stream turned away", extra={"reason": reason})
    body = wire.control(UNAVAILABLE_EVENT, {"reason": reason, "message": message, "retry_ms": retry}, None, retry)
    return SSEResponse(None, _once(body), _HEADERS, relay.settings.send_timeout, relay.settings.heartbeat_interval)


async def _once(body: bytes) -> AsyncIterator[bytes]:
    yield body


class _Cursor:
    """A multi-channel stream's `id:`: the last id sent per channel, written in front of every event."""

    def __init__(self, positions: dict[str, str]) -> None:
        self.ids = positions

    def __str__(self) -> str:
        return ",".join(f"{c}={i}" for c, i in self.ids.items())

    def frame(self, m: Message) -> bytes:
        if m.control:
            return m.envelope
        self.ids[m.channel] = m.id
        return wire.id_line(str(self)) + m.envelope


async def _events(
    relay: Relay, sub: Subscriber, last_event_id: str | None, expires_at: float | None = None, legacy: bool = False
) -> AsyncIterator[bytes]:
    """The stream's bytes, phase by phase (the module's docstring): phases 1 to 4 are `_Opening`'s, the live loop
    is here, in the generator the response iterates (one hop per write, nothing in between)."""
    # Registered here, not in open_stream: a generator that never starts never runs its `finally`.
    relay.register(sub)
    expiry: asyncio.TimerHandle | None = None
    if expires_at is not None:  # a token-authorised stream ends when its token does
        loop = asyncio.get_running_loop()
        expiry = loop.call_at(loop.time() + max(0.0, expires_at - time.time()), sub.close, "expired")
    try:
        opening = _Opening(relay, sub, last_event_id, _LEGACY_FRAME if legacy else _FRAME)
        # A phase with nothing to do is not entered: a new stream into a live channel with no Last-Event-ID (most
        # of a reconnect storm's) creates no generator for it.
        if not opening.join():
            # A coroutine per wait, not an async generator: most streams of a reconnect storm wait here, and an
            # async generator costs each its registration with the loop (a WeakSet entry, added and removed).
            while (ping := await opening.wait_live()) is not None:
                yield ping
            if opening.ended:
                return
        if opening.resumes():
            async for chunk in opening.read_first_pages():
                yield chunk
            if opening.ended:
                return
        yield opening.greeting()
        if opening.first or opening.malformed:
            async for chunk in opening.replay():
                yield chunk
        sub.go_live(opening.floors, opening.epochs)  # a single-channel stream may be written directly from now on
        cursor, frame_of = opening.cursor, opening.frame_of
        # This frame stays suspended for the stream's life: what only the start needed goes now.
        del opening
        # 5. Live: what queued since it joined (less the floors), then messages as they come, batched.
        batch = await sub.next_batch(first=True)
        while batch is not None:
            if not batch:
                yield wire.PING
            elif cursor is not None:
                yield b"".join(cursor.frame(m) for m in batch)
            elif len(batch) == 1:
                yield bytes(frame_of(batch[0]))
            else:
                yield b"".join(map(frame_of, batch))
            batch = await sub.next_batch()
        farewell = _farewell(relay, sub.closed_reason, expires_at)
        if farewell is not None:
            yield farewell
    finally:
        if expiry is not None:
            expiry.cancel()
        relay.unregister(sub)


def _farewell(relay: Relay, reason: str | None, expires_at: float | None) -> bytes | None:
    """The last frame of a closed stream: why its token ended it, or when to come back (a `retry:` with jitter)
    when the instance drains, shuts down or is full; nothing otherwise."""
    if reason == "expired":
        return wire.control(EXPIRED_EVENT, {"reason": "token expired", "expired_at": expires_at})
    if reason in ("drain", "shutdown", "full"):
        return wire.retry(relay.jittered_retry_ms())
    return None


class _Opening:
    """A stream until it is live (phases 1 to 4 of the module's docstring), each phase a method. What they
    compute for the live phase (`cursor`, `floors`, `epochs`) is read from here, and the object is dropped."""

    def __init__(self, relay: Relay, sub: Subscriber, last_event_id: str | None,
                 frame_of: Callable[[Message], memoryview]) -> None:
        self.relay, self.sub, self.last_event_id, self.frame_of = relay, sub, last_event_id, frame_of
        self.ended = False  # closed while it waited: the stream ends at once
        self.joined = 0.0  # time.monotonic() when it joined the hub
        self.owed = False  # the broker was told the stream is owed what was published since it joined
        self.positions: dict[str, Position] = {}
        self.malformed = False
        self.first: dict[str, Page] = {}
        self.cursor: _Cursor | None = None
        self.floors: dict[str, MessageId] = {}
        self.epochs: dict[str, str] = {}

    def join(self) -> bool:
        """1. Join the hub; whether the broker has every channel live already (else `wait_live`)."""
        self.joined = time.monotonic()
        relay, sub = self.relay, self.sub
        relay.hub.add(sub)
        is_live = relay.broker.is_live
        for channel in sub.channels:
            if not is_live(channel):
                return False
        return True

    async def wait_live(self) -> bytes | None:
        """1. Wait until the broker has every channel live (None), or a ping is due (the ping to send, then call
        again); None as well when the subscriber is closed meanwhile (`ended`).

        Waiting cannot fail (the broker retries subscribing on its own), so the stream parks on one future the
        relay's ticker (a ping due), its end and the channel going live all wake (`Subscriber.wait_live`): no
        task, no `asyncio.wait` and no timer per stream; in a reconnect storm every stream of a new room waits
        here, and those cost more than the rest of the wait. The channel going live is the broker's one future
        for it, whoever waits (`Broker.when_live`)."""
        relay, sub = self.relay, self.sub
        # Its position is not known yet (a channel being subscribed, or Redis unreachable). Once its 200 goes out
        # (with the first ping), the client has connected: it is owed every message published from the moment it
        # joined, not from whenever the position becomes known (docs/reliability.md). Under sse-starlette
        # (`pings_itself`) the 200 may go out with its own ping at any time.
        if not self.owed and sub.pings_itself:
            self.owed = True
            relay.hub.owe(sub, self.joined)
        while sub.closed_reason is None:
            pending = relay.hub.when_live(sub)
            if pending is None:
                return None
            await sub.wait_live(pending)
            if sub.closed_reason is None and sub.take_ping():
                if not self.owed:
                    self.owed = True
                    relay.hub.owe(sub, self.joined)
                return wire.PING
        self.ended = True
        return None

    def resumes(self) -> bool:
        """2, first half: the Last-Event-ID, parsed; whether there is history to read before the greeting."""
        self.positions, self.malformed = parse_cursor(self.last_event_id, self.sub.channels)
        return bool(self.positions) and not self.malformed

    async def read_first_pages(self) -> AsyncIterator[bytes]:
        """2. The first history page of each resumed channel (`resumes`), read before the greeting: its id depends
        on them."""
        relay, sub = self.relay, self.sub
        limit = relay.settings.history_page_entries
        for channel, position in self.positions.items():
            box: list[Page] = []
            reader = _history_reader(relay, channel, position, limit)
            async for ping in _pinging(relay, sub, reader, box):  # type: ignore[arg-type]
                yield ping
            if not box:
                self.ended = True
                return
            self.first[channel] = box[0]

    def greeting(self) -> bytes:
        """3. `relay.hello`, whose `id:` is the stream's position: where each resumed channel's history starts
        (the start of it, for a cursor it cannot honour), else the channel's position when the stream joined."""
        relay, channels, first, malformed = self.relay, self.sub.channels, self.first, self.malformed
        origin = self.sub.take_origin()
        head, tail = relay.hello_json
        if not first and not malformed and self.sub.single:  # a new stream of one channel: the common case
            channel = channels[0]
            position = origin.get(channel) or relay.broker.position(channel) or START
            self.floors = {channel: position.key}
            return wire.control_encoded(b"%s%s%s" % (head, wire.encode_data([channel]), tail), HELLO_EVENT,
                                        str(position), relay.settings.retry_ms)
        hello: dict[str, Position] = {}
        for channel in channels:
            page = first.get(channel)
            if malformed or (page is not None and not page.complete):
                hello[channel] = START
            elif page is not None:
                hello[channel] = self.positions[channel]
            else:
                hello[channel] = origin.get(channel) or relay.broker.position(channel) or START
        multi = not self.sub.single
        hello_id = str(hello[channels[0]]) if not multi else ",".join(f"{c}={p}" for c, p in hello.items())
        self.cursor = _Cursor({c: str(p) for c, p in hello.items()}) if multi else None
        self.floors = {c: p.key for c, p in hello.items() if c not in first and not malformed}
        # `retry:` rides in the hello event's block: a block without data is an empty event to some clients.
        # Its data is {"instance", "channels", "default_channel"}: only the channels are encoded per stream.
        return wire.control_encoded(b"%s%s%s" % (head, wire.encode_data(list(channels)), tail), HELLO_EVENT,
                                    hello_id, relay.settings.retry_ms)

    async def replay(self) -> AsyncIterator[bytes]:
        """4. Each resumed channel's history after its cursor, page by page (`relay.reset` first where the cursor
        cannot be honoured); `floors` and `epochs` record what was sent."""
        relay, last_event_id, malformed = self.relay, self.last_event_id, self.malformed
        if malformed:
            relay.metrics.resumes.labels("malformed").inc()
            yield wire.control(RESET_EVENT, {"reason": "malformed", "last_event_id": (last_event_id or "")[:200]})
        for channel in self.sub.channels:
            page = self.first.get(channel)
            if page is None and not malformed:
                continue  # not resumed: its position is the greeting's
            after: Position | None = self.positions.get(channel) if page is not None and page.complete else None
            if page is not None:
                relay.metrics.resumes.labels(page.reason or "ok").inc()
                if not page.complete:
                    yield wire.control(RESET_EVENT, {"reason": page.reason, "channel": channel,
                                                     "last_event_id": (last_event_id or "")[:200]})
                    page = None
            replay = _Replay(relay, self.sub, channel, after, page, self.cursor, self.frame_of)
            async for chunk in replay.run():
                yield chunk
            self.floors[channel] = replay.last
            if replay.epoch is not None:
                self.epochs[channel] = replay.epoch


def _history_reader(relay: Relay, channel: str, after: Position | None, limit: int) -> Callable[[], Awaitable[Page]]:
    return lambda: relay.broker.history(channel, after, limit)


class _Replay:
    """History of one channel after `after` (None: everything retained), page by page, each page written
    before the next is read, so a resume holds one page in memory and Redis one bounded read at a time."""

    def __init__(self, relay: Relay, sub: Subscriber, channel: str, after: Position | None, page: Page | None,
                 cursor: _Cursor | None, frame_of: Callable[[Message], memoryview] = _FRAME) -> None:
        self.relay, self.sub, self.channel, self.cursor, self.frame_of = relay, sub, channel, cursor, frame_of
        self.after, self.page = after, page
        self.last: MessageId = after.key if after is not None else (0, 0)
        self.epoch: str | None = None  # of the history it read

    async def run(self) -> AsyncIterator[bytes]:
        limit = self.relay.settings.history_page_entries
        page = self.page
        while self.sub.closed_reason is None:
            if page is None:
                box: list[Page] = []
                reader = _history_reader(self.relay, self.channel, self.after, limit)
                async for ping in _pinging(self.relay, self.sub, reader, box):  # type: ignore[arg-type]
                    yield ping
                if not box:
                    return
                page = box[0]
                if not page.complete:
                    # Trimmed under a slow reader: the same contract as at the start.
                    yield wire.control(RESET_EVENT, {"reason": page.reason, "channel": self.channel})
                    self.after, self.last, page = None, (0, 0), None
                    continue
            if page.messages:
                tail = page.messages[-1]
                self.last, self.after, self.epoch = tail.key, Position(tail.key, tail.epoch), tail.epoch
                cursor = self.cursor
                yield b"".join(cursor.frame(m) for m in page.messages) if cursor is not None else b"".join(
                    map(self.frame_of, page.messages))
            if not page.more:
                return
            page = None


async def _pinging(relay: Relay, sub: Subscriber, work: Callable[[], Awaitable[object]],
                   box: list[object] | None = None) -> AsyncIterator[bytes]:
    """Run `work` until it succeeds, yielding pings while it takes long or fails, so the stream stays open.

    A broker error is retried with backoff and jitter: a read that timed out is not re-issued at once while the
    abandoned one may still be running. Ends early when the subscriber is closed (`box` then stays empty).
    """
    delay = 0.0
    heartbeat = relay.settings.heartbeat_interval
    while sub.closed_reason is None:
        if delay:
            deadline = time.monotonic() + delay * random.uniform(0.5, 1.5)
            while (left := deadline - time.monotonic()) > 0 and sub.closed_reason is None:
                await asyncio.sleep(min(left, heartbeat / 2))
                if sub.take_ping():
                    yield wire.PING
            if sub.closed_reason is not None:
                return
        task = asyncio.ensure_future(work())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=heartbeat / 2)
                if done:
                    break
                if sub.closed_reason is not None:
                    return
                if sub.take_ping():
                    yield wire.PING
            result = task.result()
        except BrokerError as exc:
            delay = min(max(delay * 2, 0.25), 5.0)
            log.info("history read failed; retrying", extra={"kind": exc.kind, "retry_s": delay})
            continue
        finally:
            if not task.done():
                task.cancel()
        if box is not None:
            box.append(result)
        return
