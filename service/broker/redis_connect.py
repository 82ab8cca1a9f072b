"""From `REDIS_URL` to clients: one Redis, a Redis Cluster, or a master found through Sentinel.

- `redis://`, `rediss://`, `unix://`: one Redis (a managed endpoint with its own failover included).
- `redis+cluster://host:port[,host:port...]` (`rediss+cluster://`): Redis Cluster, found through any of the
  seed nodes listed; live delivery uses sharded pub/sub (SPUBLISH/SSUBSCRIBE) so a message travels only within
  the shard that owns its channel.
- `redis+sentinel://host:port[,host:port...]/service-name[/db]`: the master Sentinel names, followed as it moves
  (`redis_sentinel`): every connection, pooled or held, leaves a master Sentinel has replaced, and each checks
  `ROLE` when it opens.

Every option that matters is set here rather than left to redis-py, whose defaults have changed between
releases (RESP3 by default since 8, pool sizes, retries): RESP2 (the reader parses its replies itself), no
client-side retry (a failure surfaces at once: publishing answers 503/504, the reader reconnects and fills its
gap, instead of a silent reconnect that would hide the gap), no health-check round trips, TCP keep-alive,
explicit connect and command timeouts. Commands go over connections made here (`command_pool`, used only to
make connections) and driven by `redis_commands.RedisCommands`: no redis-py client, pool checkout or
`RedisCluster` on any command path; the pub/sub readers get a client of their own (`subscriber_client`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any
from urllib.parse import urlsplit

from redis.asyncio import ConnectionPool, Redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .redis_sentinel import SentinelMasterPool, SentinelWatcher
from .redis_topology import Node

__all__ = ["RedisOptions", "RedisTarget"]


@dataclass(frozen=True, slots=True)
class RedisOptions:
    connect_timeout: float = 2.0
    command_timeout: float = 3.0
    pool_size: int = 32


def _options(connect_timeout: float, socket_timeout: float | None, max_connections: int | None) -> dict[str, Any]:
    options: dict[str, Any] = {
        "socket_connect_timeout": connect_timeout, "socket_timeout": socket_timeout, "socket_keepalive": True,
        "retry": Retry(NoBackoff(), 0), "health_check_interval": 0, "protocol": 2,
    }
    if max_connections is not None:
        options["max_connections"] = max_connections
    return options


@dataclass(frozen=True)
class RedisTarget:
    url: str
    options: RedisOptions = RedisOptions()

    @cached_property
    def kind(self) -> str:
        """`single`, `sentinel` or `cluster`, parsed once (it is asked on hot paths: a publish asks `sharded`)."""
        scheme = urlsplit(self.url).scheme
        if scheme.endswith("+cluster"):
            return "cluster"
        if scheme.endswith("+sentinel"):
            return "sentinel"
        return "single"

    @cached_property
    def sharded(self) -> bool:
        return self.kind == "cluster"

    def _plain_url(self) -> str:
        scheme, _, rest = self.url.partition("://")
        return f"{scheme.split('+')[0]}://{rest}"

    def sentinel_watcher(self) -> SentinelWatcher:
        """Sentinel: a watcher of the sentinels the URL lists, for the service it names (not started yet)."""
        parts = urlsplit(self.url)
        hosts = []
        for item in parts.netloc.rsplit("@", 1)[-1].split(","):
            host, _, port = item.partition(":")
            hosts.append(Node(host, int(port or 26379)))
        path = [p for p in parts.path.split("/") if p]
        if not path:
            raise ValueError("a sentinel REDIS_URL names the service: redis+sentinel://host:26379/mymaster")
        return SentinelWatcher(hosts, path[0], connect_timeout=self.options.connect_timeout)

    def _sentinel_pool(self, socket_timeout: float | None, max_connections: int | None,
                       watcher: SentinelWatcher | None) -> SentinelMasterPool:
        """Connections to the master Sentinel names. Without `watcher` the pool watches the sentinels itself (and
        stops when closed); the broker and the command layer pass their own so all their connections move
        together."""
        parts = urlsplit(self.url)
        path = [p for p in parts.path.split("/") if p]
        db = int(path[1]) if len(path) > 1 else 0
        options = _options(self.options.connect_timeout, socket_timeout, max_connections)
        own = watcher is None
        return SentinelMasterPool(watcher or self.sentinel_watcher(), owns_watcher=own,
                                  ssl=parts.scheme.startswith("rediss"), db=db, username=parts.username,
                                  password=parts.password, **options)

    def command_pool(self, host: str | None = None, port: int | None = None,
                     watcher: SentinelWatcher | None = None) -> ConnectionPool:
        """Where the command layer (`redis_commands`) gets its connections: the single Redis, the Sentinel master
        (through `watcher`), or one Cluster node (`host`, `port`). Used only for `make_connection`: redis-py
        opens the connection (TCP or TLS, AUTH, SELECT, the RESP2 handshake, ROLE behind Sentinel), the
        multiplexer does the I/O; nothing is checked out of it as a pool."""
        options = _options(self.options.connect_timeout, self.options.command_timeout, self.options.pool_size + 1)
        if self.kind == "cluster":
            if host is None or port is None:
                raise ValueError("a Cluster's command connections are made per node: pass its host and port")
            return ConnectionPool.from_url(self._node_url(host, port), **options)
        if self.kind == "sentinel":
            return self._sentinel_pool(self.options.command_timeout, self.options.pool_size + 1, watcher)
        return ConnectionPool.from_url(self.url, **self._for_scheme(options))

    def command_client(self) -> Redis:
        """A redis-py client of the single Redis or the Sentinel master, with the command layer's options (tests
        and tools; the service's own commands go through `redis_commands.RedisCommands`)."""
        if self.kind == "cluster":
            raise ValueError("no single command client for a Cluster: see redis_commands.RedisCommands")
        return Redis.from_pool(self.command_pool())

    def _for_scheme(self, options: dict[str, Any]) -> dict[str, Any]:
        """A `unix://` socket has no TCP options: redis-py's unix connection refuses `socket_keepalive` (every
        command then failed, and the broker looked down)."""
        if urlsplit(self.url).scheme == "unix":
            options.pop("socket_keepalive", None)
        return options

    def seeds(self) -> list[Node]:
        """Cluster: the seed nodes listed in the URL."""
        parts = urlsplit(self._plain_url())
        nodes = []
        for item in parts.netloc.rsplit("@", 1)[-1].split(","):
            host, sep, port = item.rpartition(":")
            if sep and port.isdigit() and (not host.startswith("[") or host.endswith("]")):
                nodes.append(Node(host.strip("[]"), int(port)))  # IPv6 as Cluster lists it: no brackets
            else:
                nodes.append(Node(item.strip("[]"), 6379))
        return nodes

    def _node_url(self, host: str, port: int) -> str:
        parts = urlsplit(self._plain_url().split(",", 1)[0])
        scheme = "rediss" if parts.scheme == "rediss" else "redis"
        auth = f"{parts.username or ''}:{parts.password}@" if parts.password else ""
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"  # an IPv6 address (CLUSTER NODES gives them bare) in a URL
        return f"{scheme}://{auth}{host}:{port}/0"

    def subscriber_client(self, host: str | None = None, port: int | None = None,
                          watcher: SentinelWatcher | None = None) -> Redis:
        """For one pub/sub connection: to the single Redis / Sentinel master, or to one cluster node."""
        options = _options(self.options.connect_timeout, None, 2)
        if self.kind == "cluster":
            assert host is not None and port is not None
            return Redis.from_url(self._node_url(host, port), **options)
        if self.kind == "sentinel":
            return Redis.from_pool(self._sentinel_pool(None, 2, watcher))
        return Redis.from_url(self.url, **self._for_scheme(options))
