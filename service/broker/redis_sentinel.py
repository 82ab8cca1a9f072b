"""Where the master Sentinel names is, and when it moves, told by the sentinels as it happens.

Why not redis-py's `Sentinel`: it asks for the master only when it opens a connection, so every connection it
already holds (a pool's, the multiplexed publish and history connections, the pub/sub reader's) stays on the old
primary after a failover. Measured on Redis 7.0 with a publish every 0.1 s (tests/test_sentinel_failover.py): a
planned failover (`SENTINEL FAILOVER`) sends REPLICAOF NO ONE to the replica, announces `+switch-master` about a
second later (once it saw the promotion in the replica's INFO), and demotes the old primary about 10 s after
that. Meanwhile the old primary answers writes as a master, and they are thrown away when it resyncs from the new
one: 69 of 101 publishes answered 202 were lost. Sentinel (7.0) does not pause the old primary's clients, so
even a relay that moves the instant `+switch-master` arrives has had about a second of 202s from a primary that
was already replaced. Hence two things here:

- **Where the master is.** A pub/sub connection to every sentinel of REDIS_URL (`PSUBSCRIBE *`); a sentinel that
  goes away is reconnected with backoff while the others carry on, and after every (re)subscribe that sentinel is
  asked (`SENTINEL MASTER`), so nothing announced while it was away is missed. At `+switch-master` every listener
  (the command layer, the broker's readers) drops its connections; new ones go to the new master. When sentinels
  disagree, the newest config epoch wins: one that has not heard of a failover cannot move us back.
- **Whether a failover is under way.** From a failover's first event (`+try-failover`, `+elected-leader`,
  `+failover-state-*`, ...) until `+switch-master` or its abort (`-failover-abort-*`), and while a sentinel's
  flags say `failover_in_progress` (polled, so a missed abort cannot hold it for ever). Sentinel announces a
  failover before it sends REPLICAOF NO ONE (about 0.1-0.2 s before, one or two of its timer ticks), so a
  publish that waits for `settled()` is never acknowledged by the primary being replaced.

Every connection to the master also checks `ROLE` when it opens (`SentinelMasterConnection`): a sentinel that
is behind, or a master demoted under us, is found at once and named `moved` (`redis_errors.MasterMoved`), not
taken for an outage; a READONLY reply means the same (the multiplexer drops that connection; the broker asks
the sentinels).

Sentinels must all be listed in REDIS_URL for the "under way" signal: only the sentinel that runs a failover
announces its steps; the others only announce `+switch-master`, once they hear of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from typing import Any

from redis import exceptions as rx
from redis.asyncio import Redis
from redis.asyncio.connection import Connection, ConnectionPool, SSLConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ..tasks import cancel_and_wait
from .redis_errors import MasterMoved
from .redis_topology import Node

__all__ = ["SentinelMasterConnection", "SentinelMasterPool", "SentinelMasterSSLConnection", "SentinelWatcher"]

log = logging.getLogger("service.broker.redis")

_BACKOFF_MIN, _BACKOFF_MAX = 0.1, 5.0
_POLL_CALM, _POLL_FAILING = 5.0, 0.25  # how often the sentinels are asked anyway: normally / while one fails over
# The steps of a failover as the sentinel running it announces them (all before `+switch-master`).
_UNDER_WAY = ("+try-failover", "+elected-leader", "+failover-detected", "+selected-slave", "+promoted-slave",
              "+slave-reconf-sent", "+slave-reconf-inprog", "+slave-reconf-done", "+failover-end",
              "+failover-end-for-timeout")

Listener = Callable[[Node | None, Node], None]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _master_named(payload: str) -> tuple[str | None, Node | None]:
    """The master an event is about, by name and address: `master <name> <ip> <port>` or
    `<type> <name> <ip> <port> @ <master> <ip> <port>`."""
    parts = payload.split()
    if "@" in parts:
        parts = parts[parts.index("@"):]
    elif not parts or parts[0] != "master":
        return None, None
    if len(parts) < 4 or not parts[3].isdigit():
        return (parts[1] if len(parts) > 1 else None), None
    return parts[1], Node(parts[2], int(parts[3]))


class SentinelWatcher:
    """The current master of `service` and whether a failover of it is under way (see the module docstring)."""

    def __init__(self, sentinels: list[Node], service: str, *, connect_timeout: float = 2.0,
                 probe_interval: float = 5.0) -> None:
        self.sentinels = sentinels
        self.service = service
        self._connect_timeout = connect_timeout
        self._probe = probe_interval
        self.master: Node | None = None
        self._epoch = -1
        self._failing: set[str] = set()  # sentinels running a failover of our master now
        self._events = 0  # failover events and switches seen: an answer asked for before one is out of date
        self._calm = asyncio.Event()
        self._calm.set()
        self._ask_now = asyncio.Event()
        self._listeners: list[Listener] = []
        self._clients: dict[str, Redis] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._first = asyncio.Lock()
        self.switches = 0
        self.subscribed: set[str] = set()  # sentinels whose announcements reach us now

    # -- what the rest of the broker uses ---------------------------------------------------------------------

    def add_listener(self, listener: Listener) -> None:
        """`listener(old, new)` runs (synchronously, in the event loop) when the master moves."""
        self._listeners.append(listener)

    @property
    def failing_over(self) -> bool:
        return not self._calm.is_set()

    async def settled(self, timeout: float) -> bool:
        """True once no failover of the master is under way (at once when none is); False after `timeout`."""
        if self._calm.is_set():
            return True
        try:
            async with asyncio.timeout(timeout):
                await self._calm.wait()
        except TimeoutError:
            return False
        return True

    async def master_address(self) -> Node:
        """Where to connect now. The first call asks the sentinels (and starts watching them)."""
        self.start()
        if self.master is not None:
            return self.master
        async with self._first:
            if self.master is None:
                await self._ask_all()
        if self.master is None:
            names = ", ".join(n.name for n in self.sentinels)
            raise rx.ConnectionError(f"Error connecting to the sentinels {names}: none named a master for "
                                     f"{self.service!r}")
        return self.master

    def suspect(self, reason: str) -> None:
        """A connection found a replica where the master should be: ask the sentinels now."""
        log.info("the Sentinel master looks moved; asking the sentinels", extra={"reason": reason[:200]})
        self._ask_now.set()

    def start(self) -> None:
        """Start watching (idempotent; needs a running event loop)."""
        if self._tasks:
            return
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._follow(node), name=f"sentinel-{node.name}") for node in self.sentinels]
        self._tasks.append(loop.create_task(self._poll(), name="sentinel-poll"))

    async def aclose(self) -> None:
        tasks, self._tasks = self._tasks, []
        await cancel_and_wait(*tasks)
        clients, self._clients = self._clients, {}
        for client in clients.values():
            with contextlib.suppress(Exception):
                await client.aclose()
        self.subscribed.clear()

    # -- the master moves ---------------------------------------------------------------------------------------

    def _adopt(self, address: Node, epoch: int, source: str, in_progress: bool) -> None:
        """An address a sentinel gave with its config epoch: newer config wins, equal confirms, older is ignored.
        Never from a sentinel in the middle of a failover: its leader reports the new epoch with the old address
        from the promotion until it has re-pointed the other replicas (after the others announced the switch)."""
        if self.master is None:
            self.master, self._epoch = address, epoch
            log.info("Sentinel names the master", extra={"master": address.name, "sentinel": source,
                                                          "service": self.service})
        elif in_progress:
            return
        elif address == self.master:
            self._epoch = max(self._epoch, epoch)
        elif epoch > self._epoch:
            self._epoch = epoch
            self._switch(address, source)

    def _switch(self, new: Node, source: str) -> None:
        old, self.master = self.master, new
        self.switches += 1
        self._events += 1
        self._failing.clear()
        self._calm.set()
        log.warning("Sentinel switched the master: moving every connection to the new one",
                    extra={"old": old.name if old else None, "new": new.name, "sentinel": source,
                           "service": self.service})
        for listener in list(self._listeners):
            try:
                listener(old, new)
            except Exception:  # noqa: BLE001 - one listener's failure must not keep the others on the old master
                log.exception("a listener of the Sentinel master switch failed")

    def _failover_started(self, source: str, event: str) -> None:
        self._events += 1
        if source not in self._failing:
            self._failing.add(source)
            self._calm.clear()
            log.warning("a Sentinel failover is under way: publishes wait for the new master",
                        extra={"sentinel": source, "event": event, "service": self.service})
        self._ask_now.set()

    def _failover_over(self, source: str) -> None:
        self._failing.discard(source)
        if not self._failing:
            self._calm.set()

    def _on_event(self, source: str, channel: str, payload: str) -> None:
        if channel == "+switch-master":
            parts = payload.split()
            if len(parts) == 5 and parts[0] == self.service and parts[4].isdigit():
                new = Node(parts[3], int(parts[4]))
                if new != self.master:
                    self._switch(new, source)
                self._failover_over(source)
                self._ask_now.set()
            return
        name, address = _master_named(payload)
        if name != self.service or (address is not None and self.master is not None and address != self.master):
            # Not ours, or about a master we already left: the sentinel that ran a failover announces its last
            # steps (re-pointing the other replicas) under the old address, after the others announced the switch.
            return
        if channel.startswith("-failover-abort"):
            self._events += 1
            log.info("the Sentinel failover was aborted", extra={"sentinel": source, "event": channel})
            self._failover_over(source)
        elif channel in _UNDER_WAY or channel.startswith("+failover-state-"):
            self._failover_started(source, channel)

    # -- asking the sentinels ---------------------------------------------------------------------------------

    def _client(self, node: Node) -> Redis:
        client = self._clients.get(node.name)
        if client is None:
            client = self._clients[node.name] = Redis(
                host=node.host, port=node.port, socket_connect_timeout=self._connect_timeout,
                socket_timeout=self._connect_timeout, retry=Retry(NoBackoff(), 0), health_check_interval=0,
                protocol=2, max_connections=4)
        return client

    async def _ask(self, node: Node) -> bool:
        """`SENTINEL MASTER` of one sentinel: the master's address and epoch, and whether it runs a failover."""
        seen = self._events
        try:
            raw = await self._client(node).execute_command(  # type: ignore[no-untyped-call]
                "SENTINEL", "MASTER", self.service)
        except Exception as exc:  # noqa: BLE001 - that sentinel is away; the others answer
            log.debug("a sentinel did not answer", extra={"sentinel": node.name, "error": repr(exc)[:200]})
            return False
        if isinstance(raw, dict):
            fields = {_text(k): _text(v) for k, v in raw.items()}
        else:
            items = [_text(x) for x in raw]
            fields = dict(zip(items[::2], items[1::2], strict=False))
        ip, port = fields.get("ip"), fields.get("port", "")
        if not ip or not port.isdigit():
            return False
        epoch = int(fields["config-epoch"]) if fields.get("config-epoch", "").isdigit() else 0
        address = Node(ip, int(port))
        in_progress = "failover_in_progress" in fields.get("flags", "").split(",")
        self._adopt(address, epoch, node.name, in_progress)
        if self._events != seen:
            return True  # an event arrived while it answered: its flags may predate it (the event decides)
        if address != self.master:
            # Behind us (it has not heard of the switch yet), or the failover's leader finishing the failover we
            # already followed: either way nothing is under way for the master we use now.
            self._failover_over(node.name)
        elif in_progress:
            self._failover_started(node.name, "failover_in_progress")
        else:
            self._failover_over(node.name)
        return True

    async def _ask_all(self) -> None:
        await asyncio.gather(*(self._ask(node) for node in self.sentinels))

    async def _poll(self) -> None:
        """Ask every sentinel now and then: often while a failover is under way, at once when told to."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_POLL_FAILING if self._failing else _POLL_CALM):
                    await self._ask_now.wait()
            self._ask_now.clear()
            await self._ask_all()

    async def _follow(self, node: Node) -> None:
        """One sentinel's announcements, for ever: (re)subscribe with backoff, ask after each subscribe."""
        backoff = _BACKOFF_MIN
        while True:
            conn = Connection(host=node.host, port=node.port, socket_connect_timeout=self._connect_timeout,
                              socket_timeout=None, retry=Retry(NoBackoff(), 0), protocol=2)
            try:
                await conn.connect()  # type: ignore[no-untyped-call]
                await conn.send_command("PSUBSCRIBE", "*", check_health=False)
                if await conn.read_response(timeout=self._connect_timeout) is None:
                    raise rx.TimeoutError("no answer to PSUBSCRIBE")
                self.subscribed.add(node.name)
                await self._ask(node)  # after subscribing: what happened before is asked, what follows is heard
                backoff = _BACKOFF_MIN
                await self._listen(conn, node)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a sentinel going away must never stop the watch
                log.info("sentinel connection lost; reconnecting", extra={"sentinel": node.name,
                                                                          "error": repr(exc)[:200]})
            finally:
                self.subscribed.discard(node.name)
                with contextlib.suppress(Exception):
                    await conn.disconnect(nowait=True)
            await asyncio.sleep(backoff * random.uniform(0.5, 1.5))
            backoff = min(backoff * 2, _BACKOFF_MAX)

    async def _listen(self, conn: Connection, node: Node) -> None:
        """Events until the connection fails; a quiet connection is PINGed, and one that stays silent is dead."""
        pinged = False
        while True:
            reply = await conn.read_response(timeout=self._probe)
            if reply is None:
                if pinged:
                    raise rx.TimeoutError(f"no answer from the sentinel for {2 * self._probe:g}s")
                await conn.send_command("PING", check_health=False)
                pinged = True
                continue
            pinged = False
            if isinstance(reply, list) and len(reply) == 4 and reply[0] == b"pmessage":
                self._on_event(node.name, _text(reply[2]), _text(reply[3]))


class SentinelMasterConnection(Connection):
    """A connection to wherever the watcher says the master is, which checks on opening that it is one."""

    def __init__(self, **kwargs: Any) -> None:
        self.watcher: SentinelWatcher = kwargs.pop("watcher")
        super().__init__(**kwargs)

    async def connect_check_health(self, check_health: bool = True, retry_socket_connect: bool = True) -> None:
        if self.is_connected:
            return
        master = await self.watcher.master_address()
        self.host, self.port = master.host, master.port
        await super().connect_check_health(check_health=check_health, retry_socket_connect=retry_socket_connect)

    async def on_connect_check_health(self, check_health: bool = True) -> None:
        await super().on_connect_check_health(check_health=check_health)
        await self.send_command("ROLE", check_health=False)
        try:
            role = await self.read_response()
        except rx.ResponseError:
            return  # ROLE not allowed to this user (ACL): nothing to check with; Sentinel's word stands
        if not isinstance(role, list) or not role or role[0] != b"master":
            name = f"{self.host}:{self.port}"
            what = _text(role[0]) if isinstance(role, list) and role else "unknown"
            self.watcher.suspect(f"{name} answered ROLE {what}")
            raise MasterMoved(f"{name} is not the master of {self.watcher.service!r} any more (ROLE {what}): "
                              "it moved")

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)
        except rx.ReadOnlyError as exc:
            # A demoted primary: this connection is useless now; the next one goes where Sentinel says.
            self.watcher.suspect(f"{self.host}:{self.port} answered READONLY")
            await self.disconnect()
            raise MasterMoved(f"{self.host}:{self.port} answered READONLY: the master moved ({exc})") from exc


class SentinelMasterSSLConnection(SentinelMasterConnection, SSLConnection):
    pass


class SentinelMasterPool(ConnectionPool):
    """Makes `SentinelMasterConnection`s (the command layer's and the readers' connections: nothing is checked out
    of it as a pool). Whoever holds a connection drops it when the master moves (`RedisCommands`, the broker's
    readers: both listen to the watcher)."""

    def __init__(self, watcher: SentinelWatcher, *, owns_watcher: bool, ssl: bool = False, **kwargs: Any) -> None:
        kwargs["connection_class"] = SentinelMasterSSLConnection if ssl else SentinelMasterConnection
        super().__init__(**kwargs)
        self.connection_kwargs["watcher"] = watcher
        self.watcher = watcher
        self._owns_watcher = owns_watcher

    async def aclose(self) -> None:
        await super().aclose()
        if self._owns_watcher:
            await self.watcher.aclose()
