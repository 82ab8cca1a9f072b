"""Redis stalls, pauses, a starved command pool and an outage behind a readiness probe: every channel that has
subscribers ends up subscribed, every 202 is delivered, and every state the service enters has a way out.

Real redis-server and real `python -m service` processes; light raw-socket clients.
"""

from __future__ import annotations

import asyncio
import functools
import re
import socket
import threading
import time
from pathlib import Path

import httpx
import orjson
import pytest
import redis

from .sse import SSEStream, open_streams, wait_all
from .support import RawHTTP, RedisServer, ServiceProcess, eventually

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(180)]


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def _start(services: list[ServiceProcess], tmp_path: Path, redis_server: RedisServer, **env: str) -> ServiceProcess:
    svc = ServiceProcess(tmp_path, {"REDIS_URL": redis_server.url, "HEARTBEAT_INTERVAL": "1",
                                    "REDIS_PROBE_INTERVAL": "1", **env}, name=f"r{len(services)}")
    services.append(svc)
    return svc.start()


async def _publish_each(port: int, channels: list[str], tag: str) -> dict[str, str]:
    """One message per channel, retried until accepted (same Idempotency-Key); channel -> id."""
    ids: dict[str, str] = {}
    conn = RawHTTP(port)

    async def accepted(channel: str) -> str | None:
        try:
            status, headers, body = await conn.post(f"/channels/{channel}/messages",
                                                    {"data": {"tag": tag, "channel": channel}},
                                                    {"Idempotency-Key": f"{tag}-{channel}"})
        except (OSError, asyncio.IncompleteReadError):
            return None
        if status == 202:
            return str(orjson.loads(body)["id"])
        assert status in (503, 504) and headers.get("retry-after"), body
        return None

    try:
        for channel in channels:
            ids[channel] = await eventually(functools.partial(accepted, channel), 30, f"{channel}: a publish accepted")
    finally:
        conn.close()
    return ids


def _in_thread(fn: object) -> threading.Thread:
    thread = threading.Thread(target=fn, daemon=True)  # type: ignore[arg-type]
    thread.start()
    return thread


@pytest.mark.parametrize("stall", ["DEBUG SLEEP 3", "CLIENT PAUSE 5000 WRITE"])
async def test_streams_opened_on_new_channels_during_a_redis_stall_get_everything_after(
    redis_server: RedisServer, services: list[ServiceProcess], tmp_path: Path, stall: str
) -> None:
    svc = _start(services, tmp_path, redis_server, REDIS_COMMAND_TIMEOUT="1")
    channels = [f"stall_{i}" for i in range(40)]
    admin = redis.Redis(port=redis_server.port, socket_timeout=10)
    started = time.monotonic()
    blocker = _in_thread(lambda: admin.execute_command(*stall.split()))

    def stalled() -> bool:
        """A write from another connection gets no answer: the stall is on (before the streams open)."""
        with socket.create_connection(("127.0.0.1", redis_server.port), timeout=0.1) as probe:
            probe.sendall(b"SET stall-probe 1\r\n")
            try:
                probe.recv(64)
            except TimeoutError:
                return True
        return False

    await eventually(stalled, 5, f"{stall} in effect", every=0.02)
    streams = [SSEStream(f"{svc.url}/channels/{c}/events").start() for c in channels]
    # the streams are accepted (200) at once and wait, pinging, for their channels to be live
    await wait_all(streams, lambda s: s.statuses == [200], 10, "200 during the stall")
    blocker.join(10)
    await wait_all(streams, lambda s: s.hellos == 1, 20, "greeted once Redis answers")
    greeted = time.monotonic() - started
    ids = await _publish_each(svc.port, channels, "after")
    await wait_all(streams, lambda s: len(s.events) >= 1, 20, "the message published after the stall")
    for s, c in zip(streams, channels, strict=True):
        assert [(e.event, e.id) for e in s.events] == [("message", ids[c])]
    metrics = httpx.get(f"{svc.url}/metrics").text
    assert _metric(metrics, "sse_broker_channels_pending") == 0
    # streams opened on the same channels afterwards get their messages too
    later = await open_streams([SSEStream(f"{svc.url}/channels/{c}/events") for c in channels], 10)
    ids = await _publish_each(svc.port, channels, "later")
    await wait_all(later, lambda s: len(s.events) >= 1, 20, "a later stream's message")
    print(f"\n{stall}: 40 streams on new channels greeted {greeted:.1f}s after the stall began; all delivered")
    assert "Traceback" not in svc.log(), svc.log()
    await asyncio.gather(*(s.close() for s in streams + later))


async def test_starved_pool_queues_and_every_channel_ends_subscribed(
    redis_server: RedisServer, services: list[ServiceProcess], tmp_path: Path
) -> None:
    svc = _start(services, tmp_path, redis_server, REDIS_POOL_SIZE="2", REDIS_POOL_TIMEOUT="0.5")
    channels = [f"starved_{i}" for i in range(200)]
    streams = [SSEStream(f"{svc.url}/channels/{c}/events") for c in channels]
    for s in streams:
        s.start()
    # 200 publishes at once, on 20 connections, while the 200 channels are being subscribed
    outcomes: dict[int, int] = {}
    accepted: dict[str, str] = {}

    async def publish(i: int, conn: RawHTTP) -> None:
        channel = channels[i]
        status, headers, body = await conn.post(f"/channels/{channel}/messages", {"data": {"i": i}})
        outcomes[status] = outcomes.get(status, 0) + 1
        if status == 202:
            accepted[channel] = orjson.loads(body)["id"]
        else:
            assert status == 503 and headers.get("retry-after"), (status, body)
            assert orjson.loads(body)["error"]["code"] == "busy", body

    conns = [RawHTTP(svc.port) for _ in range(20)]

    async def worker(k: int) -> None:
        for i in range(k, 200, 20):
            await publish(i, conns[k])

    await asyncio.gather(*(worker(k) for k in range(20)))
    await wait_all(streams, lambda s: s.hellos == 1, 60, "greeted")

    async with httpx.AsyncClient(base_url=svc.url, timeout=5) as http:
        async def settled() -> bool:
            return _metric((await http.get("/metrics")).text, "sse_broker_channels_pending") == 0

        await eventually(settled, 30, "no channel pending at the broker", every=0.1)
    # every 202 is in history; streams that joined before it was published also got it live
    r = redis.Redis(port=redis_server.port)
    numsub = dict(r.pubsub_numsub(*[f"sse:{{{c}}}:live" for c in channels]))
    assert set(numsub.values()) == {1}
    for channel, message_id in accepted.items():
        entries = r.xrange(f"sse:{{{channel}}}:log")
        assert [e[0].decode() for e in entries] == [message_id.rsplit("-", 1)[0]]
    # and a second round, with everything subscribed, reaches every stream
    ids = await _publish_each(svc.port, channels, "second")
    await wait_all(streams, lambda s: any(d.get("tag") == "second" for d in s.data()), 30, "second round")
    for s, c in zip(streams, channels, strict=True):
        assert s.events[-1].id == ids[c]
    print(f"\nstarved pool (2 connections): publishes {outcomes}; all 200 channels subscribed and delivering")
    for c in conns:
        c.close()
    assert "Traceback" not in svc.log()
    await asyncio.gather(*(s.close() for s in streams))


async def test_redis_outage_keeps_replicas_ready_and_streams_opened_during_it_deliver(
    redis_server: RedisServer, services: list[ServiceProcess], tmp_path: Path
) -> None:
    replicas = [_start(services, tmp_path, redis_server) for _ in range(2)]
    redis_server.kill()
    async with httpx.AsyncClient(timeout=2) as c:
        for svc in replicas:
            async def down(url: str = svc.url) -> bool:
                return (await c.get(f"{url}/healthz/broker")).status_code == 503

            await eventually(down, 10, f"{svc.name}: /healthz/broker 503")
            ready = await c.get(f"{svc.url}/readyz")
            assert ready.status_code == 200 and ready.json()["broker"] == "down"
            assert _metric((await c.get(f"{svc.url}/metrics")).text, "sse_broker_up") == 0
        # streams on new channels, opened during the outage: 200, pings, no greeting yet
        streams = [SSEStream(f"{svc.url}/channels/outage_{i}/events").start()
                   for svc in replicas for i in range(10)]
        await wait_all(streams, lambda s: s.statuses == [200] and s.comments >= 1, 10, "200 and pinging")
        assert all(s.hellos == 0 for s in streams)
        redis_server.start()
        await wait_all(streams, lambda s: s.hellos == 1, 20, "greeted once Redis is back")
        for svc in replicas:
            assert (await c.get(f"{svc.url}/healthz/broker")).status_code == 200
    ids = await _publish_each(replicas[0].port, [f"outage_{i}" for i in range(10)], "back")
    await wait_all(streams, lambda s: len(s.events) == 1, 20, "the message after the outage")
    for s in streams:
        assert s.events[0].id == ids[s.channel]
    await asyncio.gather(*(s.close() for s in streams))


async def test_redis_out_of_memory_is_named_logged_and_counted(
    redis_server: RedisServer, services: list[ServiceProcess], tmp_path: Path
) -> None:
    svc = _start(services, tmp_path, redis_server)
    admin = redis.Redis(port=redis_server.port)
    admin.config_set("maxmemory", 1)  # every write is refused (maxmemory-policy noeviction)
    async with httpx.AsyncClient(base_url=svc.url, timeout=5) as c:
        for _ in range(3):
            resp = await c.post("/channels/oom/messages", json={"data": 1})
            assert resp.status_code == 503 and resp.headers["retry-after"]
            error = resp.json()["error"]
            assert error["code"] == "unavailable" and error["kind"] == "oom", error
        metrics = (await c.get("/metrics")).text
        assert re.search(r'^sse_redis_errors_total\{kind="oom"\} 3\.0$', metrics, re.M), metrics
        admin.config_set("maxmemory", 0)
        assert (await c.post("/channels/oom/messages", json={"data": 2})).status_code == 202
    log = svc.log()
    assert log.count("Redis error (oom)") == 1, "logged once, with what it means"
    assert "maxmemory" in log
    assert admin.xlen("sse:{oom}:log") == 1, "nothing of the refused publishes was stored"


async def test_a_gap_of_many_pages_is_filled_after_the_subscription_is_killed(
    redis_server: RedisServer, services: list[ServiceProcess], tmp_path: Path
) -> None:
    """The gap after a lost pub/sub connection can be far longer than one history page: all of it arrives."""
    svc = _start(services, tmp_path, redis_server, REDIS_PROBE_INTERVAL="5")
    streams = await open_streams([SSEStream(f"{svc.url}/channels/gap_{i}/events") for i in range(3)])
    admin = redis.Redis(port=redis_server.port)
    # Hold the relay's pub/sub connection off (kill it and keep killing it) while 300 messages per channel go in.
    stop = threading.Event()

    def keep_killing() -> None:
        while not stop.is_set():
            admin.client_kill_filter(_type="pubsub")
            time.sleep(0.01)

    killer = _in_thread(keep_killing)
    publisher = redis.Redis(port=redis_server.port)
    ids: dict[str, list[str]] = {}
    from service.publisher import Publisher

    with Publisher(redis_server.url) as pub:
        for i in range(3):
            ids[f"gap_{i}"] = [pub.publish(f"gap_{i}", n) for n in range(300)]
    stop.set()
    killer.join(5)
    try:
        await wait_all(streams, lambda s: len(s.events) >= 300, 15, "the whole gap")
    except AssertionError:
        broker = [line for line in httpx.get(f"{svc.url}/metrics").text.splitlines() if line.startswith("sse_broker")]
        raise AssertionError(f"got {[len(s.events) for s in streams]} of 300; {broker}; "
                             f"Redis clients {admin.client_list()}") from None
    for i, s in enumerate(streams):
        assert s.ids() == ids[f"gap_{i}"]
    publisher.close()
    await asyncio.gather(*(s.close() for s in streams))
