"""One supervised pub/sub connection (to the single Redis, or to one Cluster primary) and the channels it carries.

The reader converges on a set: `assign`/`release` say which channels it must carry, and a worker brings the
connection there in bulk. A burst of new channels becomes a few SUBSCRIBE commands carrying many channels (one
per slot on a Cluster, where SSUBSCRIBE must not mix slots), with their tail ids read in pipelines before and
their gaps filled in pipelines after. The hooks (`ReaderHooks`, implemented by the broker) do the Redis reads;
the reader never imports the broker.

- No client-side retry: every connection error ends the session, and a new session re-subscribes every
  assigned channel and has its gap filled from the Streams, so a blink never loses a message unnoticed.
- A local failure (the command pool stayed busy, a read timed out) while preparing or filling channels does
  not end the session: those channels are retried with backoff until they are live.
- A channel counts as subscribed only when Redis confirmed it; the reconciler (`check`) compares what is
  assigned with what is confirmed and live, and repairs any drift.
- When idle it PINGs; two probe intervals without any answer mean a half-open path: the session restarts.
- `restart(reason)` ends the session on purpose (the Sentinel master moved): the next one, started at once,
  connects to wherever the client now points and fills the gap like any other.
- It parses replies itself from a raw connection (RESP2): no per-message work beyond a tuple test and a
  dictionary lookup, and it never waits on a client: delivery only enqueues.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection

from ..tasks import cancel_and_wait
from .base import BrokerError
from .redis_wire import WireIO, pack, wire_io

__all__ = ["Reader", "ReaderHooks"]

log = logging.getLogger("service.broker.redis")

_BACKOFF_MIN, _BACKOFF_MAX = 0.05, 5.0
_BATCH = 1000  # channels per SUBSCRIBE round (tails, subscribe, fill)
# In a burst of new channels (a round ended less than _BURST_S ago), the next round waits _GATHER_S for more to
# come: a reconnect storm into 2,000 new rooms otherwise ran ~800 rounds of 2-3 channels, each round's fixed cost
# (four round trips, their futures and packing) a tenth of the storm's CPU, while the streams of the rooms not yet
# live waited for the rounds ahead. A lone new channel (no round in the last _BURST_S) goes at once.
_BURST_S, _GATHER_S = 0.05, 0.01
_MESSAGE = (b"message", b"smessage")
_SUBSCRIBED = (b"subscribe", b"ssubscribe")
_UNSUBSCRIBED = (b"unsubscribe", b"sunsubscribe")


class _Stale(ConnectionError):
    """The pub/sub connection stopped answering."""


class ReaderHooks(Protocol):
    """What a reader needs from the broker."""

    def live_key(self, channel: str) -> str: ...

    def channel_of(self, live_key: bytes) -> str | None:
        """The SSE channel a pub/sub channel name belongs to (parsed, so it works for any channel)."""

    def slot_of(self, channel: str) -> int: ...

    def on_payload(self, channel: str, payload: bytes) -> None:
        """A live message of `channel` (raw payload)."""


    async def prepare(self, channels: list[str]) -> None:
        """Before SUBSCRIBE: make sure each channel has a cursor (its tail id). Raises BrokerError."""

    def begin_fill(self, channels: list[str]) -> None:
        """SUBSCRIBE is about to be sent: buffer live messages of these channels until `fill` is done."""

    async def fill(self, channels: list[str]) -> None:
        """After the subscription is confirmed: deliver each channel's history after its cursor, then what
        was buffered. Raises BrokerError (the channels stay buffered and are filled again)."""

    def unsubscribed(self, channel: str) -> None:
        """The reader no longer carries `channel` (released, or moved)."""

    def slot_moved(self, channel: str) -> None:
        """Redis dropped a sharded subscription on its own: the slot moved to another node (the reader no
        longer carries the channel)."""

    def session_ended(self, reader: Reader, was_connected: bool) -> None:
        """A session failed (before or after it was up); on a Cluster the topology may have changed."""


class Reader:
    def __init__(self, hooks: ReaderHooks, client: Redis, name: str, probe_interval: float, sharded: bool) -> None:
        self._hooks = hooks
        self._client = client
        self.name = name
        self._probe = probe_interval
        self._sharded = sharded
        self.assigned: set[str] = set()
        self._pending: set[str] = set()  # assigned, not yet subscribed in this session
        self._dropping: set[str] = set()  # subscribed in this session, no longer assigned
        self._subscribed: set[str] = set()  # SUBSCRIBE sent in this session
        self._confirmed: set[str] = set()  # Redis said so
        self._outstanding: Counter[str] = Counter()  # (un)subscribe replies still to come, per channel
        self._unfilled: set[str] = set()  # confirmed, gap fill still to do
        self._working: set[str] = set()  # taken from pending by the worker, being prepared
        self.live: set[str] = set()  # confirmed and filled
        self._conn: AbstractConnection | None = None
        self._wake = asyncio.Event()
        self._confirm_changed = asyncio.Event()
        self.connected = False
        self.repaired = 0
        self._last_rx = 0.0
        self._task: asyncio.Task[None] | None = None
        self._restart = asyncio.Event()
        self._restart_reason: Exception = ConnectionError("restart")

    # -- what to carry -----------------------------------------------------------------------------------

    def assign(self, channel: str) -> None:
        self.assigned.add(channel)
        self._dropping.discard(channel)
        if channel not in self._subscribed:
            self._pending.add(channel)
            self._wake.set()

    def release(self, channel: str) -> None:
        self.assigned.discard(channel)
        self._pending.discard(channel)
        if channel in self._subscribed:
            self._dropping.add(channel)
            self._wake.set()
        else:
            self._hooks.unsubscribed(channel)

    @property
    def not_live(self) -> int:
        """Assigned channels not (yet) confirmed and filled: the reconciler's gauge."""
        return len(self.assigned) - len(self.live & self.assigned)

    def check(self) -> int:
        """The reconciler's pass: every assigned channel is live or on its way; anything else is drift, which is
        queued again. Returns the number of channels repaired."""
        in_flight = self._pending | self._subscribed | self._working
        drift = [c for c in self.assigned if c not in in_flight and c not in self.live]
        stale = [c for c in self.live if c not in self.assigned and c not in self._dropping]
        for channel in drift:
            self._pending.add(channel)
        for channel in stale:
            self.live.discard(channel)
        if self._unfilled or drift:
            self._wake.set()
        if drift:
            self.repaired += len(drift)
            log.warning("reconciler: channels wanted but not subscribed were queued again",
                        extra={"node": self.name, "channels": len(drift), "sample": drift[:5]})
        return len(drift)

    def restart(self, reason: Exception) -> None:
        """End the current session (or the one being opened) now; `reason` is what it ends with."""
        self._restart_reason = reason
        self._restart.set()

    # -- lifecycle -----------------------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._supervise(), name=f"redis-reader-{self.name}")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self.connected = False
        await self._close_connection()
        await self._client.aclose()

    async def _supervise(self) -> None:
        """Keep a session alive forever; every failure is logged, backed off with jitter and retried."""
        backoff = _BACKOFF_MIN
        while True:
            started = time.monotonic()
            restarted = False
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the reader must never die for good
                restarted = exc is self._restart_reason
                if restarted:
                    log.warning("Redis pub/sub moving: re-subscribing", extra={"node": self.name,
                                                                               "reason": str(exc)[:300]})
                elif self.connected:
                    log.warning("Redis pub/sub connection lost; reconnecting",
                                extra={"node": self.name, "error": repr(exc)[:300]})
                else:
                    log.debug("Redis not reachable yet", extra={"node": self.name, "error": repr(exc)[:300]})
                self._hooks.session_ended(self, self.connected)
            finally:
                self.connected = False
                await self._end_session()
            if restarted or time.monotonic() - started > 10:
                backoff = _BACKOFF_MIN
            # A restart asked for while backing off (the master moved while it was unreachable) cuts the wait short:
            # the reader would otherwise sit out up to 7.5 s of backoff after the new master is known.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(backoff * random.uniform(0.5, 1.5)):
                    await self._restart.wait()
            backoff = min(backoff * 2, _BACKOFF_MAX)

    async def _end_session(self) -> None:
        await self._close_connection()
        for channel in list(self._dropping):
            self._hooks.unsubscribed(channel)
        self._dropping.clear()
        self._subscribed.clear()
        self._confirmed.clear()
        self._outstanding.clear()
        self._unfilled.clear()
        self.live.clear()
        self._pending = set(self.assigned)

    async def _close_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await conn.disconnect(nowait=True)
            except Exception:  # noqa: BLE001 - closing a broken connection may fail in many ways
                pass

    async def _session(self) -> None:
        self._restart.clear()  # a restart asked for from here on (even while connecting) ends this session
        conn = self._client.connection_pool.make_connection()  # type: ignore[no-untyped-call]
        self._conn = conn
        opening = asyncio.ensure_future(self._open(conn))
        moved = asyncio.ensure_future(self._restart.wait())
        try:
            # A restart asked for while connecting (the master moved while the old one hangs) ends it at once,
            # not after REDIS_CONNECT_TIMEOUT and two probes.
            await asyncio.wait({opening, moved}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            moved.cancel()
        if not opening.done():
            await cancel_and_wait(opening)
            raise self._restart_reason
        opening.result()
        self.connected = True
        self._pending = set(self.assigned)
        self._wake.set()
        log.info("Redis pub/sub connected", extra={"node": self.name, "channels": len(self._pending)})
        io = wire_io(conn)  # from here on the replies are read here, in bulk (the PING's was the last for redis-py)
        self._last_rx = time.monotonic()
        loop = asyncio.get_running_loop()
        worker = loop.create_task(self._work(conn), name=f"redis-subscriber-{self.name}")
        reading = loop.create_task(self._read(io), name=f"redis-pubsub-{self.name}")
        watching = loop.create_task(self._watch(io), name=f"redis-pubsub-probe-{self.name}")
        moving = loop.create_task(self._restarting(), name=f"redis-pubsub-restart-{self.name}")
        try:
            done, _ = await asyncio.wait({reading, worker, watching, moving}, return_when=asyncio.FIRST_COMPLETED)
            if moving in done:
                raise self._restart_reason
            for task in done:
                task.result()  # whichever ended first ended with an error
            raise _Stale("reader task ended")
        finally:
            await cancel_and_wait(worker, reading, watching, moving)

    async def _open(self, conn: AbstractConnection) -> None:
        await conn.connect()  # type: ignore[no-untyped-call]
        await conn.send_command("PING")
        if await conn.read_response(timeout=self._probe * 2) is None:
            raise _Stale("no answer to PING")

    async def _restarting(self) -> None:
        await self._restart.wait()

    # -- the worker: bulk subscribe, fill, unsubscribe ----------------------------------------------------------

    async def _work(self, conn: AbstractConnection) -> None:
        retry_delay = 0.0
        last_round = -_BURST_S
        while True:
            await self._wake.wait()
            self._wake.clear()
            if retry_delay:
                await asyncio.sleep(retry_delay * random.uniform(0.5, 1.5))
            elif 0 < len(self._pending) < _BATCH and time.monotonic() - last_round < _BURST_S:
                await asyncio.sleep(_GATHER_S)  # a burst: let more new channels join this round
            if self._dropping:
                drop, self._dropping = list(self._dropping), set()
                await self._send(conn, "UNSUBSCRIBE", drop)
                for channel in drop:
                    self._subscribed.discard(channel)
                    self._confirmed.discard(channel)
                    self._unfilled.discard(channel)
                    self.live.discard(channel)
                    self._hooks.unsubscribed(channel)
            try:
                if self._unfilled:
                    await self._fill(list(self._unfilled))
                if self._pending:
                    await self._subscribe(conn, self._take(_BATCH))
                    last_round = time.monotonic()
                retry_delay = 0.0
            except BrokerError as exc:
                # A local or passing failure (pool busy, a timeout): the connection is fine, try these again.
                retry_delay = min(max(retry_delay * 2, 0.1), _BACKOFF_MAX)
                log.info("subscribing deferred; retrying", extra={"node": self.name, "kind": exc.kind,
                                                                  "error": str(exc)[:200], "retry_s": retry_delay})
            if self._pending or self._unfilled or self._dropping:
                self._wake.set()

    def _take(self, n: int) -> list[str]:
        batch = []
        for channel in self._pending:
            batch.append(channel)
            if len(batch) >= n:
                break
        self._pending.difference_update(batch)
        return batch

    async def _subscribe(self, conn: AbstractConnection, batch: list[str]) -> None:
        self._working = set(batch)
        try:
            await self._hooks.prepare(batch)
        except BrokerError:
            self._pending.update(c for c in batch if c in self.assigned)
            raise
        finally:
            self._working = set()
        batch = [c for c in batch if c in self.assigned and c not in self._subscribed]
        if not batch:
            return
        self._hooks.begin_fill(batch)
        self._subscribed.update(batch)
        await self._send(conn, "SUBSCRIBE", batch)
        await self._await_confirmed(batch)
        self._unfilled.update(batch)
        await self._fill(batch)

    async def _fill(self, channels: list[str]) -> None:
        channels = [c for c in channels if c in self._confirmed]
        if not channels:
            return
        await self._hooks.fill(channels)
        for channel in channels:
            self._unfilled.discard(channel)
            if channel in self.assigned:
                self.live.add(channel)

    async def _send(self, conn: AbstractConnection, verb: str, channels: list[str]) -> None:
        """One command per chunk of channels; per slot on a Cluster (a sharded command must not mix slots)."""
        command = ("S" + verb) if self._sharded else verb
        groups: dict[int, list[str]] = {}
        for channel in channels:
            groups.setdefault(self._hooks.slot_of(channel) if self._sharded else 0, []).append(
                self._hooks.live_key(channel))
        commands: list[tuple[Any, ...]] = []
        for channel in channels:
            self._outstanding[channel] += 1
        for names in groups.values():
            for i in range(0, len(names), 500):
                commands.append((command, *names[i:i + 500]))
        await conn.send_packed_command(conn.pack_commands(commands), check_health=False)

    async def _await_confirmed(self, batch: list[str]) -> None:
        deadline = time.monotonic() + max(self._probe * 2, 2.0)
        while not all(c in self._confirmed or c not in self._subscribed for c in batch):
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Stale(f"Redis did not confirm {len(batch)} subscriptions")
            self._confirm_changed.clear()
            try:
                async with asyncio.timeout(left):
                    await self._confirm_changed.wait()
            except TimeoutError:
                continue

    # -- the read loop -----------------------------------------------------------------------------------------

    async def _read(self, io: WireIO) -> None:
        hooks = self._hooks
        channel_of = hooks.channel_of
        while True:
            replies = await io.read()
            self._last_rx = time.monotonic()
            for reply in replies:
                if not isinstance(reply, list):
                    if isinstance(reply, Exception):
                        raise reply  # an error reply on a subscriber connection: start a new session
                    continue  # +PONG on a connection with no subscription
                kind = reply[0]
                if kind in _MESSAGE:
                    channel = channel_of(reply[1])
                    if channel is not None:
                        hooks.on_payload(channel, reply[2])
                elif kind in _SUBSCRIBED or kind in _UNSUBSCRIBED:
                    self._on_reply(kind in _SUBSCRIBED, reply[1])

    async def _watch(self, io: WireIO) -> None:
        """A half-open path (a NAT or a proxy that forgot the connection) looks like a quiet channel: after one
        probe interval without anything from Redis, PING; if nothing at all arrives within one more interval after
        the PING, the session is stale. A timer of its own, so reading a message costs no timeout scope. Whether
        the PING was answered is judged by the time of the last read against the time it was sent, never by the
        idle time alone: a PONG that comes at once leaves the connection idle for exactly one interval again."""
        probe = self._probe
        sent_at: float | None = None
        while True:
            now = time.monotonic()
            if sent_at is not None and self._last_rx >= sent_at:
                sent_at = None  # answered (or anything else arrived since it went out)
            if sent_at is None:
                idle = now - self._last_rx
                if idle < probe:
                    await asyncio.sleep(probe - idle)
                    continue
                io.write(pack(("PING",)))
                sent_at = now
                await asyncio.sleep(probe)
            elif now - sent_at >= probe:
                raise _Stale(f"no answer from Redis for {now - self._last_rx:.1f}s (a PING {now - sent_at:.1f}s ago)")
            else:
                await asyncio.sleep(probe - (now - sent_at))

    def _on_reply(self, subscribed: bool, live_key: bytes) -> None:
        """A (un)subscribe reply. Replies come in command order, so a channel is confirmed once the replies to
        every command sent for it have arrived and the last one sent was SUBSCRIBE."""
        channel = self._hooks.channel_of(live_key)
        if channel is None:
            return
        if self._outstanding[channel] > 0:
            self._outstanding[channel] -= 1
            if self._outstanding[channel] == 0:
                del self._outstanding[channel]
                if channel in self._subscribed:
                    self._confirmed.add(channel)
                    self._confirm_changed.set()
        elif not subscribed and channel in self._subscribed:
            # Not asked for: on a Cluster the slot moved (resharding or failover). This node no longer carries
            # it; the broker finds its new owner.
            self._subscribed.discard(channel)
            self._confirmed.discard(channel)
            self._unfilled.discard(channel)
            self.live.discard(channel)
            self.assigned.discard(channel)
            self._pending.discard(channel)
            self._hooks.slot_moved(channel)
