"""The Redis broker: a Stream per channel for history, pub/sub for live delivery, written in one Lua step.

Keys of one SSE channel share a hash tag, `sse:{room}:log` (the Stream) and `sse:{room}:live` (the pub/sub
channel), so they sit in one Cluster slot. The Stream entry id is the message id.

Receiving is one pub/sub connection per instance, owned by one supervised reader task:
- it has no client-side retry (redis-py would otherwise reconnect and re-subscribe silently, and the gap would
  never be filled); every error ends the session, and a new one re-subscribes and fills each channel's gap from
  its Stream, starting after the last id this instance dispatched;
- it probes the connection with PING when idle, so a half-open TCP path is noticed within two probe intervals;
- it never waits on a client: the sink only enqueues.

Per channel, the reader delivers in id order and never twice (a cursor per channel), which is what makes the
subscribe-then-read-history dance race-free.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from ..message import Message, MessageId, format_id, parse_id
from .base import BrokerUnavailable, History, Sink
from .redis_format import HISTORY_SCRIPT, PUBLISH_SCRIPT, keys_for, publish_args

if TYPE_CHECKING:
    from ..config import Settings

__all__ = ["RedisBroker", "keys_for"]

log = logging.getLogger("service.broker.redis")

_PROBE = b"sse-relay-probe"
_BACKOFF_MIN, _BACKOFF_MAX = 0.05, 5.0


class _Stale(ConnectionError):
    """The pub/sub connection stopped answering probes."""


class RedisBroker:
    def __init__(
        self,
        url: str,
        *,
        prefix: str = "sse",
        history_size: int = 1000,
        history_ttl: float = 3600.0,
        probe_interval: float = 2.0,
        publish_command: str = "PUBLISH",
    ) -> None:
        self._url = url
        self._prefix = prefix
        self._maxlen = history_size
        self._ttl_ms = int(history_ttl * 1000)
        self._probe = probe_interval
        self._publish_command = publish_command
        # Publishing and reading history fail fast: a publish during an outage answers 503, never hangs.
        self._cmd = self._client(socket_timeout=max(2.0, probe_interval))
        self._sub_redis = self._client(socket_timeout=None)
        self._publish_script = self._cmd.register_script(PUBLISH_SCRIPT)
        self._history_script = self._cmd.register_script(HISTORY_SCRIPT)
        self._sink: Sink | None = None
        self._task: asyncio.Task[None] | None = None
        self._pubsub: PubSub | None = None
        self._connected = False
        self._wanted: set[str] = set()
        self._active: set[str] = set()
        self._cursor: dict[str, MessageId] = {}
        self._filling: dict[str, list[Message]] = {}
        self._live_to_channel: dict[bytes, str] = {}
        self.reconnects = 0

    @classmethod
    def from_settings(cls, settings: "Settings") -> "RedisBroker":
        assert settings.redis_url
        return cls(
            settings.redis_url,
            prefix=settings.redis_key_prefix,
            history_size=settings.history_size,
            history_ttl=settings.history_ttl,
            probe_interval=settings.redis_probe_interval,
        )

    def _client(self, socket_timeout: float | None) -> Redis:
        return Redis.from_url(
            self._url,
            socket_connect_timeout=2.0,
            socket_timeout=socket_timeout,
            socket_keepalive=True,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def start(self, sink: Sink) -> None:
        self._sink = sink
        self._task = asyncio.create_task(self._supervise(), name="redis-pubsub-reader")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self._connected = False
        await self._cmd.aclose()
        await self._sub_redis.aclose()

    def ready(self) -> bool:
        return self._connected

    # -- publishing and history ------------------------------------------------------------------------------

    async def publish(self, channel: str, data: bytes, event: str | None = None) -> str:
        stream, live = keys_for(self._prefix, channel)
        try:
            raw = await self._publish_script(
                keys=[stream, live], args=publish_args(data, event, self._maxlen, self._ttl_ms, self._publish_command)
            )
        except RedisError as exc:
            raise BrokerUnavailable(f"Redis did not take the message: {exc}") from exc
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    async def history(self, channel: str, after: MessageId | None) -> History:
        stream, _ = keys_for(self._prefix, channel)
        start = "-" if not after or after == (0, 0) else f"({format_id(after)}"
        try:
            exists, trimmed, first, now_ms, entries = await self._history_script(
                keys=[stream], args=[start, self._maxlen * 2 + 100]
            )
        except RedisError as exc:
            raise BrokerUnavailable(f"Redis did not answer the history read: {exc}") from exc
        messages = [self._from_entry(channel, entry) for entry in entries]
        if after is None or after == (0, 0):
            return History(messages, True)
        if not exists:
            # The key expired: it held nothing newer than one TTL ago, so only an id older than that can have missed.
            return History(messages, after[0] >= int(now_ms) - self._ttl_ms)
        # An id just below the first retained one may be reported incomplete when it was the last one trimmed:
        # a needless reset (what follows is all retained history) at the exact boundary, never a silent loss.
        return History(messages, not trimmed or after >= (parse_id(first) or (0, 0)))

    @staticmethod
    def _from_entry(channel: str, entry: Any) -> Message:
        raw_id, fields = entry
        values = dict(zip(fields[::2], fields[1::2]))
        event = values.get(b"e", b"").decode()
        return Message.create(channel, raw_id.decode(), event, values.get(b"d", b"null"))

    async def last_id(self, channel: str) -> str | None:
        try:
            tail = await self._tail(channel)
        except RedisError as exc:
            raise BrokerUnavailable(f"Redis did not answer: {exc}") from exc
        return format_id(tail) if tail != (0, 0) else None

    async def _tail(self, channel: str) -> MessageId:
        stream, _ = keys_for(self._prefix, channel)
        entries = await self._cmd.xrevrange(stream, "+", "-", count=1)
        return (parse_id(entries[0][0]) or (0, 0)) if entries else (0, 0)

    # -- subscriptions ---------------------------------------------------------------------------------------

    async def subscribe(self, channel: str) -> None:
        if channel in self._wanted:
            return
        self._wanted.add(channel)
        _, live = keys_for(self._prefix, channel)
        self._live_to_channel[live.encode()] = channel
        pubsub = self._pubsub
        if not self._connected or pubsub is None:
            # The reader subscribes it when it is back. A margin for clock skew: a fresh stream that gets a
            # message from just before it connected has lost nothing.
            self._cursor[channel] = (int(time.time() * 1000) - 2000, 0)
            return
        self._filling[channel] = []
        try:
            self._cursor[channel] = await self._tail(channel)
            await pubsub.subscribe(live)
            self._active.add(channel)
            await self._fill([channel])
        except RedisError as exc:
            # The reader's session fails on the same fault and re-subscribes everything in `_wanted`.
            log.warning("subscribe deferred until Redis answers", extra={"channel": channel, "error": str(exc)})
            self._cursor.setdefault(channel, (int(time.time() * 1000) - 2000, 0))
        finally:
            self._flush_filling(channel)

    async def unsubscribe(self, channel: str) -> None:
        self._wanted.discard(channel)
        self._cursor.pop(channel, None)
        _, live = keys_for(self._prefix, channel)
        if channel in self._active:
            self._active.discard(channel)
            if self._pubsub is not None and self._connected:
                try:
                    await self._pubsub.unsubscribe(live)
                except RedisError:
                    pass  # the session is ending anyway; a new one subscribes only `_wanted`
        if channel not in self._wanted:
            self._live_to_channel.pop(live.encode(), None)

    # -- delivery --------------------------------------------------------------------------------------------

    def _deliver(self, message: Message) -> None:
        channel = message.channel
        buffer = self._filling.get(channel)
        if buffer is not None:
            buffer.append(message)
            return
        cursor = self._cursor.get(channel)
        if cursor is None or message.key <= cursor:
            return  # not subscribed any more, or already delivered (gap fill overlapping live)
        self._cursor[channel] = message.key
        assert self._sink is not None
        self._sink.dispatch(message)

    def _flush_filling(self, channel: str) -> None:
        for message in self._filling.pop(channel, ()):
            self._deliver(message)

    async def _fill(self, channels: list[str]) -> None:
        """Deliver what each channel's Stream holds after its cursor (the gap an outage or a subscribe left)."""
        for channel in channels:
            if channel not in self._cursor:
                continue
            history = await self.history(channel, self._cursor[channel])
            buffer = self._filling.pop(channel, None)
            for message in history.messages:
                self._deliver(message)
            if buffer is not None:
                self._filling[channel] = buffer

    # -- the reader ------------------------------------------------------------------------------------------

    async def _supervise(self) -> None:
        """Keep a reader session alive forever; every failure is logged, backed off with jitter and retried."""
        backoff = _BACKOFF_MIN
        while True:
            started = time.monotonic()
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the reader must never die for good
                was_connected = self._connected
                self._connected = False
                if was_connected:
                    self.reconnects += 1
                    log.warning("Redis pub/sub connection lost; reconnecting", extra={"error": repr(exc)})
                else:
                    log.debug("Redis not reachable yet", extra={"error": repr(exc)})
            finally:
                self._connected = False
                await self._drop_pubsub()
            if time.monotonic() - started > 10:
                backoff = _BACKOFF_MIN
            await asyncio.sleep(backoff * random.uniform(0.5, 1.5))
            backoff = min(backoff * 2, _BACKOFF_MAX)

    async def _drop_pubsub(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        self._active.clear()
        if pubsub is not None:
            try:
                await pubsub.aclose()
            except Exception:  # noqa: BLE001 - closing a broken connection may fail in many ways
                pass

    async def _session(self) -> None:
        pubsub = self._sub_redis.pubsub(ignore_subscribe_messages=True)
        self._pubsub = pubsub
        # A channel that is ours alone keeps the connection in subscribed mode even with no SSE channel.
        await pubsub.subscribe(f"{self._prefix}:probe")
        while missing := sorted(self._wanted - self._active):
            await pubsub.subscribe(*(keys_for(self._prefix, c)[1] for c in missing))
            self._active.update(missing)
            await self._fill(missing)
        self._connected = True
        log.info("Redis pub/sub connected", extra={"channels": len(self._active)})
        await self._read(pubsub)

    async def _read(self, pubsub: PubSub) -> None:
        last_rx = time.monotonic()
        probe_sent = False
        while True:
            msg = await pubsub.get_message(timeout=self._probe)
            now = time.monotonic()
            if msg is None:
                if now - last_rx >= self._probe * 2 and probe_sent:
                    raise _Stale(f"no answer from Redis for {now - last_rx:.1f}s")
                if now - last_rx >= self._probe:
                    await pubsub.ping(_PROBE)
                    probe_sent = True
                continue
            last_rx = now
            probe_sent = False
            if msg["type"] == "message":
                self._on_payload(msg["channel"], msg["data"])
            elif msg["type"] == "smessage":
                self._on_payload(msg["channel"], msg["data"])

    def _on_payload(self, live: bytes, payload: bytes) -> None:
        channel = self._live_to_channel.get(live)
        if channel is None:
            return
        try:
            raw_id, event, data = payload.split(b"\n", 2)
            message = Message.create(channel, raw_id.decode(), event.decode(), data)
        except ValueError:
            log.error("malformed payload on %s ignored", live, extra={"payload": payload[:200]})
            return
        self._deliver(message)
