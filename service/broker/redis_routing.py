"""Which reader carries each wanted channel, and keeping that right as the deployment changes.

Receiving is one pub/sub connection per instance (per primary on a Cluster), each owned by a supervised
`redis_reader.Reader` that converges on the channels assigned to it. On a Cluster a channel goes to the reader of
the primary that owns its slot by the one slot map; the map is read again when something suggests it changed (a
failure, a slot moved, a lost reader) and every few seconds anyway, and channels move to their new owner's reader
(which fills their gap from the Stream). A reconciler re-checks every `reconcile_interval` that each wanted
channel is carried by the reader of the node that owns it and is live there, and repairs any drift.

Behind Sentinel, when the `redis_sentinel.SentinelWatcher` sees the master switch, every reader re-subscribes on
the new master and fills the gap from its Streams (the command connections move first, in `redis_commands`).

The readers are made with the broker's `ReaderHooks` (`hooks`): what they call back spans the cursors and this
part, so the broker that composes both answers them; this part knows them only by that protocol.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from ..tasks import cancel_and_wait
from .redis_cursors import ChannelState
from .redis_errors import MasterMoved, classify
from .redis_link import RedisLink
from .redis_reader import Reader, ReaderHooks
from .redis_topology import Node

__all__ = ["ReaderRouting"]

log = logging.getLogger("service.broker.redis")


class ReaderRouting:
    def __init__(
        self,
        link: RedisLink,
        states: dict[str, ChannelState],
        hooks: ReaderHooks,
        *,
        probe_interval: float,
        reconcile_interval: float,
        subscriber_client: Callable[[str | None, int | None], Any] | None = None,
    ) -> None:
        """`states`: the cursors' record of every wanted channel (this part sets and compares `reader`).
        `subscriber_client` replaces the readers' clients made from the link's target (fakeredis in unit tests)."""
        self._link = link
        self._target = link.target
        self._topology = link.topology
        self._commands = link.commands
        self._states = states
        self._hooks = hooks
        self._probe = probe_interval
        self._reconcile_interval = reconcile_interval
        self._subscriber_client = subscriber_client or link.subscriber_client
        if link.watcher is not None:
            link.watcher.add_listener(self._master_moved)
        self.readers: dict[str, Reader] = {}
        self.lost_connections = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._topology_lock = asyncio.Lock()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if not self._target.sharded:
            self._reader_for_node("main", None, None)
        else:
            await self.reroute()
            self._tasks.append(loop.create_task(self._topology_forever(), name="redis-cluster-topology"))
        self._tasks.append(loop.create_task(self._reconcile_forever(), name="redis-reconciler"))

    async def close(self) -> None:
        await cancel_and_wait(*self._tasks)
        self._tasks.clear()
        for reader in list(self.readers.values()):
            await reader.stop()
        self.readers.clear()

    def ready(self) -> bool:
        return bool(self.readers) and all(r.connected for r in self.readers.values())

    def pending(self) -> int:
        """Wanted channels not live yet: unrouted, or not yet subscribed and filled by their reader."""
        unrouted = sum(1 for s in self._states.values() if s.wanted and s.reader is None)
        return unrouted + sum(r.not_live for r in self.readers.values())

    # -- which reader ------------------------------------------------------------------------------------------

    def assign(self, channel: str, state: ChannelState) -> None:
        reader = self._route(channel)
        if reader is not state.reader and state.reader is not None:
            state.reader.release(channel)
        state.reader = reader
        if reader is not None:
            reader.assign(channel)

    def _route(self, channel: str) -> Reader | None:
        if not self._target.sharded:
            return self.readers.get("main")
        node = self._node_of(channel)
        if node is None:
            return None
        return self._reader_for_node(node.name, node.host, node.port)

    def _node_of(self, channel: str) -> Node | None:
        assert self._topology is not None
        return self._topology.owner_of_key(self._link.live_key(channel))

    def _reader_for_node(self, name: str, host: str | None, port: int | None) -> Reader:
        reader = self.readers.get(name)
        if reader is None:
            reader = Reader(self._hooks, self._subscriber_client(host, port), name, self._probe,
                            self._target.sharded)
            self.readers[name] = reader
            reader.start()
        return reader

    # -- keeping it right --------------------------------------------------------------------------------------

    async def reroute(self) -> None:
        """Cluster: re-read the topology and move every channel to the reader of the node that owns it now.

        Never raises: while the topology cannot be read, channels stay where they are and the reconciler
        tries again on its next pass.
        """
        if self._topology is None:
            return
        async with self._topology_lock:
            try:
                async with self._link.budget.slot("cluster topology"):
                    await self._commands.refresh()
            except Exception as exc:  # noqa: BLE001 - any failure here only delays the move
                self._link.errors.record(classify(exc, "reading the Cluster topology"))
                return
            primaries = self._topology.primaries()
            for node in primaries.values():
                self._reader_for_node(node.name, node.host, node.port)
            for channel, state in list(self._states.items()):
                if state.wanted:
                    self.assign(channel, state)
            for name, reader in list(self.readers.items()):
                if name not in primaries and not reader.assigned:
                    del self.readers[name]
                    await reader.stop()
            await self._commands.forget_unknown()

    async def _topology_forever(self) -> None:
        """Refresh the Cluster topology when something suggests it changed, and every few seconds anyway."""
        refresh_asked = self._link.refresh_asked
        while True:
            try:
                async with asyncio.timeout(5.0):
                    await refresh_asked.wait()
            except TimeoutError:
                pass
            refresh_asked.clear()
            await self.reroute()
            await asyncio.sleep(0.2)

    async def _reconcile_forever(self) -> None:
        while True:
            await asyncio.sleep(self._reconcile_interval)
            try:
                if self._target.sharded:
                    for channel, state in self._states.items():
                        if state.wanted and state.reader is not self._route(channel):
                            self._link.request_refresh()  # unrouted, or its slot's owner changed: move it
                            break
                for reader in list(self.readers.values()):
                    reader.check()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the reconciler must outlive anything it meets
                log.exception("reconciler pass failed")

    # -- what the readers and Sentinel report ------------------------------------------------------------------

    def slot_moved(self, channel: str) -> None:
        """The reader's node dropped the channel's subscription itself (its slot moved): it waits unrouted,
        counted as pending, until the refreshed topology names its new owner."""
        state = self._states.get(channel)
        if state is not None:
            state.reader = None
        self._link.request_refresh()

    def session_ended(self, reader: Reader, was_connected: bool) -> None:
        if was_connected:
            self.lost_connections += 1
            # The command connections to that server went through the same path: a half-open path or a restarted
            # server leaves them dead too, and each would cost a full command timeout to find out. Start afresh.
            self._commands.reset(reader.name, "the pub/sub connection to the same server was lost")
        if self._target.sharded:
            self._link.request_refresh()  # a failover may be under way: its channels may have a new owner

    def _master_moved(self, old: Node | None, new: Node) -> None:
        """Sentinel switched the master: nothing may go on talking to the old one. Commands in flight there learn
        their outcome is unknown (they may have run on a primary being replaced); the reader re-subscribes on the
        new master and fills each channel's gap from its Stream."""
        reason = f"the Sentinel master moved from {old.name if old else '?'} to {new.name}"
        # (The command connections moved already: `RedisCommands` listens to the same watcher, and was first.)
        for reader in self.readers.values():
            reader.restart(MasterMoved(reason))
