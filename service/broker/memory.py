"""The embedded broker: one process, no Redis, the same semantics (ids, epochs, retention, idempotency) as Redis.

History expires on time: a sweep every `sweep_interval` seconds drops messages older than the TTL and forgets
channels left with no history and no subscribers (their epoch too: a later cursor of theirs gets a reset), so
memory follows what is retained, not what was ever published. Freed message buffers are handed back to the
operating system after a large sweep (`malloc_trim`), or a burst of big messages would keep the RSS up.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import secrets
import time
from collections import deque

from ..message import START, Message, MessageId, Position
from ..tasks import cancel_and_wait
from .base import IdempotencyKeyReused, Page, Published, RateCharge, Sink, judge_resume
from .redis_format import publish_fingerprint

__all__ = ["MemoryBroker"]

_TRIM_AFTER_BYTES = 8 << 20  # ask libc to return freed pages once a sweep freed this much


def _malloc_trim() -> None:
    name = ctypes.util.find_library("c")
    if not name:
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(name).malloc_trim(0)


class _Channel:
    __slots__ = ("bytes", "entries", "epoch", "lost", "top", "trimmed")

    def __init__(self) -> None:
        self.entries: deque[Message] = deque()
        self.epoch = secrets.token_hex(4)
        self.top: MessageId = (0, 0)
        self.lost: MessageId = (0, 0)
        self.trimmed = False
        self.bytes = 0


class MemoryBroker:
    """History per channel in a deque; publishing dispatches synchronously to the sink.

    Ids are `<ms>-<seq>-<epoch>` from the wall clock, increasing per channel even if the clock steps back,
    exactly as Redis assigns stream ids.
    """

    charges_rates = False

    def __init__(self, history_size: int = 1000, history_ttl: float = 3600.0, idempotency_ttl: float = 300.0,
                 sweep_interval: float = 1.0) -> None:
        self._size = history_size
        self._ttl_ms = int(history_ttl * 1000)
        self._idem_ttl = idempotency_ttl
        self._sweep_interval = sweep_interval
        self._channels: dict[str, _Channel] = {}
        self._wanted: set[str] = set()
        # (channel, key) -> (expiry, first id, fingerprint of its event and data)
        self._idempotent: dict[tuple[str, str], tuple[float, str, str]] = {}
        self._sink: Sink | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._freed = 0

    async def start(self, sink: Sink) -> None:
        self._sink = sink
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever(), name="memory-broker-sweep")

    async def close(self) -> None:
        await cancel_and_wait(self._sweeper)
        self._sink = None

    def ready(self) -> bool:
        return self._sink is not None

    def stats(self) -> dict[str, float]:
        return {"channels_pending": 0, "channels_wanted": len(self._wanted), "history_channels": len(self._channels)}

    async def publish(self, channel: str, data: bytes, event: str | None = None,
                      idempotency_key: str | None = None, charge: RateCharge | None = None) -> Published:
        if charge is not None:
            # The embedded default's rate limiter is in-process (ratelimit.MemoryRateLimiter) and asked on its own.
            raise ValueError("the in-memory broker does not charge rates (charges_rates is false)")
        now_s = time.time()
        fingerprint = ""
        if idempotency_key is not None:
            fingerprint = publish_fingerprint(event, data)
            seen = self._idempotent.get((channel, idempotency_key))
            if seen is not None and seen[0] > now_s:
                if seen[2] != fingerprint:
                    raise IdempotencyKeyReused(channel, idempotency_key, seen[1])
                return Published(seen[1], duplicate=True)
        now = int(now_s * 1000)
        ch = self._channels.get(channel)
        if ch is None:
            ch = self._channels[channel] = _Channel()
        last = ch.top
        key = (now, 0) if now > last[0] else (last[0], last[1] + 1)
        ch.top = key
        message = Message(channel, key, ch.epoch, event, data)
        ch.entries.append(message)
        ch.bytes += len(message.chunk)
        self._trim(ch, now)
        if idempotency_key is not None:
            self._idempotent[(channel, idempotency_key)] = (now_s + self._idem_ttl, message.id, fingerprint)
        if self._sink is not None and channel in self._wanted:
            # Synchronous: ids are assigned and dispatched in one step, so order and no-duplicates hold trivially.
            self._sink.dispatch(message)
        return Published(message.id)

    def _trim(self, ch: _Channel, now_ms: int) -> int:
        entries = ch.entries
        oldest_allowed = now_ms - self._ttl_ms
        freed = 0
        while entries and (len(entries) > self._size or entries[0].key[0] < oldest_allowed):
            gone = entries.popleft()
            freed += len(gone.chunk)
            ch.trimmed = True
        ch.bytes -= freed
        return freed

    async def history(self, channel: str, after: Position | None, limit: int) -> Page:
        ch = self._channels.get(channel)
        if ch is None:
            if after is None:
                return Page([])
            reason = judge_resume(after, epoch=None, top=(0, 0), lost=(0, 0), exists=False, trimmed=False,
                                  first=(0, 0))
            return Page([], reason is None, reason)
        self._trim(ch, int(time.time() * 1000))
        if after is not None:
            first = ch.entries[0].key if ch.entries else ch.top
            reason = judge_resume(after, epoch=ch.epoch, top=ch.top, lost=ch.lost, exists=bool(ch.entries),
                                  trimmed=ch.trimmed, first=first)
            if reason is not None:
                return Page([], False, reason)
        floor = after.key if after is not None else (0, 0)
        messages = [m for m in ch.entries if m.key > floor][:limit]
        more = bool(messages) and messages[-1].key < ch.top and len(messages) == limit
        return Page(messages, True, None, more)

    async def last_id(self, channel: str) -> str | None:
        ch = self._channels.get(channel)
        return ch.entries[-1].id if ch is not None and ch.entries else None

    def want(self, channel: str) -> None:
        self._wanted.add(channel)

    def unwant(self, channel: str) -> None:
        self._wanted.discard(channel)

    def is_live(self, channel: str) -> bool:
        return True

    def owe(self, channel: str, since: float) -> None:
        return None  # always live: a stream's position is known the moment it joins

    async def live(self, channel: str) -> None:
        return None

    def when_live(self, channel: str) -> None:
        return None  # always live

    def position(self, channel: str) -> Position:
        ch = self._channels.get(channel)
        if ch is None:
            return START
        return Position(ch.top, ch.epoch)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_interval)
            self.sweep()

    def sweep(self) -> None:
        """Expire history on time, and forget channels with neither history nor subscribers."""
        now_s = time.time()
        now = int(now_s * 1000)
        for name, ch in list(self._channels.items()):
            self._freed += self._trim(ch, now)
            if not ch.entries and name not in self._wanted:
                del self._channels[name]
        for key, (expires, _, _) in list(self._idempotent.items()):
            if expires <= now_s:
                del self._idempotent[key]
        if self._freed >= _TRIM_AFTER_BYTES:
            self._freed = 0
            _malloc_trim()
