"""From `REDIS_URL` to clients: one Redis, a Redis Cluster, or a master found through Sentinel.

- `redis://`, `rediss://`, `unix://`: one Redis (a managed endpoint with its own failover included).
- `redis+cluster://host:port` (`rediss+cluster://`): Redis Cluster; live delivery uses sharded pub/sub
  (SPUBLISH/SSUBSCRIBE) so a message travels only within the shard that owns its channel.
- `redis+sentinel://host:port[,host:port...]/service-name[/db]`: the master Sentinel names; after a failover
  the next connection goes to the new master.

Every client has no client-side retry: a failure surfaces at once (publishing answers 503, the pub/sub reader
reconnects and fills its gap) instead of a silent reconnect that would hide the gap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = ["RedisTarget"]


def _options(socket_timeout: float | None) -> dict[str, Any]:
    return {"socket_connect_timeout": 2.0, "socket_timeout": socket_timeout, "socket_keepalive": True,
            "retry": Retry(NoBackoff(), 0), "health_check_interval": 0}


@dataclass(frozen=True)
class RedisTarget:
    url: str

    @property
    def kind(self) -> str:
        scheme = urlsplit(self.url).scheme
        if scheme.endswith("+cluster"):
            return "cluster"
        if scheme.endswith("+sentinel"):
            return "sentinel"
        return "single"

    @property
    def sharded(self) -> bool:
        return self.kind == "cluster"

    def _plain_url(self) -> str:
        scheme, _, rest = self.url.partition("://")
        return f"{scheme.split('+')[0]}://{rest}"

    def _sentinel(self, socket_timeout: float | None) -> Redis:
        parts = urlsplit(self.url)
        hosts = []
        for item in parts.netloc.rsplit("@", 1)[-1].split(","):
            host, _, port = item.partition(":")
            hosts.append((host, int(port or 26379)))
        path = [p for p in parts.path.split("/") if p]
        if not path:
            raise ValueError("a sentinel REDIS_URL names the service: redis+sentinel://host:26379/mymaster")
        db = int(path[1]) if len(path) > 1 else 0
        options = _options(socket_timeout)
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            hosts, sentinel_kwargs={"socket_connect_timeout": 2.0, "socket_timeout": 2.0},
                            password=parts.password, db=db, **options)
        master: Redis = sentinel.master_for(path[0], **options)
        return master

    def command_client(self, socket_timeout: float) -> Redis | RedisCluster:
        """For publishing and reading history: scripts are routed by their keys' slot in a cluster."""
        if self.kind == "cluster":
            options = _options(socket_timeout)
            options.pop("retry")
            return RedisCluster.from_url(self._plain_url(), retry=Retry(NoBackoff(), 0), **options)
        if self.kind == "sentinel":
            return self._sentinel(socket_timeout)
        return Redis.from_url(self.url, **_options(socket_timeout))

    def subscriber_client(self, host: str | None = None, port: int | None = None) -> Redis:
        """For one pub/sub connection: to the single Redis / Sentinel master, or to one cluster node."""
        if self.kind == "cluster":
            assert host is not None and port is not None
            parts = urlsplit(self._plain_url())
            scheme = "rediss" if parts.scheme == "rediss" else "redis"
            auth = f"{parts.username or ''}:{parts.password}@" if parts.password else ""
            return Redis.from_url(f"{scheme}://{auth}{host}:{port}/0", **_options(None))
        if self.kind == "sentinel":
            return self._sentinel(None)
        return Redis.from_url(self.url, **_options(None))
