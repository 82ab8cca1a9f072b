"""Sentinel master switches under traffic: a real primary, two replicas and three `redis-server --sentinel`s, one
relay instance on `redis+sentinel://…/mymaster`, a publish every 0.1 s for ~12 s around the switch.

- planned (`SENTINEL FAILOVER mymaster`): the old primary stays up and keeps answering as a master for ~10 s
  after Sentinel promoted the replica (until Sentinel demotes it), so a relay that keeps its connections there
  gets 202s from a server whose data is about to be thrown away. Asserted: 0 of the 202s missing from the new
  master's Stream, with and without `REDIS_WAIT_REPLICAS=1`, and the live stream got every one of them, no reset.
- crash (`kill -9` of the primary): with `REDIS_WAIT_REPLICAS=1`, 0 lost; without it Redis replication is
  asynchronous and the tail acknowledged just before the kill may be lost: counted, printed, and bounded to
  messages acknowledged in the last second before the kill.

Two replicas, as a deployment with `REDIS_WAIT_REPLICAS=1` needs: Sentinel re-points the other replica at the new
master during the failover, whereas the old primary becomes a replica only ~10 s later (planned) or when it is
back (crash); with a single replica every publish would get 504 `not_replicated` until then, by design.

Every figure is printed (`-s`): answers by status, 202s, missing from history, the live stream's losses and
resets, and how long publishes were refused.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson
import pytest
import redis

from service.broker.redis_connect import RedisTarget
from service.broker.redis_errors import MasterMoved, classify
from service.broker.redis_sentinel import SentinelMasterConnection
from service.broker.redis_topology import Node

from .sse import SSEStream
from .support import ProcessSet, RedisServer, ServiceProcess, eventually, eventually_blocking, free_port

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(150)]

SERVICE = "mymaster"
CHANNEL = "failover"


def _client(port: int) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=2, socket_connect_timeout=1, protocol=2)


def _info(port: int, section: str) -> dict[str, object]:
    with _client(port) as c:
        return dict(c.info(section))


@dataclass
class SentinelSet(ProcessSet):
    """A primary, two replicas and three sentinels (quorum 2) on free loopback ports in a temp dir."""

    tmp: Path
    down_after_ms: int = 1000
    failover_timeout_ms: int = 5000
    redis_ports: list[int] = field(default_factory=list)
    sentinel_ports: list[int] = field(default_factory=list)
    procs: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.redis_ports = [free_port(), free_port(), free_port()]
        self.sentinel_ports = [free_port() for _ in range(3)]

    @property
    def url(self) -> str:
        return "redis+sentinel://" + ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports) + f"/{SERVICE}"

    def start_redis(self, port: int, replica_of: int | None = None) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is needed: run ./scripts/test"
        d = self.tmp / f"redis-{port}"
        d.mkdir(exist_ok=True)
        extra = ["--replicaof", "127.0.0.1", str(replica_of)] if replica_of else []
        self.procs[port] = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(d), "--save", "",
             "--appendonly", "no", "--protected-mode", "no", "--repl-diskless-sync-delay", "0",
             "--logfile", str(d / "redis.log"), *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        eventually_blocking(lambda: self._pong(port), 10, f"redis-server on {port}", every=0.02)

    def start_sentinel(self, port: int) -> None:
        binary = shutil.which("redis-server")
        assert binary
        d = self.tmp / f"sentinel-{port}"
        d.mkdir(exist_ok=True)
        conf = d / "sentinel.conf"
        if not conf.exists():  # a restarted sentinel keeps what it rewrote into its config
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {d}\nlogfile {d / 'sentinel.log'}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.redis_ports[0]} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} {self.down_after_ms}\n"
                f"sentinel failover-timeout {SERVICE} {self.failover_timeout_ms}\n")
        self.procs[port] = subprocess.Popen([binary, str(conf), "--sentinel"], stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL)
        eventually_blocking(lambda: self._pong(port), 10, f"sentinel on {port}", every=0.02)

    @staticmethod
    def _pong(port: int) -> bool:
        try:
            with _client(port) as c:
                return bool(c.ping())
        except redis.RedisError:
            return False

    def start(self) -> None:
        primary, *replicas = self.redis_ports
        self.start_redis(primary)
        for replica in replicas:
            self.start_redis(replica, replica_of=primary)
        for port in self.sentinel_ports:
            self.start_sentinel(port)
        # A replica that has not finished its first sync cannot be promoted; sentinels that do not know each
        # other cannot agree on a crash failover.
        for replica in replicas:
            self.wait_in_sync(replica)
        eventually_blocking(self._sentinels_ready, 30, "every sentinel knowing the replicas and the two others",
                            every=0.1)

    def wait_in_sync(self, replica: int, timeout: float = 20) -> None:
        eventually_blocking(lambda: _info(replica, "replication").get("master_link_status") == "up", timeout,
                            f"replica {replica} in sync", every=0.05)

    def _sentinels_ready(self) -> bool:
        for port in self.sentinel_ports:
            with _client(port) as c:
                state = self._fields(c.execute_command("SENTINEL", "MASTER", SERVICE))
                if int(state.get("num-slaves", 0)) < 2 or int(state.get("num-other-sentinels", 0)) < 2:
                    return False
        return True

    @staticmethod
    def _fields(flat: list[bytes]) -> dict[str, str]:
        text = [x.decode() for x in flat]
        return dict(zip(text[::2], text[1::2], strict=False))

    def master(self) -> int:
        """The master's port as the sentinels see it (the first that answers)."""
        for port in self.sentinel_ports:
            try:
                with _client(port) as c:
                    _, p = c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
                    return int(p)
            except redis.RedisError:
                continue
        raise AssertionError("no sentinel answered")

    def switched(self, old: int) -> bool:
        """Every sentinel that is up names a master other than `old`, and that master says it is one."""
        for port in self.sentinel_ports:
            with _client(port) as c:
                _, p = c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
            if int(p) == old:
                return False
        return _info(self.master(), "replication").get("role") == "master"

    def failover(self, via: int | None = None) -> None:
        with _client(via or self.sentinel_ports[0]) as c:
            c.execute_command("SENTINEL", "FAILOVER", SERVICE)



@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[SentinelSet]:
    s = SentinelSet(tmp_path)
    try:
        s.start()
        yield s
    finally:
        s.stop()


@dataclass
class Traffic:
    """A publish every `interval` s, each in a task of its own (a slow answer does not delay the next); records
    the status, error code and id of every answer with the time it was sent."""

    url: str
    interval: float = 0.1
    answers: list[tuple[float, float, int, str, str | None]] = field(default_factory=list)  # sent, answered, status, code, id
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, limit: int = 400) -> None:
        async with httpx.AsyncClient(timeout=5.0, limits=httpx.Limits(max_connections=64)) as client:
            tasks = []
            for n in range(limit):
                if self.stop.is_set():
                    break
                tasks.append(asyncio.create_task(self._one(client, n)))
                await asyncio.sleep(self.interval)
            await asyncio.gather(*tasks)

    async def _one(self, client: httpx.AsyncClient, n: int) -> None:
        sent = time.monotonic()
        try:
            resp = await client.post(f"{self.url}/channels/{CHANNEL}/messages", json={"data": {"n": n}, "event": "n"})
        except httpx.TransportError as exc:
            self.answers.append((sent, time.monotonic(), 0, type(exc).__name__, None))
            return
        body = orjson.loads(resp.content)
        if resp.status_code == 202:
            self.answers.append((sent, time.monotonic(), 202, "", str(body["id"])))
        else:
            self.answers.append((sent, time.monotonic(), resp.status_code, body["error"]["code"], None))

    def accepted(self) -> list[tuple[float, str]]:
        return [(answered, i) for _, answered, status, _, i in self.answers if status == 202 and i is not None]


def _stream_ids(port: int) -> set[str]:
    """Every id the channel's Stream holds on that server, in the relay's form (`<ms>-<seq>-<epoch>`)."""
    with _client(port) as c:
        epoch = c.hget(f"sse:{{{CHANNEL}}}:meta", "e")
        entries = c.xrange(f"sse:{{{CHANNEL}}}:log", "-", "+")
    suffix = f"-{epoch.decode()}" if epoch else ""
    return {e[0].decode() + suffix for e in entries}


async def _run_switch(sentinels: SentinelSet, services: list[ServiceProcess], tmp_path: Path, *, crash: bool,
                      wait_replicas: int) -> dict[str, object]:
    env = {"REDIS_URL": sentinels.url, "REDIS_WAIT_REPLICAS": str(wait_replicas), "REDIS_WAIT_TIMEOUT": "0.5",
           "REDIS_COMMAND_TIMEOUT": "1", "REDIS_CONNECT_TIMEOUT": "0.5", "REDIS_PROBE_INTERVAL": "0.5",
           "HEARTBEAT_INTERVAL": "1", "LOG_LEVEL": "info"}
    relay = ServiceProcess(tmp_path, env, name="sentinel-relay")
    services.append(relay)
    await asyncio.to_thread(relay.start)
    old = sentinels.master()
    live = SSEStream(f"{relay.url}/channels/{CHANNEL}/events", reconnect=True)
    async with live:
        traffic = Traffic(relay.url)
        running = asyncio.create_task(traffic.run())
        await asyncio.sleep(3)
        switch_at = time.monotonic()
        if crash:
            sentinels.kill(old)
        else:
            await asyncio.to_thread(sentinels.failover)
        await eventually(lambda: sentinels.switched(old), 30, "the sentinels naming the new master", every=0.1)
        switched_at = time.monotonic()
        new = sentinels.master()
        if crash:
            # As an orchestrator would: the dead primary comes back, as the new master's replica (with
            # REDIS_WAIT_REPLICAS=1 nothing can be acknowledged until a replica is attached again).
            await asyncio.to_thread(sentinels.start_redis, old, new)
        await asyncio.sleep(max(0.0, switched_at + 6 - time.monotonic()))
        traffic.stop.set()
        await asyncio.wait_for(running, 30)
        accepted = traffic.accepted()
        assert accepted, "some publishes accepted"
        # Everything accepted after the switch must reach the live stream; wait for the last one.
        last = accepted[-1][1]
        await live.wait(lambda s: last in s.ids("n"), 10, "the last accepted message on the live stream")
    # The master at the end (on a loaded machine the sentinels may switch again: `new` can be a replica by now, a
    # little behind), which must hold everything acknowledged.
    stored = _stream_ids(sentinels.master())
    missing = [(t - switch_at, i) for t, i in accepted if i not in stored]
    # and through the relay: a resume from the first accepted message, read up to a marker published after it
    first = accepted[0][1]
    async with httpx.AsyncClient(timeout=5.0) as client:
        async def mark() -> bool:
            resp = await client.post(f"{relay.url}/channels/{CHANNEL}/messages", json={"data": "marker", "event": "end"},
                                     headers={"Idempotency-Key": "marker"})
            return resp.status_code == 202
        await eventually(mark, 10, "the marker accepted", every=0.1)
    async with SSEStream(f"{relay.url}/channels/{CHANNEL}/events", last_id=first) as resumed:
        try:
            await resumed.wait(lambda s: s.named("end"), 5, "the resume reaching the marker")
        except AssertionError:
            pass  # counted below: what it did not get is missing from the resume
        resumed_ids = set(resumed.ids("n"))
        resume_resets = len(resumed.resets)
    missing_from_resume = [i for _, i in accepted[1:] if i not in resumed_ids]
    live_ids = live.ids("n")
    statuses = Counter((status, code) for _, _, status, code, _ in traffic.answers)
    refused = [answered - switch_at for sent, answered, status, _, _ in traffic.answers if status != 202]
    report: dict[str, object] = {
        "answers": dict(statuses), "accepted": len(accepted), "missing_from_history": len(missing),
        "missing_from_resume": len(missing_from_resume), "resume_resets": resume_resets,
        "live_missing": len({i for _, i in accepted} - set(live_ids)), "live_duplicates": len(live_ids) - len(set(live_ids)),
        "live_resets": len(live.resets), "switch_s": round(switched_at - switch_at, 2),
        "refused_s": [round(min(refused), 2), round(max(refused), 2)] if refused else [],
        "missing_sample": [(round(t, 2), i) for t, i in missing[:5]],
    }
    kind = "crash (kill -9)" if crash else "planned (SENTINEL FAILOVER)"
    print(f"\nsentinel {kind}, REDIS_WAIT_REPLICAS={wait_replicas}: {report}", flush=True)
    assert all(status != 500 for _, _, status, _, _ in traffic.answers), statuses
    assert "Traceback" not in relay.log(), relay.log()
    report["missing"] = missing
    return report


@pytest.mark.parametrize("wait_replicas", [0, 1], ids=["async-replication", "REDIS_WAIT_REPLICAS=1"])
async def test_planned_failover_loses_no_acknowledged_publish(
    sentinels: SentinelSet, services: list[ServiceProcess], tmp_path: Path, wait_replicas: int
) -> None:
    report = await _run_switch(sentinels, services, tmp_path, crash=False, wait_replicas=wait_replicas)
    assert report["missing_from_history"] == 0, report
    assert report["missing_from_resume"] == 0, report
    assert report["live_missing"] == 0 and report["live_duplicates"] == 0, report
    assert report["live_resets"] == 0, report
    # The switch is announced at once: publishes are refused (or held) for about as long as Sentinel takes to
    # promote the replica, not until it gets round to demoting the old primary (~10 s).
    refused = report["refused_s"]
    assert isinstance(refused, list)
    assert not refused or refused[1] - refused[0] < 4, report


@pytest.mark.parametrize("wait_replicas", [0, 1], ids=["async-replication", "REDIS_WAIT_REPLICAS=1"])
async def test_crash_failover_loses_nothing_with_wait(
    sentinels: SentinelSet, services: list[ServiceProcess], tmp_path: Path, wait_replicas: int
) -> None:
    report = await _run_switch(sentinels, services, tmp_path, crash=True, wait_replicas=wait_replicas)
    missing = report["missing"]
    assert isinstance(missing, list)
    if wait_replicas:
        assert missing == [], report
        assert report["missing_from_resume"] == 0, report
    else:
        # Asynchronous replication: only what the old primary acknowledged just before it died can be gone.
        assert all(-1.0 < t <= 0.1 for t, _ in missing), report
    assert report["live_duplicates"] == 0, report


async def test_watcher_survives_a_sentinel_going_away(sentinels: SentinelSet) -> None:
    """One sentinel of three is killed: the watcher goes on with the other two, follows a failover announced by
    them, and watches the killed one again once it is back."""
    watcher = RedisTarget(sentinels.url).sentinel_watcher()
    moves: list[tuple[Node | None, Node]] = []
    watcher.add_listener(lambda old, new: moves.append((old, new)))
    gone, via = sentinels.sentinel_ports[0], sentinels.sentinel_ports[1]
    try:
        first = await watcher.master_address()
        assert first.port == sentinels.redis_ports[0]
        await eventually(lambda: len(watcher.subscribed) == 3, 5, "subscribed to the three sentinels")
        sentinels.kill(gone)
        await eventually(lambda: len(watcher.subscribed) == 2, 5, "the killed sentinel dropped")
        seen_under_way = asyncio.Event()

        async def spot() -> None:
            while not seen_under_way.is_set():
                if watcher.failing_over:
                    seen_under_way.set()
                await asyncio.sleep(0.005)

        spotting = asyncio.create_task(spot())
        started = time.monotonic()
        await asyncio.to_thread(sentinels.failover, via)
        await eventually(lambda: watcher.master != first, 10, "the watcher following the switch", every=0.02)
        took = time.monotonic() - started
        spotting.cancel()
        assert watcher.master is not None and watcher.master.port == sentinels.master()
        assert seen_under_way.is_set(), "the failover was seen under way before the switch"
        assert moves == [(first, watcher.master)]
        assert not watcher.failing_over
        print(f"\nwatcher: switch followed {took:.2f}s after SENTINEL FAILOVER, with one sentinel of three gone")
        await asyncio.to_thread(sentinels.start_sentinel, gone)
        await eventually(lambda: len(watcher.subscribed) == 3, 15, "the sentinel watched again once back")
    finally:
        await watcher.aclose()


class _StaleWatcher:
    """A watcher whose sentinel is behind: it names a replica."""

    service = SERVICE

    def __init__(self, port: int) -> None:
        self.port = port
        self.suspected: list[str] = []

    async def master_address(self) -> Node:
        return Node("127.0.0.1", self.port)

    def suspect(self, reason: str) -> None:
        self.suspected.append(reason)


async def test_a_connection_reaching_a_replica_is_moved_not_down(tmp_path: Path) -> None:
    """Every connection checks ROLE when it opens: a replica where the master should be is "moved" (and the
    watcher is asked to look again), never taken for the master nor for an outage."""
    replica = RedisServer(tmp_path, appendonly=False, extra=["--replicaof", "127.0.0.1", str(free_port())])
    replica.start()
    try:
        watcher = _StaleWatcher(replica.port)
        conn = SentinelMasterConnection(watcher=watcher, socket_connect_timeout=1.0, protocol=2)
        with pytest.raises(MasterMoved) as caught:
            await conn.connect()
        assert classify(caught.value, "publish").kind == "moved"
        assert watcher.suspected and "slave" in watcher.suspected[0]
        assert not conn.is_connected
    finally:
        replica.stop()
