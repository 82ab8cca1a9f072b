"""A client cannot choose its identity: `X-Forwarded-For` counts only from the proxies in TRUST_PROXY_HEADERS.

The per-client limits (PUBLISH_RATE_LIMIT, MAX_STREAMS_PER_CLIENT) key on the client's address when it has no
token. These tests forge `X-Forwarded-For` on real `python -m service` processes: from loopback with no proxy
trusted, from an untrusted peer with a proxy trusted, through a trusted proxy that appends to the header, and
through the shipped nginx (tests/test_load_balancer.py's topology) in front of two replicas on one Redis. Every
time the limits still hold. Distinct real clients are distinct source addresses on loopback (127.0.0.2, ...:
Linux routes all of 127/8 to `lo`), so "the proxy's address", "the real client's" and "a forged one" differ.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from starlette.requests import Request

from service.clients import TrustedProxies, client_ip
from service.config import ConfigError, Settings

from .support import Nginx, RedisServer, ServiceProcess

pytestmark = pytest.mark.timeout(90)

RATE = 2  # PUBLISH_RATE_LIMIT: 2/s in bursts of 2
STREAMS = 3  # MAX_STREAMS_PER_CLIENT
FORGED = 30


# -- the setting ------------------------------------------------------------------------------------------------


def test_trust_proxy_headers_is_a_list_of_addresses_and_networks() -> None:
    def networks(raw: str) -> list[str]:
        return [str(n) for n in Settings.from_env({"TRUST_PROXY_HEADERS": raw}).trusted_proxy_networks()]

    assert Settings.from_env({}).trusted_proxy_networks() == ()
    assert networks("false") == [] and networks("off") == []  # the old "trust nobody" keeps meaning that
    assert networks("10.0.0.0/8, 127.0.0.1,fd00::/8 , ::1") == ["10.0.0.0/8", "127.0.0.1/32", "fd00::/8", "::1/128"]
    assert networks("[::1]") == ["::1/128"]
    for raw, hint in (
        ("true", "List the addresses or CIDRs"),
        ("yes", "TRUST_PROXY_HEADERS=10.0.0.0/8"),
        ("*", "choose its own identity"),
        ("10.0.0.0/8,true", "List the addresses"),
        ("10.0.0.1/8", "host bits set"),
        ("proxy.internal", "not an IP address or CIDR"),
        ("10.0.0.0/8 127.0.0.1", "comma-separated"),
    ):
        with pytest.raises(ConfigError, match="TRUST_PROXY_HEADERS") as err:
            Settings.from_env({"TRUST_PROXY_HEADERS": raw})
        assert hint in str(err.value), (raw, str(err.value))
    with pytest.raises(ConfigError, match="List the addresses"):
        Settings.from_env({}, trust_proxy_headers=True)  # embedders passing the old bool get the same answer
    assert Settings.from_env({}, trust_proxy_headers=False).trusted_proxy_networks() == ()


def _request(peer: str | None, *forwarded: str) -> Request:
    headers = [(b"x-forwarded-for", value.encode()) for value in forwarded]
    return Request({"type": "http", "method": "GET", "path": "/", "headers": headers,
                    "client": (peer, 40000) if peer else None})


def test_client_ip_walks_x_forwarded_for_from_the_right_and_only_from_trusted_peers() -> None:
    import ipaddress

    proxies = TrustedProxies([ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("127.0.0.1/32")])
    nobody = TrustedProxies()
    cases = [
        # (peer, X-Forwarded-For headers, trusted, client)
        ("127.0.0.1", ["6.6.6.6"], nobody, "127.0.0.1"),  # nobody trusted: the header means nothing
        ("203.0.113.9", ["6.6.6.6"], proxies, "203.0.113.9"),  # an untrusted peer: its header means nothing
        ("127.0.0.1", [], proxies, "127.0.0.1"),  # a trusted peer without the header is the client itself
        ("127.0.0.1", ["198.51.100.7"], proxies, "198.51.100.7"),  # a proxy that overwrites
        ("127.0.0.1", ["6.6.6.6, 198.51.100.7"], proxies, "198.51.100.7"),  # one that appends: not the leftmost
        ("127.0.0.1", ["6.6.6.6, 198.51.100.7, 10.1.2.3"], proxies, "198.51.100.7"),  # two trusted hops skipped
        ("127.0.0.1", ["6.6.6.6", "198.51.100.7, 10.1.2.3"], proxies, "198.51.100.7"),  # repeated header lines
        ("127.0.0.1", ["10.0.0.5, 10.0.0.6"], proxies, "10.0.0.5"),  # all trusted: the farthest one
        ("127.0.0.1", ["6.6.6.6, not-an-ip"], proxies, "127.0.0.1"),  # garbage ends the walk at the last trusted
        ("127.0.0.1", ["6.6.6.6, bogus, 10.1.2.3"], proxies, "10.1.2.3"),
        ("127.0.0.1", ["6.6.6.6, "], proxies, "127.0.0.1"),  # an empty hop is no address either
        ("127.0.0.1", ["198.51.100.7:5555"], proxies, "198.51.100.7"),  # ports, as some proxies write them
        ("127.0.0.1", ["[2001:db8::1]:443"], proxies, "2001:db8::1"),
        ("127.0.0.1", ["2001:DB8:0::1"], proxies, "2001:db8::1"),  # normalised: one client, one bucket
        ("::ffff:10.9.9.9", ["198.51.100.7"], proxies, "198.51.100.7"),  # an IPv4-mapped peer is its IPv4
        (None, ["198.51.100.7"], proxies, "unknown"),
    ]
    for peer, forwarded, trusted, expected in cases:
        assert client_ip(_request(peer, *forwarded), trusted) == expected, (peer, forwarded, trusted)
    assert "10.200.0.1" in proxies and "::ffff:10.200.0.1" in proxies and "127.0.0.2" not in proxies
    assert "garbage" not in proxies and "127.0.0.1" not in nobody and not nobody


# -- real processes on loopback ---------------------------------------------------------------------------------


def _client(url: str, source: str) -> httpx.AsyncClient:
    """An HTTP client whose connections come from `source` (a loopback address), i.e. a distinct real client."""
    return httpx.AsyncClient(base_url=url, timeout=10, transport=httpx.AsyncHTTPTransport(local_address=source))


async def _forged_publishes(client: httpx.AsyncClient, channel: str, forged: str = "10.9.8.{i}") -> list[int]:
    """FORGED publishes in a row, each claiming another address; asserts the rate limit held; the statuses."""
    started = time.monotonic()
    codes = []
    for i in range(FORGED):
        resp = await client.post(f"/channels/{channel}/messages", json={"data": i},
                                 headers={"X-Forwarded-For": forged.format(i=i)})
        codes.append(resp.status_code)
    elapsed = time.monotonic() - started
    # A burst of RATE, then RATE per second: whatever the forged header said.
    assert codes[0] == 202 and 429 in codes, codes
    assert set(codes) == {202, 429} and codes.count(202) <= RATE + math.ceil(RATE * elapsed), (codes, elapsed)
    return codes


@contextlib.asynccontextmanager
async def _streams(client: httpx.AsyncClient, path: str, n: int,
                   forged: str = "10.9.8.{i}") -> AsyncIterator[list[httpx.Response]]:
    """Opens n streams one after another, each claiming another address; yields the responses (open ones stay
    open until the block ends)."""
    responses: list[httpx.Response] = []
    try:
        for i in range(n):
            request = client.build_request("GET", path, headers={"X-Forwarded-For": forged.format(i=i)})
            responses.append(await client.send(request, stream=True))
        yield responses
    finally:
        for resp in responses:
            await resp.aclose()


def _assert_streams_limited(responses: list[httpx.Response], allowed: int) -> None:
    codes = [r.status_code for r in responses]
    assert codes.count(200) == allowed and codes.count(429) == len(codes) - allowed, codes
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.headers["content-type"].startswith("application/json")


@pytest.fixture
def relay_env() -> dict[str, str]:
    return {"PUBLISH_RATE_LIMIT": str(RATE), "MAX_STREAMS_PER_CLIENT": str(STREAMS), "PUBLIC_CHANNELS": "*",
            "LOG_LEVEL": "warning"}


@pytest.fixture
def service(tmp_path: Path, relay_env: dict[str, str], request: pytest.FixtureRequest) -> Iterator[ServiceProcess]:
    env = {**relay_env, **getattr(request, "param", {})}
    svc = ServiceProcess(tmp_path, env=env, name="trust").start()
    try:
        yield svc
    finally:
        svc.kill()


@pytest.mark.parametrize("service", [{"FORWARDED_ALLOW_IPS": "*"}], indirect=True)
async def test_forged_forwarded_for_from_loopback_is_ignored_when_no_proxy_is_trusted(
    service: ServiceProcess,
) -> None:
    """The default (TRUST_PROXY_HEADERS empty), with the FORWARDED_ALLOW_IPS=* the old compose file set: the
    issue's reproduction from 127.0.0.1 is limited, and the stale variable is named in the log."""
    assert "FORWARDED_ALLOW_IPS is ignored" in service.log()
    async with _client(service.url, "127.0.0.1") as c:
        await _forged_publishes(c, "forged")
        async with _streams(c, "/channels/forged/events", 20) as responses:
            _assert_streams_limited(responses, STREAMS)
            # Another real client has budgets of its own: the limits key on the real address.
            async with _client(service.url, "127.0.0.2") as other:
                assert (await other.post("/channels/forged/messages", json={"data": "b"})).status_code == 202
                async with _streams(other, "/channels/forged/events", 1) as theirs:
                    assert theirs[0].status_code == 200


@pytest.mark.parametrize("service", [{"TRUST_PROXY_HEADERS": "127.0.0.1", "MAX_CONNECTIONS_PER_CLIENT": "8"}],
                         indirect=True)
async def test_with_a_trusted_proxy_only_its_header_counts_and_only_its_rightmost_hops(
    service: ServiceProcess,
) -> None:
    """127.0.0.1 plays the proxy. A client connecting directly from 127.0.0.2 forges the header: ignored. The
    proxy appends the real client's address to what the client sent (as `$proxy_add_x_forwarded_for`,
    ingress-nginx or most L7 balancers do): the client is that rightmost address, never the forged leftmost."""
    async with _client(service.url, "127.0.0.2") as direct:
        await _forged_publishes(direct, "direct")
        async with _streams(direct, "/channels/direct/events", 6) as responses:
            _assert_streams_limited(responses, STREAMS)

    async with _client(service.url, "127.0.0.1") as proxy:
        await _forged_publishes(proxy, "appended", forged="10.9.8.{i}, 198.51.100.7")
        async with _streams(proxy, "/channels/appended/events", 6, forged="10.9.8.{i}, 198.51.100.7") as responses:
            _assert_streams_limited(responses, STREAMS)
        # The proxy's other clients are not punished for 198.51.100.7.
        ok = await proxy.post("/channels/appended/messages", json={"data": 1},
                              headers={"X-Forwarded-For": "10.9.8.1, 198.51.100.8"})
        assert ok.status_code == 202

        # MAX_CONNECTIONS_PER_CLIENT=8: the trusted proxy is exempt (its 12 connections carry 12 clients) ...
        async with _streams(proxy, "/channels/many/events", 12, forged="192.0.2.{i}") as responses:
            assert [r.status_code for r in responses] == [200] * 12
    # ... while an untrusted address gets 8 connections and no more.
    assert await _connections_served(service.port, "127.0.0.3", 12) == 8


async def _connections_served(port: int, source: str, n: int) -> int:
    """Opens n connections from `source` at once, then sends a request on each: how many get an answer."""
    conns = [await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0)) for _ in range(n)]

    async def ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        try:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n")
            await writer.drain()
            return (await asyncio.wait_for(reader.readline(), 10)).startswith(b"HTTP/1.1 200")
        except (ConnectionError, asyncio.IncompleteReadError):
            return False  # closed at once by the cap

    try:
        return sum(await asyncio.gather(*(ask(r, w) for r, w in conns)))
    finally:
        for _, writer in conns:
            writer.close()


# -- through the shipped nginx -----------------------------------------------------------------------------------


@pytest.mark.redis
@pytest.mark.slow
async def test_forged_forwarded_for_through_the_shipped_nginx_is_still_limited(tmp_path: Path,
                                                                             relay_env: dict[str, str]) -> None:
    """Two replicas on one Redis behind the shipped nginx, trusting nginx's address (127.0.0.1) only, as the
    compose file trusts its `lb`. Clients come from 127.0.0.2 and 127.0.0.3 and forge the header. The publish
    rate holds across both replicas (the limiter is in Redis, keyed on the real address); the streams limit holds
    per replica; nginx's own connections are exempt from MAX_CONNECTIONS_PER_CLIENT."""
    redis = RedisServer(tmp_path / "redis")
    redis.dir.mkdir()
    redis.start()
    env = {**relay_env, "REDIS_URL": redis.url, "TRUST_PROXY_HEADERS": "127.0.0.1", "MAX_CONNECTIONS_PER_CLIENT": "2"}
    replicas = [ServiceProcess(tmp_path, env=env, name=f"relay-{i + 1}") for i in range(2)]
    nginx: Nginx | None = None
    try:
        for r in replicas:
            r.start(wait_ready=False)
        for r in replicas:
            r.wait_ready()
        nginx = Nginx([r.port for r in replicas])
        nginx.start()

        async with _client(nginx.url, "127.0.0.2") as mallory:
            await _forged_publishes(mallory, "lb-forged")
            async with _streams(mallory, "/channels/lb-forged/events", 20) as responses:
                _assert_streams_limited(responses, STREAMS * len(replicas))
                per_replica = Counter(r.headers["x-relay-instance"] for r in responses if r.status_code == 200)
                assert per_replica == {r.name: STREAMS for r in replicas}, per_replica
                # A second real client, with streams of its own on both replicas: each replica now holds more
                # connections from nginx than MAX_CONNECTIONS_PER_CLIENT=2, and serves them all.
                async with _client(nginx.url, "127.0.0.3") as alice:
                    assert (await alice.post("/channels/lb-forged/messages", json={"data": "a"})).status_code == 202
                    async with _streams(alice, "/channels/lb-forged/events", 3) as theirs:
                        assert [r.status_code for r in theirs] == [200] * 3
        keys = subprocess.run(["redis-cli", "-p", str(redis.port), "--scan", "--pattern", "sse:rl:*"],
                              capture_output=True, text=True, check=True, timeout=10).stdout.split()
        assert sorted(keys) == ["sse:rl:ip:127.0.0.2", "sse:rl:ip:127.0.0.3"], keys
    finally:
        if nginx is not None:
            nginx.stop()
        for r in replicas:
            r.kill()
        redis.stop()
