"""HAProxy and Caddy as tested deployments, like nginx in tests/test_load_balancer.py: Debian's own binaries run
the shipped deploy/haproxy/haproxy.cfg and deploy/caddy/Caddyfile in front of three `python -m service` replicas
on one redis-server, all on loopback. Every test runs once per balancer (the `balancer` parameter).

The configs are templated for addresses and timeouts only (each file's header lists the exact strings): the
timeouts that govern a stream and an idle connection are cut from an hour / a minute to a few seconds, so that
"longer than the proxy's timeout" takes seconds here. What is checked, per balancer:

- a stream stays open while idle for 3x the proxy's stream timeout, kept alive by heartbeats; and a replica
  whose heartbeat is slower than that timeout has its quiet stream cut by the proxy (the timeout is real);
- events arrive unbuffered: publish-to-receive through the proxy within a few ms of direct (medians);
- publishes on a keep-alive pool through the proxy never fail across idle gaps longer than the proxy's and
  the relay's keep-alive timeouts (which side closed the idle connections is counted from TIME-WAIT);
- a forged X-Forwarded-For does not escape the per-client limits (TRUST_PROXY_HEADERS = the proxy);
- SIGTERM of a replica: its clients resume on the others through the proxy, nothing lost or doubled.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import httpx
import pytest

from .sse import SSEStream, open_streams, wait_all
from .support import ROOT, RedisServer, ServiceProcess, eventually, free_port, wait_port
from .test_proxy_keepalive import _ESTABLISHED, _TIME_WAIT, tcp_sockets
from .test_proxy_trust import RATE, STREAMS, _assert_streams_limited, _client, _forged_publishes, _streams

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(120)]

REPLICAS = 3
HEARTBEAT = 1.0  # HEARTBEAT_INTERVAL of the replicas
STREAM_TIMEOUT = 3  # the proxy's stream inactivity timeout, templated down from 1 h
CLIENT_IDLE = 2  # the proxy's idle keep-alive timeout towards clients, templated down from 60 s
UPSTREAM_IDLE = 2  # how long the proxy keeps an idle connection to a replica, templated down from 5 s / 60 s
RELAY_KEEPALIVE = 4  # the replicas' KEEPALIVE_TIMEOUT: above UPSTREAM_IDLE, as 75 s is above 60 s when shipped


# -- the balancers ----------------------------------------------------------------------------------------------


def render(config: Path, rules: list[tuple[str, str]]) -> str:
    """The shipped config with exactly the substitutions its header comment lists, each found exactly once
    outside comments (the header quotes the same strings), so a change to the shipped file that breaks the
    templating fails here instead of testing something else. A rule may span lines (a block)."""
    text = config.read_text()
    for old, new in rules:
        hits = []
        at = text.find(old)
        while at >= 0:
            line_start = text.rfind("\n", 0, at) + 1
            if "#" not in text[line_start:at]:
                hits.append(at)
            at = text.find(old, at + 1)
        assert len(hits) == 1, f"{config}: {old!r} found {len(hits)} times outside comments; the templating needs 1"
        text = text[:hits[0]] + new + text[hits[0] + len(old):]
    return text


class Balancer:
    """One balancer process with its shipped config templated into a temp dir; its output in a log there."""

    name: ClassVar[str]
    config: ClassVar[Path]
    binary: ClassVar[str]

    def __init__(self, upstream_ports: list[int], stream_timeout: float = STREAM_TIMEOUT) -> None:
        found = shutil.which(self.binary) or shutil.which(self.binary, path="/usr/sbin")
        if found is None:
            raise RuntimeError(f"{self.binary} is not installed: run scripts/test (apt-get install {self.binary})")
        self.exe = found
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix=f"sse-relay-{self.name}-"))
        self.conf = self.dir / self.config.name
        self.conf.write_text(render(self.config, self.rules(upstream_ports, stream_timeout)))
        self.log_path = self.dir / "output.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def rules(self, upstream_ports: list[int], stream_timeout: float) -> list[tuple[str, str]]:
        raise NotImplementedError

    def command(self) -> list[str]:
        raise NotImplementedError

    def check_command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Balancer:
        check = subprocess.run(self.check_command(), capture_output=True, text=True, timeout=30, env=self.env())
        assert check.returncode == 0, f"{self.name} rejected the shipped config:\n{check.stdout}\n{check.stderr}"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=self.env())
        wait_port(self.port)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


class HAProxy(Balancer):
    name = "haproxy"
    config = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
    binary = "haproxy"

    def rules(self, upstream_ports: list[int], stream_timeout: float) -> list[tuple[str, str]]:
        servers = "\n    ".join(f"server relay{i + 1} 127.0.0.1:{p}" for i, p in enumerate(upstream_ports))
        return [
            ("bind :80", f"bind 127.0.0.1:{self.port}"),
            ("server-template relay 10 relay:8000", servers),
            ("timeout client 1h", f"timeout client {stream_timeout}s"),
            ("timeout server 1h", f"timeout server {stream_timeout}s"),
            ("timeout http-keep-alive 60s", f"timeout http-keep-alive {CLIENT_IDLE}s"),
            ("pool-purge-delay 5s", f"pool-purge-delay {UPSTREAM_IDLE}s"),
            ("inter 2s", "inter 500ms"),
            ("local0 warning", "local0 info"),  # one line per request, with its retries (the test reads them)
        ]

    def command(self) -> list[str]:
        return [self.exe, "-db", "-f", str(self.conf)]

    def check_command(self) -> list[str]:
        return [self.exe, "-c", "-q", "-f", str(self.conf)]


class Caddy(Balancer):
    name = "caddy"
    config = ROOT / "deploy" / "caddy" / "Caddyfile"
    binary = "caddy"

    def rules(self, upstream_ports: list[int], stream_timeout: float) -> list[tuple[str, str]]:
        return [
            ("http://:80 {", f"http://:{self.port} {{\n\tbind 127.0.0.1"),  # loopback only
            ("dynamic a relay 8000 {\n\t\t\trefresh 5s\n\t\t}", "to " + " ".join(f"127.0.0.1:{p}" for p in upstream_ports)),
            ("read_timeout 1h", f"read_timeout {stream_timeout}s"),
            ("idle 60s", f"idle {CLIENT_IDLE}s"),
            ("keepalive 60s", f"keepalive {UPSTREAM_IDLE}s"),
        ]

    def env(self) -> dict[str, str]:
        # Caddy keeps its state (autosaved config, certificates) under XDG dirs: the temp dir, not root's home.
        return {**os.environ, "HOME": str(self.dir), "XDG_DATA_HOME": str(self.dir / "data"),
                "XDG_CONFIG_HOME": str(self.dir / "config")}

    def command(self) -> list[str]:
        return [self.exe, "run", "--config", str(self.conf), "--adapter", "caddyfile"]

    def check_command(self) -> list[str]:
        return [self.exe, "validate", "--config", str(self.conf), "--adapter", "caddyfile"]


BALANCERS: dict[str, type[Balancer]] = {"haproxy": HAProxy, "caddy": Caddy}


# -- the topology -----------------------------------------------------------------------------------------------


@dataclass
class Topology:
    redis: RedisServer
    replicas: list[ServiceProcess]
    proxy: Balancer
    tmp: Path

    def logs(self) -> str:
        return "\n".join([f"--- {self.proxy.name}\n{self.proxy.log()}",
                          *(f"--- {r.name}\n{r.log()[-1500:]}" for r in self.replicas)])


def start_replicas(tmp: Path, n: int, **env: str) -> list[ServiceProcess]:
    replicas = [ServiceProcess(tmp, env={"LOG_LEVEL": "warning", **env}, name=f"relay-{i + 1}-{free_port()}")
                for i in range(n)]
    for r in replicas:
        r.start(wait_ready=False)
    for r in replicas:
        r.wait_ready()
    return replicas


@pytest.fixture(scope="module", params=list(BALANCERS))
def topology(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    tmp = tmp_path_factory.mktemp(request.param)
    redis = RedisServer(tmp / "redis")
    redis.dir.mkdir()
    redis.start()
    replicas: list[ServiceProcess] = []
    proxy: Balancer | None = None
    try:
        replicas = start_replicas(tmp, REPLICAS, REDIS_URL=redis.url, HEARTBEAT_INTERVAL=str(HEARTBEAT),
                                  KEEPALIVE_TIMEOUT=str(RELAY_KEEPALIVE), DRAIN_GRACE="2", RETRY_MS="300")
        proxy = BALANCERS[request.param]([r.port for r in replicas]).start()
        yield Topology(redis, replicas, proxy, tmp)
    finally:
        if proxy is not None:
            proxy.stop()
        for r in replicas:
            r.kill()
        redis.stop()


async def publish(http: httpx.AsyncClient, channel: str, data: object) -> str:
    resp = await http.post(f"/channels/{channel}/messages", json={"data": data})
    assert resp.status_code == 202, (resp.status_code, resp.text)
    return str(resp.json()["id"])


async def publish_retrying(http: httpx.AsyncClient, channel: str, data: object, key: str,
                           retried: Counter[str], within: float = 15.0) -> str:
    """What a producer should do behind any balancer: resend a publish that got 502/503 or no answer, with the
    same Idempotency-Key, so a resend of one that did go through returns the first id instead of a copy.
    `retried` counts the resends by cause; `within` covers Caddy's fail_duration (see deploy/caddy/Caddyfile)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            resp = await http.post(f"/channels/{channel}/messages", json={"data": data},
                                   headers={"Idempotency-Key": key})
        except httpx.TransportError as exc:
            retried[type(exc).__name__] += 1
        else:
            if resp.status_code == 202:
                return str(resp.json()["id"])
            assert resp.status_code in (502, 503), (resp.status_code, resp.text)
            retried[str(resp.status_code)] += 1
        await asyncio.sleep(0.1)
    raise AssertionError(f"{key} not accepted within {within}s: {dict(retried)}")


# -- the tests --------------------------------------------------------------------------------------------------


async def test_idle_streams_outlive_the_proxy_timeout_by_heartbeats_and_without_them_are_cut(
    topology: Topology,
) -> None:
    """Quiet streams through the proxy stay open for 3x its stream timeout (heartbeats every HEARTBEAT s keep
    resetting it); the same config in front of a replica whose heartbeat is slower than the timeout cuts a
    quiet stream at about the timeout, so the timeout under test is live."""
    slow = start_replicas(topology.tmp, 1, REDIS_URL=topology.redis.url, HEARTBEAT_INTERVAL="60")[0]
    control = BALANCERS[topology.proxy.name]([slow.port]).start()
    try:
        quiet = [SSEStream(f"{topology.proxy.url}/channels/idle/events") for _ in range(3)]
        cut = SSEStream(f"{control.url}/channels/idle/events")
        await open_streams([*quiet, cut], 10)
        opened = time.monotonic()
        pings_needed = int(3 * STREAM_TIMEOUT / HEARTBEAT) + 1  # the first comes about HEARTBEAT after opening
        # the control's stream ends first, at about the timeout; the quiet ones outlive 3x it
        await eventually(lambda: cut.ended.is_set(), STREAM_TIMEOUT + 5, f"the control stream cut: {cut!r}",
                         on=cut.changed)
        cut_after = time.monotonic() - opened
        await wait_all(quiet, lambda s: s.comments >= pings_needed, 3 * STREAM_TIMEOUT + 5,
                       f"{pings_needed} heartbeats")
        idle_for = time.monotonic() - opened
        async with httpx.AsyncClient(base_url=topology.proxy.url, timeout=10) as http:
            mid = await publish(http, "idle", "still there")
        await wait_all(quiet, lambda s: mid in s.ids(), 5, "a message after the idle time")
        assert idle_for >= 3 * STREAM_TIMEOUT
        for s in quiet:
            assert s.connects == 1 and not s.ended.is_set(), s
        print(f"\n{topology.proxy.name}: 3 streams idle {idle_for:.1f}s through a {STREAM_TIMEOUT}s stream timeout "
              f"(heartbeat {HEARTBEAT:g}s), still open; heartbeat 60s: cut after {cut_after:.1f}s")
        assert STREAM_TIMEOUT - 0.5 <= cut_after <= STREAM_TIMEOUT + 3, cut_after
        await asyncio.gather(*(s.close() for s in [*quiet, cut]))
    finally:
        control.stop()
        slow.kill()


async def test_events_arrive_unbuffered_within_a_few_ms_of_direct(topology: Topology) -> None:
    """The same messages read by streams straight from each replica and by streams through the proxy: the
    medians of publish-to-receive differ by a few ms at most (a buffering proxy would hold them)."""
    channel = "latency"
    direct = [SSEStream(f"{r.url}/channels/{channel}/events") for r in topology.replicas]
    proxied = [SSEStream(f"{topology.proxy.url}/channels/{channel}/events") for _ in range(REPLICAS)]
    await open_streams([*direct, *proxied], 10)
    try:
        # heartbeats (a few bytes each) cross the proxy on their own, every HEARTBEAT
        await wait_all(proxied, lambda s: s.comments >= 2, 5 * HEARTBEAT, "two heartbeats")
        gaps = [b - a for s in proxied for a, b in zip(s.comments_at, s.comments_at[1:])]
        assert max(gaps) < HEARTBEAT + 0.5, gaps
        sent: list[float] = []
        async with httpx.AsyncClient(base_url=topology.replicas[0].url, timeout=10) as http:
            for i in range(30):
                sent.append(time.time())
                await publish(http, channel, i)
                await wait_all([*direct, *proxied], lambda s, n=i + 1: len(s.events) >= n, 5, f"message {i}")

        def latencies(streams: list[SSEStream]) -> list[float]:
            return [s.events[i].at - t for s in streams for i, t in enumerate(sent)]

        via, straight = latencies(proxied), latencies(direct)
        med_via, med_straight = statistics.median(via), statistics.median(straight)
        print(f"\n{topology.proxy.name}: publish -> event median {med_via * 1000:.2f} ms through the proxy, "
              f"{med_straight * 1000:.2f} ms direct (+{(med_via - med_straight) * 1000:.2f} ms); "
              f"max {max(via) * 1000:.1f} / {max(straight) * 1000:.1f} ms ({len(via)} samples each)")
        assert med_via - med_straight < 0.005, (med_via, med_straight)
        for s in proxied:
            assert s.data() == list(range(30))
    finally:
        await asyncio.gather(*(s.close() for s in [*direct, *proxied]))


async def test_publishes_on_a_keepalive_pool_survive_idle_gaps_longer_than_the_keepalive_timeouts(
    topology: Topology,
) -> None:
    """A publisher with a pool of keep-alive connections through the proxy: bursts separated by idle gaps
    between the proxy's upstream keep-alive and the relay's (the proxy closes), and longer than every timeout
    (client side included). Every publish is answered 202: no 502 from a connection closed under a request."""
    burst = 20
    answers: Counter[int | str] = Counter()
    gaps = [UPSTREAM_IDLE + 1.0, RELAY_KEEPALIVE + 1.5, UPSTREAM_IDLE + 1.0, RELAY_KEEPALIVE + 1.5]
    ports = {r.port for r in topology.replicas}
    closed_by_relay = closed_by_proxy = 0
    limits = httpx.Limits(max_connections=burst, max_keepalive_connections=burst, keepalive_expiry=3600)
    async with httpx.AsyncClient(base_url=topology.proxy.url, timeout=10, limits=limits) as http:

        async def one(tag: str) -> None:
            try:
                resp = await http.post("/channels/keepalive/messages", json={"data": tag})
                answers[resp.status_code] += 1
            except httpx.HTTPError as exc:
                answers[type(exc).__name__] += 1

        await asyncio.gather(*(one(f"warm-{i}") for i in range(burst)))
        for n, gap in enumerate(gaps):
            upstream = {c for c in tcp_sockets(_ESTABLISHED) if c[1] in ports}  # the proxy's idle connections
            await asyncio.sleep(gap)  # the idle gap is what is tested
            waiting = set(tcp_sockets(_TIME_WAIT))
            closed_by_proxy += len(upstream & waiting)
            closed_by_relay += sum(1 for c in waiting if c[0] in ports and (c[1], c[0]) in upstream)
            await asyncio.gather(*(one(f"gap{n}-{i}") for i in range(burst)))
    print(f"\n{topology.proxy.name}: {sum(answers.values())} publishes over a keep-alive pool, idle gaps {gaps} s "
          f"(proxy upstream idle {UPSTREAM_IDLE}s, client idle {CLIENT_IDLE}s, relay KEEPALIVE_TIMEOUT "
          f"{RELAY_KEEPALIVE}s): answers {dict(answers)}; idle upstream connections closed by the proxy "
          f"{closed_by_proxy}, by the relay {closed_by_relay}")
    assert answers == {202: burst * (len(gaps) + 1)}, f"{dict(answers)}\n{topology.logs()}"


async def test_haproxy_resends_a_publish_the_relay_closed_its_connection_under(tmp_path: Path) -> None:
    """HAProxy keeps idle connections to a replica until the relay closes them (see haproxy.cfg), so the relay's
    close can cross a request HAProxy sends on one. The race is widened as in tests/test_proxy_keepalive.py: the
    replica (KEEPALIVE_TIMEOUT=1) is paused across its keep-alive deadline while HAProxy sends a burst of
    publishes on its idle connections. `retry-on empty-response` with `option http-buffer-request` resends them
    (HAProxy's log counts the retries); a few may still fail (closed without an answer, never stored: the
    client may resend them, with an Idempotency-Key to be safe). Every publish answered 202 is stored exactly
    once, nothing else is."""
    replica = start_replicas(tmp_path, 1, KEEPALIVE_TIMEOUT="1")[0]
    proxy = HAProxy([replica.port]).start()
    burst, rounds = 20, 6
    keys: list[str] = []
    accepted: list[str] = []
    failed: list[str] = []
    closed_by_relay: set[tuple[int, int]] = set()
    try:
        async with httpx.AsyncClient(base_url=proxy.url, timeout=20) as http:

            async def send(tag: str) -> None:
                async def one(key: str) -> None:
                    keys.append(key)
                    try:
                        resp = await http.post("/channels/race/messages", json={"data": key})
                    except httpx.HTTPError as exc:
                        failed.append(f"{key}: {exc!r}")
                        return
                    if resp.status_code == 202:
                        accepted.append(key)
                    else:
                        failed.append(f"{key}: {resp.status_code} {resp.text[:100]}")

                await asyncio.gather(*(one(f"{tag}-{i}") for i in range(burst)))

            for n in range(rounds):
                await send(f"warm{n}")
                await asyncio.sleep(0.9)  # just before the replica's 1 s keep-alive deadline
                replica.signal(signal.SIGSTOP)
                try:
                    await asyncio.sleep(0.2)  # the deadline passes while the replica cannot act on it
                    sent = asyncio.create_task(send(f"paused{n}"))
                    await asyncio.sleep(0.1)  # HAProxy has written the requests on its idle connections
                finally:
                    replica.signal(signal.SIGCONT)
                await sent
                closed_by_relay |= {c for c in tcp_sockets(_TIME_WAIT) if c[0] == replica.port}
                await asyncio.sleep(0.2)
        # the channel's history, straight from the replica: a marker published last ends it
        async with httpx.AsyncClient(base_url=replica.url, timeout=10) as http:
            assert (await http.post("/channels/race/messages", json={"data": "end"})).status_code == 202
        async with SSEStream(f"{replica.url}/channels/race/events?last_event_id=0") as reader:
            await reader.wait(lambda r: "end" in r.data(), 10, "the history up to the marker")
            stored = reader.data()[:-1]
        # httplog: after the termination state, "actconn/feconn/beconn/srv_conn/retries" ("+N": redispatched)
        haproxy_log = proxy.log_path.read_text()
        retries = [int(m.group(1).lstrip("+")) for m in re.finditer(r" [-\w]{4} \d+/\d+/\d+/\d+/(\+?\d+) .*race/messages",
                                                                  haproxy_log)]
        retried = sum(1 for r in retries if r > 0)
    finally:
        proxy.stop()
        replica.kill()
    print(f"\nhaproxy, relay KEEPALIVE_TIMEOUT=1 paused across its deadline ({rounds} rounds of {burst}): "
          f"{len(keys) - len(failed)} of {len(keys)} publishes 202, {retried} retried by HAProxy, "
          f"connections closed by the relay {len(closed_by_relay)}; failed: {failed[:3]}")
    assert closed_by_relay and retried > 0, "the race did not happen: nothing was tested"
    assert len(failed) <= len(keys) // 50, f"{len(failed)} failed: {failed[:5]}"  # 26-56 of 240 without the option
    doubled = [k for k, n in Counter(stored).items() if n > 1]
    assert not doubled and set(accepted) <= set(stored) <= set(keys), (len(stored), doubled[:5])


async def test_forged_forwarded_for_through_the_proxy_is_still_limited(topology: Topology) -> None:
    """Two replicas trusting only the proxy's address, PUBLISH_RATE_LIMIT and MAX_STREAMS_PER_CLIENT low. A
    client at 127.0.0.2 forging X-Forwarded-For on every request through the proxy (HAProxy appends the peer to
    it, Caddy overwrites it) is limited as 127.0.0.2; another client keeps budgets of its own."""
    replicas = start_replicas(topology.tmp, 2, REDIS_URL=topology.redis.url, TRUST_PROXY_HEADERS="127.0.0.1",
                              PUBLISH_RATE_LIMIT=str(RATE), MAX_STREAMS_PER_CLIENT=str(STREAMS),
                              MAX_CONNECTIONS_PER_CLIENT="2")
    proxy = BALANCERS[topology.proxy.name]([r.port for r in replicas]).start()
    try:
        async with _client(proxy.url, "127.0.0.2") as mallory:
            codes = await _forged_publishes(mallory, "forged")
            async with _streams(mallory, "/channels/forged/events", 12) as responses:
                _assert_streams_limited(responses, STREAMS * len(replicas))  # MAX_STREAMS_PER_CLIENT is per replica
                async with _client(proxy.url, "127.0.0.3") as alice:
                    assert (await alice.post("/channels/forged/messages", json={"data": "a"})).status_code == 202
                    async with _streams(alice, "/channels/forged/events", 3) as theirs:
                        assert [r.status_code for r in theirs] == [200] * 3
        keys = subprocess.run(["redis-cli", "-p", str(topology.redis.port), "--scan", "--pattern", "sse:rl:*"],
                              capture_output=True, text=True, check=True, timeout=10).stdout.split()
        assert sorted(keys) == ["sse:rl:ip:127.0.0.2", "sse:rl:ip:127.0.0.3"], keys
        print(f"\n{proxy.name}: {len(codes)} publishes forging X-Forwarded-For: {dict(Counter(codes))}; "
              f"12 forged streams: {dict(Counter(r.status_code for r in responses))}; rate-limit keys {keys}")
    finally:
        proxy.stop()
        for r in replicas:
            r.kill()


async def test_a_drained_replica_hands_its_clients_to_the_others_through_the_proxy(topology: Topology) -> None:
    """SIGTERM one replica while messages are published through the proxy: its streams end with `retry:`, the
    clients reconnect through the proxy with Last-Event-ID and land on the other replicas, and every client has
    every message exactly once, in order. The publisher resends a 502/503 with its Idempotency-Key, as a producer
    should (Caddy cannot resend a POST the draining replica's connection dropped; the resends are printed).
    Runs last for each balancer: it stops a replica."""
    channel = "drain"
    victim = topology.replicas[0]
    clients = [SSEStream(f"{topology.proxy.url}/channels/{channel}/events", reconnect=True, persistent=True,
                         retry_delay=0.3) for _ in range(30)]
    await open_streams(clients, 15)
    on_victim = [c for c in clients if c.instance == victim.name]
    assert on_victim, f"no stream on {victim.name}: {Counter(c.instance for c in clients)}"
    ids: list[str] = []
    retried: Counter[str] = Counter()
    async with httpx.AsyncClient(base_url=topology.proxy.url, timeout=10) as http:
        ids.append(await publish(http, channel, 0))
        await wait_all(clients, lambda c: len(c.events) >= 1, 10, "the first message")
        victim.signal(signal.SIGTERM)
        for i in range(1, 30):
            ids.append(await publish_retrying(http, channel, i, f"drain-{i}", retried))
            await asyncio.sleep(0.1)  # spread over the drain (DRAIN_GRACE=2)
        assert await asyncio.to_thread(victim.wait, 15) == 0, victim.log()
        end = await publish_retrying(http, channel, "end", "drain-end", retried)
        try:
            await wait_all(clients, lambda c: end in c.ids(), 20, "the last message")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{topology.logs()}") from None
    try:
        for c in clients:
            assert c.ids() == [*ids, end], f"first on {c.instances[0]}: {len(c.ids())} of {len(ids) + 1}"
            assert c.resets == []
        moved = [c for c in clients if len(c.instances) > 1]
        assert {c.instances[0] for c in moved} == {victim.name}, "only the drained replica's clients move"
        assert all(c.instance != victim.name for c in clients)
        landed = Counter(c.instance for c in moved)
        print(f"\n{topology.proxy.name}: drained {victim.name} (exit 0); {len(moved)} of {len(clients)} streams "
              f"moved, resumed on {dict(landed)}; 31 messages each, 0 lost, 0 doubled; connects of the moved "
              f"{sorted(c.connects for c in moved)}; publishes resent by the producer {dict(retried) or 0}")
    finally:
        await asyncio.gather(*(c.close() for c in clients))


def test_the_templating_rules_match_the_shipped_configs() -> None:
    """Fast, without processes: every rule of each balancer applies to exactly one directive line."""
    for kind in BALANCERS.values():
        proxy = kind([1, 2, 3])
        try:
            text = proxy.conf.read_text()
            assert "127.0.0.1:1" in text and "127.0.0.1:3" in text
        finally:
            shutil.rmtree(proxy.dir, ignore_errors=True)

