"""One stream's bounded inbox.

`offer` never waits. For a caught-up single-channel stream on uvicorn it hands the message's pre-framed bytes
straight to the connection (the server's `connection.StreamWriter`): no coroutine wake-up per subscriber per
message. Otherwise it appends the shared `Message` to a queue bounded in messages and in bytes and wakes the
stream, which takes everything queued at once (`take`) and writes it as one chunk, so a client that falls behind
gets batched writes. When either bound is reached the subscriber is marked too slow and closed: a client that
stops reading pins at most SUBSCRIBER_QUEUE_BYTES of messages (shared objects, one encoding each) before it is
cut off.

`floors` holds, per channel, the last id a resume already sent from history: live copies at or below it are
dropped, whether they are already queued or still to come. Control events (`relay.reset` from the broker) pass
every floor and clear them: the history the floors refer to is gone.
"""

from __future__ import annotations

import asyncio

from .connection import StreamWriter
from .message import Message, MessageId, Position

__all__ = ["Subscriber"]


class Subscriber:
    __slots__ = ("_queue", "_waiter", "byte_capacity", "capacity", "channels", "client", "closed_reason", "direct",
                 "epochs", "floors", "origin", "overflowed", "parked", "ping_due", "queued_bytes", "single", "user",
                 "writer", "wrote")

    def __init__(self, channels: tuple[str, ...], capacity: int, client: str = "", user: str | None = None,
                 byte_capacity: int = 1 << 20) -> None:
        self.channels = channels
        self.single = len(channels) == 1
        self.capacity = capacity
        self.byte_capacity = byte_capacity
        self.queued_bytes = 0
        self.client = client
        self.user = user
        self.overflowed = False
        self.closed_reason: str | None = None
        self.floors: dict[str, MessageId] | None = None  # None, not {}: an idle stream holds no dict
        self.epochs: dict[str, str] | None = None  # the epoch of each channel's history a resume read
        self.origin: dict[str, Position | None] | None = None  # positions when it joined (until its greeting)
        self.writer: StreamWriter | None = None  # the connection, when the server allows direct writes
        self.direct: StreamWriter | None = None  # set once the stream is live and may be written directly
        self.parked = False
        self.ping_due = False
        self.wrote = False
        self._queue: list[Message] = []  # a list, not a deque: an empty deque costs ~600 bytes per stream
        self._waiter: asyncio.Future[None] | None = None

    def offer(self, message: Message) -> bool:
        """Take a message without ever waiting; False when the subscriber is closed (or just became too slow)."""
        if self.closed_reason is not None:
            return False
        floors = self.floors
        if floors is not None:
            if message.control:
                epochs = self.epochs
                if message.epoch is not None and epochs is not None and epochs.get(message.channel) == message.epoch:
                    # A reset into the history this stream already resumed from (it read it after the history was
                    # recreated, before the broker noticed): nothing of it was lost, and the floors still hold.
                    return True
                self.floors = self.epochs = None
            else:
                floor = floors.get(message.channel)
                if floor is not None:
                    if message.key <= floor:
                        return True  # history already sent it
                    del floors[message.channel]
                    if not floors:
                        self.floors = self.epochs = None
        direct = self.direct
        if direct is not None and self.parked and not self._queue:
            if direct.write(message):
                self.wrote = True
                return True
            if direct.disconnected:  # the write found the client gone: this stream ends, nobody else notices
                self.close("gone")
                return False
        size = message.size
        if len(self._queue) >= self.capacity or self.queued_bytes + size > self.byte_capacity and self._queue:
            self.overflowed = True
            self.close("slow")
            return False
        self._queue.append(message)
        self.queued_bytes += size
        self._wake()
        return True

    def set_floors(self, floors: dict[str, MessageId], epochs: dict[str, str] | None = None) -> None:
        """After a resume: drop queued live copies of what history sent, and those still to come. `epochs`: the
        epoch of each channel's history the resume read."""
        self.floors = dict(floors) if floors else None
        self.epochs = dict(epochs) if epochs and floors else None
        if floors and self._queue:
            kept = [m for m in self._queue if m.control or m.key > floors.get(m.channel, (-1, -1))]
            self._queue = kept
            self.queued_bytes = sum(m.size for m in kept)
            for channel in {m.channel for m in kept}:
                if self.floors is not None:
                    self.floors.pop(channel, None)
            if not self.floors:
                self.floors = None

    def ping(self) -> None:
        """The heartbeat ticker found nothing written for an interval."""
        self.ping_due = True
        self._wake()

    def close(self, reason: str) -> None:
        """End the stream after what is queued (`drain`, `slow`, `expired`, `gone`, ...)."""
        if self.closed_reason is None:
            self.closed_reason = reason
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        """Return when there is something to take, a ping is due, or the subscriber was closed."""
        if self._queue or self.closed_reason is not None or self.ping_due:
            return
        self._waiter = asyncio.get_running_loop().create_future()
        self.parked = True
        try:
            await self._waiter
        finally:
            self.parked = False
            self._waiter = None

    def take(self) -> list[Message]:
        items, self._queue = self._queue, []
        self.queued_bytes = 0
        return items

    def __len__(self) -> int:
        return len(self._queue)
