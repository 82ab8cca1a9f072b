"""The publish rate one client may have.

The publish rate is a GCRA (generic cell rate algorithm, the "leaky bucket as a meter"): one timestamp per
client, the theoretical arrival time (TAT) of its next message. A client may send `rate` messages at once and
then `rate` per second; whatever it sends above that is refused with how long to wait. One number per client
means the state is tiny, and in Redis one atomic script call per publish.

- On the embedded default (no REDIS_URL) the TATs live in this process.
- With REDIS_URL they live in Redis under `<REDIS_KEY_PREFIX>:rl:<client>`, on Redis's own clock, so the limit
  holds across replicas: a client spreading its publishes over every replica still gets `rate` per second.
  When Redis cannot answer, the limiter fails OPEN (the publish goes on to the broker, which then answers
  503 itself if Redis is really down) and logs it at most every few seconds: rate limiting is protection, not
  an availability dependency.

A client is the token's `sub` when the request carried a valid token, else its address (clients.py).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable
from typing import Protocol

from .broker.base import RateCharge
from .broker.redis_format import RATE_SCRIPT
from .config import Settings

__all__ = ["MemoryRateLimiter", "NoRateLimit", "RateLimiter", "RedisRateLimiter", "create_rate_limiter"]

log = logging.getLogger("service.ratelimit")


class RateLimiter(Protocol):
    rate: float

    async def hit(self, client: str, cost: int = 1) -> float | None:
        """Charge `cost` messages to `client`: None when allowed, else the seconds to wait before retrying."""
        ...

    def charge(self, client: str, cost: int = 1) -> RateCharge | None:
        """The same charge for a broker to take in the publish's own step (`Broker.charges_rates`), or None when
        this limiter is not one a broker can take (then `hit` is asked)."""
        ...

    async def close(self) -> None: ...


class NoRateLimit:
    """PUBLISH_RATE_LIMIT=0."""

    rate = 0.0

    async def hit(self, client: str, cost: int = 1) -> float | None:
        return None

    def charge(self, client: str, cost: int = 1) -> RateCharge | None:
        return None

    async def close(self) -> None:
        return None


class MemoryRateLimiter:
    """GCRA in a dict. Clients whose bucket is full again are forgotten when the dict grows, so memory stays
    bounded by the clients active within the last `burst / rate` seconds."""

    _PRUNE_AT = 10_000

    def __init__(self, rate: float, burst: int | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.interval = 1.0 / rate
        self.burst = burst if burst is not None else max(1, math.ceil(rate))
        self._tolerance = self.interval * self.burst
        self._tat: dict[str, float] = {}
        self._clock = clock

    async def hit(self, client: str, cost: int = 1) -> float | None:
        now = self._clock()
        tat = max(self._tat.get(client, now), now)
        new_tat = tat + self.interval * cost
        excess = new_tat - now - self._tolerance
        # A batch bigger than the burst passes only when the bucket is full, and then the client owes its cost.
        if excess > 1e-9 and tat > now:
            return min(excess, tat - now)
        if len(self._tat) >= self._PRUNE_AT and client not in self._tat:
            self._prune(now)
        self._tat[client] = new_tat
        return None

    def charge(self, client: str, cost: int = 1) -> RateCharge | None:
        return None  # in this process: asked on its own, no round trip to save

    def _prune(self, now: float) -> None:
        for key in [k for k, t in self._tat.items() if t <= now]:
            del self._tat[key]
        if len(self._tat) >= self._PRUNE_AT:  # all busy: forget the oldest half rather than grow without end
            for key in list(self._tat)[: len(self._tat) // 2]:
                del self._tat[key]

    async def close(self) -> None:
        return None


class RedisRateLimiter:
    """GCRA in Redis (`redis_format.RATE_SCRIPT`, Redis's clock), shared by every replica. Fails open when Redis
    does not answer.

    A single publish charges its rate in the publish's own script where the broker can take it (`charge`, one
    Redis but not a Cluster, and no publish hook to protect: api._publish_one): one round trip instead of two,
    which cost ~17 % of the chat's throughput (docs/performance.md). Everything else (batches, the old chat's
    send, a Cluster, a publish hook) asks `hit` first, as a separate EVALSHA."""

    _LOG_EVERY = 10.0

    def __init__(self, url: str, prefix: str, rate: float, burst: int | None = None) -> None:
        # Imported here: the embedded default (no REDIS_URL) never loads a Redis client.
        from redis.exceptions import RedisError

        from .broker.base import BrokerError
        from .broker.redis_commands import RedisCommands, Script
        from .broker.redis_connect import RedisOptions, RedisTarget
        from .broker.redis_errors import CommandBudget

        self.rate = rate
        self.burst = burst if burst is not None else max(1, math.ceil(rate))
        self._interval_us = 1_000_000 / rate
        self._tolerance_us = self._interval_us * self.burst
        self._prefix = f"{prefix}:rl:"
        # Short timeouts and no retries: a slow Redis must not make every publish slow; we fail open instead.
        # At most 16 scripts in flight, a burst of publishes waiting up to 1 s for a slot (as it once waited for one
        # of 16 pooled connections). The command layer routes the script by its key on a Cluster and follows the
        # master behind Sentinel; one Redis gets a 1 s connect timeout, Cluster nodes and Sentinel masters 2 s.
        target = RedisTarget(url)
        connect_timeout = 1.0 if target.kind == "single" else RedisOptions().connect_timeout
        self._commands = RedisCommands(
            RedisTarget(url, RedisOptions(connect_timeout=connect_timeout, command_timeout=1.0, pool_size=16)),
            self_routing=True)
        self._budget = CommandBudget(16, 1.0)
        self._script = Script(RATE_SCRIPT)
        self._errors: tuple[type[BaseException], ...] = (RedisError, OSError, BrokerError)
        self._last_log = -math.inf
        self.failures = 0

    def charge(self, client: str, cost: int = 1) -> RateCharge | None:
        return RateCharge(self.key(client), self._interval_us, self._tolerance_us, cost)

    def key(self, client: str) -> str:
        # A token's `sub` is the issuer's choice; keep keys short and free of anything Redis Cluster would read.
        if len(client) > 128 or "{" in client:
            client = "h:" + hashlib.sha256(client.encode()).hexdigest()
        return self._prefix + client

    async def hit(self, client: str, cost: int = 1) -> float | None:
        try:
            async with self._budget.slot("rate limit"):
                wait_us = await self._commands.eval(
                    self._script, [self.key(client)], [f"{self._interval_us:.3f}", f"{self._tolerance_us:.3f}", cost])
        except self._errors as exc:
            self.failures += 1
            now = time.monotonic()
            if now - self._last_log >= self._LOG_EVERY:
                self._last_log = now
                log.warning(
                    "rate limiter cannot reach Redis; publishes are not rate limited meanwhile",
                    extra={"error": type(exc).__name__, "failures": self.failures},
                )
            return None
        return None if int(wait_us) <= 0 else int(wait_us) / 1_000_000

    async def close(self) -> None:
        await self._commands.aclose()


def create_rate_limiter(settings: Settings) -> RateLimiter:
    rate = float(settings.publish_rate_limit)
    if rate <= 0:
        return NoRateLimit()
    if settings.redis_url:
        return RedisRateLimiter(settings.redis_url, settings.redis_key_prefix, rate)
    return MemoryRateLimiter(rate)


# -- who the client is -----------------------------------------------------------------------------------------
