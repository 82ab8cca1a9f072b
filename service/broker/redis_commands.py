"""The one way the service sends Redis commands: one `RedisCommands` per Redis deployment and caller.

It owns the command connections (a `redis_multiplex.Multiplexer` per node and kind: "write" for publishes and
other short writes, "read" for history pages, tails and the Cluster map, so a megabyte page never queues in front
of a publish's answer), and:

- routes a command by its first key: to the one Redis (or the Sentinel master), or on a Cluster to the primary
  of the key's slot by `redis_topology.ClusterTopology`, the one slot map (no `RedisCluster`);
- follows the Sentinel watcher: when the master moves, every connection is dropped (what is in flight learns its
  outcome is unknown) and the next command goes to the new master;
- runs scripts by EVALSHA, falling back to EVAL (which loads the script) when Redis answers NOSCRIPT (`eval`,
  `eval_then`): the only place the service does this;
- raises only typed outcomes: `redis_errors.NotSent` (nothing ran: no connection, or not written before it broke;
  `Unrouted` for a slot no primary owns now), `MaybeSent` / `MaybeSentTimeout` (written, answer lost: it may
  have run), or the class redis-py's parser gives an error reply (`NoScriptError`, `MovedError`,
  `BusyLoadingError`, ...). `redis_errors.classify` names each by its type.

What it does not own: budgets (each caller keeps its own: the broker's REDIS_POOL_SIZE, the rate limiter's 16
slots waiting 1 s) and the pub/sub readers (`redis_reader`), whose connections are not command connections.
redis-py still opens each connection (`RedisTarget.command_pool`: TCP or TLS, AUTH, SELECT, the RESP2
handshake, ROLE behind Sentinel); the I/O after that is `redis_wire`'s.

The broker re-reads the slot map itself (`refresh`, from its topology task, which also moves its readers).
Callers without such a task (the rate limiter, presence) pass `self_routing=True`: the map is read before the
first command, and again (in the background, at most once a second) after a command found it stale.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from redis import exceptions as rx

from .redis_connect import RedisTarget
from .redis_errors import MaybeSent, NotSent, Unrouted
from .redis_multiplex import Multiplexer
from .redis_sentinel import SentinelWatcher
from .redis_topology import ClusterTopology, Node

__all__ = ["MAIN", "RedisCommands", "Script"]

log = logging.getLogger("service.broker.redis")

MAIN = "main"  # the node name of the one Redis / the Sentinel master (the name of the broker's only reader too)
_KINDS = ("write", "read")
_REFRESH_EVERY = 1.0  # self-routing: at most one slot-map refresh a second

T = TypeVar("T")


class Script:
    """A Lua script and its SHA1, run with `RedisCommands.eval`."""

    __slots__ = ("sha", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()  # noqa: S324 - the name Redis gives the script


class _NodeCommands:
    """What `ClusterTopology` asks a node through: `CLUSTER NODES` on that node's read connection."""

    __slots__ = ("_commands", "_node")

    def __init__(self, commands: RedisCommands, node: Node) -> None:
        self._commands = commands
        self._node = node

    async def execute_command(self, *args: Any) -> Any:
        return await self._commands.mux(self._commands.learn(self._node), "read").call(*args)


class RedisCommands:
    def __init__(self, target: RedisTarget, *, watcher: SentinelWatcher | None = None, client: Any = None,
                 self_routing: bool = False) -> None:
        """`watcher`: the Sentinel watcher the caller shares with its other connections (the broker's readers);
        without one a Sentinel target gets its own, closed with this object. `client`: a redis-py client whose
        connection factory replaces the target's (fakeredis in unit tests; one Redis only)."""
        self.target = target
        self.sharded = target.sharded and client is None
        self._client = client
        self._owns_watcher = False
        if watcher is None and target.kind == "sentinel" and client is None:
            watcher = target.sentinel_watcher()
            self._owns_watcher = True
        self.watcher = watcher
        if watcher is not None:
            watcher.add_listener(self._master_moved)
        self._addresses: dict[str, Node] = {}  # Cluster: node name -> address, for every node routed to or asked
        self._pools: dict[str, Any] = {}  # node name -> redis-py ConnectionPool (a connection factory only)
        self._muxes: dict[tuple[str, str], Multiplexer] = {}
        self.topology = ClusterTopology(target.seeds(), self._node_commands) if self.sharded else None
        self._self_routing = self_routing
        self._stale = False
        self._last_refresh = -1e9
        self._refresh_lock = asyncio.Lock()
        self._refresh_task: asyncio.Task[None] | None = None

    # -- where a command goes -----------------------------------------------------------------------------------

    def node_of(self, key: str) -> str:
        """The node that serves `key`: MAIN, or on a Cluster its slot's primary by the slot map. Raises
        `Unrouted` when no primary owns the slot now."""
        if self.topology is None:
            return MAIN
        node = self.topology.owner_of_key(key)
        if node is None:
            self._stale = True
            raise Unrouted(f"Error while routing: no Cluster primary owns {key!r}'s slot right now")
        return self.learn(node)

    def by_node(self, items: Sequence[T], key_of: Callable[[T], str]) -> list[tuple[str, list[T]]]:
        """`items` grouped by the node serving their key (one group without a Cluster). Raises `Unrouted`."""
        groups: dict[str, list[T]] = {}
        for item in items:
            groups.setdefault(self.node_of(key_of(item)), []).append(item)
        return list(groups.items())

    def learn(self, node: Node) -> str:
        self._addresses.setdefault(node.name, node)
        return node.name

    def mux(self, node: str, kind: str = "write") -> Multiplexer:
        """The multiplexed connection to `node` for `kind` ("write" or "read")."""
        mux = self._muxes.get((node, kind))
        if mux is None:
            mux = self._muxes[(node, kind)] = Multiplexer(self._pool(node).make_connection,
                                                          self.target.options.command_timeout)
        return mux

    def _pool(self, node: str) -> Any:
        pool = self._pools.get(node)
        if pool is None:
            if self._client is not None:
                pool = self._client.connection_pool
            elif node == MAIN:
                pool = self.target.command_pool(watcher=self.watcher)
            else:
                address = self._addresses[node]
                pool = self.target.command_pool(address.host, address.port)
            self._pools[node] = pool
        return pool

    def _node_commands(self, node: Node) -> _NodeCommands:
        return _NodeCommands(self, node)

    # -- commands -----------------------------------------------------------------------------------------------

    async def call(self, key: str, *args: Any, kind: str = "write") -> Any:
        """One command, sent to the node serving `key`."""
        if self._self_routing:
            await self._routable()
        try:
            return await self.mux(self.node_of(key), kind).call(*args)
        except Exception as exc:
            self._noticed(exc)
            raise

    async def call_many(self, key: str, commands: list[tuple[Any, ...]], kind: str = "read") -> list[Any]:
        """Commands back to back on one connection to the node serving `key` (nothing of anyone else's between
        them: Redis runs them in this order)."""
        if self._self_routing:
            await self._routable()
        try:
            return await self.mux(self.node_of(key), kind).call_many(commands)
        except Exception as exc:
            self._noticed(exc)
            raise

    async def eval(self, script: Script, keys: Sequence[Any], args: Sequence[Any], *, kind: str = "write") -> Any:
        """Run `script` on the node serving `keys[0]`: EVALSHA, and EVAL when Redis does not have it (NOSCRIPT:
        nothing ran; EVAL loads it for the next time)."""
        if self._self_routing:
            await self._routable()
        try:
            mux = self.mux(self.node_of(keys[0]), kind)
            try:
                return await mux.call("EVALSHA", script.sha, len(keys), *keys, *args)
            except rx.NoScriptError:
                return await mux.call("EVAL", script.text, len(keys), *keys, *args)
        except Exception as exc:
            self._noticed(exc)
            raise

    async def eval_then(self, script: Script, keys: Sequence[Any], args: Sequence[Any],
                        then: list[tuple[Any, ...]], *, kind: str = "write") -> list[Any]:
        """`script` (as `eval`) and then `then`, back to back on the same connection (a publish and its WAIT):
        the script's reply first, then theirs. After NOSCRIPT the whole sequence is sent again with EVAL."""
        if self._self_routing:
            await self._routable()
        try:
            mux = self.mux(self.node_of(keys[0]), kind)
            try:
                return await mux.call_many([("EVALSHA", script.sha, len(keys), *keys, *args), *then])
            except rx.NoScriptError:
                return await mux.call_many([("EVAL", script.text, len(keys), *keys, *args), *then])
        except Exception as exc:
            self._noticed(exc)
            raise

    # -- the connections move -----------------------------------------------------------------------------------

    def reset(self, node: str, reason: str) -> None:
        """Drop `node`'s connections (a sibling connection to the same server was found dead): the next command
        opens new ones; commands in flight learn their outcome is unknown."""
        for kind in _KINDS:
            mux = self._muxes.get((node, kind))
            if mux is not None:
                mux.reset(reason)

    def _master_moved(self, old: Node | None, new: Node) -> None:
        """Sentinel switched the master: nothing may go on talking to the old one. Commands in flight there learn
        their outcome is unknown (they may have run on a primary being replaced)."""
        reason = f"the Sentinel master moved from {old.name if old else '?'} to {new.name}"
        for mux in self._muxes.values():
            mux.reset(reason)

    async def refresh(self) -> None:
        """Cluster: read the slot map again (raises when no node answered; the old map stays)."""
        if self.topology is None:
            return
        await self.topology.refresh()
        self._stale = False
        self._last_refresh = time.monotonic()

    async def forget_unknown(self) -> None:
        """Cluster: close the connections of nodes the map no longer lists."""
        if self.topology is None:
            return
        known = {n.name for n in self.topology.known}
        for name in [n for n in self._pools if n not in known]:
            await self._close_node(name)

    async def _close_node(self, name: str) -> None:
        for kind in _KINDS:
            mux = self._muxes.pop((name, kind), None)
            if mux is not None:
                await mux.aclose()
        pool = self._pools.pop(name, None)
        if pool is not None and self._client is None:
            await pool.aclose()
        self._addresses.pop(name, None)

    async def aclose(self) -> None:
        task, self._refresh_task = self._refresh_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for name in list(self._pools):
            await self._close_node(name)
        for mux in self._muxes.values():
            await mux.aclose()
        self._muxes.clear()
        if self._client is not None:
            await self._client.aclose()
        if self.watcher is not None and self._owns_watcher:
            await self.watcher.aclose()

    # -- self-routing (callers without a topology task) ---------------------------------------------------------

    async def _routable(self) -> None:
        """Self-routing on a Cluster: read the map before the first command; refresh it in the background when
        a command found it stale."""
        if not self._self_routing or self.topology is None:
            return
        if not self.topology.ready:
            async with self._refresh_lock:
                if not self.topology.ready:
                    await self.refresh()
        elif self._stale and time.monotonic() - self._last_refresh >= _REFRESH_EVERY and (
                self._refresh_task is None or self._refresh_task.done()):
            self._refresh_task = asyncio.get_running_loop().create_task(self._refresh_quietly(),
                                                                        name="redis-cluster-map")

    async def _refresh_quietly(self) -> None:
        async with self._refresh_lock:
            try:
                await self.refresh()
            except Exception as exc:  # noqa: BLE001 - the next stale command asks again
                self._last_refresh = time.monotonic()
                log.debug("Cluster map not refreshed", extra={"error": repr(exc)[:200]})

    def _noticed(self, exc: BaseException) -> None:
        """A failure that suggests the Cluster map moved (a slot moved, a primary is gone)."""
        if self.topology is not None and isinstance(exc, (rx.MovedError, rx.AskError, rx.ClusterDownError,
                                                           rx.TryAgainError, NotSent, MaybeSent,
                                                           rx.TimeoutError, rx.ReadOnlyError)):
            self._stale = True
