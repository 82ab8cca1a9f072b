"""Who is listening: subscriber counts per channel across all replicas.

Each instance reports its own local count per channel; the total is the sum over instances whose report has
not expired. A replica that dies (even by `kill -9`) stops refreshing, and its share disappears after
`ttl` seconds, so counts heal by themselves.

With Redis, per channel: a sorted set `sse:{room}:presence` (instance → expiry, Redis clock) and a hash
`sse:{room}:counts` (instance → count), under the channel's hash tag. Without Redis the hub's own count is the
whole truth.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from .broker import BrokerUnavailable
from .broker.redis_format import PRESENCE_COUNT_SCRIPT, PRESENCE_REPORT_SCRIPT
from .tasks import cancel_and_wait

__all__ = ["LocalPresence", "Presence", "RedisPresence"]

log = logging.getLogger("service.presence")

_BATCH = 200  # channels per report script (one Redis, no Cluster): ~10 KiB of command, well under a millisecond

class Presence(Protocol):
    def changed(self, channel: str, local_count: int) -> None:
        """The hub's count of local subscribers of `channel` changed (called synchronously, must not block)."""

    async def count(self, channel: str) -> tuple[int, int]:
        """(subscribers, instances) of `channel` over all replicas. Raises BrokerUnavailable."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class LocalPresence:
    """One process: the local counts are the totals."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def changed(self, channel: str, local_count: int) -> None:
        if local_count:
            self._counts[channel] = local_count
        else:
            self._counts.pop(channel, None)

    async def count(self, channel: str) -> tuple[int, int]:
        n = self._counts.get(channel, 0)
        return n, 1 if n else 0

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


class RedisPresence:
    """Reports changes within ~50 ms (batched) and refreshes every channel it holds each `interval` seconds."""

    def __init__(self, url: str, instance: str, prefix: str = "sse", interval: float = 5.0) -> None:
        # Imported here: the embedded default (no REDIS_URL) never loads a Redis client.
        from redis.exceptions import RedisError

        from .broker.redis_commands import RedisCommands, Script
        from .broker.redis_connect import RedisOptions, RedisTarget

        self._redis_errors = (RedisError, OSError)
        # Best effort: no budget of its own (a report round is at most 100 scripts, written together on one
        # connection), a 3 s command timeout; routed by each channel's hash tag on a Cluster.
        self._commands = RedisCommands(RedisTarget(url, RedisOptions(command_timeout=3.0)), self_routing=True)
        self._report = Script(PRESENCE_REPORT_SCRIPT)
        self._count = Script(PRESENCE_COUNT_SCRIPT)
        self._instance = instance
        self._prefix = prefix
        self._interval = interval
        self._ttl_ms = int(interval * 3 * 1000)
        self._local: dict[str, int] = {}
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def _keys(self, channel: str) -> list[str]:
        return [f"{self._prefix}:{{{channel}}}:presence", f"{self._prefix}:{{{channel}}}:counts"]

    def changed(self, channel: str, local_count: int) -> None:
        self._local[channel] = local_count
        self._dirty.add(channel)
        self._wake.set()

    async def count(self, channel: str) -> tuple[int, int]:
        try:
            total, instances = await self._commands.eval(self._count, self._keys(channel), [], kind="read")
        except self._redis_errors as exc:
            raise BrokerUnavailable(f"presence unavailable: {exc}") from exc
        return int(total), int(instances)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="presence-reporter")

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        # Leave politely; after a crash the entries expire instead.
        for channel in [c for c, n in self._local.items() if n]:
            self._local[channel] = 0
        try:
            await self._flush(list(self._local))
        except self._redis_errors:
            pass
        await self._commands.aclose()

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        next_refresh = loop.time() + self._interval
        while True:
            timeout = max(0.0, next_refresh - loop.time())
            try:
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
                await asyncio.sleep(0.05)  # batch a burst of joins into one round trip
            except TimeoutError:
                pass
            self._wake.clear()
            if loop.time() >= next_refresh:
                channels = list(self._local)
                next_refresh = loop.time() + self._interval
            else:
                channels = list(self._dirty)
            self._dirty.clear()
            try:
                await self._flush(channels)
            except self._redis_errors as exc:
                self._dirty.update(channels)
                log.debug("presence report deferred", extra={"error": str(exc)})
                await asyncio.sleep(min(self._interval, 1.0))

    async def _flush(self, channels: list[str]) -> None:
        if not channels:
            return
        # A batch of channels per script: a reconnect storm opens thousands of rooms, and a call per channel cost a
        # task, a round trip's share and a script run per room, on the service's core and on Redis's. A batch's keys
        # must share a slot on a Cluster (each channel has its own hash tag): there each channel is its own call,
        # the calls written together on each shard's connection.
        size = 1 if self._commands.sharded else _BATCH
        batches = [channels[start:start + size] for start in range(0, len(channels), size)]
        if len(batches) == 1:
            await self._report_batch(batches[0])
        else:
            for start in range(0, len(batches), 100):
                await asyncio.gather(*(self._report_batch(batch) for batch in batches[start:start + 100]))
        for channel in channels:
            if not self._local.get(channel):
                self._local.pop(channel, None)

    async def _report_batch(self, batch: list[str]) -> None:
        keys: list[str] = []
        counts: list[int] = []
        for channel in batch:
            keys += self._keys(channel)
            counts.append(self._local.get(channel, 0))
        await self._commands.eval(self._report, keys, [self._instance, self._ttl_ms, *counts])
