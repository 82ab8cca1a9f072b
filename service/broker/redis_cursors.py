"""Each wanted channel's cursor: what makes receiving lossless whatever the pub/sub connections go through.

The broker hands each channel's messages to the sink in id order and never twice (a cursor per channel: the last
id dispatched), and fills the gap from the Stream after every (re)subscribe: that is what makes outages, bursts of
new channels and the subscribe-then-read-history dance lossless. Before a channel is subscribed its tail (epoch,
last id) is read, which gives its cursor; once the subscription is confirmed, whatever the Stream holds after the
cursor is delivered, then what arrived live meanwhile (held back while the gap is filled). A history that was
recreated (another epoch) or trimmed past the cursor is a reset, told to the sink.

The readers call these through the broker (`redis_reader.ReaderHooks`); who carries each channel is the routing
part's to decide (`ChannelState.reader`), and only `unwant` tells that reader to let it go.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ..message import START, Message, MessageId, Position
from .base import Sink
from .redis_format import HISTORY_META_SCRIPT, TAIL_SCRIPT, keys_for, meta_key
from .redis_link import RedisLink
from .redis_reader import Reader
from .redis_store import as_text, id_of, page_of, range_start

__all__ = ["OWED_DRIFT", "OWED_SKEW_MS", "ChannelCursors", "ChannelState"]

log = logging.getLogger("service.broker.redis")

_FILL_GROUP = 16  # channels per pipelined gap-fill round

# How much earlier than Redis's clock at the moment a waiting stream joined its channel's position may start
# (`ChannelCursors.owe`): 1 s for a step of Redis's clock, plus 0.1% of the wait for the rates of our monotonic
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


class ChannelState:
    """One wanted channel on this instance: its cursor (last id dispatched) and who carries it."""

    __slots__ = ("buffer", "cursor", "epoch", "live", "owed", "reader", "resetting", "waited", "wanted")

    def __init__(self) -> None:
        self.cursor: MessageId | None = None  # None until its tail was read from Redis
        self.epoch: str | None = None
        self.reader: Reader | None = None
        self.wanted = True
        self.live = asyncio.Event()  # set once subscribed and filled: from then on `cursor` is a valid position
        self.waited: asyncio.Future[None] | None = None  # `ChannelCursors.when_live`'s, done when `live` is set
        self.buffer: list[Message] | None = None  # live messages held back while the gap is filled
        self.resetting = False  # after a reset: the next fill reads what is retained without judging it
        # time.monotonic() when the earliest stream that was answered before the cursor was known joined (owe)
        self.owed: float | None = None


class ChannelCursors:
    def __init__(self, link: RedisLink, *, page_size: int) -> None:
        self._link = link
        self._commands = link.commands
        self._budget = link.budget
        self._fail = link.fail
        self._prefix = link.prefix
        self._page_size = page_size
        self._sink: Sink | None = None
        # Shared with the routing part, which sets `reader` and reads `wanted`: the one record of each channel.
        self.states: dict[str, ChannelState] = {}

    def attach(self, sink: Sink) -> None:
        self._sink = sink

    # -- what is wanted ----------------------------------------------------------------------------------------

    def want(self, channel: str) -> ChannelState:
        """Mark `channel` wanted; the caller then has it carried by the right reader."""
        state = self.states.get(channel)
        if state is None:
            state = self.states[channel] = ChannelState()
        state.wanted = True
        return state

    def unwant(self, channel: str) -> None:
        state = self.states.get(channel)
        if state is None:
            return
        state.wanted = False
        if state.reader is not None:
            state.reader.release(channel)  # `unsubscribed` forgets the state once Redis is told
        else:
            del self.states[channel]

    def unsubscribed(self, channel: str) -> None:
        state = self.states.get(channel)
        if state is not None and not state.wanted:
            del self.states[channel]

    def wanted_count(self) -> int:
        return sum(1 for s in self.states.values() if s.wanted)

    # -- positions ---------------------------------------------------------------------------------------------

    def is_live(self, channel: str) -> bool:
        state = self.states.get(channel)
        return state is None or state.live.is_set()

    async def live(self, channel: str) -> None:
        state = self.states.get(channel)
        if state is not None:
            await state.live.wait()

    def when_live(self, channel: str) -> asyncio.Future[None] | None:
        """`live` as a future, made on first demand and shared (`Broker.when_live`); None when live already."""
        state = self.states.get(channel)
        if state is None or state.live.is_set():
            return None
        if state.waited is None:
            state.waited = asyncio.get_running_loop().create_future()
        return state.waited

    def owe(self, channel: str, since: float) -> None:
        state = self.states.get(channel)
        if state is None or state.cursor is not None:
            return  # known already: it was read before the stream was answered, so it is early enough
        state.owed = since if state.owed is None else min(state.owed, since)

    def position(self, channel: str) -> Position | None:
        state = self.states.get(channel)
        if state is None or state.cursor is None:
            return None
        if state.cursor == (0, 0):
            return START if state.epoch is None else Position((0, 0), state.epoch)
        return Position(state.cursor, state.epoch)

    # -- the gap fill ------------------------------------------------------------------------------------------

    async def prepare(self, channels: list[str]) -> None:
        """Read the tail (epoch, last id) of channels that have no cursor yet, in pipelines."""
        todo = [c for c in channels if (s := self.states.get(c)) is not None and s.cursor is None]
        for node, all_of_node in self._link.by_node(todo):
            for i in range(0, len(all_of_node), 500):
                await self._read_tails(node, all_of_node[i:i + 500])

    async def _read_tails(self, node: str, group: list[str]) -> None:
        # Streams already answered while these channels' positions were unknown (an outage): Redis's clock is read
        # with the tails, to tell which of what the tails hold was published after those streams joined.
        owed = any((s := self.states.get(c)) is not None and s.owed is not None for c in group)
        try:
            async with self._budget.slot("subscribe"):
                replies = await self._commands.mux(node, "read").call_many(
                    ([("TIME",)] if owed else []) + self._tail_commands(group))
                read_at = time.monotonic()
            clock_ms = _clock_ms(replies.pop(0)) if owed else None
        except Exception as exc:
            raise self._fail(exc, "reading channel tails", channels=len(group)) from exc
        for channel, (epoch, top) in zip(group, replies, strict=True):
            state = self.states.get(channel)
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
            state = self.states.get(channel)
            if state is not None and state.buffer is None:
                state.buffer = []

    async def fill(self, channels: list[str]) -> None:
        """Deliver what each channel's Stream holds after its cursor, page by page, then what was buffered."""
        todo = [c for c in channels if (s := self.states.get(c)) is not None and s.cursor is not None]
        if len(todo) > _FILL_GROUP:
            todo = await self._changed(todo)
        while todo:
            group, todo = todo[:_FILL_GROUP], todo[_FILL_GROUP:]
            for node, of_node in self._link.by_node(group):
                todo.extend(await self._fill_round(node, of_node))  # channels with more pages come round again
        for channel in channels:
            state = self.states.get(channel)
            if state is None:
                continue
            buffered, state.buffer = state.buffer or [], None
            for message in buffered:
                self._deliver(state, message)
            state.live.set()
            if state.waited is not None and not state.waited.done():
                state.waited.set_result(None)
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
        for node, of_node in self._link.by_node(channels):
            for i in range(0, len(of_node), 500):
                group = of_node[i:i + 500]
                try:
                    async with self._budget.slot("gap fill"):
                        replies = await self._commands.mux(node, "read").call_many(self._tail_commands(group))
                except Exception as exc:
                    raise self._fail(exc, "gap fill", channels=len(group)) from exc
                for channel, (epoch, top) in zip(group, replies, strict=True):
                    state = self.states.get(channel)
                    if state is None:
                        continue
                    if (state.resetting or (as_text(epoch) or None) != state.epoch
                            or id_of(as_text(top)) != state.cursor):
                        changed.append(channel)
        return changed

    async def _fill_round(self, node: str, channels: list[str]) -> list[str]:
        """One page per channel (all on `node`), written back to back on its read connection, each page followed
        by its judgement (as `history`); returns the channels with more to read."""
        states = [self.states[c] for c in channels]
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

    # -- delivery ----------------------------------------------------------------------------------------------

    def on_payload(self, channel: str, payload: bytes) -> None:
        state = self.states.get(channel)
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

    def _deliver(self, state: ChannelState, message: Message) -> None:
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
