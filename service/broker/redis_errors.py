"""What a Redis failure means, named once: the command budget, the classification, and logging by kind.

- The budget: every command of the instance (publish, history page, gap fill, tail read) takes a slot of one
  bounded pool (REDIS_POOL_SIZE) and waits at most REDIS_POOL_TIMEOUT for one. A burst queues instead of
  opening thousands of connections or failing at once (redis-py's own pool raises "Too many connections" the
  moment it is full, and its size is a default that changes between versions: it is sized from ours and never
  reached). A wait that runs out is `BrokerBusy`: a local resource, not an outage.
- The classification: a connection that could not be made, or a command Redis refused (OOM, READONLY, cluster
  down, loading) did not happen: `BrokerUnavailable`. A command that was sent and whose answer was lost (a
  read timeout, the connection dropping mid-reply) may have run: `OutcomeUnknown`. Each carries a `kind` that
  logs and `/metrics` use.
- Logging: the first error of a kind is logged with what it means and what to do, then at most one line per
  kind every 30 s with the count, so an outage does not flood the log and a new kind is never hidden.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Generator
from typing import Any

from redis import exceptions as rx

from .base import BrokerBusy, BrokerError, BrokerUnavailable, OutcomeUnknown

__all__ = ["CommandBudget", "ErrorLog", "MasterMoved", "MaybeSent", "MaybeSentTimeout", "NotSent", "Unrouted",
           "classify"]

log = logging.getLogger("service.broker.redis")

_MEANING = {
    "down": "Redis refused or dropped the connection; check that it runs and is reachable (REDIS_URL)",
    "connect_timeout": "no connection to Redis within REDIS_CONNECT_TIMEOUT; check the network path to Redis",
    "timeout": "Redis did not answer within REDIS_COMMAND_TIMEOUT (stalled, overloaded, or a slow script); "
               "the command may still have run",
    "connection_lost": "the connection to Redis dropped while a command was in flight; it may have run",
    "oom": "Redis is out of memory (maxmemory): raise maxmemory, or lower HISTORY_SIZE / HISTORY_TTL",
    "readonly": "Redis answered READONLY: REDIS_URL points at a replica, or a failover is under way",
    "moved": "the Redis master moved (a Sentinel failover): the connection reached a server that is no longer the "
             "master; the relay follows Sentinel to the new one",
    "failover": "a Sentinel failover of the master is under way: publishes waited REDIS_POOL_TIMEOUT for the new "
                "master and were refused; they go through once Sentinel names it",
    "loading": "Redis is loading its dataset after a restart; it answers once loaded",
    "busy_script": "Redis is busy running a script; it answers once the script ends",
    "cluster": "the Redis Cluster is down or moving slots; commands for the affected slots fail until it settles",
    "auth": "Redis refused the credentials of REDIS_URL",
    "busy": "all REDIS_POOL_SIZE connections stayed busy for REDIS_POOL_TIMEOUT: Redis may be fine; raise the "
            "pool size if this happens under normal load",
    "error": "Redis answered with an error",
    "client_error": "the Redis client failed unexpectedly (logged with its traceback); please report it",
}


class NotSent(rx.ConnectionError):
    """The command never reached Redis (the connection could not be made, or broke before the command was
    written): nothing of it ran. Raised by the multiplexer by construction, not recognised by its message."""


class Unrouted(NotSent):
    """A Cluster command for a slot no primary owns in our map right now (a failover under way, or the map not
    read yet): it was not sent anywhere. Named `cluster`, not `down`."""


class MaybeSent(rx.ConnectionError):
    """The command was written and its answer lost (the connection dropped, or the oldest command in flight
    passed its deadline): it may have run."""


class MaybeSentTimeout(rx.TimeoutError):
    """A written command whose answer did not come within REDIS_COMMAND_TIMEOUT: it may have run."""


class MasterMoved(rx.ConnectionError):
    """The server reached is no longer the master Sentinel named (ROLE says replica, or it answered READONLY):
    the master moved. Not an outage: the next connection goes to the new master."""


def classify(exc: BaseException, what: str) -> BrokerError:
    """The broker error a redis-py exception means, for the operation `what` ("publish", "history read", ...)."""
    if isinstance(exc, BrokerError):
        return exc
    text = str(exc)
    if isinstance(exc, MasterMoved):
        return BrokerUnavailable(f"{what}: {text}", "moved")
    # The command layer's outcomes are typed (redis_commands, redis_multiplex): NotSent, MaybeSent,
    # MaybeSentTimeout, or the class redis-py's parser gives an error reply. The text checks further down are
    # only for what still goes through redis-py's own client: `publisher.py` (a library for other processes).
    if isinstance(exc, Unrouted):
        return BrokerUnavailable(f"{what}: {text}", "cluster")
    if isinstance(exc, NotSent):
        kind = "connect_timeout" if isinstance(exc.__cause__, rx.TimeoutError) else "down"
        return BrokerUnavailable(f"{what}: {text}", kind)
    if isinstance(exc, MaybeSentTimeout):
        return OutcomeUnknown(f"{what}: Redis did not answer in time ({text})", "timeout")
    if isinstance(exc, MaybeSent):
        return OutcomeUnknown(f"{what}: {text}", "connection_lost")
    if isinstance(exc, rx.MaxConnectionsError):
        return BrokerBusy(f"{what}: no Redis connection free ({text})", "busy")
    if isinstance(exc, rx.TimeoutError):
        if "connecting" in text:  # redis-py's client path only (publisher.py): its connect timeout
            return BrokerUnavailable(f"{what}: {text}", "connect_timeout")
        return OutcomeUnknown(f"{what}: Redis did not answer in time ({text})", "timeout")
    if isinstance(exc, rx.BusyLoadingError):
        return BrokerUnavailable(f"{what}: Redis answered LOADING {text}", "loading")
    if isinstance(exc, rx.MasterDownError):  # before the cluster errors: redis-py makes it a ClusterDownError
        return BrokerUnavailable(f"{what}: Redis answered MASTERDOWN {text}", "readonly")
    if isinstance(exc, (rx.MovedError, rx.AskError)):
        return BrokerUnavailable(f"{what}: Redis answered {type(exc).__name__} {text}", "cluster")
    if isinstance(exc, (rx.AuthenticationError, rx.AuthorizationError)):
        return BrokerUnavailable(f"{what}: {text}", "auth")
    if isinstance(exc, rx.ConnectionError):
        # redis-py's client path only (publisher.py): its connect and write errors, by their text. On the command
        # layer's connections these are NotSent by construction. "max number of clients reached" is an error reply
        # (redis-py makes it a ConnectionError) that Redis sends at connect: NotSent there too.
        if "connecting to" in text or "while writing" in text or "max number of clients" in text:
            return BrokerUnavailable(f"{what}: {text}", "down")
        return OutcomeUnknown(f"{what}: {text}", "connection_lost")
    if isinstance(exc, (rx.ClusterDownError, rx.TryAgainError, rx.RedisClusterException)):
        return BrokerUnavailable(f"{what}: {text}", "cluster")
    if isinstance(exc, rx.ResponseError):
        # redis-py strips the error code from the message and keeps it as the class (and `status_code`)
        if isinstance(exc, rx.OutOfMemoryError):
            return BrokerUnavailable(f"{what}: Redis answered OOM {text}", "oom")
        if isinstance(exc, rx.ReadOnlyError):
            return BrokerUnavailable(f"{what}: Redis answered READONLY {text}", "readonly")
        head = str(getattr(exc, "status_code", None) or text.split(" ", 1)[0]).upper()
        kind = {"OOM": "oom", "READONLY": "readonly", "LOADING": "loading", "BUSY": "busy_script",
                "MASTERDOWN": "readonly", "CLUSTERDOWN": "cluster", "TRYAGAIN": "cluster", "MOVED": "cluster",
                "ASK": "cluster"}.get(head, "error")
        return BrokerUnavailable(f"{what}: Redis answered {text}", kind)
    if isinstance(exc, rx.RedisError):
        return BrokerUnavailable(f"{what}: {text}", "error")
    if isinstance(exc, OSError):
        return BrokerUnavailable(f"{what}: {exc!r}", "down")
    # Anything else from the client library (an IndexError in a topology change, say) is still "not done":
    # it must never reach the client as a 500. It is logged with its traceback by the caller's ErrorLog.
    log.error("unexpected error from the Redis client", exc_info=exc, extra={"operation": what})
    return BrokerUnavailable(f"{what}: unexpected {type(exc).__name__}: {exc}", "client_error")


class ErrorLog:
    """Counts errors by kind and logs each kind with its meaning, without flooding."""

    def __init__(self, every: float = 30.0) -> None:
        self.counts: Counter[str] = Counter()
        self._every = every
        self._last: dict[str, tuple[float, int]] = {}

    def record(self, error: BrokerError, **context: object) -> None:
        kind = error.kind
        self.counts[kind] += 1
        now = time.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last[0] < self._every:
            return
        since = self.counts[kind] - (last[1] if last else 0)
        self._last[kind] = (now, self.counts[kind])
        log.warning(
            f"Redis error ({kind}): {_MEANING.get(kind, _MEANING['error'])}",
            extra={"kind": kind, "error": str(error)[:300], "count_since_last_log": since, **context},
        )


class CommandBudget:
    """At most `size` Redis commands in flight for this instance; a caller waits up to `wait` seconds, in order.

    `slot(what)` is an async context manager object, not a generator: it is entered on every publish. A caller
    that finds a free slot takes it without suspending. The others wait in a FIFO queue: they all wait the same
    `wait`, so the oldest is always the first whose time runs out, and one timer for the queue (re-armed for the
    next in line) replaces a timeout scope and a timer per waiting caller (with 100 publishing connections and 32
    slots, those were ~5 % of the publish path's CPU)."""

    def __init__(self, size: int, wait: float) -> None:
        self.size = size
        self.wait = wait
        self._free = size
        self._queue: deque[tuple[asyncio.Future[None], float]] = deque()
        self._timer: asyncio.TimerHandle | None = None

    @property
    def in_use(self) -> int:
        return self.size - self._free

    @property
    def waiting(self) -> int:
        return sum(1 for future, _ in self._queue if not future.done())

    def slot(self, what: str) -> _Slot:
        return _Slot(self, what)

    async def acquire(self, what: str) -> None:
        if self._free > 0 and not self._queue:
            self._free -= 1
            return
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._queue.append((future, loop.time() + self.wait))
        if self._timer is None:
            self._timer = loop.call_at(self._queue[0][1], self._expire)
        try:
            await future
        except TimeoutError:
            raise BrokerBusy(
                f"{what}: all {self.size} Redis connections stayed busy for {self.wait}s (REDIS_POOL_SIZE, "
                "REDIS_POOL_TIMEOUT)", "busy") from None
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.exception() is None:
                self.release()  # the slot was handed over as the caller was cancelled: pass it on
            raise

    def release(self) -> None:
        queue = self._queue
        while queue:
            future, _ = queue.popleft()
            if not future.done():
                future.set_result(None)  # the slot goes straight to the next in line
                return
        self._free += 1

    def _expire(self) -> None:
        self._timer = None
        queue = self._queue
        loop = asyncio.get_running_loop()
        now = loop.time()
        while queue and (queue[0][0].done() or queue[0][1] <= now):
            future, _ = queue.popleft()
            if not future.done():
                future.set_exception(TimeoutError())
        if queue:
            self._timer = loop.call_at(queue[0][1], self._expire)


class _Ready:
    """An awaitable that is already done: what a slot's enter returns when a slot is free, and its exit."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, Any, None]:
        yield from ()


_READY = _Ready()


class _Slot:
    """Entered on every command. Its enter and exit are plain methods returning awaitables: when a slot is free
    nothing is created but this object (no coroutine for the enter, for `acquire`, for the exit)."""

    __slots__ = ("_budget", "_what")

    def __init__(self, budget: CommandBudget, what: str) -> None:
        self._budget = budget
        self._what = what

    def __aenter__(self) -> Awaitable[None]:
        budget = self._budget
        if budget._free > 0 and not budget._queue:  # noqa: SLF001 - acquire's own fast path, inlined
            budget._free -= 1  # noqa: SLF001
            return _READY
        return budget.acquire(self._what)

    def __aexit__(self, *exc: object) -> Awaitable[None]:
        self._budget.release()
        return _READY
