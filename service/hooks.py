"""Your backend decides: the authorization hook and the publish hook, and the decisions they leave behind.

The authorization hook (AUTH_HOOK_URL, or an async callable given to `Relay` / `create_app`) is asked whether a
client may open a stream on, or publish to, channels that are neither public nor granted by a valid token
(auth.py decides which). The publish hook (PUBLISH_HOOK_URL, or a callable) sees every client publish before it
goes out and accepts it, replacing its `data` if it likes, or rejects it. The contract, in JSON both ways, is the
same for a URL and a callable (docs/security.md):

    POST AUTH_HOOK_URL    (the client's Cookie and Authorization headers forwarded as they came)
    {"action": "subscribe" | "publish", "channels": ["room1"], "address": "203.0.113.7"}
    → 200 {"allow": true, "user": "alice", "cache_seconds": 30}     (user, cache_seconds optional)
    → 200 {"allow": false, "reason": "banned", "cache_seconds": 5}   (401/403 with any body: deny, not cached)

    POST PUBLISH_HOOK_URL (the same headers)
    {"channel": "room1", "event": "chat", "data": {...}, "user": "alice", "address": "203.0.113.7"}
    → 200 {"accept": true}  or  {"accept": true, "data": <replacement>}
    → 200 {"accept": false, "status": 403, "code": "moderated", "message": "..."}   (status 400-499)

Why it is built the way it is:

- **Fail closed.** A hook that does not answer within HOOK_TIMEOUT, cannot be reached, or answers anything but
  the contract is a `HookFailed` with its `kind` (`timeout`, `unreachable`, `invalid`, `busy`), never an allow:
  an outage of the backend must not open private channels. The HTTP edge answers it 503 (a stream: 200 and a
  `retry:`, see stream.refuse_stream), never a hang or a 500.
- **Bounded.** At most HOOK_CONCURRENCY calls in flight per hook and process; waiting for a slot counts against
  the same HOOK_TIMEOUT (then `busy`). Decisions are remembered for the `cache_seconds` the backend allows, at
  most AUTH_HOOK_MAX_CACHE_SECONDS, in an LRU of AUTH_HOOK_CACHE_SIZE entries keyed by a 16-byte digest (a
  cookie is never kept), so the cache's memory has a ceiling whatever clients send.
- **Coalesced.** A reconnect storm sends the same question many times at once (every tab of a user, every
  replica's clients after a deploy): identical calls in flight (same action, channels, Cookie and Authorization)
  share one call. The address is not part of the question's identity: the backend sees the first asker's.
- **Forgettable.** `forget(user=..., channel=...)` drops what was remembered (ending a user's streams, see
  control.py) and makes calls already in flight unfit for the cache, so the next open asks the backend again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

__all__ = [
    "AuthCallable",
    "AuthDecision",
    "AuthHook",
    "AuthQuestion",
    "HookFailed",
    "PublishCallable",
    "PublishDecision",
    "PublishHook",
    "PublishQuestion",
]

log = logging.getLogger("service.hooks")

_MAX_REASON = 200
_MAX_USER = 128
_MAX_CODE = 64
_MAX_ANSWER_BYTES = 1 << 20
_LOG_EVERY = 5.0


class HookFailed(Exception):
    """The hook gave no usable answer; nothing was allowed. `kind`: `timeout` (no answer within HOOK_TIMEOUT),
    `unreachable` (connection refused, reset, DNS), `invalid` (an answer outside the contract, a 5xx included),
    `busy` (HOOK_CONCURRENCY calls were in flight for the whole HOOK_TIMEOUT)."""

    def __init__(self, hook: str, kind: str, detail: str) -> None:
        super().__init__(f"the {hook} hook failed ({kind}): {detail}")
        self.hook, self.kind, self.detail = hook, kind, detail


@dataclass(frozen=True, slots=True)
class AuthQuestion:
    """What the authorization hook is asked. `request` is the Starlette request, for an embedded callable that
    wants its own session machinery (None for calls made outside a request)."""

    action: str
    channels: tuple[str, ...]
    address: str
    cookie: str | None = None
    authorization: str | None = None
    request_id: str | None = None
    request: Any = None

    def body(self) -> dict[str, Any]:
        return {"action": self.action, "channels": list(self.channels), "address": self.address}

    def key(self) -> bytes:
        """The question's identity for coalescing and the cache: a digest, so no cookie is ever kept."""
        h = hashlib.blake2b(digest_size=16)
        for part in (self.action, "\0".join(self.channels), self.cookie or "", self.authorization or ""):
            h.update(part.encode("utf-8", "surrogatepass"))
            h.update(b"\x1f")
        return h.digest()


@dataclass(frozen=True, slots=True)
class AuthDecision:
    allow: bool
    user: str | None = None
    cache_seconds: float = 0.0
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class PublishQuestion:
    channel: str
    event: str | None
    data: Any
    user: str | None
    address: str
    cookie: str | None = None
    authorization: str | None = None
    request_id: str | None = None
    request: Any = None

    def body(self) -> dict[str, Any]:
        return {"channel": self.channel, "event": self.event, "data": self.data, "user": self.user,
                "address": self.address}


_KEEP = object()


@dataclass(frozen=True, slots=True)
class PublishDecision:
    """`accept` True: publish `data` (the original unless the backend replaced it). False: answer `status` (400-499)
    with `code` and `message`, publish nothing."""

    accept: bool
    data: Any = _KEEP
    status: int = 403
    code: str = "rejected"
    message: str = "the backend rejected this message"

    @property
    def replaced(self) -> bool:
        return self.data is not _KEEP


AuthCallable = Callable[[AuthQuestion], Awaitable["AuthDecision | Mapping[str, Any]"]]
PublishCallable = Callable[[PublishQuestion], Awaitable["PublishDecision | Mapping[str, Any]"]]


# -- reading answers: the one parser for a URL's JSON and a callable's mapping ------------------------------------


def _invalid(hook: str, detail: str) -> HookFailed:
    return HookFailed(hook, "invalid", detail)


def parse_auth_answer(value: Any, max_cache: float) -> AuthDecision:
    if isinstance(value, AuthDecision):
        return AuthDecision(value.allow, value.user, min(max(0.0, value.cache_seconds), max_cache),
                            value.reason[:_MAX_REASON] if value.reason else None)
    if not isinstance(value, Mapping):
        raise _invalid("auth", f"the answer must be a JSON object, not {type(value).__name__}")
    allow = value.get("allow")
    if not isinstance(allow, bool):
        raise _invalid("auth", 'the answer needs "allow": true or false')
    user = value.get("user")
    if user is not None and not (isinstance(user, str) and 0 < len(user) <= _MAX_USER and user.isprintable()):
        raise _invalid("auth", f'"user" must be a printable string of 1-{_MAX_USER} characters, or absent')
    cache = value.get("cache_seconds", 0)
    if isinstance(cache, bool) or not isinstance(cache, int | float) or not cache >= 0:
        raise _invalid("auth", '"cache_seconds" must be a number >= 0')
    reason = value.get("reason")
    if reason is not None and not isinstance(reason, str):
        raise _invalid("auth", '"reason" must be a string')
    return AuthDecision(allow, user, min(float(cache), max_cache), reason[:_MAX_REASON] if reason else None)


def parse_publish_answer(value: Any) -> PublishDecision:
    if isinstance(value, PublishDecision):
        value = {"accept": value.accept, "status": value.status, "code": value.code, "message": value.message,
                 **({"data": value.data} if value.replaced else {})}
    if not isinstance(value, Mapping):
        raise _invalid("publish", f"the answer must be a JSON object, not {type(value).__name__}")
    accept = value.get("accept")
    if not isinstance(accept, bool):
        raise _invalid("publish", 'the answer needs "accept": true or false')
    if accept:
        return PublishDecision(True, value["data"]) if "data" in value else PublishDecision(True)
    status = value.get("status", 403)
    if isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 499:
        raise _invalid("publish", '"status" of a rejection must be an integer 400-499')
    code = value.get("code", "rejected")
    if not (isinstance(code, str) and 0 < len(code) <= _MAX_CODE and code.replace("_", "").isalnum()):
        raise _invalid("publish", f'"code" must be 1-{_MAX_CODE} letters, digits or _')
    message = value.get("message", "the backend rejected this message")
    if not isinstance(message, str):
        raise _invalid("publish", '"message" must be a string')
    return PublishDecision(False, status=status, code=code, message=message[:_MAX_REASON] or code)


# -- transports: a URL (httpx) or the app's own coroutine -----------------------------------------------------------


class _Transport:
    """Asks once: returns the answer as a value (a mapping or a decision); raises HookFailed."""

    async def ask(self, body: dict[str, Any], headers: dict[str, str], question: Any) -> Any:
        raise NotImplementedError

    async def close(self) -> None:
        return None


class _HTTP(_Transport):
    """POST the JSON body with the client's headers. httpx with explicit limits: as many connections as calls may
    be in flight, kept alive (a hook call must not pay a TCP handshake), and every phase under the timeout."""

    def __init__(self, hook: str, url: str, timeout: float, concurrency: int, deny_statuses: frozenset[int]) -> None:
        self.hook, self.url, self.deny_statuses = hook, url, deny_statuses
        self.timeout, self.concurrency = timeout, concurrency
        self.client: httpx.AsyncClient | None = None  # made on first use, so a relay started again gets a new one

    def _client(self) -> httpx.AsyncClient:
        if self.client is None:
            limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency,
                                  keepalive_expiry=30.0)
            self.client = httpx.AsyncClient(
                # TCP_NODELAY: a request's headers and body leave at once (~0.7 ms a call on loopback, measured)
                transport=httpx.AsyncHTTPTransport(
                    limits=limits, socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]),
                timeout=httpx.Timeout(self.timeout),
                limits=limits,
                follow_redirects=False,
                trust_env=False,  # an HTTP(S)_PROXY of the environment must not see clients' cookies
            )
        return self.client

    async def ask(self, body: dict[str, Any], headers: dict[str, str], question: Any) -> Any:
        try:
            response = await self._client().post(self.url, content=orjson.dumps(body),
                                              headers={"content-type": "application/json", **headers})
        except httpx.TimeoutException:
            raise HookFailed(self.hook, "timeout", f"{self.url} did not answer in time") from None
        except (httpx.TransportError, OSError) as exc:
            raise HookFailed(self.hook, "unreachable", f"{self.url}: {type(exc).__name__}") from None
        if response.status_code in self.deny_statuses:
            return {"allow": False, "reason": f"the backend answered {response.status_code}"}
        if response.status_code != 200:
            raise _invalid(self.hook, f"{self.url} answered {response.status_code}; the contract wants 200")
        if len(response.content) > _MAX_ANSWER_BYTES:
            raise _invalid(self.hook, f"{self.url} answered over {_MAX_ANSWER_BYTES} bytes")
        try:
            return orjson.loads(response.content)
        except orjson.JSONDecodeError:
            raise _invalid(self.hook, f"{self.url} answered something that is not JSON") from None

    async def close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            await client.aclose()


class _Callable(_Transport):
    def __init__(self, hook: str, function: Callable[[Any], Awaitable[Any]]) -> None:
        self.hook, self.function = hook, function
        self._logged = -_LOG_EVERY

    async def ask(self, body: dict[str, Any], headers: dict[str, str], question: Any) -> Any:
        try:
            return await self.function(question)
        except HookFailed:
            raise
        except Exception as exc:  # noqa: BLE001 - the app's code failed: refuse, say so, never a 500
            if time.monotonic() - self._logged >= _LOG_EVERY:  # with its traceback, at most every 5 s
                self._logged = time.monotonic()
                log.exception("the %s hook raised", self.hook)
            raise HookFailed(self.hook, "invalid", f"the hook raised {type(exc).__name__}") from None


def _headers(cookie: str | None, authorization: str | None, request_id: str | None) -> dict[str, str]:
    headers = {}
    if cookie:
        headers["cookie"] = cookie
    if authorization:
        headers["authorization"] = authorization
    if request_id:
        headers["x-request-id"] = request_id
    return headers


class _Gate:
    """HOOK_CONCURRENCY calls in flight; the wait for a slot and the call share one deadline."""

    def __init__(self, hook: str, transport: _Transport, timeout: float, concurrency: int) -> None:
        self.hook, self.transport, self.timeout = hook, transport, timeout
        self.concurrency = concurrency
        self.slots = asyncio.Semaphore(concurrency)
        self.calls = 0  # made (for tests and the benchmark)
        self.failures: dict[str, int] = {}
        self._logged: dict[str, float] = {}

    async def ask(self, body: dict[str, Any], headers: dict[str, str], question: Any) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        try:
            async with asyncio.timeout_at(deadline):
                await self.slots.acquire()
        except TimeoutError:
            self.failed("busy", f"{self.concurrency} calls in flight for {self.timeout:g} s")
            raise HookFailed(self.hook, "busy", f"{self.concurrency} of its calls were in flight for "
                             f"{self.timeout:g} s (HOOK_CONCURRENCY)") from None
        try:
            self.calls += 1
            async with asyncio.timeout_at(deadline):
                return await self.transport.ask(body, headers, question)
        except TimeoutError:
            self.failed("timeout", f"no answer within {self.timeout:g} s")
            raise HookFailed(self.hook, "timeout", f"no answer within {self.timeout:g} s (HOOK_TIMEOUT)") from None
        except HookFailed as exc:
            self.failed(exc.kind, exc.detail)
            raise
        finally:
            self.slots.release()

    def failed(self, kind: str, detail: str = "") -> None:
        """Count a failure; log it at most every 5 s per kind (a backend outage fails every request)."""
        self.failures[kind] = self.failures.get(kind, 0) + 1
        now = time.monotonic()
        if now - self._logged.get(kind, -_LOG_EVERY) >= _LOG_EVERY:
            self._logged[kind] = now
            log.warning("the %s hook failed (%s): %s; requests needing it are refused", self.hook, kind, detail,
                        extra={"hook": self.hook, "kind": kind, "failures": self.failures[kind]})


# -- the hooks ---------------------------------------------------------------------------------------------------


class AuthHook:
    """Decides `AuthQuestion`s through the backend, coalescing identical calls in flight and remembering answers."""

    def __init__(self, target: str | AuthCallable, *, timeout: float = 0.5, concurrency: int = 64,
                 cache_size: int = 10000, max_cache_seconds: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        transport: _Transport = (
            _HTTP("auth", target, timeout, concurrency, frozenset({401, 403})) if isinstance(target, str)
            else _Callable("auth", target)
        )
        self._gate = _Gate("auth", transport, timeout, concurrency)
        self._cache_size, self._max_cache = cache_size, max_cache_seconds
        self._clock = clock
        # key → (expires at, decision, channels): channels to forget a channel's decisions by
        self._cache: OrderedDict[bytes, tuple[float, AuthDecision, tuple[str, ...]]] = OrderedDict()
        self._inflight: dict[bytes, asyncio.Task[AuthDecision]] = {}
        self._generation = 0
        self.coalesced = 0  # questions answered by a call another asker started
        self.cache_hits = 0

    @property
    def calls(self) -> int:
        return self._gate.calls

    @property
    def failures(self) -> dict[str, int]:
        return self._gate.failures

    async def close(self) -> None:
        for task in list(self._inflight.values()):
            task.cancel()
        await self._gate.transport.close()

    async def decide(self, question: AuthQuestion) -> AuthDecision:
        """The backend's decision; raises HookFailed."""
        key = question.key()
        cached = self._cache.get(key)
        if cached is not None:
            if cached[0] > self._clock():
                self._cache.move_to_end(key)
                self.cache_hits += 1
                return cached[1]
            del self._cache[key]
        for _ in range(2):  # a second time only when a `forget` overtook the call (its answer may be stale)
            generation = self._generation
            task = self._inflight.get(key)
            if task is None:
                task = asyncio.get_running_loop().create_task(self._call(key, question))
                self._inflight[key] = task
                task.add_done_callback(lambda t, k=key: self._done(k, t))  # type: ignore[misc]
            else:
                self.coalesced += 1
            # shield: one asker leaving (its client went away) does not cancel the call the others wait on
            decision = await asyncio.shield(task)
            if generation == self._generation or not decision.allow:
                return decision
        return decision

    async def _call(self, key: bytes, question: AuthQuestion) -> AuthDecision:
        generation = self._generation
        answer = await self._gate.ask(question.body(),
                                      _headers(question.cookie, question.authorization, question.request_id),
                                      question)
        try:
            decision = parse_auth_answer(answer, self._max_cache)
        except HookFailed as exc:
            self._gate.failed(exc.kind, exc.detail)
            raise
        if decision.cache_seconds > 0 and self._cache_size and generation == self._generation:
            self._cache[key] = (self._clock() + decision.cache_seconds, decision, question.channels)
            self._cache.move_to_end(key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return decision

    def _done(self, key: bytes, task: asyncio.Task[AuthDecision]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved: every asker got it already (or none is left to)

    def forget(self, user: str | None = None, channel: str | None = None) -> int:
        """Drop remembered decisions for `user` (allowed as that user) and/or `channel` (None, None: all), and
        make answers of calls in flight unfit for the cache. Returns how many were dropped."""
        self._generation += 1
        if user is None and channel is None:
            dropped = len(self._cache)
            self._cache.clear()
            return dropped
        doomed = [k for k, (_, d, channels) in self._cache.items()
                  if (user is not None and d.user == user) or (channel is not None and channel in channels)]
        for k in doomed:
            del self._cache[k]
        return len(doomed)

    def __len__(self) -> int:
        return len(self._cache)

    def stats(self) -> dict[str, float]:
        return {"calls": self.calls, "cache_hits": self.cache_hits, "coalesced": self.coalesced,
                "cache_entries": len(self._cache), **{f"failures.{k}": v for k, v in self.failures.items()}}


class PublishHook:
    """Asks the backend about each client publish; nothing is coalesced or remembered (every message differs)."""

    def __init__(self, target: str | PublishCallable, *, timeout: float = 0.5, concurrency: int = 64) -> None:
        transport: _Transport = (
            _HTTP("publish", target, timeout, concurrency, frozenset()) if isinstance(target, str)
            else _Callable("publish", target)
        )
        self._gate = _Gate("publish", transport, timeout, concurrency)

    @property
    def calls(self) -> int:
        return self._gate.calls

    async def close(self) -> None:
        await self._gate.transport.close()

    def stats(self) -> dict[str, float]:
        return {"calls": self.calls, **{f"failures.{k}": v for k, v in self._gate.failures.items()}}

    async def decide(self, question: PublishQuestion) -> PublishDecision:
        """Raises HookFailed."""
        answer = await self._gate.ask(question.body(),
                                      _headers(question.cookie, question.authorization, question.request_id),
                                      question)
        try:
            return parse_publish_answer(answer)
        except HookFailed as exc:
            self._gate.failed(exc.kind, exc.detail)
            raise
