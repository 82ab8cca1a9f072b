"""What every part of the Redis broker shares of one Redis deployment: its command layer, the one command
budget, the error log, and the keys of a channel under the broker's prefix.

A failure means more than its caller's error: behind Sentinel a READONLY or a moved master makes the watcher
suspect the master, and on a Cluster a failover or a moved slot asks for the slot map to be read again. That
reaction lives here, in `fail`, so a publish, a history read and a gap fill all react alike; the request to
re-read the map is only an event (`refresh_asked`), which the routing part's topology task waits on, so nothing
here depends on the parts above.
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis.crc import key_slot

from .base import BrokerError, BrokerUnavailable
from .redis_commands import RedisCommands
from .redis_connect import RedisOptions, RedisTarget
from .redis_errors import CommandBudget, ErrorLog, Unrouted, classify
from .redis_format import keys_for
from .redis_sentinel import SentinelWatcher
from .redis_topology import ClusterTopology

__all__ = ["RedisLink"]


class RedisLink:
    def __init__(self, url: str, options: RedisOptions, *, prefix: str, pool_timeout: float,
                 command_client: Any = None) -> None:
        """`command_client` replaces the connections made from `url` (fakeredis in unit tests)."""
        self.options = options
        self.target = RedisTarget(url, options)
        if command_client is not None and self.target.sharded:
            raise ValueError("command_client replaces the one Redis's connections, not a Cluster's")
        # Every command goes through the one layer (redis_commands); it moves its connections when Sentinel
        # switches the master, and its watcher is the readers' too, so they all move together.
        self.commands = RedisCommands(self.target, client=command_client)
        self.watcher: SentinelWatcher | None = self.commands.watcher
        self.topology: ClusterTopology | None = self.commands.topology
        self.prefix = prefix
        self._live_head = f"{prefix}:{{".encode()
        self.budget = CommandBudget(options.pool_size, pool_timeout)
        self.errors = ErrorLog()
        self.refresh_asked = asyncio.Event()

    def start(self) -> None:
        if self.watcher is not None:
            self.watcher.start()

    async def aclose(self) -> None:
        await self.commands.aclose()  # the watcher too: after the readers, which follow it

    def subscriber_client(self, host: str | None, port: int | None) -> Any:
        """The default pub/sub client of a reader: to `host:port` (a Cluster primary), or to the one Redis or
        wherever the Sentinel watcher says the master is."""
        return self.target.subscriber_client(host, port, watcher=self.watcher)

    # -- failures ----------------------------------------------------------------------------------------------

    def fail(self, exc: BaseException, what: str, **context: object) -> BrokerError:
        error = classify(exc, what)
        if self.watcher is not None and error.kind in ("readonly", "moved"):
            # Behind Sentinel, READONLY from the server we were sent to means it was demoted: the master moved.
            if error.kind == "readonly":
                error = BrokerUnavailable(f"{error} (a demoted master: it moved)", "moved")
            self.watcher.suspect(str(error))
        self.errors.record(error, **context)
        if self.target.sharded and error.kind in ("cluster", "down", "connection_lost", "timeout", "readonly"):
            self.request_refresh()  # a failover or a moved slot: find the owners again
        return error

    def request_refresh(self) -> None:
        """Ask for a Cluster topology refresh soon (coalesced: at most a few per second)."""
        self.refresh_asked.set()

    # -- where a channel's commands go ------------------------------------------------------------------------

    def node_for(self, channel: str) -> str:
        """The node serving `channel`'s keys (all under its hash tag): the one Redis, or, on a Cluster, the
        primary of its slot by the one slot map. Each primary has connections of its own, so a dead shard fails
        alone instead of dragging every command through redis-py's cluster-wide re-initialisation."""
        try:
            return self.commands.node_of(self.live_key(channel))
        except Unrouted:
            self.request_refresh()
            raise

    def by_node(self, channels: list[str]) -> list[tuple[str, list[str]]]:
        """Channels grouped by the node serving them (one group without a Cluster)."""
        try:
            return self.commands.by_node(channels, self.live_key)
        except Unrouted as exc:
            self.request_refresh()
            raise BrokerUnavailable(str(exc), "cluster") from exc

    # -- a channel's keys --------------------------------------------------------------------------------------

    def live_key(self, channel: str) -> str:
        return keys_for(self.prefix, channel)[1]

    def channel_of(self, live_key: bytes) -> str | None:
        if not live_key.startswith(self._live_head) or not live_key.endswith(b"}:live"):
            return None
        return live_key[len(self._live_head):-6].decode()

    def slot_of(self, channel: str) -> int:
        return key_slot(self.live_key(channel).encode())
