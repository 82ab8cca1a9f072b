"""The Redis broker: a Stream per channel for history, pub/sub for live delivery, written in one Lua step.

`RedisBroker` is the `base.Broker` the service uses with REDIS_URL, composed of parts that each hold one concern,
in the order data flows (each imports only those before it):

- `redis_link.RedisLink`: what they all share of the deployment (the command layer, the one command budget, the
  error log and what a failure means beyond its caller, a channel's keys);
- `redis_store.RedisStore`: publishing and history pages;
- `redis_cursors.ChannelCursors`: each wanted channel's cursor, live delivery in id order and never twice, and
  the gap fill after every (re)subscribe;
- `redis_routing.ReaderRouting`: the pub/sub readers (one per Redis, per primary on a Cluster), which one carries
  each channel, the Cluster topology and reconciler tasks, and following the Sentinel master.

The readers' hooks (`redis_reader.ReaderHooks`) span the cursors and the routing, so the broker answers them
itself, by delegation; the routing part makes the readers with the broker as their hooks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from ..message import Position
from .base import Page, Published, RateCharge, Sink
from .redis_connect import RedisOptions
from .redis_cursors import ChannelCursors
from .redis_format import keys_for
from .redis_link import RedisLink
from .redis_reader import Reader
from .redis_routing import ReaderRouting
from .redis_store import RedisStore

if TYPE_CHECKING:
    from ..config import Settings

__all__ = ["RedisBroker", "keys_for"]


class RedisBroker:
    # Called for every live message and every pub/sub reply: the parts' own bound methods, set once in __init__,
    # so the broker adds no call of its own on that path.
    on_payload: Callable[[str, bytes], None]
    charges_rates: bool
    channel_of: Callable[[bytes], str | None]

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "sse",
        history_size: int = 1000,
        history_ttl: float = 3600.0,
        meta_ttl: float = 86400.0,
        idempotency_ttl: float = 300.0,
        probe_interval: float = 2.0,
        options: RedisOptions | None = None,
        pool_timeout: float = 2.0,
        history_reads: int = 8,
        page_size: int = 16,
        reconcile_interval: float = 1.0,
        wait_replicas: int = 0,
        wait_timeout: float = 1.0,
        command_client: Any = None,
        subscriber_client: Callable[[str | None, int | None], Any] | None = None,
    ) -> None:
        """`command_client`/`subscriber_client` replace the clients made from `url` (fakeredis in unit tests)."""
        self._link = RedisLink(url, options or RedisOptions(), prefix=prefix, pool_timeout=pool_timeout,
                               command_client=command_client)
        self._cursors = ChannelCursors(self._link, page_size=page_size)
        # Right after the command layer: the routing part follows the Sentinel master after the command connections.
        self._routing = ReaderRouting(self._link, self._cursors.states, self, probe_interval=probe_interval,
                                      reconcile_interval=reconcile_interval, subscriber_client=subscriber_client)
        self._store = RedisStore(self._link, history_size=history_size, history_ttl=history_ttl, meta_ttl=meta_ttl,
                                 idempotency_ttl=idempotency_ttl, history_reads=history_reads,
                                 wait_replicas=wait_replicas, wait_timeout=wait_timeout,
                                 reroute=self._routing.reroute)
        # One Redis (plain or behind Sentinel) charges a publisher's rate in the publish's own script; a Cluster
        # cannot (the publisher's key and the channel's are in different slots).
        self.charges_rates = not self._link.target.sharded
        self.on_payload = self._cursors.on_payload
        self.channel_of = self._link.channel_of

    @classmethod
    def from_settings(cls, settings: Settings) -> RedisBroker:
        assert settings.redis_url
        return cls(
            settings.redis_url,
            prefix=settings.redis_key_prefix,
            history_size=settings.history_size,
            history_ttl=settings.history_ttl,
            meta_ttl=settings.history_meta_ttl,
            idempotency_ttl=settings.idempotency_ttl,
            probe_interval=settings.redis_probe_interval,
            options=RedisOptions(settings.redis_connect_timeout, settings.redis_command_timeout,
                                 settings.redis_pool_size),
            pool_timeout=settings.redis_pool_timeout,
            history_reads=settings.history_reads,
            page_size=settings.history_page_entries,
            wait_replicas=settings.redis_wait_replicas,
            wait_timeout=settings.redis_wait_timeout,
        )

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def start(self, sink: Sink) -> None:
        self._cursors.attach(sink)
        self._link.start()
        await self._routing.start()

    async def close(self) -> None:
        await self._routing.close()
        await self._link.aclose()  # the watcher too: after the readers, which follow it

    def ready(self) -> bool:
        return self._routing.ready()

    def stats(self) -> dict[str, float]:
        readers = self._routing.readers.values()
        budget = self._link.budget
        stats: dict[str, float] = {
            "channels_wanted": self._cursors.wanted_count(),
            "channels_pending": self._routing.pending(),
            "channels_repaired": sum(r.repaired for r in readers),
            "reconnects": self._routing.lost_connections,
            "pool_in_use": budget.in_use,
            "pool_waiting": budget.waiting,
            "readers": len(readers),
            "readers_connected": sum(1 for r in readers if r.connected),
        }
        if self._link.watcher is not None:
            stats["master_switches"] = self._link.watcher.switches
        for kind, count in self._link.errors.counts.items():
            stats[f"errors.{kind}"] = count
        return stats

    # -- publishing and history ------------------------------------------------------------------------------


    def publish(self, channel: str, data: bytes, event: str | None = None, idempotency_key: str | None = None,
                charge: RateCharge | None = None) -> Coroutine[Any, Any, Published]:
        """The store's publish, handed on (not awaited here: no frame of the facade's on the hot path)."""
        return self._store.publish(channel, data, event, idempotency_key, charge)

    async def history(self, channel: str, after: Position | None, limit: int) -> Page:
        return await self._store.history(channel, after, limit)

    async def last_id(self, channel: str) -> str | None:
        return await self._store.last_id(channel)

    # -- subscriptions ---------------------------------------------------------------------------------------

    def live_key(self, channel: str) -> str:
        return self._link.live_key(channel)

    def slot_of(self, channel: str) -> int:
        return self._link.slot_of(channel)

    def want(self, channel: str) -> None:
        self._routing.assign(channel, self._cursors.want(channel))

    def unwant(self, channel: str) -> None:
        self._cursors.unwant(channel)

    def is_live(self, channel: str) -> bool:
        return self._cursors.is_live(channel)

    async def live(self, channel: str) -> None:
        await self._cursors.live(channel)

    def when_live(self, channel: str) -> asyncio.Future[None] | None:
        return self._cursors.when_live(channel)

    def owe(self, channel: str, since: float) -> None:
        self._cursors.owe(channel, since)

    def position(self, channel: str) -> Position | None:
        return self._cursors.position(channel)

    async def reroute(self) -> None:
        """Cluster: re-read the topology and move every channel to the reader of the node that owns it now."""
        await self._routing.reroute()

    def request_refresh(self) -> None:
        """Ask for a Cluster topology refresh soon (coalesced: at most a few per second)."""
        self._link.request_refresh()

    # -- reader hooks (redis_reader.ReaderHooks) -------------------------------------------------------------

    async def prepare(self, channels: list[str]) -> None:
        await self._cursors.prepare(channels)

    def begin_fill(self, channels: list[str]) -> None:
        self._cursors.begin_fill(channels)

    async def fill(self, channels: list[str]) -> None:
        await self._cursors.fill(channels)

    def unsubscribed(self, channel: str) -> None:
        self._cursors.unsubscribed(channel)

    def slot_moved(self, channel: str) -> None:
        self._routing.slot_moved(channel)

    def session_ended(self, reader: Reader, was_connected: bool) -> None:
        self._routing.session_ended(reader, was_connected)
