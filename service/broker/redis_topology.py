"""Who owns which slot of a Redis Cluster, read from the cluster itself.

Why our own map rather than redis-py's `RedisCluster`: after a primary dies, redis-py re-initialises its whole
topology from inside commands of every shard (so a dead shard slows or fails the healthy ones), it only
re-reads the map when its internal flag says so (calling `initialize()` again is a no-op), and those internals
change between releases. Here the map is a plain table refreshed on demand: `CLUSTER NODES` from up to three
reachable nodes, and for each slot the primary with the newest config epoch wins, so a node that has not yet
heard of a failover cannot hold us on the dead primary. Nodes flagged `fail` own nothing.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis.crc import key_slot

__all__ = ["ClusterTopology", "Node", "parse_cluster_nodes"]

log = logging.getLogger("service.broker.redis")

SLOTS = 16384


@dataclass(frozen=True, slots=True)
class Node:
    host: str
    port: int

    @property
    def name(self) -> str:
        return f"{self.host}:{self.port}"


def parse_cluster_nodes(text: str) -> list[tuple[Node, str, int, list[tuple[int, int]], bool]]:
    """`CLUSTER NODES` as (node, flags, config epoch, slot ranges, failing) per line."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 8:
            continue
        address = parts[1].split("@", 1)[0].split(",", 1)[0]
        host, _, port = address.rpartition(":")
        if not port.isdigit() or not host:
            continue
        flags = parts[2]
        ranges = []
        for item in parts[8:]:
            if item.startswith("["):
                continue  # a slot being imported or migrated: its owner is still the one listed for it
            lo, _, hi = item.partition("-")
            if lo.isdigit():
                ranges.append((int(lo), int(hi or lo)))
        failing = "fail" in flags.split(",")  # `fail?` (suspected) still owns its slots
        out.append((Node(host, int(port)), flags, int(parts[6]) if parts[6].isdigit() else 0, ranges, failing))
    return out


class ClusterTopology:
    def __init__(self, seeds: list[Node], client_for: Callable[[Node], Any]) -> None:
        self._seeds = seeds
        self._client_for = client_for
        self._owner: list[Node | None] = [None] * SLOTS
        self._known: list[Node] = list(seeds)
        self.ready = False

    def owner_of_key(self, key: str) -> Node | None:
        return self._owner[key_slot(key.encode())]

    @property
    def known(self) -> list[Node]:
        return list(self._known)

    def primaries(self) -> dict[str, Node]:
        return {n.name: n for n in self._owner if n is not None}

    async def refresh(self) -> None:
        """Read the map again. Raises the last error when no node answered (the old map stays)."""
        candidates = list(dict.fromkeys([*random.sample(self._known, len(self._known)), *self._seeds]))
        views: list[list[tuple[Node, str, int, list[tuple[int, int]], bool]]] = []
        error: BaseException | None = None
        for node in candidates:
            try:
                # Two arguments, so redis-py hands back the text instead of its own parse of it.
                raw = await self._client_for(node).execute_command("CLUSTER", "NODES")
            except Exception as exc:  # noqa: BLE001 - try the next node; report the last failure
                error = exc
                continue
            views.append(parse_cluster_nodes(raw.decode() if isinstance(raw, bytes) else str(raw)))
            if len(views) >= 3:
                break
        if not views:
            raise error or ConnectionError("no Cluster node to ask")
        best: list[tuple[int, Node] | None] = [None] * SLOTS
        known: dict[str, Node] = {}
        for view in views:
            for node, flags, epoch, ranges, failing in view:
                known[node.name] = node
                if failing or "master" not in flags.split(","):
                    continue
                for lo, hi in ranges:
                    for slot in range(lo, hi + 1):
                        current = best[slot]
                        if current is None or epoch > current[0]:
                            best[slot] = (epoch, node)
        self._owner = [b[1] if b is not None else None for b in best]
        self._known = list(known.values()) or self._known
        self.ready = True
        uncovered = sum(1 for b in best if b is None)
        if uncovered:
            log.info("Cluster map has slots without a live primary (failover under way?)",
                     extra={"uncovered_slots": uncovered})
