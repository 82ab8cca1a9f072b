"""The Redis broker: a Stream per channel for history, pub/sub for live delivery, written in one Lua step.

Receiving is one pub/sub connection per instance (per primary on a Cluster), each owned by a supervised
`redis_reader.Reader` that converges on the channels assigned to it. A reconciler re-checks every
`reconcile_interval` that each wanted channel is carried by the reader of the node that owns it and is live
there, and repairs any drift.

Publishing and history pages are `redis_store.RedisStore`'s; each channel's cursor, delivery and gap fill
`redis_cursors.ChannelCursors`'s; every part shares one `redis_link.RedisLink`.

Behind Sentinel, a `redis_sentinel.SentinelWatcher` follows the master: when Sentinel switches it, every
connection moves (the multiplexed ones, the pools', the pub/sub reader's, which re-subscribes on the new master and
fills the gap from its Streams).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..message import Position
from ..tasks import cancel_and_wait
from .base import Page, Published, Sink
from .redis_connect import RedisOptions
from .redis_cursors import ChannelCursors, ChannelState
from .redis_errors import MasterMoved, classify
from .redis_format import keys_for
from .redis_link import RedisLink
from .redis_reader import Reader
from .redis_sentinel import SentinelWatcher
from .redis_store import RedisStore
from .redis_topology import ClusterTopology, Node

if TYPE_CHECKING:
    from ..config import Settings

__all__ = ["RedisBroker", "keys_for"]

log = logging.getLogger("service.broker.redis")


class RedisBroker:
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
        self._target = self._link.target
        self._commands = self._link.commands
        self._watcher: SentinelWatcher | None = self._link.watcher
        if self._watcher is not None:
            self._watcher.add_listener(self._master_moved)
        self._subscriber_client = subscriber_client or self._link.subscriber_client
        self._probe = probe_interval
        self._reconcile_interval = reconcile_interval
        self._topology: ClusterTopology | None = self._link.topology
        self._budget = self._link.budget
        self._errors = self._link.errors
        self._readers: dict[str, Reader] = {}
        self._cursors = ChannelCursors(self._link, page_size=page_size)
        self._states = self._cursors.states
        self._lost_connections = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._topology_lock = asyncio.Lock()
        self._store = RedisStore(self._link, history_size=history_size, history_ttl=history_ttl, meta_ttl=meta_ttl,
                                 idempotency_ttl=idempotency_ttl, history_reads=history_reads,
                                 wait_replicas=wait_replicas, wait_timeout=wait_timeout, reroute=self.reroute)

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
        loop = asyncio.get_running_loop()
        self._link.start()
        if not self._target.sharded:
            self._reader_for_node("main", None, None)
        else:
            await self.reroute()
            self._tasks.append(loop.create_task(self._topology_forever(), name="redis-cluster-topology"))
        self._tasks.append(loop.create_task(self._reconcile_forever(), name="redis-reconciler"))

    async def close(self) -> None:
        await cancel_and_wait(*self._tasks)
        self._tasks.clear()
        for reader in list(self._readers.values()):
            await reader.stop()
        self._readers.clear()
        await self._link.aclose()  # the watcher too: after the readers, which follow it

    def ready(self) -> bool:
        return bool(self._readers) and all(r.connected for r in self._readers.values())

    def stats(self) -> dict[str, float]:
        unrouted = sum(1 for s in self._states.values() if s.wanted and s.reader is None)
        stats: dict[str, float] = {
            "channels_wanted": self._cursors.wanted_count(),
            "channels_pending": unrouted + sum(r.not_live for r in self._readers.values()),
            "channels_repaired": sum(r.repaired for r in self._readers.values()),
            "reconnects": self._lost_connections,
            "pool_in_use": self._budget.in_use,
            "pool_waiting": self._budget.waiting,
            "readers": len(self._readers),
            "readers_connected": sum(1 for r in self._readers.values() if r.connected),
        }
        if self._watcher is not None:
            stats["master_switches"] = self._watcher.switches
        for kind, count in self._errors.counts.items():
            stats[f"errors.{kind}"] = count
        return stats

    def _node_of(self, channel: str) -> Node | None:
        assert self._topology is not None
        return self._topology.owner_of_key(self.live_key(channel))

    # -- publishing and history ------------------------------------------------------------------------------

    async def publish(self, channel: str, data: bytes, event: str | None = None,
                      idempotency_key: str | None = None) -> Published:
        return await self._store.publish(channel, data, event, idempotency_key)

    async def history(self, channel: str, after: Position | None, limit: int) -> Page:
        return await self._store.history(channel, after, limit)

    async def last_id(self, channel: str) -> str | None:
        return await self._store.last_id(channel)

    # -- subscriptions ---------------------------------------------------------------------------------------

    def live_key(self, channel: str) -> str:
        return self._link.live_key(channel)

    def channel_of(self, live_key: bytes) -> str | None:
        return self._link.channel_of(live_key)

    def slot_of(self, channel: str) -> int:
        return self._link.slot_of(channel)

    def want(self, channel: str) -> None:
        self._assign(channel, self._cursors.want(channel))

    def unwant(self, channel: str) -> None:
        self._cursors.unwant(channel)

    def is_live(self, channel: str) -> bool:
        return self._cursors.is_live(channel)

    async def live(self, channel: str) -> None:
        await self._cursors.live(channel)

    def owe(self, channel: str, since: float) -> None:
        self._cursors.owe(channel, since)

    def position(self, channel: str) -> Position | None:
        return self._cursors.position(channel)

    def _assign(self, channel: str, state: ChannelState) -> None:
        reader = self._route(channel)
        if reader is not state.reader and state.reader is not None:
            state.reader.release(channel)
        state.reader = reader
        if reader is not None:
            reader.assign(channel)

    def _route(self, channel: str) -> Reader | None:
        if not self._target.sharded:
            return self._readers.get("main")
        node = self._node_of(channel)
        if node is None:
            return None
        return self._reader_for_node(node.name, node.host, node.port)

    def _reader_for_node(self, name: str, host: str | None, port: int | None) -> Reader:
        reader = self._readers.get(name)
        if reader is None:
            reader = Reader(self, self._subscriber_client(host, port), name, self._probe, self._target.sharded)
            self._readers[name] = reader
            reader.start()
        return reader

    async def reroute(self) -> None:
        """Cluster: re-read the topology and move every channel to the reader of the node that owns it now.

        Never raises: while the topology cannot be read, channels stay where they are and the reconciler
        tries again on its next pass.
        """
        if self._topology is None:
            return
        async with self._topology_lock:
            try:
                async with self._budget.slot("cluster topology"):
                    await self._commands.refresh()
            except Exception as exc:  # noqa: BLE001 - any failure here only delays the move
                self._errors.record(classify(exc, "reading the Cluster topology"))
                return
            primaries = self._topology.primaries()
            for node in primaries.values():
                self._reader_for_node(node.name, node.host, node.port)
            for channel, state in list(self._states.items()):
                if state.wanted:
                    self._assign(channel, state)
            for name, reader in list(self._readers.items()):
                if name not in primaries and not reader.assigned:
                    del self._readers[name]
                    await reader.stop()
            await self._commands.forget_unknown()

    def request_refresh(self) -> None:
        """Ask for a Cluster topology refresh soon (coalesced: at most a few per second)."""
        self._link.request_refresh()

    async def _topology_forever(self) -> None:
        """Refresh the Cluster topology when something suggests it changed, and every few seconds anyway."""
        while True:
            try:
                async with asyncio.timeout(5.0):
                    await self._link.refresh_asked.wait()
            except TimeoutError:
                pass
            self._link.refresh_asked.clear()
            await self.reroute()
            await asyncio.sleep(0.2)

    async def _reconcile_forever(self) -> None:
        while True:
            await asyncio.sleep(self._reconcile_interval)
            try:
                if self._target.sharded:
                    for channel, state in self._states.items():
                        if state.wanted and state.reader is not self._route(channel):
                            self.request_refresh()  # unrouted, or its slot's owner changed: move it
                            break
                for reader in list(self._readers.values()):
                    reader.check()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the reconciler must outlive anything it meets
                log.exception("reconciler pass failed")

    # -- reader hooks ----------------------------------------------------------------------------------------

    async def prepare(self, channels: list[str]) -> None:
        await self._cursors.prepare(channels)

    def begin_fill(self, channels: list[str]) -> None:
        self._cursors.begin_fill(channels)

    async def fill(self, channels: list[str]) -> None:
        await self._cursors.fill(channels)

    def unsubscribed(self, channel: str) -> None:
        self._cursors.unsubscribed(channel)

    def slot_moved(self, channel: str) -> None:
        """The reader's node dropped the channel's subscription itself (its slot moved): it waits unrouted,
        counted as pending, until the refreshed topology names its new owner."""
        state = self._states.get(channel)
        if state is not None:
            state.reader = None
        self.request_refresh()

    def session_ended(self, reader: Reader, was_connected: bool) -> None:
        if was_connected:
            self._lost_connections += 1
            # The command connections to that server went through the same path: a half-open path or a restarted
            # server leaves them dead too, and each would cost a full command timeout to find out. Start afresh.
            self._commands.reset(reader.name, "the pub/sub connection to the same server was lost")
        if self._target.sharded:
            self.request_refresh()  # a failover may be under way: its channels may have a new owner

    def _master_moved(self, old: Node | None, new: Node) -> None:
        """Sentinel switched the master: nothing may go on talking to the old one. Commands in flight there learn
        their outcome is unknown (they may have run on a primary being replaced); the reader re-subscribes on the
        new master and fills each channel's gap from its Stream."""
        reason = f"the Sentinel master moved from {old.name if old else '?'} to {new.name}"
        # (The command connections moved already: `RedisCommands` listens to the same watcher, and was first.)
        for reader in self._readers.values():
            reader.restart(MasterMoved(reason))

    # -- delivery --------------------------------------------------------------------------------------------

    def on_payload(self, channel: str, payload: bytes) -> None:
        self._cursors.on_payload(channel, payload)
