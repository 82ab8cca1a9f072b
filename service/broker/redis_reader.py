"""One supervised pub/sub connection: to the single Redis, or to one Redis Cluster primary.

- No client-side retry: every error ends the session, and a new session re-subscribes its channels and asks the
  broker to fill their gaps from the Streams, so a blink never loses a message unnoticed.
- When idle it PINGs; two probe intervals without any answer mean a half-open path: the session is restarted.
- It never waits on a client: delivery only enqueues.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import TYPE_CHECKING

from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from ..tasks import cancel_and_wait

if TYPE_CHECKING:
    from .redis import RedisBroker

__all__ = ["Reader"]

log = logging.getLogger("service.broker.redis")

_PROBE = b"sse-relay-probe"
_BACKOFF_MIN, _BACKOFF_MAX = 0.05, 5.0


class _Stale(ConnectionError):
    """The pub/sub connection stopped answering probes."""


class Reader:
    def __init__(self, broker: RedisBroker, client: Redis, name: str, probe_channel: str, probe_interval: float,
                 sharded: bool) -> None:
        self._broker = broker
        self._client = client
        self.name = name
        self._probe_channel = probe_channel
        self._probe = probe_interval
        self._sharded = sharded
        self._pubsub: PubSub | None = None
        self._active: set[str] = set()
        self.connected = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._supervise(), name=f"redis-reader-{self.name}")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self.connected = False
        await self._client.aclose()

    async def add(self, channel: str) -> None:
        """Subscribe now (the session is up); raises RedisError if the connection fails meanwhile."""
        assert self._pubsub is not None
        await self._sub(self._pubsub, [self._broker.live_key(channel)])
        self._active.add(channel)

    async def remove(self, channel: str) -> None:
        if channel in self._active:
            self._active.discard(channel)
            if self._pubsub is not None and self.connected:
                try:
                    live = self._broker.live_key(channel)
                    if self._sharded:
                        await self._pubsub.sunsubscribe(live)
                    else:
                        await self._pubsub.unsubscribe(live)
                except Exception:  # noqa: BLE001 - the session is ending anyway; a new one subscribes what is wanted
                    pass

    async def _sub(self, pubsub: PubSub, names: list[str]) -> None:
        if self._sharded:
            await pubsub.ssubscribe(*names)
        else:
            await pubsub.subscribe(*names)

    async def _supervise(self) -> None:
        """Keep a session alive forever; every failure is logged, backed off with jitter and retried."""
        backoff = _BACKOFF_MIN
        while True:
            started = time.monotonic()
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the reader must never die for good
                if self.connected:
                    self._broker.connection_lost()
                    log.warning("Redis pub/sub connection lost; reconnecting",
                                extra={"node": self.name, "error": repr(exc)})
                else:
                    log.debug("Redis not reachable yet", extra={"node": self.name, "error": repr(exc)})
            finally:
                self.connected = False
                await self._drop()
            if self._sharded:
                await self._broker.reroute()  # a failover or resharding may have moved this node's slots
            if time.monotonic() - started > 10:
                backoff = _BACKOFF_MIN
            await asyncio.sleep(backoff * random.uniform(0.5, 1.5))
            backoff = min(backoff * 2, _BACKOFF_MAX)

    async def _drop(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        self._active.clear()
        if pubsub is not None:
            try:
                await pubsub.aclose()  # type: ignore[no-untyped-call]
            except Exception:  # noqa: BLE001 - closing a broken connection may fail in many ways
                pass

    async def _session(self) -> None:
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        self._pubsub = pubsub
        await self._sub(pubsub, [self._probe_channel])
        while missing := [c for c in self._broker.channels_of(self) if c not in self._active]:
            await self._sub(pubsub, [self._broker.live_key(c) for c in missing])
            self._active.update(missing)
            await self._broker.fill(missing)
        self.connected = True
        log.info("Redis pub/sub connected", extra={"node": self.name, "channels": len(self._active)})
        await self._read(pubsub)

    async def _read(self, pubsub: PubSub) -> None:
        last_rx = time.monotonic()
        probe_sent = False
        on_payload = self._broker.on_payload
        while True:
            msg = await pubsub.get_message(timeout=self._probe)
            now = time.monotonic()
            if msg is None:
                if probe_sent and now - last_rx >= self._probe * 2:
                    raise _Stale(f"no answer from Redis for {now - last_rx:.1f}s")
                if now - last_rx >= self._probe:
                    await pubsub.ping(_PROBE)
                    probe_sent = True
                continue
            last_rx = now
            probe_sent = False
            kind = msg["type"]
            if kind == "message" or kind == "smessage":
                on_payload(msg["channel"], msg["data"])
            elif kind == "sunsubscribe" and self._sharded:
                # The node gave the slot away (resharding/failover): find the channel's new home.
                asyncio.get_running_loop().create_task(self._broker.reroute())
