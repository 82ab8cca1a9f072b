"""One stream's state: its bounded inbox, its connection, its pings and its end, decided here and nowhere else.

One class, `Subscriber`, not a `Stream` wrapped around an inbox: an idle stream is one object with `__slots__`
(no instance dict, no second object), and the hub's `offer` reads the fields it needs as plain attributes of
`self`, with no hop through another object or a property. Everything else changes this state only through the
methods below, each named for what its caller means; the other modules read a few fields through read-only
properties, away from the per-message paths.

Who does what to a stream, and when:

- **The response** (`sse.SSEResponse`) `attach`es the connection when it starts: a `connection.StreamWriter`
  under uvicorn-httptools, or None where sse-starlette's `EventSourceResponse` carries the stream (it then pings
  and notices the client leaving itself). It `detach`es it when the response ends, whatever ended it.
- **The hub** (`hub.Hub`) joins it to its channels (`joined`, `established`: the positions its greeting will
  carry) and `offer`s it every message of those channels, never waiting.
- **The stream body** (`stream._events`) asks for a ping while it has not gone live (`take_ping`, during the
  waits for Redis and history), `go_live`s once history is sent, then loops on `next_batch`.
- **The relay** runs one `heartbeat` ticker and one twice-a-second sweep (`check_connection`) over all streams.

Who pings: the relay's ticker calls `heartbeat()` every half HEARTBEAT_INTERVAL; a stream that wrote nothing
since the previous tick gets a ping due, which `next_batch` hands out as an empty batch (or `take_ping` before
live). A stream attached without a writer (sse-starlette's) pings itself, and `heartbeat` leaves it alone.

Who notices a disconnect: the relay's sweep (`check_connection`: the writer's `disconnected` flag, which the server
sets), a direct write that finds the client gone (`offer`), and the response when a write fails or times out, or
sse-starlette reports `http.disconnect` (`close("gone")` / `close("stalled")`).

When direct writes start: at `go_live`, for a single-channel stream attached with a writer, once its history was
sent; from then on, while the stream is parked in `next_batch` with nothing queued, `offer` hands the message's
pre-framed bytes straight to the connection: no coroutine wake-up per subscriber per message. A write the
connection cannot take without blocking falls back to the queue. They stop at the stream's end and at `detach`.

Who ends me: `close(reason)`, called by the hub's `offer` (`slow`: the queue is full; `gone`: a direct write found
the client gone), the hub (`failed`: a delivery raised), the relay (`drain`, `shutdown`: the server exits,
`gone`: the sweep, `ended`: an end command), the response (`stalled`: the write timeout, `gone`, `shutdown`:
sse-starlette saw the server exit) and the stream body (`expired`: its token). The stream writes what was queued
before (see `next_batch`), then its farewell, and ends.

The inbox: `offer` appends the shared `Message` to a queue bounded in messages and in bytes and wakes the
stream, which takes everything queued at once and writes it as one chunk, so a client that falls behind gets
batched writes. When either bound is reached the subscriber is closed as too slow: a client that stops reading
pins at most SUBSCRIBER_QUEUE_BYTES of messages (shared objects, one encoding each) before it is cut off.

Floors (set at `go_live`) hold, per channel, the last id a resume already sent from history: live copies at or
below it are dropped, whether they are already queued or still to come. Control events (`relay.reset` from the
broker) pass every floor and clear them: the history the floors refer to is gone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from .connection import StreamWriter
from .message import Message, MessageId, Position

__all__ = ["Subscriber"]


class Subscriber:
    __slots__ = ("_byte_capacity", "_capacity", "_channels", "_client", "_closed_reason", "_direct", "_epochs",
                 "_floors", "_origin", "_own_pings", "_ping_due", "_queue", "_queued_bytes", "_single", "_user",
                 "_waiter", "_writer", "_wrote")

    def __init__(self, channels: tuple[str, ...], capacity: int, client: str = "", user: str | None = None,
                 byte_capacity: int = 1 << 20) -> None:
        self._channels = channels
        self._single = len(channels) == 1
        self._capacity = capacity
        self._byte_capacity = byte_capacity
        self._queued_bytes = 0
        self._client = client
        self._user = user
        self._closed_reason: str | None = None
        self._floors: dict[str, MessageId] | None = None  # None, not {}: an idle stream holds no dict
        self._epochs: dict[str, str] | None = None  # the epoch of each channel's history a resume read
        self._origin: dict[str, Position | None] | None = None  # positions when it joined (until its greeting)
        self._writer: StreamWriter | None = None  # the connection, when the server allows direct writes
        self._direct: StreamWriter | None = None  # the writer, once the stream is live and may be written directly
        self._own_pings = False  # attached without a writer: its response (sse-starlette's) pings by itself
        self._ping_due = False
        self._wrote = False  # something was written since the heartbeat's last tick
        self._queue: list[Message] = []  # a list, not a deque: an empty deque costs ~600 bytes per stream
        self._waiter: asyncio.Future[None] | None = None  # not None: parked in `next_batch`, waiting

    # -- what other modules read -----------------------------------------------------------------------------

    @property
    def channels(self) -> tuple[str, ...]:
        return self._channels

    @property
    def single(self) -> bool:
        """One channel: plain ids, and direct writes once live."""
        return self._single

    @property
    def client(self) -> str:
        return self._client

    @property
    def user(self) -> str | None:
        return self._user

    @property
    def closed_reason(self) -> str | None:
        """Why it was closed (`close`), or None while it is open."""
        return self._closed_reason

    @property
    def overflowed(self) -> bool:
        """Closed because its queue was full (the client reads too slowly)."""
        return self._closed_reason == "slow"

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def byte_capacity(self) -> int:
        return self._byte_capacity

    @property
    def queued_bytes(self) -> int:
        return self._queued_bytes

    @property
    def pings_itself(self) -> bool:
        """Its response sends its own pings (sse-starlette's): its 200 may go out at any time."""
        return self._own_pings

    @property
    def writes_directly(self) -> bool:
        """The hub may write to its connection itself (live, single-channel, on a server with a writer)."""
        return self._direct is not None

    def __len__(self) -> int:
        return len(self._queue)

    # -- the response: its connection ------------------------------------------------------------------------

    def attach(self, writer: StreamWriter | None) -> None:
        """The connection this stream is written to. A writer (uvicorn-httptools): the relay's ticker pings it,
        its sweep reads the writer's `disconnected` flag, and direct writes may start at `go_live`. None: the
        response pings and notices a disconnect itself (sse-starlette's); the ticker leaves the stream alone."""
        self._writer = writer
        self._own_pings = writer is None

    def detach(self) -> None:
        """The response ended: no direct writes, no pings, no sweep for this stream any more."""
        self._direct = self._writer = None
        self._own_pings = False

    # -- the hub ---------------------------------------------------------------------------------------------

    def joined(self, origin: dict[str, Position | None]) -> None:
        """Joined to its channels; `origin`: each channel's position at that moment (None: not known yet, the
        broker is subscribing it; `established` fills it in). The greeting carries them (`take_origin`)."""
        self._origin = origin

    def established(self, channel: str, position: Position) -> None:
        """The broker established `channel`'s position: it is this stream's, unless it had one when it joined."""
        origin = self._origin
        if origin is not None and origin.get(channel, position) is None:
            origin[channel] = position

    def offer(self, message: Message) -> bool:
        """Take a message without ever waiting; False when the subscriber is closed (or just became too slow)."""
        if self._closed_reason is not None:
            return False
        floors = self._floors
        if floors is not None:
            if message.control:
                epochs = self._epochs
                if message.epoch is not None and epochs is not None and epochs.get(message.channel) == message.epoch:
                    # A reset into the history this stream already resumed from (it read it after the history was
                    # recreated, before the broker noticed): nothing of it was lost, and the floors still hold.
                    return True
                self._floors = self._epochs = None
            else:
                floor = floors.get(message.channel)
                if floor is not None:
                    if message.key <= floor:
                        return True  # history already sent it
                    del floors[message.channel]
                    if not floors:
                        self._floors = self._epochs = None
        direct = self._direct
        if direct is not None and self._waiter is not None and not self._queue:
            if direct.write(message):
                self._wrote = True
                return True
            if direct.disconnected:  # the write found the client gone: this stream ends, nobody else notices
                self.close("gone")
                return False
        size = message.size
        if len(self._queue) >= self._capacity or self._queued_bytes + size > self._byte_capacity and self._queue:
            self.close("slow")
            return False
        self._queue.append(message)
        self._queued_bytes += size
        self._wake()
        return True

    # -- the stream body -------------------------------------------------------------------------------------

    def take_origin(self) -> dict[str, Position | None]:
        """The positions recorded when it joined (see `joined`), once: the greeting is built from them."""
        origin, self._origin = self._origin, None
        return origin or {}

    def take_ping(self) -> bool:
        """Before it is live: whether the heartbeat asked for a ping (then it is no longer due)."""
        if self._ping_due:
            self._ping_due = False
            return True
        return False

    async def wait_live(self, pending: asyncio.Future[None]) -> None:
        """Before it is live: park until `pending` (its channel going live, `Hub.when_live`) is done, a ping is due
        (`take_ping` tells), a message is queued or it is closed, whichever comes first. One future, woken by the
        same `_wake` as `next_batch`'s: no timer of its own (the relay's ticker makes the pings due)."""
        if self._closed_reason is not None or self._ping_due or pending.done():
            return
        self._waiter = waiter = asyncio.get_running_loop().create_future()
        woken = self._woken
        pending.add_done_callback(woken)
        try:
            await waiter
        finally:
            self._waiter = None
            pending.remove_done_callback(woken)

    def _woken(self, _: object) -> None:
        self._wake()

    def go_live(self, floors: dict[str, MessageId], epochs: dict[str, str] | None = None) -> None:
        """History is sent: from now on the stream writes live messages. `floors`: per channel, the last id sent
        (queued live copies at or below it are dropped, and those still to come); `epochs`: the epoch of each
        channel's history the resume read. A single-channel stream with a writer may be written directly from now
        on (see the module's docstring)."""
        self._floors = dict(floors) if floors else None
        self._epochs = dict(epochs) if epochs and floors else None
        if floors and self._queue:
            kept = [m for m in self._queue if m.control or m.key > floors.get(m.channel, (-1, -1))]
            self._queue = kept
            self._queued_bytes = sum(m.size for m in kept)
            for channel in {m.channel for m in kept}:
                if self._floors is not None:
                    self._floors.pop(channel, None)
            if not self._floors:
                self._floors = None
        if self._single:
            self._direct = self._writer

    async def next_batch(self, first: bool = False) -> list[Message] | None:
        """Wait for what to write next: the messages queued (a non-empty list, taken at once), a ping due (an
        empty list), or the end (None: the subscriber was closed, and direct writes have stopped).

        Call it again once the batch is written: a subscriber closed meanwhile then ends without writing what was
        queued during that write (a slow client is not sent its full queue). `first`: the first call after
        `go_live`, which still hands out what was queued before a close (a `relay.ended` event, say).
        """
        if self._closed_reason is not None and not first:
            self._direct = None
            return None
        if not self._queue and self._closed_reason is None and not self._ping_due:
            self._waiter = waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        items, self._queue = self._queue, []
        self._queued_bytes = 0
        self._ping_due = False
        self._wrote = True
        if items or self._closed_reason is None:
            return items
        self._direct = None
        return None

    def take(self) -> list[Message]:
        """Everything queued, now, without waiting (what `next_batch` hands out)."""
        items, self._queue = self._queue, []
        self._queued_bytes = 0
        return items

    # -- the relay's timers ----------------------------------------------------------------------------------

    def heartbeat(self) -> None:
        """The relay's ticker, every half HEARTBEAT_INTERVAL: a ping is due if nothing was written since the last
        tick, so no stream is silent longer than the interval. Nothing for a stream that pings itself."""
        if self._own_pings:
            return
        if self._wrote:
            self._wrote = False
        else:
            self._ping_due = True
            self._wake()

    def check_connection(self) -> None:
        """The relay's sweep: the stream ends if the server saw its client leave."""
        writer = self._writer
        if writer is not None and writer.disconnected:
            self.close("gone")

    @staticmethod
    def check_connections(subs: Iterable[Subscriber]) -> None:
        """`check_connection` of every stream, in one loop: the relay's sweep runs it over all of them twice a
        second, and a call per stream was a third of it."""
        for sub in subs:
            writer = sub._writer
            if writer is not None and writer.disconnected:
                sub.close("gone")

    # -- the end ---------------------------------------------------------------------------------------------

    def close(self, reason: str) -> None:
        """End the stream (`drain`, `slow`, `expired`, `gone`, ...; the first reason stays): see `next_batch`."""
        if self._closed_reason is None:
            self._closed_reason = reason
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
