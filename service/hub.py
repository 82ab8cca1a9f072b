"""The instance's local fan-out: channel → the subscribers of this instance.

The hub subscribes the broker to a channel when its first local subscriber arrives and unsubscribes when the
last one leaves (under a per-channel lock, so a join racing a leave cannot end unsubscribed). Dispatch is a
plain loop of non-blocking offers of one shared `Message` object: the broker's reader never waits on a client.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable

from .broker import Broker
from .message import Message
from .metrics import Metrics
from .subscriber import Subscriber

__all__ = ["Hub"]

log = logging.getLogger("service.hub")


class Hub:
    def __init__(
        self, broker: Broker, metrics: Metrics, on_count: Callable[[str, int], None] | None = None
    ) -> None:
        self._broker = broker
        self._metrics = metrics
        self._on_count = on_count or (lambda channel, count: None)
        self._subs: dict[str, set[Subscriber]] = {}
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._tasks: set[asyncio.Task[None]] = set()

    def dispatch(self, message: Message) -> None:
        subs = self._subs.get(message.channel)
        if not subs:
            return
        self._metrics.received_message(message)
        delivered = 0
        for sub in tuple(subs):
            if sub.offer(message):
                delivered += 1
                continue
            self.release(sub)
            if sub.overflowed:
                self._metrics.slow_disconnect()
                log.warning(
                    "slow client cut off: its queue is full",
                    extra={"channel": message.channel, "queue": sub.capacity, "client": sub.client},
                )
        self._metrics.fanned_out(delivered)

    async def add(self, sub: Subscriber) -> None:
        for channel in sub.channels:
            async with self._locks[channel]:
                subs = self._subs.get(channel)
                if subs is None:
                    subs = self._subs[channel] = set()
                    try:
                        await self._broker.subscribe(channel)
                    except BaseException:
                        self._schedule_unsubscribe(channel)
                        raise
                subs.add(sub)
            self._on_count(channel, len(subs))
        self._metrics.channels_active.set(len(self._subs))

    def release(self, sub: Subscriber) -> None:
        """Detach a subscriber now, without awaiting: it runs in `finally` blocks of cancelled streams.

        Channels left without local subscribers are unsubscribed from the broker by a task of their own.
        """
        for channel in sub.channels:
            subs = self._subs.get(channel)
            if subs is None:
                continue
            if sub not in subs:
                continue
            subs.discard(sub)
            self._on_count(channel, len(subs))
            if not subs:
                self._schedule_unsubscribe(channel)

    def _schedule_unsubscribe(self, channel: str) -> None:
        task = asyncio.get_running_loop().create_task(self._unsubscribe_if_unused(channel))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _unsubscribe_if_unused(self, channel: str) -> None:
        lock = self._locks[channel]
        async with lock:
            subs = self._subs.get(channel)
            if subs is not None and not subs:
                del self._subs[channel]
                try:
                    await self._broker.unsubscribe(channel)
                except Exception:  # noqa: BLE001 - a failed unsubscribe only costs unwanted traffic
                    log.exception("unsubscribe failed", extra={"channel": channel})
        if channel not in self._subs and not lock.locked():
            self._locks.pop(channel, None)
        self._metrics.channels_active.set(len(self._subs))
