"""One SSE stream: resume from history, then live messages, until the client leaves or the relay ends it.

Resume is race-free because the subscriber joins the hub *before* history is read: every message is then in
the history read, in the live queue, or both, and `floors` drops the live copies of what history already sent.

The response is sse-starlette's `EventSourceResponse` (pings, disconnect detection, send timeout), fed with
pre-encoded bytes. A stream is never refused with a non-200 for a passing condition: a browser's EventSource
stops reconnecting for good after one, so a draining or full instance answers 200, a `retry:` hint, and ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator

import orjson
from sse_starlette.sse import EventSourceResponse, SendTimeoutError, ServerSentEvent
from starlette.types import Receive, Scope, Send

from .broker import BrokerUnavailable
from .message import Message, MessageId, format_id, parse_id
from .relay import Relay
from .subscriber import Subscriber

__all__ = ["RESET_EVENT", "open_stream", "parse_cursor"]

log = logging.getLogger("service.stream")

RESET_EVENT = "relay.reset"
HELLO_EVENT = "relay.hello"
EXPIRED_EVENT = "relay.expired"  # the token the stream was opened with expired; the stream ends
_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class _Response(EventSourceResponse):
    """An EventSourceResponse whose write timeout ends the stream quietly: a stalled client is routine."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except SendTimeoutError:
            log.info("client stopped reading; connection aborted", extra={"path": scope.get("path")})
            _abort(receive)
        except OSError:
            pass  # the peer went away mid-write


def _abort(receive: Receive) -> None:
    """Drop the connection without flushing: a graceful close would wait for a client that does not read.

    uvicorn's `receive` is a bound method of its request cycle, which holds the transport. Elsewhere the
    server's own write timeout has to do this.
    """
    transport = getattr(getattr(receive, "__self__", None), "transport", None)
    if transport is not None and hasattr(transport, "abort"):
        transport.abort()


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
) -> _Response:
    settings = relay.settings
    refusal = relay.admit()
    if refusal is not None:
        log.info("stream turned away", extra={"reason": refusal, "client": client})
        body = _retry_line(relay.jittered_retry_ms())
        return _Response(_once(body), headers=_HEADERS, ping=0)
    sub = Subscriber(channels, settings.subscriber_queue_size, client, user)
    log.debug("stream opened", extra={"channels": channels, "client": client, "resume": last_event_id})
    return _Response(
        _events(relay, sub, last_event_id, expires_at),
        headers=_HEADERS,
        ping=settings.heartbeat_interval,
        ping_message_factory=lambda: ServerSentEvent(comment="ping"),
        send_timeout=settings.send_timeout,
        sep="\n",
    )


async def _once(body: bytes) -> AsyncIterator[bytes]:
    yield body


async def _events(
    relay: Relay, sub: Subscriber, last_event_id: str | None, expires_at: float | None = None
) -> AsyncIterator[bytes]:
    channels = sub.channels
    multi = len(channels) > 1
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
            history = await _read_history(relay, sub, channel, after)
            if history is None:
                return
            messages, complete = history
            chunk = []
            if not complete:
                relay.metrics.resumes.labels("expired").inc()
                chunk.append(_event(RESET_EVENT, {"reason": "expired", "channel": channel, "last_event_id": last_event_id}))
                # What follows is everything still retained: the client rebuilds its view from it.
                full = await _read_history(relay, sub, channel, None)
                if full is None:
                    return
                messages = full[0]
            else:
                relay.metrics.resumes.labels("ok").inc()
            floors[channel] = messages[-1].key if messages else after
            for m in messages:
                chunk.append(_frame_multi(m, cursor) if multi else m.frame)
            if chunk:
                yield b"".join(chunk)
        while True:
            await sub.wait()
            items = sub.take()
            if items:
                if floors:
                    items = _above_floors(items, floors)
                if multi:
                    yield b"".join(_frame_multi(m, cursor) for m in items)
                elif len(items) == 1:
                    yield items[0].frame
                else:
                    yield b"".join(m.frame for m in items)
            if sub.closed_reason is not None:
                if sub.closed_reason == "expired":
                    yield _event(EXPIRED_EVENT, {"reason": "token expired", "expired_at": expires_at})
                if sub.closed_reason in ("drain", "shutdown", "full"):
                    yield _retry_line(relay.jittered_retry_ms())
                return
    finally:
        if expiry is not None:
            expiry.cancel()
        relay.unregister(sub)


def _above_floors(items: list[Message], floors: dict[str, MessageId]) -> list[Message]:
    """Drop live copies of messages history already sent; a channel's floor is dropped once passed."""
    kept = []
    for m in items:
        floor = floors.get(m.channel)
        if floor is None:
            kept.append(m)
        elif m.key > floor:
            del floors[m.channel]
            kept.append(m)
    return kept


def _frame_multi(m: Message, cursor: dict[str, MessageId]) -> bytes:
    cursor[m.channel] = m.key
    cid = ",".join(f"{c}={format_id(k)}" for c, k in cursor.items())
    return b"id: " + cid.encode() + b"\n" + m.envelope


async def _read_history(
    relay: Relay, sub: Subscriber, channel: str, after: MessageId | None
) -> tuple[list[Message], bool] | None:
    """History, retried while the broker is down: the stream stays open (pings go on) and resumes when back.

    Returns None when the subscriber was closed meanwhile.
    """
    delay = 0.1
    while sub.closed_reason is None:
        try:
            history = await relay.broker.history(channel, after)
            return history.messages, history.complete
        except BrokerUnavailable:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
    return None
