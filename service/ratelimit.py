"""Limits on what one client may do: its publish rate, and who "one client" is.

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

A client is the token's `sub` when the request carried a valid token, else its address: the peer's, unless the
peer is one of the proxies listed in TRUST_PROXY_HEADERS. Then `X-Forwarded-For` is read from the RIGHT, the
end the proxies wrote: hops that are trusted proxies are skipped, and the first one that is not is the client.
Whatever a client put at the left of the header itself is never reached, so the proxies may append to the header
or overwrite it, and a client that connects directly (not a trusted proxy) has its header ignored.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import error_response

if TYPE_CHECKING:
    from .config import Settings

__all__ = [
    "HeaderLimit",
    "MemoryRateLimiter",
    "NoRateLimit",
    "RateLimiter",
    "RedisRateLimiter",
    "TrustedProxies",
    "client_ip",
    "create_rate_limiter",
    "within_json_depth",
]

log = logging.getLogger("service.ratelimit")


class RateLimiter(Protocol):
    rate: float

    async def hit(self, client: str, cost: int = 1) -> float | None:
        """Charge `cost` messages to `client`: None when allowed, else the seconds to wait before retrying."""
        ...

    async def close(self) -> None: ...


class NoRateLimit:
    """PUBLISH_RATE_LIMIT=0."""

    rate = 0.0

    async def hit(self, client: str, cost: int = 1) -> float | None:
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

    def _prune(self, now: float) -> None:
        for key in [k for k, t in self._tat.items() if t <= now]:
            del self._tat[key]
        if len(self._tat) >= self._PRUNE_AT:  # all busy: forget the oldest half rather than grow without end
            for key in list(self._tat)[: len(self._tat) // 2]:
                del self._tat[key]

    async def close(self) -> None:
        return None


# KEYS[1]: the client's key. ARGV: interval (µs), tolerance (µs), cost. Same rule as MemoryRateLimiter.hit.
# Returns 0 when allowed, else the microseconds to wait. Redis's clock, so replicas' clocks do not matter.
# Times are written with %.0f: Lua's tostring() keeps 14 digits and would round a µs timestamp.
_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local new_tat = tat + interval * tonumber(ARGV[3])
local excess = new_tat - now - tolerance
if excess > 0 and tat > now then
  return math.ceil(math.min(excess, tat - now))
end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
return 0
"""


class RedisRateLimiter:
    """GCRA in Redis: one EVALSHA per publish, shared by every replica. Fails open when Redis does not answer."""

    _LOG_EVERY = 10.0

    def __init__(self, url: str, prefix: str, rate: float, burst: int | None = None) -> None:
        from redis.asyncio import BlockingConnectionPool, Redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        from .broker.redis_connect import RedisTarget

        self.rate = rate
        self.burst = burst if burst is not None else max(1, math.ceil(rate))
        self._interval_us = 1_000_000 / rate
        self._tolerance_us = self._interval_us * self.burst
        self._prefix = f"{prefix}:rl:"
        # Short timeouts and no retries: a slow Redis must not make every publish slow; we fail open instead.
        # One Redis: a bounded pool, so a burst of publishes queues for a connection instead of opening
        # thousands. Cluster and Sentinel URLs: the broker's own client factory (the key routes the script).
        target = RedisTarget(url)
        self._redis: Any
        if target.kind == "single":
            pool = BlockingConnectionPool.from_url(
                url, max_connections=16, timeout=1.0, socket_connect_timeout=1.0, socket_timeout=1.0,
                retry=Retry(NoBackoff(), 0), health_check_interval=0,
            )
            self._redis = Redis.from_pool(pool)
        else:
            self._redis = target.command_client(socket_timeout=1.0)
        self._script = self._redis.register_script(_GCRA)
        self._last_log = -math.inf
        self.failures = 0

    def key(self, client: str) -> str:
        # A token's `sub` is the issuer's choice; keep keys short and free of anything Redis Cluster would read.
        if len(client) > 128 or "{" in client:
            client = "h:" + hashlib.sha256(client.encode()).hexdigest()
        return self._prefix + client

    async def hit(self, client: str, cost: int = 1) -> float | None:
        from redis.exceptions import RedisError

        try:
            wait_us = await self._script(
                keys=[self.key(client)],
                args=[f"{self._interval_us:.3f}", f"{self._tolerance_us:.3f}", cost],
            )
        except (RedisError, OSError) as exc:
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
        await self._redis.aclose()


def create_rate_limiter(settings: Settings) -> RateLimiter:
    rate = float(settings.publish_rate_limit)
    if rate <= 0:
        return NoRateLimit()
    if settings.redis_url:
        return RedisRateLimiter(settings.redis_url, settings.redis_key_prefix, rate)
    return MemoryRateLimiter(rate)


# -- who the client is -----------------------------------------------------------------------------------------


class TrustedProxies:
    """The proxies whose `X-Forwarded-For` is believed (TRUST_PROXY_HEADERS): `address in trusted`.

    Empty (the default): nobody's. IPv4-mapped IPv6 peers (`::ffff:10.1.2.3`, on dual-stack sockets) are
    matched as the IPv4 address they are.
    """

    __slots__ = ("networks",)

    def __init__(self, networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network] = ()) -> None:
        self.networks = tuple(networks)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __contains__(self, address: object) -> bool:
        if not self.networks:
            return False
        ip = address if isinstance(address, (ipaddress.IPv4Address, ipaddress.IPv6Address)) else _hop(str(address))
        return ip is not None and any(ip in network for network in self.networks)

    def __repr__(self) -> str:
        return f"TrustedProxies({', '.join(map(str, self.networks)) or 'nobody'})"


def _hop(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """One X-Forwarded-For entry as an address: `1.2.3.4`, `1.2.3.4:567`, `::1`, `[::1]`, `[::1]:567`; else None."""
    text = text.strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]  # IPv4 with a port (some proxies add it); a bare IPv6 has 2+ colons
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def client_ip(request: Request, trusted: TrustedProxies) -> str:
    """Who the client is, by address: the peer, or when the peer is a trusted proxy, the rightmost hop of
    `X-Forwarded-For` that is not a trusted proxy (all trusted: the leftmost). An entry that is not an address
    ends the walk: the last trusted hop is then the client, never attacker-chosen text."""
    peer = request.client.host if request.client else None
    if peer is None:
        return "unknown"
    if peer not in trusted:
        return peer
    client = _hop(peer)
    for header in reversed(request.headers.getlist("x-forwarded-for")):
        for entry in reversed(header.split(",")):
            ip = _hop(entry)
            if ip is None:
                return str(client)
            client = ip
            if ip not in trusted:
                return str(ip)
    return str(client)


# -- input limits ------------------------------------------------------------------------------------------------


def within_json_depth(value: Any, limit: int) -> bool:
    """True when `value` nests containers no deeper than `limit` (a scalar has depth 0). Iterative: no recursion."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth + 1 > limit:
            return False
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return True


class HeaderLimit:
    """431 for requests whose headers (names + values) exceed MAX_HEADER_BYTES, before any endpoint runs.

    The HTTP parser has already read them; this keeps oversized cookies and tokens away from JWT decoding and
    logs, and gives a clear answer instead of an opaque connection reset.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.limit > 0:
            size = sum(len(k) + len(v) for k, v in scope.get("headers", ()))
            if size > self.limit:
                response = error_response(
                    431, f"request headers are {size} bytes; the limit is {self.limit} (MAX_HEADER_BYTES)",
                    "headers_too_large",
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
