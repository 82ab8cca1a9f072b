"""The Redis broker: a Stream per channel for history, pub/sub for live delivery, written in one Lua step.

Keys of one SSE channel share a hash tag, `sse:{room}:log` (the Stream) and `sse:{room}:live` (the pub/sub
channel), so they sit in one Cluster slot. The Stream entry id is the message id.

Receiving is one pub/sub connection per instance (per shard on a Cluster), each owned by a supervised reader
(`redis_reader._Reader`). Whatever a reader's connection went through, the broker hands each channel's messages
to the sink in id order and never twice (a cursor per channel), and fills the gap from the Stream after every
(re)subscribe: that is what makes outages and the subscribe-then-read-history dance lossless.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from ..message import Message, MessageId, format_id, parse_id
from .base import BrokerUnavailable, History, Sink
from .redis_connect import RedisTarget
from .redis_format import HISTORY_SCRIPT, PUBLISH_SCRIPT, keys_for, publish_args
from .redis_reader import Reader

if TYPE_CHECKING:
    from ..config import Settings

__all__ = ["RedisBroker", "keys_for"]

log = logging.getLogger("service.broker.redis")

# A fresh stream subscribed while Redis is unreachable starts this far back: a message from just before it
# connected is not a loss, a clock skew between this host and Redis must not become one.
_SKEW_MS = 2000


class RedisBroker:
    def __init__(
        self,
        url: str,
        *,
        prefix: str = "sse",
        history_size: int = 1000,
        history_ttl: float = 3600.0,
        probe_interval: float = 2.0,
        command_client: Any = None,
        subscriber_client: Callable[[str | None, int | None], Any] | None = None,
    ) -> None:
        """`command_client`/`subscriber_client` replace the clients made from `url` (fakeredis in unit tests)."""
        self._target = RedisTarget(url)
        self._subscriber_client = subscriber_client or self._target.subscriber_client
        self._prefix = prefix
        self._maxlen = history_size
        self._ttl_ms = int(history_ttl * 1000)
        self._probe = probe_interval
        self._publish_command = "SPUBLISH" if self._target.sharded else "PUBLISH"
        # Publishing and reading history fail fast: a publish during an outage answers 503, never hangs.
        self._cmd = command_client or self._target.command_client(socket_timeout=max(2.0, probe_interval))
        self._publish_script = self._cmd.register_script(PUBLISH_SCRIPT)
        self._history_script = self._cmd.register_script(HISTORY_SCRIPT)
        self._sink: Sink | None = None
        self._readers: dict[str, Reader] = {}
        self._wanted: dict[str, Reader | None] = {}  # channel -> the reader carrying it
        self._cursor: dict[str, MessageId] = {}
        self._filling: dict[str, list[Message]] = {}
        self._live_to_channel: dict[bytes, str] = {}
        self._lost_connections = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> RedisBroker:
        assert settings.redis_url
        return cls(
            settings.redis_url,
            prefix=settings.redis_key_prefix,
            history_size=settings.history_size,
            history_ttl=settings.history_ttl,
            probe_interval=settings.redis_probe_interval,
        )

    @property
    def reconnects(self) -> int:
        return self._lost_connections

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def start(self, sink: Sink) -> None:
        self._sink = sink
        if not self._target.sharded:
            self._reader_for_node("main", None, None)
            return
        try:
            await self._cmd.initialize()
            for node in self._cmd.get_primaries():  # type: ignore[union-attr]
                self._reader_for_node(node.name, node.host, int(node.port))
        except RedisError as exc:
            log.warning("Redis Cluster not reachable yet", extra={"error": str(exc)})
            asyncio.get_running_loop().create_task(self._retry_topology())

    async def close(self) -> None:
        for reader in list(self._readers.values()):
            await reader.stop()
        self._readers.clear()
        await self._cmd.aclose()

    def ready(self) -> bool:
        return bool(self._readers) and all(r.connected for r in self._readers.values())

    # -- publishing and history ------------------------------------------------------------------------------

    async def publish(self, channel: str, data: bytes, event: str | None = None) -> str:
        stream, live = keys_for(self._prefix, channel)
        try:
            raw = await self._publish_script(
                keys=[stream, live], args=publish_args(data, event, self._maxlen, self._ttl_ms, self._publish_command)
            )
        except RedisError as exc:
            raise BrokerUnavailable(f"Redis did not take the message: {exc}") from exc
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    async def history(self, channel: str, after: MessageId | None) -> History:
        stream, _ = keys_for(self._prefix, channel)
        start = "-" if not after or after == (0, 0) else f"({format_id(after)}"
        try:
            exists, trimmed, first, now_ms, entries = await self._history_script(
                keys=[stream], args=[start, self._maxlen * 2 + 100]
            )
        except RedisError as exc:
            raise BrokerUnavailable(f"Redis did not answer the history read: {exc}") from exc
        messages = [self._from_entry(channel, entry) for entry in entries]
        if after is None or after == (0, 0):
            return History(messages, True)
        if not exists:
            # The key expired: it held nothing newer than one TTL ago, so only an id older than that can have missed.
            return History(messages, after[0] >= int(now_ms) - self._ttl_ms)
        # An id just below the first retained one may be reported incomplete when it was the last one trimmed:
        # a needless reset (what follows is all retained history) at the exact boundary, never a silent loss.
        return History(messages, not trimmed or after >= (parse_id(first) or (0, 0)))

    @staticmethod
    def _from_entry(channel: str, entry: Any) -> Message:
        raw_id, fields = entry
        values = dict(zip(fields[::2], fields[1::2]))
        event = values.get(b"e", b"").decode()
        return Message.create(channel, raw_id.decode(), event, values.get(b"d", b"null"))

    async def last_id(self, channel: str) -> str | None:
        try:
            tail = await self._tail(channel)
        except RedisError as exc:
            raise BrokerUnavailable(f"Redis did not answer: {exc}") from exc
        return format_id(tail) if tail != (0, 0) else None

    async def _tail(self, channel: str) -> MessageId:
        stream, _ = keys_for(self._prefix, channel)
        entries = await self._cmd.xrevrange(stream, "+", "-", count=1)
        return (parse_id(entries[0][0]) or (0, 0)) if entries else (0, 0)

    # -- subscriptions ---------------------------------------------------------------------------------------

    def live_key(self, channel: str) -> str:
        return keys_for(self._prefix, channel)[1]

    async def subscribe(self, channel: str) -> None:
        if channel in self._wanted:
            return
        reader = self._route(channel)
        self._wanted[channel] = reader
        self._live_to_channel[self.live_key(channel).encode()] = channel
        if reader is None or not reader.connected:
            # Its reader subscribes it when it is (back) up.
            self._cursor[channel] = (int(time.time() * 1000) - _SKEW_MS, 0)
            return
        self._filling[channel] = []
        try:
            self._cursor[channel] = await self._tail(channel)
            await reader.add(channel)
            await self.fill([channel])
        except RedisError as exc:
            # The reader's session fails on the same fault and re-subscribes all its channels.
            log.warning("subscribe deferred until Redis answers", extra={"channel": channel, "error": str(exc)})
            self._cursor.setdefault(channel, (int(time.time() * 1000) - _SKEW_MS, 0))
        finally:
            self._flush_filling(channel)

    async def unsubscribe(self, channel: str) -> None:
        reader = self._wanted.pop(channel, None)
        self._cursor.pop(channel, None)
        self._live_to_channel.pop(self.live_key(channel).encode(), None)
        if reader is not None:
            await reader.remove(channel)

    def channels_of(self, reader: Reader) -> list[str]:
        return sorted(c for c, r in self._wanted.items() if r is reader)

    def _route(self, channel: str) -> Reader | None:
        if not self._target.sharded:
            return self._readers["main"]
        assert isinstance(self._cmd, RedisCluster)
        try:
            node = self._cmd.get_node_from_key(self.live_key(channel))
        except Exception:  # noqa: BLE001 - no topology yet: the channel waits for it
            return None
        if node is None:
            return None
        return self._reader_for_node(node.name, node.host, int(node.port))

    def _reader_for_node(self, name: str, host: str | None, port: int | None) -> Reader:
        reader = self._readers.get(name)
        if reader is None:
            probe = self._probe_channel(name)
            reader = Reader(self, self._subscriber_client(host, port), name, probe, self._probe,
                            sharded=self._target.sharded)
            self._readers[name] = reader
            reader.start()
        return reader

    def _probe_channel(self, node_name: str) -> str:
        """A channel of our own on that node, keeping its connection in subscribed mode even with no SSE channel."""
        if not self._target.sharded:
            return f"{self._prefix}:probe"
        assert isinstance(self._cmd, RedisCluster)
        for i in range(100000):
            name = f"{self._prefix}:{{probe-{i}}}:live"
            node = self._cmd.get_node_from_key(name)
            if node is not None and node.name == node_name:
                return name
        raise RuntimeError(f"no probe channel found for {node_name}")

    async def reroute(self) -> None:
        """After a Cluster topology change: move every channel to the reader of the node that now owns it."""
        if not self._target.sharded:
            return
        try:
            await self._cmd.initialize()
        except RedisError:
            return
        for channel, old in list(self._wanted.items()):
            new = self._route(channel)
            if new is old:
                continue
            self._wanted[channel] = new
            if old is not None:
                await old.remove(channel)
            if new is not None and new.connected:
                try:
                    await new.add(channel)
                    await self.fill([channel])
                except RedisError:
                    pass  # its session restarts and subscribes it

    async def _retry_topology(self) -> None:
        delay = 0.2
        while not self._readers:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
            try:
                await self._cmd.initialize()
                for node in self._cmd.get_primaries():  # type: ignore[union-attr]
                    self._reader_for_node(node.name, node.host, int(node.port))
            except RedisError:
                continue
        await self.reroute()

    def connection_lost(self) -> None:
        self._lost_connections += 1

    # -- delivery --------------------------------------------------------------------------------------------

    def on_payload(self, live: bytes, payload: bytes) -> None:
        channel = self._live_to_channel.get(live)
        if channel is None:
            return
        try:
            raw_id, event, data = payload.split(b"\n", 2)
            message = Message.create(channel, raw_id.decode(), event.decode(), data)
        except ValueError:
            log.error("malformed payload ignored", extra={"channel": channel, "payload": payload[:200]})
            return
        self._deliver(message)

    def _deliver(self, message: Message) -> None:
        channel = message.channel
        buffer = self._filling.get(channel)
        if buffer is not None:
            buffer.append(message)
            return
        cursor = self._cursor.get(channel)
        if cursor is None or message.key <= cursor:
            return  # not subscribed any more, or already delivered (gap fill overlapping live)
        self._cursor[channel] = message.key
        assert self._sink is not None
        self._sink.dispatch(message)

    def _flush_filling(self, channel: str) -> None:
        for message in self._filling.pop(channel, ()):
            self._deliver(message)

    async def fill(self, channels: list[str]) -> None:
        """Deliver what each channel's Stream holds after its cursor (the gap an outage or a subscribe left)."""
        for channel in channels:
            if channel not in self._cursor:
                continue
            history = await self.history(channel, self._cursor[channel])
            buffer = self._filling.pop(channel, None)
            for message in history.messages:
                self._deliver(message)
            if buffer is not None:
                self._filling[channel] = buffer
