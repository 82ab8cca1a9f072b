"""The instance's local fan-out: channel → the subscribers of this instance.

The hub tells the broker which channels it wants when their first local subscriber arrives and when the last
one leaves. Both are synchronous calls that only record a wish (the broker converges on the wanted set in the
background, retrying through any fault), so joins and leaves need no lock and cannot race each other into a
channel that is wanted but unsubscribed. Dispatch is a plain loop of non-blocking offers of one shared
`Message` object: the broker's reader never waits on a client, and a client whose delivery fails (even by a bug)
is ended alone: nothing raises into the reader.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from .broker import Broker
from .message import Message, Position
from .metrics import Metrics
from .subscriber import Subscriber

__all__ = ["RESET_EVENT", "Hub"]

log = logging.getLogger("service.hub")

RESET_EVENT = "relay.reset"


class Hub:
    def __init__(self, broker: Broker, metrics: Metrics, on_count: Callable[[str, int], None] | None = None) -> None:
        self._broker = broker
        self._metrics = metrics
        self._on_count = on_count or (lambda channel, count: None)
        self._subs: dict[str, set[Subscriber]] = {}
        # The relay's own listeners (control.py): subscribed like streams, but neither counted nor in presence
        self._internal: dict[str, set[Subscriber]] = {}
        # Read when collected, not set per stream joined and released (a prometheus_client update takes a lock).
        metrics.channels_active.set_function(lambda: len(self._subs))

    @property
    def channels(self) -> set[str]:
        return set(self._subs)

    def dispatch(self, message: Message) -> None:
        subs = self._subs.get(message.channel)
        if not subs:
            internal = self._internal.get(message.channel)
            if internal:
                for sub in tuple(internal):
                    if not sub.offer(message):
                        self.release_internal(sub)
            return
        self._metrics.received_message(message)
        delivered = 0
        for sub in tuple(subs):
            try:
                if sub.offer(message):
                    delivered += 1
                    continue
            except Exception:  # noqa: BLE001 - one client's fault must never reach the broker's reader
                log.exception("delivery to a stream failed; that stream is ended", extra={"client": sub.client})
                sub.close("failed")
            self._cut_off(sub, message.channel)
        self._metrics.fanned_out(delivered)

    def reset(self, channel: str, reason: str, epoch: str | None = None) -> None:
        """History under this channel's live streams was lost: each of them gets `relay.reset` in order (a stream
        that already resumed into the history of `epoch` lost nothing and is left alone, see Subscriber.offer)."""
        subs = self._subs.get(channel)
        if not subs:
            return
        log.warning("history lost under live streams; they get relay.reset",
                    extra={"channel": channel, "reason": reason, "streams": len(subs)})
        control = Message.control_event(channel, RESET_EVENT, {"reason": reason, "channel": channel})
        control.epoch = epoch
        for sub in tuple(subs):
            try:
                if sub.offer(control):
                    continue
            except Exception:  # noqa: BLE001 - as in dispatch
                log.exception("delivery to a stream failed; that stream is ended", extra={"client": sub.client})
                sub.close("failed")
            self._cut_off(sub, channel)

    def _cut_off(self, sub: Subscriber, channel: str) -> None:
        self.release(sub)
        if sub.overflowed:
            self._metrics.slow_disconnect()
            log.warning(
                "slow client cut off: its queue is full",
                extra={"channel": channel, "queue": sub.capacity, "queue_bytes": sub.byte_capacity,
                       "client": sub.client},
            )

    def add(self, sub: Subscriber) -> None:
        """Join `sub` to its channels now; the broker subscribes new ones in the background (see `live`).

        The subscriber records each channel's position at this moment (for a channel the broker is still
        subscribing, the position it establishes first, see `established`): the stream's greeting carries it.
        """
        origin: dict[str, Position | None] = {}
        for channel in sub.channels:
            subs = self._subs.get(channel)
            if subs is None:
                subs = self._subs[channel] = set()
                if channel not in self._internal:
                    self._broker.want(channel)
            subs.add(sub)
            origin[channel] = self._broker.position(channel)
            self._on_count(channel, len(subs))
        sub.joined(origin)

    def add_internal(self, sub: Subscriber) -> None:
        """Join one of the relay's own listeners (control.py) to its channels: messages reach it like a stream's,
        but it counts in no metric and no presence (it is not a client)."""
        for channel in sub.channels:
            subs = self._internal.get(channel)
            if subs is None:
                subs = self._internal[channel] = set()
                if channel not in self._subs:
                    self._broker.want(channel)
            subs.add(sub)

    def release_internal(self, sub: Subscriber) -> None:
        for channel in sub.channels:
            subs = self._internal.get(channel)
            if subs is None or sub not in subs:
                continue
            subs.discard(sub)
            if not subs:
                del self._internal[channel]
                if channel not in self._subs:
                    self._broker.unwant(channel)

    def established(self, channel: str, position: Position) -> None:
        for sub in self._subs.get(channel, ()):
            sub.established(channel, position)

    def owe(self, sub: Subscriber, since: float) -> None:
        """`sub` is answered before its channels' positions are known (it waits for Redis, pinging): each channel's
        position must not come after `since`, when it joined (`Broker.owe`)."""
        for channel in sub.channels:
            self._broker.owe(channel, since)

    async def live(self, sub: Subscriber) -> None:
        """Return once every channel of `sub` is live at the broker (its position can then be read)."""
        for channel in sub.channels:
            await self._broker.live(channel)

    def when_live(self, sub: Subscriber) -> asyncio.Future[None] | None:
        """A future done once the first channel of `sub` that is not live at the broker is (None: all are): the
        broker's own, shared by every stream waiting for the channel (`Broker.when_live`), no task per wait."""
        for channel in sub.channels:
            pending = self._broker.when_live(channel)
            if pending is not None:
                return pending
        return None

    def release(self, sub: Subscriber) -> None:
        """Detach a subscriber now, without awaiting: it runs in `finally` blocks of cancelled streams."""
        for channel in sub.channels:
            subs = self._subs.get(channel)
            if subs is None or sub not in subs:
                continue
            subs.discard(sub)
            self._on_count(channel, len(subs))
            if not subs:
                del self._subs[channel]
                if channel not in self._internal:
                    self._broker.unwant(channel)
