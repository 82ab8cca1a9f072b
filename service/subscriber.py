"""One stream's bounded inbox.

`offer` never waits: it appends a shared `Message` or, when the inbox is full, marks the subscriber as too slow
and wakes its stream so it can end. The stream takes everything queued at once (`take`) and writes it as one
chunk, so a client that falls behind gets batched writes instead of one wake-up per message.
"""

from __future__ import annotations

import asyncio
from collections import deque

from .message import Message

__all__ = ["Subscriber"]


class Subscriber:
    __slots__ = ("channels", "capacity", "client", "user", "overflowed", "closed_reason", "_queue", "_waiter")

    def __init__(self, channels: tuple[str, ...], capacity: int, client: str = "", user: str | None = None) -> None:
        self.channels = channels
        self.capacity = capacity
        self.client = client
        self.user = user
        self.overflowed = False
        self.closed_reason: str | None = None
        self._queue: deque[Message] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def offer(self, message: Message) -> bool:
        if self.closed_reason is not None:
            return False
        if len(self._queue) >= self.capacity:
            self.overflowed = True
            self.close("slow")
            return False
        self._queue.append(message)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        return True

    def close(self, reason: str) -> None:
        """End the stream after what is queued (`drain`, `slow`, `expired`, ...)."""
        if self.closed_reason is None:
            self.closed_reason = reason
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        """Return when there is something to take or the subscriber was closed."""
        if self._queue or self.closed_reason is not None:
            return
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def take(self) -> list[Message]:
        items = list(self._queue)
        self._queue.clear()
        return items

    def __len__(self) -> int:
        return len(self._queue)
