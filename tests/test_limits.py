"""Limits: publishes per client per second (one budget across replicas on Redis, keyed on the forwarded address
only from a trusted proxy), streams per client and per instance, and the size of request headers.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from service import Settings
from service.broker.redis_format import RATE_SCRIPT
from service.config import ConfigError

from .sse import SSEStream
from .support import RedisServer, bearer, eventually, free_port, replicas, serve, token

pytestmark = pytest.mark.timeout(60)


# -- publishes ---------------------------------------------------------------------------------------------------------


async def test_publish_rate_limit_per_client_answers_429_with_retry_after() -> None:
    # 1/s: deterministic however slow this machine is (bursts are checked on a fake clock further down)
    async with serve(publish_rate_limit=1) as s, httpx.AsyncClient(base_url=s.url) as c:
        assert (await c.post("/channels/chat/messages", json={"data": "first"})).status_code == 202
        refused = await c.post("/channels/chat/messages", json={"data": "over"})
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "rate_limited"
        assert "PUBLISH_RATE_LIMIT" in refused.json()["error"]["message"]
        assert refused.headers["retry-after"] == "1"
        wait_ms = refused.json()["error"]["retry_after_ms"]
        assert 0 < wait_ms <= 1000
        # every publish path counts against the same client
        legacy = await c.post("/server/send", json={"messages": [{"role": "u", "content": "x"}]})
        assert legacy.status_code == 429
        assert (await c.post("/publish", json={"messages": [{"channel": "chat", "data": "b"}]})).status_code == 429
        # another client (a token's sub) has its own budget, even on a public channel
        bob = bearer(token(sub="bob"))
        assert (await c.post("/channels/chat/messages", json={"data": "bob"}, headers=bob)).status_code == 202
        assert await s.history("chat") == ["first", "bob"]
        await asyncio.sleep(wait_ms / 1000 + 0.05)  # the rule is about time: wait what the relay said
        assert (await c.post("/channels/chat/messages", json={"data": "later"})).status_code == 202
        assert await s.history("chat") == ["first", "bob", "later"]


async def test_rate_limit_client_is_the_forwarded_address_only_from_a_trusted_proxy() -> None:
    for trusted in ((), ("127.0.0.1",)):
        async with serve(publish_rate_limit=1, trust_proxy_headers=trusted) as s, httpx.AsyncClient(base_url=s.url) as c:
            codes = []
            for chain in ("6.6.6.6, 203.0.113.1", "6.6.6.7, 203.0.113.2", "6.6.6.8, not-an-ip", "7.7.7.7, 203.0.113.1"):
                resp = await c.post("/channels/chat/messages", json={"data": chain}, headers={"X-Forwarded-For": chain})
                codes.append(resp.status_code)
            # Nobody trusted: the header is ignored, all four are the peer, only the first passes. The peer trusted:
            # the rightmost hop is the client (two addresses, two buckets); a hop that is not an address leaves the
            # peer as the client (a third bucket); the leftmost hop, which the client wrote, never counts.
            assert codes == ([202, 429, 429, 429] if not trusted else [202, 202, 202, 429])


@pytest.mark.redis
async def test_rate_limit_holds_across_replicas(redis_server: RedisServer, tmp_path: Path) -> None:
    env = {"REDIS_URL": redis_server.url, "PUBLISH_RATE_LIMIT": "5", "PUBLIC_CHANNELS": "*"}
    with replicas(tmp_path, env, "rl0", "rl1") as group:
        async with httpx.AsyncClient(timeout=5) as c:
            started = time.monotonic()
            results = []
            for i in range(20):
                replica = group[i % 2]
                resp = await c.post(f"{replica.url}/channels/rl/messages", json={"data": i})
                results.append((replica.name, resp.status_code))
            elapsed = time.monotonic() - started
            accepted = [name for name, status in results if status == 202]
            refused = [name for name, status in results if status == 429]
            # 5 at once plus 5/s, shared: an in-process limit per replica would have let 10 through at once
            assert 5 <= len(accepted) <= 5 + int(5 * elapsed) + 1, (results, elapsed)
            assert set(refused) == {"rl0", "rl1"}, results
            keys = subprocess.run(["redis-cli", "-p", str(redis_server.port), "--scan", "--pattern", "sse:rl:*"],
                                  capture_output=True, text=True, check=True).stdout.split()
            assert keys == ["sse:rl:ip:127.0.0.1"]
            # Charged in each publish's own script (one round trip): the limiter's own script never ran.
            rate_sha = hashlib.sha1(RATE_SCRIPT.encode()).hexdigest()
            exists = subprocess.run(["redis-cli", "-p", str(redis_server.port), "SCRIPT", "EXISTS", rate_sha],
                                    capture_output=True, text=True, check=True).stdout.split()
            assert exists == ["0"]
            # what was refused was not published
            got = (await c.get(f"{group[0].url}/channels/rl")).json()
            assert got["last_id"] is not None
        async with SSEStream(f"{group[1].url}/channels/rl/events?last_event_id=0") as r:
            await r.wait_count(len(accepted))  # history comes as one chunk: nothing else can follow
            assert r.data("message") == [i for i, (_, status) in enumerate(results) if status == 202]


async def test_redis_rate_limiter_fails_open_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    from service.ratelimit import RedisRateLimiter

    limiter = RedisRateLimiter(f"redis://127.0.0.1:{free_port()}/0", "sse", rate=1)
    try:
        with caplog.at_level("WARNING", logger="service.ratelimit"):
            assert [await limiter.hit("ip:1.2.3.4") for _ in range(3)] == [None, None, None]
        assert limiter.failures == 3
        assert len([r for r in caplog.records if "not rate limited" in r.getMessage()]) == 1  # logged, not flooded
    finally:
        await limiter.close()


async def test_memory_limiter_charges_batches_and_forgets_idle_clients() -> None:
    from service.ratelimit import MemoryRateLimiter

    now = [100.0]
    limiter = MemoryRateLimiter(rate=10, clock=lambda: now[0])
    assert await limiter.hit("a", cost=25) is None  # a full bucket lets a big batch through once...
    wait = await limiter.hit("a")
    # ...and then the client owes it: 25 messages at 10/s, less the burst of 10 it may always have in hand
    assert wait is not None and wait == pytest.approx(1.6, abs=0.01)
    now[0] += 1.5
    assert await limiter.hit("a") is not None
    now[0] += 0.1
    assert await limiter.hit("a") is None
    # a burst of 10 at once, the 11th waits a tenth of a second
    assert [await limiter.hit("burst") for _ in range(10)] == [None] * 10
    assert await limiter.hit("burst") == pytest.approx(0.1)
    limiter._PRUNE_AT = 3  # type: ignore[misc]
    for name in "bcd":
        await limiter.hit(name)
    now[0] += 60
    await limiter.hit("e")
    assert set(limiter._tat) == {"e"}


@pytest.mark.parametrize(("env", "says"), [
    ({"PUBLISH_RATE_LIMIT": "-1"}, "PUBLISH_RATE_LIMIT"),
])
def test_bad_limit_settings_stop_the_service_with_what_to_do(env: dict[str, str], says: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(says)):
        Settings.from_env(env)


# -- streams -----------------------------------------------------------------------------------------------------------


async def test_streams_per_client_limit_is_429_and_instance_capacity_is_200_retry() -> None:
    async with serve(max_streams_per_client=2) as s, httpx.AsyncClient(base_url=s.url) as c:
        async with SSEStream(f"{s.url}/channels/chat/events") as a, SSEStream(f"{s.url}/events?channel=chat"):
            resp = await c.get("/server/events")
            assert resp.status_code == 429 and resp.json()["error"]["code"] == "too_many_streams"
            assert resp.headers["retry-after"]
            assert len(s.relay.streams) == 2
            # another client is not affected
            async with SSEStream(f"{s.url}/channels/chat/events", headers=bearer(token(sub="dave"))):
                assert len(s.relay.streams) == 3
            await a.close()
            await eventually(lambda: s.relay.client_streams.get("ip:127.0.0.1", 0) == 1, 5,
                             "the closed stream no longer counted", every=0.02)
            async with SSEStream(f"{s.url}/channels/chat/events"):
                pass
    async with serve(max_streams=1) as s, httpx.AsyncClient(base_url=s.url) as c:
        async with SSEStream(f"{s.url}/channels/chat/events"):
            full = SSEStream(f"{s.url}/channels/chat/events", keep_raw=True).start()
            await asyncio.wait_for(full.ended.wait(), 5)  # ends by itself
            assert full.statuses == [200] and full.error is None
            body = bytes(full.raw or b"")
            assert body.startswith(b"retry: ") and b"relay.hello" not in body


# -- headers -----------------------------------------------------------------------------------------------------------


async def test_oversized_headers_get_431_before_anything_runs() -> None:
    async with serve(public_channels=("*",), max_header_bytes=4096) as s, httpx.AsyncClient(base_url=s.url) as c:
        resp = await c.post("/channels/t/messages", json={"data": 1}, headers={"Cookie": "a=" + "x" * 5000})
        assert resp.status_code == 431 and "MAX_HEADER_BYTES" in resp.json()["error"]["message"]
        assert (await c.get("/channels/t/events", headers={"X-Junk": "y" * 5000})).status_code == 431
        assert await s.history("t") == [] and s.relay.streams == set()
        assert (await c.post("/channels/t/messages", json={"data": 1}, headers={"Cookie": "a=b"})).status_code == 202


async def test_a_rate_charged_in_the_publish_refuses_without_publishing_or_charging(redis_server: RedisServer) -> None:
    """The broker's side of a publish that carries its publisher's rate (one Redis: the same script): within the
    burst it publishes and charges; over it, `RateLimited` with the wait, nothing published and nothing charged
    (the next publish in time passes); a repeat of an idempotent publish is charged like any other; a Cluster and
    the in-memory broker say they cannot take a charge, and refuse one rather than ignore it."""
    from service.broker.base import RateCharge, RateLimited
    from service.broker.memory import MemoryBroker
    from service.broker.redis import RedisBroker

    broker = RedisBroker(redis_server.url, prefix="t")
    sink = _NullSink()
    await broker.start(sink)
    try:
        assert broker.charges_rates
        charge = RateCharge("t:rl:client", interval_us=200_000, tolerance_us=400_000)  # 5/s, burst 2
        first = await broker.publish("ch", b"1", charge=charge)
        await broker.publish("ch", b"2", charge=charge)
        with pytest.raises(RateLimited) as refused:
            await broker.publish("ch", b"3", charge=charge)
        assert 0.05 < refused.value.wait <= 0.2
        page = await broker.history("ch", None, 10)
        assert [bytes(m.data) for m in page.messages] == [b"1", b"2"]
        await asyncio.sleep(refused.value.wait + 0.01)
        await broker.publish("ch", b"4", charge=charge)  # the refused one took nothing of the budget
        other = RateCharge("t:rl:other", interval_us=200_000, tolerance_us=200_000)
        await broker.publish("ch", b"5", charge=other)
        with pytest.raises(RateLimited):
            await broker.publish("ch", b"5", charge=other)
        plain = await broker.publish("ch", b"6")  # no charge: the script skips the rate
        assert plain.id > first.id
    finally:
        await broker.close()
    memory = MemoryBroker()
    assert not memory.charges_rates
    with pytest.raises(ValueError):
        await memory.publish("ch", b"1", charge=RateCharge("k", 1.0, 1.0))
    assert not RedisBroker("redis+cluster://127.0.0.1:1").charges_rates


class _NullSink:
    def dispatch(self, message: object) -> None: ...

    def reset(self, channel: str, reason: str, epoch: str | None = None) -> None: ...

    def established(self, channel: str, position: object) -> None: ...


@pytest.mark.redis
@pytest.mark.timeout(120)
async def test_the_rate_charged_in_each_publish_holds_for_hundreds_of_clients_at_once(
        redis_server: RedisServer, tmp_path: Path) -> None:
    """At a chat's scale: 200 clients, each from its own address and on its own keep-alive connection, send 25
    publishes one at a time, all at once, into 200 rooms, against two replicas sharing one Redis (each client
    alternates between them). The rate is charged inside each publish's own script: every client gets its burst
    and what the rate refilled meanwhile, never more; every refusal is a JSON 429 with its wait; history holds
    exactly the accepted messages (the total over all rooms; three rooms read back whole, in order)."""
    rate, clients, each = 5, 200, 25
    env = {"REDIS_URL": redis_server.url, "PUBLISH_RATE_LIMIT": str(rate), "PUBLIC_CHANNELS": "*",
           "MAX_CONNECTIONS_PER_CLIENT": "0"}
    with replicas(tmp_path, env, "rls0", "rls1") as group:

        async def client(i: int) -> tuple[list[int], float]:
            accepted: list[int] = []
            source = f"127.0.{1 + i // 250}.{2 + i % 250}"
            transport = httpx.AsyncHTTPTransport(local_address=source)
            async with httpx.AsyncClient(transport=transport, timeout=20) as c:
                started = time.monotonic()
                for n in range(each):
                    url = f"{group[n % 2].url}/channels/rls_{i}/messages"
                    resp = await c.post(url, json={"data": n})
                    if resp.status_code == 202:
                        accepted.append(n)
                        continue
                    assert resp.status_code == 429, (resp.status_code, resp.text)
                    body = resp.json()
                    assert body["error"]["code"] and body["error"]["retry_after_ms"] > 0 and resp.headers["Retry-After"]
                return accepted, time.monotonic() - started

        results = await asyncio.wait_for(asyncio.gather(*(client(i) for i in range(clients))), 90)
        async with httpx.AsyncClient(timeout=20) as c:
            for i, (accepted, elapsed) in enumerate(results):
                # Never more than its budget allowed over its own time (the budget shared by both replicas is
                # tested exactly by test_rate_limit_holds_across_replicas; here: the scale, and the history).
                assert rate <= len(accepted) <= rate + int(rate * elapsed) + 1, (i, accepted, elapsed)
                history = await c.get(f"{group[i % 2].url}/channels/rls_{i}")
                assert history.status_code == 200
        for i in (0, 77, 199):
            accepted = results[i][0]
            async with SSEStream(f"{group[1].url}/channels/rls_{i}/events?last_event_id=0") as r:
                await r.wait_count(len(accepted))
                assert r.data("message") == accepted
        total = sum(len(a) for a, _ in results)
        lengths = subprocess.run(["redis-cli", "-p", str(redis_server.port), "EVAL",
                                  "local n = 0 for _, k in ipairs(redis.call('KEYS', 'sse:{rls_*}:log')) do "
                                  "n = n + redis.call('XLEN', k) end return n", "0"],
                                 capture_output=True, text=True, check=True).stdout.split()
        assert int(lengths[0]) == total, "exactly the accepted publishes are in history"
