"""One SSE stream: resume from history, then live messages, until the client leaves or the relay ends it.

Resume is race-free because the subscriber joins the hub *before* history is read: every message is then in
the history read, in the live queue, or both, and `floors` drops the live copies of what history already sent.

The bytes go out through `sse.SSEResponse` (write timeout, disconnect detection; pings come from the relay's
heartbeat ticker through `Subscriber.ping`). Once a single-channel stream is live it may be written to directly
by the hub (`Subscriber.direct`). A stream is never refused with a non-200 for a passing condition: a browser's
EventSource stops reconnecting for good after one, so a draining or full instance answers 200, a `retry:` hint,
and ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import orjson

from .broker import BrokerUnavailable
from .message import Message, MessageId, format_id, parse_id
from .relay import Relay
from .sse import PING, SSEResponse
from .subscriber import Subscriber

__all__ = ["RESET_EVENT", "open_stream", "parse_cursor"]

log = logging.getLogger("service.stream")

RESET_EVENT = "relay.reset"
HELLO_EVENT = "relay.hello"
EXPIRED_EVENT = "relay.expired"  # the token the stream was opened with expired; the stream ends
_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no")]


def parse_cursor(raw: str | None, channels: tuple[str, ...]) -> tuple[dict[str, MessageId], bool]:
    """Positions per channel from a Last-Event-ID, and whether it was malformed.

    Single-channel streams use plain ids (`1700000000000-0`); multi-channel streams write a cursor of the form
    `a=1700000000000-0,b=1699999999999-3`. A plain id given to a multi-channel stream applies to every channel.
    """
    if raw is None or raw.strip() == "":
        return {}, False
    raw = raw.strip()
    if "=" not in raw:
        key = parse_id(raw)
        return ({c: key for c in channels}, False) if key is not None else ({}, True)
    positions: dict[str, MessageId] = {}
    for part in raw.split(","):
        name, _, value = part.partition("=")
        key = parse_id(value)
        if key is None or name not in channels:
            return {}, True
        positions[name] = key
    return positions, False


def _retry_line(ms: int) -> bytes:
    return b"retry: %d\n\n" % ms


def _event(name: str, payload: object) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


def open_stream(
    relay: Relay, channels: tuple[str, ...], last_event_id: str | None, client: str,
    expires_at: float | None = None, user: str | None = None,
) -> SSEResponse:
    settings = relay.settings
    refusal = relay.admit()
    if refusal is not None:
        log.info("stream turned away", extra={"reason": refusal, "client": client})
        return SSEResponse(None, _once(_retry_line(relay.jittered_retry_ms())), _HEADERS, settings.send_timeout)
    sub = Subscriber(channels, settings.subscriber_queue_size, client, user)
    log.debug("stream opened", extra={"channels": channels, "client": client, "resume": last_event_id})
    return SSEResponse(sub, _events(relay, sub, last_event_id, expires_at), _HEADERS, settings.send_timeout)


async def _once(body: bytes) -> AsyncIterator[bytes]:
    yield body


async def _events(
    relay: Relay, sub: Subscriber, last_event_id: str | None, expires_at: float | None = None
) -> AsyncIterator[bytes]:
    channels = sub.channels
    multi = not sub.single
    # Registered here, not in open_stream: a generator that never starts never runs its `finally`.
    relay.register(sub)
    expiry: asyncio.TimerHandle | None = None
    if expires_at is not None:  # a token-authorised stream ends when its token does
        loop = asyncio.get_running_loop()
        expiry = loop.call_at(loop.time() + max(0.0, expires_at - time.time()), sub.close, "expired")
    try:
        await relay.hub.add(sub)
        # `retry:` rides in the hello event's block: a block without data is an empty event to some clients.
        yield b"retry: %d\n" % relay.settings.retry_ms + _event(
            HELLO_EVENT,
            {"instance": relay.settings.instance, "channels": list(channels),
             "default_channel": relay.settings.default_channel},
        )
        positions, malformed = parse_cursor(last_event_id, channels)
        floors: dict[str, MessageId] = {}
        # Channels with no message seen yet start "now", so a reconnect does not miss their first messages.
        now: MessageId = (int(time.time() * 1000), 0)
        cursor = {c: positions.get(c, now) for c in channels} if multi else {}
        if malformed:
            # Same contract as an expired id: reset, then everything retained, then live.
            relay.metrics.resumes.labels("malformed").inc()
            yield _event(RESET_EVENT, {"reason": "malformed", "last_event_id": last_event_id})
            positions = {c: (0, 0) for c in channels}
        for channel, after in positions.items():
            while True:
                try:
                    complete, messages = await _history(relay, channel, after)
                    break
                except BrokerUnavailable:
                    # The stream stays open (pings go on) and resumes when the broker is back.
                    if sub.closed_reason is not None:
                        return
                    if sub.ping_due:
                        sub.ping_due = False
                        yield PING
                    await asyncio.sleep(0.2)
            relay.metrics.resumes.labels("ok" if complete else "expired").inc()
            chunk = [] if complete else [
                _event(RESET_EVENT, {"reason": "expired", "channel": channel, "last_event_id": last_event_id})
            ]
            floors[channel] = messages[-1].key if messages else after
            for m in messages:
                chunk.append(_frame_multi(m, cursor) if multi else m.frame)
            if chunk:
                yield b"".join(chunk)
        sub.set_floors(floors)
        if not multi:
            sub.direct = sub.writer  # live: the hub may write to this connection itself from now on
        while True:
            await sub.wait()
            items = sub.take()
            sub.ping_due = False
            sub.wrote = True
            if items:
                if multi:
                    yield b"".join(_frame_multi(m, cursor) for m in items)
                elif len(items) == 1:
                    yield items[0].frame
                else:
                    yield b"".join(m.frame for m in items)
            elif sub.closed_reason is None:
                yield PING
            if sub.closed_reason is not None:
                sub.direct = None
                if sub.closed_reason == "expired":
                    yield _event(EXPIRED_EVENT, {"reason": "token expired", "expired_at": expires_at})
                if sub.closed_reason in ("drain", "shutdown", "full"):
                    yield _retry_line(relay.jittered_retry_ms())
                return
    finally:
        if expiry is not None:
            expiry.cancel()
        relay.unregister(sub)


async def _history(relay: Relay, channel: str, after: MessageId) -> tuple[bool, list[Message]]:
    """(complete, messages after `after`). Not complete: `after` is no longer retained, and what follows is
    everything that is, from which the client rebuilds its view. Raises BrokerUnavailable."""
    history = await relay.broker.history(channel, after)
    if history.complete:
        return True, history.messages
    return False, (await relay.broker.history(channel, None)).messages


def _frame_multi(m: Message, cursor: dict[str, MessageId]) -> bytes:
    cursor[m.channel] = m.key
    cid = ",".join(f"{c}={format_id(k)}" for c, k in cursor.items())
    return b"id: " + cid.encode() + b"\n" + m.envelope
