"""The Redis broker: a Stream per channel for history, pub/sub for live delivery, written in one Lua step.

Receiving is one pub/sub connection per instance (per primary on a Cluster), each owned by a supervised
`redis_reader.Reader` that converges on the channels assigned to it. Whatever a reader's connection went
through, the broker hands each channel's messages to the sink in id order and never twice (a cursor per
channel), and fills the gap from the Stream after every (re)subscribe: that is what makes outages, bursts of
new channels and the subscribe-then-read-history dance lossless. A reconciler re-checks every
`reconcile_interval` that each wanted channel is carried by the reader of the node that owns it and is live
there, and repairs any drift.

Publishing and history pages are `redis_store.RedisStore`'s; every part shares one `redis_link.RedisLink`.

Behind Sentinel, a `redis_sentinel.SentinelWatcher` follows the master: when Sentinel switches it, every
connection moves (the multiplexed ones, the pools', the pub/sub reader's, which re-subscribes on the new master and
fills the gap from its Streams).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..message import START, Message, MessageId, Position
from ..tasks import cancel_and_wait
from .base import Page, Published, Sink
from .redis_connect import RedisOptions
from .redis_errors import MasterMoved, classify
from .redis_format import HISTORY_META_SCRIPT, TAIL_SCRIPT, keys_for, meta_key
from .redis_link import RedisLink
from .redis_reader import Reader
from .redis_sentinel import SentinelWatcher
from .redis_store import RedisStore, as_text, id_of, page_of, range_start
from .redis_topology import ClusterTopology, Node

if TYPE_CHECKING:
    from ..config import Settings

__all__ = ["RedisBroker", "keys_for"]

log = logging.getLogger("service.broker.redis")

_FILL_GROUP = 16  # channels per pipelined gap-fill round

# How much earlier than Redis's clock at the moment a waiting stream joined its channel's position may start
# (`RedisBroker.owe`): 1 s for a step of Redis's clock, plus 0.1% of the wait for the rates of our monotonic
# clock and Redis's wall clock (NTP slews at most 0.05%). More is delivered (a message published up to this much
# before the stream connected), never less. docs/reliability.md.
OWED_SKEW_MS = 1000
OWED_DRIFT = 0.001


def _clock_ms(reply: Any) -> int:
    """Redis's TIME reply (seconds, microseconds) in milliseconds: the unit of Stream ids."""
    seconds, micros = reply
    return int(seconds) * 1000 + int(micros) // 1000


def _owed_floor(clock_ms: int, read_at: float, since: float) -> MessageId:
    """The position no later than Redis's clock when a stream joined at `since` (our monotonic clock), from a
    reading of Redis's clock (`clock_ms`) whose reply arrived at `read_at`.

    Redis's clock then was `clock_ms` minus the time elapsed since, on our clock: the reading was taken before its
    reply arrived, so this errs early (more delivered), and so does the margin for clock steps and rates. Every
    message published after the stream joined has a Stream id at or above Redis's clock when it was added: it comes
    after this position. It needs no earlier reading, so it holds for a replica that started while Redis was down
    and whatever our own wall clock says."""
    waited = max(0.0, read_at - since)
    floor = clock_ms - int(waited * 1000 * (1 + OWED_DRIFT)) - OWED_SKEW_MS
    return (max(0, floor), 0)


class _State:
    """One wanted channel on this instance: its cursor (last id dispatched) and who carries it."""

    __slots__ = ("buffer", "cursor", "epoch", "live", "owed", "reader", "resetting", "wanted")

    def __init__(self) -> None:
        self.cursor: MessageId | None = None  # None until its tail was read from Redis
        self.epoch: str | None = None
        self.reader: Reader | None = None
        self.wanted = True
        self.live = asyncio.Event()  # set once subscribed and filled: from then on `cursor` is a valid position
        self.buffer: list[Message] | None = None  # live messages held back while the gap is filled
        self.resetting = False  # after a reset: the next fill reads what is retained without judging it
        # time.monotonic() when the earliest stream that was answered before the cursor was known joined (owe)
        self.owed: float | None = None


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
        self._prefix = prefix
        self._probe = probe_interval
        self._page_size = page_size
        self._reconcile_interval = reconcile_interval
        self._topology: ClusterTopology | None = self._link.topology
        self._budget = self._link.budget
        self._errors = self._link.errors
        self._fail = self._link.fail
        self._by_node = self._link.by_node
        self._sink: Sink | None = None
        self._readers: dict[str, Reader] = {}
        self._states: dict[str, _State] = {}
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
        self._sink = sink
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
            "channels_wanted": sum(1 for s in self._states.values() if s.wanted),
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
        state = self._states.get(channel)
        if state is None:
            state = self._states[channel] = _State()
        state.wanted = True
        self._assign(channel, state)

    def unwant(self, channel: str) -> None:
        state = self._states.get(channel)
        if state is None:
            return
        state.wanted = False
        if state.reader is not None:
            state.reader.release(channel)  # `unsubscribed` forgets the state once Redis is told
        else:
            del self._states[channel]

    def is_live(self, channel: str) -> bool:
        state = self._states.get(channel)
        return state is None or state.live.is_set()

    async def live(self, channel: str) -> None:
        state = self._states.get(channel)
        if state is not None:
            await state.live.wait()

    def owe(self, channel: str, since: float) -> None:
        state = self._states.get(channel)
        if state is None or state.cursor is not None:
            return  # known already: it was read before the stream was answered, so it is early enough
        state.owed = since if state.owed is None else min(state.owed, since)

    def position(self, channel: str) -> Position | None:
        state = self._states.get(channel)
        if state is None or state.cursor is None:
            return None
        if state.cursor == (0, 0):
            return START if state.epoch is None else Position((0, 0), state.epoch)
        return Position(state.cursor, state.epoch)

    def _assign(self, channel: str, state: _State) -> None:
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
        """Read the tail (epoch, last id) of channels that have no cursor yet, in pipelines."""
        todo = [c for c in channels if (s := self._states.get(c)) is not None and s.cursor is None]
        for node, all_of_node in self._by_node(todo):
            for i in range(0, len(all_of_node), 500):
                await self._read_tails(node, all_of_node[i:i + 500])

    async def _read_tails(self, node: str, group: list[str]) -> None:
        # Streams already answered while these channels' positions were unknown (an outage): Redis's clock is read
        # with the tails, to tell which of what the tails hold was published after those streams joined.
        owed = any((s := self._states.get(c)) is not None and s.owed is not None for c in group)
        try:
            async with self._budget.slot("subscribe"):
                replies = await self._commands.mux(node, "read").call_many(
                    ([("TIME",)] if owed else []) + self._tail_commands(group))
                read_at = time.monotonic()
            clock_ms = _clock_ms(replies.pop(0)) if owed else None
        except Exception as exc:
            raise self._fail(exc, "reading channel tails", channels=len(group)) from exc
        for channel, (epoch, top) in zip(group, replies, strict=True):
            state = self._states.get(channel)
            if state is not None and state.cursor is None:
                state.epoch = as_text(epoch) or None
                state.cursor = id_of(as_text(top))
                if state.owed is not None and clock_ms is not None:
                    state.cursor = min(state.cursor, _owed_floor(clock_ms, read_at, state.owed))
                    if log.isEnabledFor(logging.DEBUG):
                        log.debug("position of a channel owed since before it was known", extra={
                            "channel": channel, "tail": as_text(top), "cursor": state.cursor})
                state.owed = None
                position = self.position(channel)
                assert position is not None and self._sink is not None
                self._sink.established(channel, position)

    def begin_fill(self, channels: list[str]) -> None:
        for channel in channels:
            state = self._states.get(channel)
            if state is not None and state.buffer is None:
                state.buffer = []

    async def fill(self, channels: list[str]) -> None:
        """Deliver what each channel's Stream holds after its cursor, page by page, then what was buffered."""
        todo = [c for c in channels if (s := self._states.get(c)) is not None and s.cursor is not None]
        if len(todo) > _FILL_GROUP:
            todo = await self._changed(todo)
        while todo:
            group, todo = todo[:_FILL_GROUP], todo[_FILL_GROUP:]
            for node, of_node in self._by_node(group):
                todo.extend(await self._fill_round(node, of_node))  # channels with more pages come round again
        for channel in channels:
            state = self._states.get(channel)
            if state is None:
                continue
            buffered, state.buffer = state.buffer or [], None
            for message in buffered:
                self._deliver(state, message)
            state.live.set()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("gaps filled", extra={"channels": len(channels), "sample": {
                c: str(self.position(c)) for c in channels[:3]}})

    def _tail_commands(self, channels: list[str]) -> list[tuple[Any, ...]]:
        """TAIL_SCRIPT for each channel, for the multiplexed read connection: written in one go and parsed in bulk
        (through redis-py's pipeline, 1,000 tails cost ~80 ms of the loop; a stream opened into a new room waits
        for its channel's tail)."""
        commands: list[tuple[Any, ...]] = []
        for channel in channels:
            stream, _ = keys_for(self._prefix, channel)
            commands.append(("EVAL", TAIL_SCRIPT, 2, stream, meta_key(self._prefix, channel)))
        return commands

    async def _changed(self, channels: list[str]) -> list[str]:
        """The channels whose Stream moved past their cursor (or to another epoch): the only ones a fill must
        read. A tail is two short strings, so hundreds are read in one round trip, where reading pages takes a
        round trip per `_FILL_GROUP` channels; after a burst of new channels (a replica's clients coming back
        into thousands of rooms) nearly none has anything to read, and the streams waiting for them go live
        after a few round trips instead of one per 16 channels."""
        changed: list[str] = []
        for node, of_node in self._by_node(channels):
            for i in range(0, len(of_node), 500):
                group = of_node[i:i + 500]
                try:
                    async with self._budget.slot("gap fill"):
                        replies = await self._commands.mux(node, "read").call_many(self._tail_commands(group))
                except Exception as exc:
                    raise self._fail(exc, "gap fill", channels=len(group)) from exc
                for channel, (epoch, top) in zip(group, replies, strict=True):
                    state = self._states.get(channel)
                    if state is None:
                        continue
                    if (state.resetting or (as_text(epoch) or None) != state.epoch
                            or id_of(as_text(top)) != state.cursor):
                        changed.append(channel)
        return changed

    async def _fill_round(self, node: str, channels: list[str]) -> list[str]:
        """One page per channel (all on `node`), written back to back on its read connection, each page followed
        by its judgement (as `history`); returns the channels with more to read."""
        states = [self._states[c] for c in channels]
        commands: list[tuple[Any, ...]] = []
        for channel, state in zip(channels, states, strict=True):
            stream, _ = keys_for(self._prefix, channel)
            commands.append(("XRANGE", stream, range_start(state.cursor), "+", "COUNT", self._page_size))
            commands.append(("EVAL", HISTORY_META_SCRIPT, 2, stream, meta_key(self._prefix, channel)))
        try:
            async with self._budget.slot("gap fill"):
                replies = await self._commands.mux(node, "read").call_many(commands)
        except Exception as exc:
            raise self._fail(exc, "gap fill", channels=len(channels)) from exc
        more: list[str] = []
        for channel, state, entries, meta in zip(channels, states, replies[::2], replies[1::2], strict=True):
            after = None if state.resetting else Position(state.cursor or (0, 0), state.epoch)
            state.resetting = False
            page = page_of(channel, after, meta, entries, self._page_size)
            if not page.complete:
                # History the live subscribers never got is gone (trimmed during a long gap, or recreated):
                # tell them, then deliver what is retained from the start.
                assert self._sink is not None
                epoch = as_text(meta[0]) or None
                self._sink.reset(channel, page.reason or "expired", epoch)
                state.epoch = epoch
                state.cursor = (0, 0)
                state.resetting = True
                more.append(channel)
                continue
            for message in page.messages:
                self._deliver(state, message)
            if page.more:
                more.append(channel)
        return more

    def unsubscribed(self, channel: str) -> None:
        state = self._states.get(channel)
        if state is not None and not state.wanted:
            del self._states[channel]

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
        state = self._states.get(channel)
        if state is None:
            return
        try:
            raw_id, event, data = payload.split(b"\n", 2)
            message = Message.from_wire(channel, raw_id.decode(), event.decode(), data)
        except ValueError:
            log.error("malformed payload ignored", extra={"channel": channel, "payload": payload[:200]})
            return
        if state.buffer is not None:
            state.buffer.append(message)
            return
        self._deliver(state, message)

    def _deliver(self, state: _State, message: Message) -> None:
        if state.cursor is None:
            return
        if message.epoch != state.epoch and state.epoch is not None:
            # The channel's history was recreated under us (FLUSHALL, a restart without persistence): ids start
            # again, possibly lower. Live subscribers are told, then follow the new history.
            assert self._sink is not None
            self._sink.reset(message.channel, "epoch", message.epoch)
            state.cursor = (0, 0)
        state.epoch = message.epoch
        if message.key <= state.cursor:
            return  # already delivered (gap fill overlapping live)
        state.cursor = message.key
        assert self._sink is not None
        self._sink.dispatch(message)

