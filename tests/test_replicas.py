"""Three real `python -m service` processes on one real redis-server: one publish reaches every subscriber."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from .sse import SSEStream, open_streams
from .support import RedisServer, ServiceProcess, eventually

pytestmark = [pytest.mark.timeout(90), pytest.mark.redis]


async def test_every_subscriber_on_every_replica_gets_every_message_once_in_order(
    redis_server: RedisServer, services: list[ServiceProcess], tmp_path
) -> None:
    env = {"REDIS_URL": redis_server.url, "HEARTBEAT_INTERVAL": "1"}
    services.extend(ServiceProcess(tmp_path, env, name=f"r{i}") for i in range(3))
    for s in services:
        s.start(wait_ready=False)
    for s in services:
        s.wait_ready()
    readers = [SSEStream(f"{s.url}/channels/room/events") for s in services for _ in range(3)]
    multi = [SSEStream(f"{s.url}/events?channel=room&channel=other") for s in services]
    await open_streams(readers + multi, 10)
    hello = {r.instances[0] for r in readers}
    assert hello == {"r0", "r1", "r2"}

    ids = []
    async with httpx.AsyncClient(timeout=5) as client:
        for i in range(60):
            s = services[i % 3]  # publish through all three in turn
            resp = await client.post(f"{s.url}/channels/room/messages", json={"data": {"seq": i}, "event": "n"})
            assert resp.status_code == 202, resp.text
            ids.append(resp.json()["id"])
        # a last message: order per channel means anything beyond the 60 (a duplicate) arrives before it
        resp = await client.post(f"{services[0].url}/channels/room/messages", json={"data": "end", "event": "end"})
        assert resp.status_code == 202, resp.text
    for r in readers + multi:
        await r.wait_count(1, "end", timeout=20)
    for r in readers:
        assert [d["seq"] for d in r.data("n")] == list(range(60))
        assert r.ids("n") == ids
    for r in multi:
        assert [d["data"]["seq"] for d in r.data("n")] == list(range(60))
    for r in readers + multi:
        await r.close()


async def test_subscribes_on_redis_only_while_it_has_local_subscribers(
    redis_server: RedisServer, services: list[ServiceProcess], tmp_path
) -> None:
    import redis.asyncio as aioredis

    services.append(ServiceProcess(tmp_path, {"REDIS_URL": redis_server.url}, name="solo").start())
    r = aioredis.from_url(redis_server.url)
    try:
        async def live_channels() -> set[bytes]:
            # (the relay's own control channel, service/control.py, is subscribed for the replica's whole life)
            return {c for c in await r.pubsub_channels() if c.endswith(b":live")} - {b"sse:{relay/control}:live"}

        async def control_subscribed() -> bool:
            return b"sse:{relay/control}:live" in await r.pubsub_channels()

        await eventually(control_subscribed, 5, "the control channel subscribed")
        assert await live_channels() == set()
        async with SSEStream(f"{services[0].url}/channels/lonely/events"):
            assert await live_channels() == {b"sse:{lonely}:live"}

        async def gone() -> bool:
            return not await live_channels()

        await eventually(gone, 5, "no live channel at Redis once the last subscriber left")
    finally:
        await r.aclose()


async def test_workers_share_one_port_and_drain_together(
    redis_server: RedisServer, services: list[ServiceProcess], tmp_path
) -> None:
    import signal

    svc = ServiceProcess(tmp_path, {"REDIS_URL": redis_server.url, "WORKERS": "2", "DRAIN_GRACE": "1"}, name="wk")
    services.append(svc.start())
    readers: list[SSEStream] = []
    instances: set[str] = set()
    # both workers take connections (the second may still be starting when the first answers /readyz)
    for _ in range(20):
        batch = await open_streams([SSEStream(f"{svc.url}/channels/room/events") for _ in range(12)], 10)
        readers += batch
        instances |= {r.instances[0] for r in batch}
        if len(instances) == 2:
            break
    assert instances == {"wk/w0", "wk/w1"}, instances
    async with httpx.AsyncClient(timeout=5) as client:
        ids = [(await client.post(f"{svc.url}/channels/room/messages", json={"data": i})).json()["id"]
               for i in range(10)]
    for r in readers:
        await r.wait_count(10)
        assert r.ids("message") == ids
    svc.signal(signal.SIGTERM)
    assert await asyncio.to_thread(svc.wait, 20) == 0
    for r in readers:
        await r.close()


async def test_workers_of_a_supervisor_killed_outright_drain_and_free_the_port(
    redis_server: RedisServer, services: list[ServiceProcess], tmp_path
) -> None:
    """Before: `kill -9` of the supervisor (the OOM killer, a harsh stop) forwarded nothing, and its workers kept
    serving the port for ever (SO_REUSEPORT), beside the instance started in its place. Now each worker sees its
    parent gone, drains and exits: the port is free within seconds."""
    import subprocess

    svc = ServiceProcess(tmp_path, {"REDIS_URL": redis_server.url, "WORKERS": "2", "DRAIN_GRACE": "1"}, name="orph")
    services.append(svc.start())
    readers = await open_streams([SSEStream(f"{svc.url}/channels/room/events") for _ in range(20)], 10)

    def listening() -> bool:
        out = subprocess.run(["ss", "-tlnH", f"( sport = :{svc.port} )"], capture_output=True, text=True,
                             check=True, timeout=10).stdout
        return bool(out.strip())

    assert listening()
    svc.kill()  # SIGKILL: no signal reaches the workers
    await eventually(lambda: asyncio.to_thread(lambda: not listening()), 15, "the workers gone from the port")
    for r in readers:
        await r.close()
    assert svc.log().count("supervisor gone; this worker drains and exits") == 2, svc.log()


def test_workers_without_redis_is_a_clear_configuration_error(tmp_path) -> None:
    import subprocess
    import sys

    from .support import ROOT

    result = subprocess.run([sys.executable, "-m", "service"], cwd=ROOT, capture_output=True, text=True, timeout=30,
                            env={"PATH": "/usr/bin:/bin", "WORKERS": "2", "PORT": "0"})
    assert result.returncode == 2
    assert "WORKERS=2 needs REDIS_URL" in result.stderr
