"""Outgrowing one Redis: a real three-primary Redis Cluster (sharded pub/sub), and a master found by Sentinel."""

from __future__ import annotations

import asyncio
import random
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from redis.crc import key_slot

from service.broker.redis_format import keys_for

from .sse import SSEStream, open_streams
from .support import ServiceProcess, eventually, eventually_blocking, wait_port

pytestmark = [pytest.mark.timeout(120), pytest.mark.redis]


def _free_pair() -> int:
    """A port p with p + 10000 (the cluster bus) free as well."""
    for _ in range(200):
        p = random.randint(20000, 29999)
        ok = True
        for port in (p, p + 10000):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
        if ok:
            return p
    raise RuntimeError("no free port pair")


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[list[int]]:
    binary, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    assert binary and cli, "redis-server and redis-cli are needed: run ./scripts/test"
    ports = [_free_pair() for _ in range(3)]
    procs = []
    for port in ports:
        d = tmp_path / f"node-{port}"
        d.mkdir()
        procs.append(subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes", "--cluster-config-file",
             str(d / "nodes.conf"), "--dir", str(d), "--save", "", "--appendonly", "no", "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    try:
        for port in ports:
            wait_port(port)
        subprocess.run([cli, "--cluster", "create", *[f"127.0.0.1:{p}" for p in ports], "--cluster-replicas", "0",
                        "--cluster-yes"], check=True, capture_output=True, timeout=30)
        eventually_blocking(lambda: "cluster_state:ok" in subprocess.run(
            [cli, "-p", str(ports[0]), "cluster", "info"], capture_output=True, text=True).stdout, 20, "cluster_state:ok")
        yield ports
    finally:
        for p in procs:
            p.kill()
            p.wait(5)


def _owner(ports: list[int], key: str) -> int:
    """The port of the primary owning `key`, read from the cluster's own CLUSTER NODES."""
    cli = shutil.which("redis-cli")
    assert cli
    slot = key_slot(key.encode())
    nodes = subprocess.run([cli, "-p", str(ports[0]), "cluster", "nodes"], capture_output=True, text=True).stdout
    for row in nodes.splitlines():
        parts = row.split()
        if "master" not in parts[2]:
            continue
        port = int(parts[1].split("@")[0].rsplit(":", 1)[1])
        for r in parts[8:]:
            lo, _, hi = r.partition("-")
            if lo.isdigit() and int(lo) <= slot <= int(hi or lo):
                return port
    raise AssertionError(f"no owner for slot {slot}")


async def test_cluster_sharded_pubsub_delivers_every_message_in_order(
    redis_cluster: list[int], services: list[ServiceProcess], tmp_path: Path
) -> None:
    ports = redis_cluster
    # three channels that live on three different shards
    channels: dict[int, str] = {}
    for i in range(1000):
        name = f"room-{i}"
        owner = _owner(ports, keys_for("sse", name)[1])
        channels.setdefault(owner, name)
        if len(channels) == 3:
            break
    assert len(channels) == 3
    names = list(channels.values())
    env = {"REDIS_URL": f"redis+cluster://127.0.0.1:{ports[0]}", "HEARTBEAT_INTERVAL": "1"}
    services.extend(ServiceProcess(tmp_path, env, name=f"c{i}") for i in range(2))
    for s in services:
        s.start()
    readers = {(s.name, ch): SSEStream(f"{s.url}/channels/{ch}/events") for s in services for ch in names}
    multi = [SSEStream(f"{s.url}/events?" + "&".join(f"channel={c}" for c in names)) for s in services]
    await open_streams([*readers.values(), *multi], 10)
    sent: dict[str, list[str]] = {ch: [] for ch in names}
    async with httpx.AsyncClient(timeout=5) as c:
        for i in range(30):
            ch = names[i % 3]
            s = services[i % 2]
            resp = await c.post(f"{s.url}/channels/{ch}/messages", json={"data": {"i": i}, "event": "n"})
            assert resp.status_code == 202, resp.text
            sent[ch].append(resp.json()["id"])
    for (_, ch), r in readers.items():
        await r.wait_count(10, "n")
        assert r.ids("n") == sent[ch]
    for r in multi:
        await r.wait_count(30, "n")
        assert [d["data"]["i"] for d in r.data("n")] == list(range(30))
    # each channel's history and live channel share a slot, on the shard that owns it
    for owner, ch in channels.items():
        stream, live = keys_for("sse", ch)
        assert key_slot(stream.encode()) == key_slot(live.encode())
        cli = shutil.which("redis-cli")
        assert cli
        exists = subprocess.run([cli, "-p", str(owner), "exists", stream], capture_output=True, text=True).stdout
        assert exists.strip() == "1"
    # resume works against the cluster too
    ch = names[0]
    async with SSEStream(f"{services[1].url}/channels/{ch}/events", last_id=sent[ch][4]) as r:
        await r.wait_count(5, "n")
        assert r.ids("n") == sent[ch][5:]
    for r in [*readers.values(), *multi]:
        await r.close()


async def test_the_rate_limiter_and_presence_route_each_key_to_its_primary_by_the_slot_map(
        redis_cluster: list[int]) -> None:
    """The rate limiter and presence reach a Cluster through the command layer (redis_commands), routed by the same
    slot map as the broker, found from one seed: keys on every primary are limited and counted."""
    from service.presence import RedisPresence
    from service.ratelimit import RedisRateLimiter

    url = f"redis+cluster://127.0.0.1:{redis_cluster[0]}"
    limiter = RedisRateLimiter(url, "sse", rate=2)
    presence = RedisPresence(url, "i1", interval=5.0)
    clients = [f"ip:10.0.0.{i}" for i in range(24)]
    channels = [f"room-{i}" for i in range(24)]
    spread = {key_slot(limiter.key(c).encode()) * 3 // 16384 for c in clients}
    assert len(spread) == 3, "the keys are on every primary"
    try:
        assert [await limiter.hit(c) for c in clients for _ in range(2)] == [None] * 48  # the burst of 2 each
        assert all([await limiter.hit(c) for c in clients]), "the third within the second waits"
        assert limiter.failures == 0
        await presence.start()
        for i, channel in enumerate(channels):
            presence.changed(channel, i + 1)

        async def counted() -> bool:
            return [await presence.count(c) for c in channels] == [(i + 1, 1) for i in range(len(channels))]

        await eventually(counted, 10, "every channel's count, from its own primary")
    finally:
        await limiter.close()
        await presence.close()


async def test_sentinel_url_finds_the_master(tmp_path: Path, services: list[ServiceProcess]) -> None:
    binary = shutil.which("redis-server")
    assert binary
    master_port, sentinel_port = _free_pair(), _free_pair()
    master = subprocess.Popen([binary, "--port", str(master_port), "--bind", "127.0.0.1", "--save", "",
                               "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    conf = tmp_path / "sentinel.conf"
    conf.write_text(f"port {sentinel_port}\nbind 127.0.0.1\ndir {tmp_path}\n"
                    f"sentinel monitor mymaster 127.0.0.1 {master_port} 1\n")
    sentinel = subprocess.Popen([binary, str(conf), "--sentinel"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    try:
        wait_port(master_port)
        wait_port(sentinel_port)
        env = {"REDIS_URL": f"redis+sentinel://127.0.0.1:{sentinel_port}/mymaster"}
        services.append(ServiceProcess(tmp_path, env, name="sent").start())
        async with SSEStream(f"{services[0].url}/channels/s/events") as r, httpx.AsyncClient() as c:
            ids = [(await c.post(f"{services[0].url}/channels/s/messages", json={"data": i})).json()["id"]
                   for i in range(5)]
            await r.wait_count(5)
            assert r.ids("message") == ids
        cli = shutil.which("redis-cli")
        assert cli
        out = subprocess.run([cli, "-p", str(master_port), "xlen", "sse:{s}:log"], capture_output=True, text=True)
        assert out.stdout.strip() == "5"
    finally:
        for p in (sentinel, master):
            p.kill()
            p.wait(5)
    await asyncio.sleep(0)
