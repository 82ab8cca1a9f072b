"""Publish from any Python process straight to Redis: a Celery/RQ worker, a Django view, a script.

No HTTP hop: the message goes into the channel's Stream and onto its live pub/sub channel in the same atomic step
the service itself uses (`broker.redis_format`), so subscribers on every replica get it, with an id, in order,
and resumable. Failures raise `PublishError` (not published; retrying is safe) or `PublishOutcomeUnknown` (the
answer was lost: retry with the same `idempotency_key` and it cannot be published twice).

    from service.publisher import Publisher            # sync
    Publisher("redis://localhost:6379/0").publish("room-1", {"text": "hi"}, event="chat")

    from service.publisher import AsyncPublisher       # asyncio
    async with AsyncPublisher("redis://localhost:6379/0") as pub:
        await pub.publish("room-1", {"text": "hi"})
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from .broker.base import BrokerError, IdempotencyKeyReused, OutcomeUnknown
from .broker.redis_errors import classify
from .broker.redis_format import PUBLISH_SCRIPT, publish_args, publish_keys
from .message import encode_data, valid_channel, valid_event

__all__ = ["AsyncPublisher", "IdempotencyKeyReused", "PublishError", "PublishOutcomeUnknown", "Publisher"]


class PublishError(RuntimeError):
    """The message was not published (Redis unreachable or refused it). Retrying is safe."""


class PublishOutcomeUnknown(PublishError):
    """Redis may or may not have published it (a timeout, a connection lost mid-reply). Retry with the same
    `idempotency_key` to get the message's id without publishing it twice."""


def _error(exc: Exception, channel: str) -> PublishError:
    error: BrokerError = classify(exc, f"publish to {channel!r}")
    return PublishOutcomeUnknown(str(error)) if isinstance(error, OutcomeUnknown) else PublishError(str(error))


def _id(channel: str, idempotency_key: str | None, raw_id: Any, seen: Any) -> str:
    """The message id of the script's reply; a key reused for another message raises `IdempotencyKeyReused` (a
    `ValueError`, as for other bad arguments: nothing was published)."""
    message_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
    if int(seen) == 2:
        raise IdempotencyKeyReused(channel, idempotency_key or "", message_id)
    return message_id


def _prepare(channel: str, data: Any, event: str | None, max_channel_length: int) -> bytes:
    if not valid_channel(channel, max_channel_length):
        raise ValueError(f"invalid channel name {channel!r}: 1-{max_channel_length} of A-Z a-z 0-9 _ - . :")
    if event is not None and not valid_event(event):
        raise ValueError(f"invalid event name {event!r}: 1-64 of A-Z a-z 0-9 _ - . : / (not starting 'relay.')")
    return encode_data(data)


class _Options:
    def __init__(self, prefix: str, history_size: int, history_ttl: float, max_channel_length: int,
                 sharded: bool, history_meta_ttl: float = 86400.0, idempotency_ttl: float = 300.0) -> None:
        # The same defaults as the service's settings: keep them equal to the service's HISTORY_* values.
        self.prefix = prefix
        self.history_size = history_size
        self.ttl_ms = int(history_ttl * 1000)
        self.meta_ttl_ms = int(history_meta_ttl * 1000)
        self.idempotency_ttl_ms = int(idempotency_ttl * 1000)
        self.max_channel_length = max_channel_length
        self.command = "SPUBLISH" if sharded else "PUBLISH"

    def _call(self, channel: str, data: Any, event: str | None,
              idempotency_key: str | None) -> tuple[list[str], list[bytes | str | int]]:
        payload = _prepare(channel, data, event, self.max_channel_length)
        if idempotency_key is not None and not (0 < len(idempotency_key) <= 128):
            raise ValueError("idempotency_key must be 1-128 characters")
        ttl = self.idempotency_ttl_ms if idempotency_key else 0
        return (publish_keys(self.prefix, channel, idempotency_key),
                publish_args(payload, event, self.history_size, self.ttl_ms, self.meta_ttl_ms, self.command, ttl))


class Publisher(_Options):
    """Synchronous publisher; thread-safe (redis-py's connection pool), one per process is enough."""

    def __init__(self, url: str, *, prefix: str = "sse", history_size: int = 1000, history_ttl: float = 3600.0,
                 max_channel_length: int = 128, sharded: bool = False, client: redis.Redis | None = None,
                 history_meta_ttl: float = 86400.0, idempotency_ttl: float = 300.0) -> None:
        super().__init__(prefix, history_size, history_ttl, max_channel_length, sharded, history_meta_ttl,
                         idempotency_ttl)
        self._redis = client or redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5, protocol=2,
                                                     retry=Retry(NoBackoff(), 0))
        self._script = self._redis.register_script(PUBLISH_SCRIPT)

    def publish(self, channel: str, data: Any, event: str | None = None, idempotency_key: str | None = None) -> str:
        """Publish one JSON-serialisable value; returns the message id (the SSE `id:`). With `idempotency_key`,
        a second publish with the same key (within IDEMPOTENCY_TTL) returns the first one's id instead, and one
        with the same key but another event or data raises `IdempotencyKeyReused` (nothing published)."""
        keys, args = self._call(channel, data, event, idempotency_key)
        try:
            raw_id, seen = self._script(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            raise _error(exc, channel) from exc
        return _id(channel, idempotency_key, raw_id, seen)

    def close(self) -> None:
        self._redis.close()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncPublisher(_Options):
    """asyncio publisher, for async workers and services that are not the relay itself."""

    def __init__(self, url: str, *, prefix: str = "sse", history_size: int = 1000, history_ttl: float = 3600.0,
                 max_channel_length: int = 128, sharded: bool = False,
                 client: aioredis.Redis | None = None, history_meta_ttl: float = 86400.0,
                 idempotency_ttl: float = 300.0) -> None:
        super().__init__(prefix, history_size, history_ttl, max_channel_length, sharded, history_meta_ttl,
                         idempotency_ttl)
        self._redis = client or aioredis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5, protocol=2,
                                                        retry=Retry(NoBackoff(), 0))
        self._script = self._redis.register_script(PUBLISH_SCRIPT)

    async def publish(self, channel: str, data: Any, event: str | None = None,
                      idempotency_key: str | None = None) -> str:
        keys, args = self._call(channel, data, event, idempotency_key)
        try:
            raw_id, seen = await self._script(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            raise _error(exc, channel) from exc
        return _id(channel, idempotency_key, raw_id, seen)

    async def aclose(self) -> None:
        await self._redis.aclose()

    async def __aenter__(self) -> AsyncPublisher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
