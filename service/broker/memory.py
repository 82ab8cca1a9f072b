"""The embedded broker: one process, no Redis, same semantics (ids, history, retention) as the Redis broker."""

from __future__ import annotations

import time
from collections import deque

from ..message import Message, MessageId, format_id
from .base import History, Sink

__all__ = ["MemoryBroker"]


class _Log:
    __slots__ = ("entries", "max_deleted")

    def __init__(self) -> None:
        self.entries: deque[Message] = deque()
        self.max_deleted: MessageId = (0, 0)


class MemoryBroker:
    """History per channel in a deque; publishing dispatches synchronously to the sink.

    Ids are `<ms>-<seq>` from the wall clock, increasing per channel even if the clock steps back, exactly as
    Redis assigns stream ids.
    """

    def __init__(self, history_size: int = 1000, history_ttl: float = 3600.0) -> None:
        self._size = history_size
        self._ttl_ms = int(history_ttl * 1000)
        self._logs: dict[str, _Log] = {}
        self._last: dict[str, MessageId] = {}
        self._subscribed: set[str] = set()
        self._sink: Sink | None = None

    async def start(self, sink: Sink) -> None:
        self._sink = sink

    async def close(self) -> None:
        self._sink = None

    def ready(self) -> bool:
        return self._sink is not None

    async def publish(self, channel: str, data: bytes, event: str | None = None) -> str:
        now = int(time.time() * 1000)
        last = self._last.get(channel, (0, 0))
        key = (now, 0) if now > last[0] else (last[0], last[1] + 1)
        self._last[channel] = key
        message = Message(channel, format_id(key), key, event or None, data)
        log = self._logs.get(channel)
        if log is None:
            log = self._logs[channel] = _Log()
        log.entries.append(message)
        self._trim(log, key[0])
        if self._sink is not None and channel in self._subscribed:
            # Synchronous: ids are assigned and dispatched in one step, so order and no-duplicates hold trivially.
            self._sink.dispatch(message)
        return message.id

    def _trim(self, log: _Log, now_ms: int) -> None:
        entries = log.entries
        oldest_allowed = now_ms - self._ttl_ms
        while entries and (len(entries) > self._size or entries[0].key[0] < oldest_allowed):
            log.max_deleted = entries.popleft().key

    async def history(self, channel: str, after: MessageId | None) -> History:
        log = self._logs.get(channel)
        if log is None:
            return History([], complete=True)
        self._trim(log, int(time.time() * 1000))
        floor = after or (0, 0)
        messages = [m for m in log.entries if m.key > floor]
        complete = after is None or after == (0, 0) or after >= log.max_deleted
        return History(messages, complete)

    async def last_id(self, channel: str) -> str | None:
        log = self._logs.get(channel)
        return log.entries[-1].id if log is not None and log.entries else None

    async def subscribe(self, channel: str) -> None:
        self._subscribed.add(channel)

    async def unsubscribe(self, channel: str) -> None:
        self._subscribed.discard(channel)
