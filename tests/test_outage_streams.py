"""A stream opened while its channel's position could not be known (Redis unreachable) is owed every message
published after it connected: when Redis comes back, the publish path reconnects at once, the pub/sub reader on
its own backoff, and what is published in between must still reach the streams that were waiting.

Real redis-server (with and without AOF) and real `python -m service` processes; the tests' raw-socket SSE
client. Each round: kill Redis, open streams (answered 200, pinging, not greeted), restart Redis on the same
port and data, publish at once (the publishers retry their 503s from before the restart, so the first 202 comes
the moment Redis accepts them), and count, per stream, the accepted messages it never got.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import orjson
import pytest

from .sse import SSEStream, wait_all
from .support import RawHTTP, RedisServer, ServiceProcess, eventually

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(300)]

FAST = {"HEARTBEAT_INTERVAL": "0.3", "RETRY_MS": "200", "REDIS_PROBE_INTERVAL": "0.5"}


def _service(services: list[ServiceProcess], tmp_path: Path, redis: RedisServer, **env: str) -> ServiceProcess:
    svc = ServiceProcess(tmp_path, {"REDIS_URL": redis.url, **FAST, **env}, name=f"r{len(services)}")
    services.append(svc)
    return svc


async def _broker_down(svc: ServiceProcess) -> None:
    async with httpx.AsyncClient(timeout=2) as http:
        async def down() -> bool:
            return (await http.get(f"{svc.url}/healthz/broker")).status_code == 503

        await eventually(down, 15, "the replica sees Redis down", every=0.05)


def _seqs(stream: SSEStream, channel: str, tag: str | None = None) -> list[int]:
    """The `seq` of each message of `channel` (published by the `tag` round, or any) a stream got (plain data, or
    a multi-channel envelope). Messages of earlier rounds may come too: a message published up to a margin before
    the stream connected is delivered (more, never less)."""
    out = []
    for e in stream.events:
        data = e.data
        if isinstance(data, dict) and "channel" in data and "data" in data:
            data = data["data"]
        if isinstance(data, dict) and data.get("ch") == channel and (tag is None or data.get("tag") == tag):
            out.append(data["seq"])
    return out


class Publishers:
    """`count` messages per channel, each retried (same Idempotency-Key) until answered 202, all channels at
    once over a few connections; started before Redis is back so that the first 202 comes as soon as it can."""

    def __init__(self, port: int, channels: list[str], count: int, tag: str, connections: int = 10) -> None:
        self.port, self.channels, self.count, self.tag = port, channels, count, tag
        self.connections = connections
        self.accepted: dict[str, list[int]] = {c: [] for c in channels}
        self.first_202: float | None = None
        self.refused = 0

    async def _channel(self, conn: RawHTTP, channel: str) -> None:
        for seq in range(self.count):
            for _ in range(2000):
                try:
                    status, _, body = await conn.post(
                        f"/channels/{channel}/messages", {"data": {"seq": seq, "ch": channel, "tag": self.tag},
                                                                "event": "n"},
                        {"Idempotency-Key": f"{self.tag}-{channel}-{seq}"}, timeout=10)
                except (OSError, asyncio.IncompleteReadError):
                    status, body = 0, b""
                if status == 202:
                    if self.first_202 is None:
                        self.first_202 = time.monotonic()
                    self.accepted[channel].append(seq)
                    break
                assert status in (0, 503, 504), (status, body)
                self.refused += 1
                await asyncio.sleep(0.01)
            else:
                raise AssertionError(f"{channel} #{seq} never accepted")

    async def run(self) -> None:
        conns = [RawHTTP(self.port) for _ in range(self.connections)]

        async def worker(k: int) -> None:
            for channel in self.channels[k::self.connections]:
                await self._channel(conns[k], channel)

        try:
            await asyncio.gather(*(worker(k) for k in range(min(self.connections, len(self.channels)))))
        finally:
            for conn in conns:
                conn.close()


async def _outage_round(redis: RedisServer, svc: ServiceProcess, fresh: list[tuple[SSEStream, list[str]]],
                        publishers: Publishers, *, spread: float = 0.0,
                        throughout: list[tuple[SSEStream, list[str]]] | None = None) -> dict[str, int]:
    """Kill Redis; open the `fresh` streams (over `spread` seconds) and wait for their 200; start publishing;
    restart Redis; wait until each stream (and each of `throughout`, connected before) has every accepted
    message of its channels. Returns counts."""
    redis.kill()
    await _broker_down(svc)
    step = spread / max(1, len(fresh))
    for stream, _ in fresh:
        stream.start()
        if step:
            await asyncio.sleep(step)
    await wait_all([s for s, _ in fresh], lambda s: s.statuses == [200], 20, "200 during the outage")
    # (a stream on a channel that was live here before the outage is greeted at once: its position is the last
    # message the replica delivered, and the gap fill after the outage starts there)
    opened = [*fresh, *(throughout or [])]
    publishing = asyncio.create_task(publishers.run())
    await asyncio.sleep(0.1)  # the publishers are being refused (503)
    await asyncio.to_thread(redis.start)
    await asyncio.wait_for(publishing, 60)

    tag = publishers.tag

    def complete(stream: SSEStream, channels: list[str]) -> bool:
        return all(set(publishers.accepted[c]) <= set(_seqs(stream, c, tag)) for c in channels)

    lost = 0
    try:
        await wait_all([s for s, _ in opened], lambda s: complete(s, dict(opened)[s]), 10, "every accepted message")
    except AssertionError:
        pass
    duplicates = earlier = 0
    for stream, channels in opened:
        for c in channels:
            got = _seqs(stream, c, tag)
            lost += len(set(publishers.accepted[c]) - set(got))
            duplicates += len(got) - len(set(got))
            earlier += len(_seqs(stream, c)) - len(got)
            assert got == sorted(got), f"out of order: {got}"
    await asyncio.gather(*(s.close() for s, _ in opened))
    accepted = sum(len(publishers.accepted[c]) for _, channels in opened for c in channels)
    return {"owed": accepted, "lost": lost, "duplicates": duplicates, "earlier": earlier}


@pytest.mark.parametrize("appendonly", [True, False], ids=["aof", "no-aof"])
async def test_streams_opened_during_an_outage_get_every_message_published_after_they_connected(
    tmp_path: Path, services: list[ServiceProcess], appendonly: bool
) -> None:
    """The issue's scenario, 20 times on one replica: a single-channel, a multi-channel and the old chat's stream
    opened while Redis is down, 5 messages per channel published the moment Redis is back."""
    redis = RedisServer(tmp_path / "redis", appendonly=appendonly)
    redis.dir.mkdir()
    redis.start()
    try:
        svc = _service(services, tmp_path, redis, DEFAULT_CHANNEL="chat").start()
        totals = {"owed": 0, "lost": 0, "duplicates": 0, "earlier": 0}
        per_round = []
        for n in range(20):
            late, other = f"late{n}", f"other{n}"
            opened = [
                (SSEStream(f"{svc.url}/channels/{late}/events"), [late]),
                (SSEStream(f"{svc.url}/events?channel={late}&channel={other}"), [late, other]),
                (SSEStream(f"{svc.url}/server/events"), ["chat"]),
            ]
            publishers = Publishers(svc.port, [late, other, "chat"], 5, f"r{n}", connections=3)
            counts = await _outage_round(redis, svc, opened, publishers)
            per_round.append(counts["lost"])
            for k in totals:
                totals[k] += counts[k]
        print(f"\n20 outages ({'aof' if appendonly else 'no aof'}): {totals}, lost per round {per_round}")
        assert totals["lost"] == 0 and totals["duplicates"] == 0, (totals, per_round)
        assert "Traceback" not in svc.log(), svc.log()
    finally:
        redis.stop()


@pytest.mark.parametrize("appendonly", [True, False], ids=["aof", "no-aof"])
async def test_200_streams_on_50_channels_opened_during_a_5s_outage(
    tmp_path: Path, services: list[ServiceProcess], appendonly: bool
) -> None:
    redis = RedisServer(tmp_path / "redis", appendonly=appendonly)
    redis.dir.mkdir()
    redis.start()
    try:
        svc = _service(services, tmp_path, redis).start()
        channels = [f"room{i}" for i in range(50)]
        opened = [(SSEStream(f"{svc.url}/channels/{channels[i % 50]}/events"), [channels[i % 50]])
                  for i in range(200)]
        publishers = Publishers(svc.port, channels, 3, "wide", connections=10)
        started = time.monotonic()
        counts = await _outage_round(redis, svc, opened, publishers, spread=5.0)
        print(f"\n200 streams / 50 channels opened over a {time.monotonic() - started:.1f}s outage "
              f"({'aof' if appendonly else 'no aof'}): {counts}, refused while down {publishers.refused}")
        assert counts["lost"] == 0 and counts["duplicates"] == 0, counts
    finally:
        redis.stop()


async def test_a_replica_that_starts_while_redis_is_down(tmp_path: Path, services: list[ServiceProcess]) -> None:
    """It has never seen Redis: its streams are owed what is published after they connected all the same."""
    redis = RedisServer(tmp_path / "redis")
    redis.dir.mkdir()
    redis.start()
    # history before the outage (written through another replica): not owed to the streams
    admin = _service(services, tmp_path, redis).start()
    conn = RawHTTP(admin.port)
    for i in range(3):
        status, _, body = await conn.post("/channels/cold/messages", {"data": {"seq": -1 - i, "ch": "cold"},
                                                                      "event": "n"})
        assert status == 202, body
    conn.close()
    admin.kill()
    redis.kill()
    svc = _service(services, tmp_path, redis)
    svc.start(wait_ready=False)
    try:
        async with httpx.AsyncClient(timeout=1) as http:
            async def ready() -> bool:
                try:
                    return (await http.get(f"{svc.url}/readyz")).status_code == 200
                except httpx.HTTPError:
                    return False

            await eventually(ready, 15, "the replica ready without Redis", every=0.05)
        opened = [(SSEStream(f"{svc.url}/channels/cold/events"), ["cold"]),
                  (SSEStream(f"{svc.url}/events?channel=cold&channel=new"), ["cold", "new"])]
        for stream, _ in opened:
            stream.start()
        await wait_all([s for s, _ in opened], lambda s: s.statuses == [200], 20, "200 while Redis is down")
        publishers = Publishers(svc.port, ["cold", "new"], 5, "cold", connections=2)
        publishing = asyncio.create_task(publishers.run())
        await asyncio.sleep(0.1)
        await asyncio.to_thread(redis.start)
        await asyncio.wait_for(publishing, 60)
        for stream, channels in opened:
            for c in channels:
                await stream.wait(lambda s, c=c: set(publishers.accepted[c]) <= set(_seqs(s, c)), 15,
                                  f"every accepted message of {c}")
        print(f"\nreplica started during the outage: {[(s.hello_id, _seqs(s, 'cold')) for s, _ in opened]}")
        for stream, _ in opened:
            await stream.close()
    finally:
        redis.stop()


async def test_a_redis_that_comes_back_empty_resets_the_streams(
    tmp_path: Path, services: list[ServiceProcess]
) -> None:
    """No persistence: history is gone, a new epoch. A stream connected throughout and a resume from an old id
    get `relay.reset`; a stream opened during the outage gets every message after it connected."""
    redis = RedisServer(tmp_path / "redis", appendonly=False)
    redis.dir.mkdir()
    redis.start()
    try:
        svc = _service(services, tmp_path, redis).start()
        conn = RawHTTP(svc.port)
        ids = []
        for i in range(3):
            status, _, body = await conn.post("/channels/gone/messages", {"data": {"seq": -1 - i, "ch": "gone"},
                                                                          "event": "n"})
            assert status == 202, body
            ids.append(orjson.loads(body)["id"])
        conn.close()
        throughout = SSEStream(f"{svc.url}/channels/gone/events").start()
        await throughout.wait(lambda s: s.hellos == 1, 10, "greeted")
        opened = [(SSEStream(f"{svc.url}/channels/gone/events"), ["gone"]),
                  (SSEStream(f"{svc.url}/channels/gone/events", last_id=ids[0]), ["gone"])]
        publishers = Publishers(svc.port, ["gone"], 5, "empty", connections=1)
        counts = await _outage_round(redis, svc, opened, publishers, throughout=[(throughout, ["gone"])])
        assert counts["lost"] == 0, counts
        for stream in (throughout, opened[1][0]):
            reasons = [r["reason"] for r in stream.resets]
            assert reasons and set(reasons) == {"epoch"}, stream.resets
        print(f"\nRedis back empty: {counts}; resets: throughout {throughout.resets}, resumed {opened[1][0].resets}")
    finally:
        redis.stop()


# -- in-process: the broker's part ------------------------------------------------------------------------------


def test_owed_floor_maps_the_join_onto_redis_clock_and_errs_early() -> None:
    from service.broker.redis_cursors import OWED_SKEW_MS, _owed_floor

    # joined 5 s before a TIME reading of 1,000,000 ms: Redis's clock then was 995,000, less the margins
    floor, seq = _owed_floor(1_000_000, 105.0, 100.0)
    assert seq == 0 and 1_000_000 - 5_005 - OWED_SKEW_MS <= floor <= 1_000_000 - 5_000 - OWED_SKEW_MS, floor
    assert _owed_floor(500, 10.0, 0.0) == (0, 0)  # never below the first id
    assert _owed_floor(1_000_000, 100.0, 101.0)[0] == 1_000_000 - OWED_SKEW_MS  # a join after the reading


class _Sink:
    def __init__(self) -> None:
        self.dispatched: list[str] = []
        self.positions: dict[str, str] = {}

    def dispatch(self, message: object) -> None:
        self.dispatched.append(bytes(message.data).decode())  # type: ignore[attr-defined]

    def reset(self, channel: str, reason: str, epoch: str | None = None) -> None: ...

    def established(self, channel: str, position: object) -> None:
        self.positions[channel] = str(position)

    def hold_writes(self) -> None: ...

    def release_writes(self) -> None: ...


async def test_broker_position_of_a_channel_owed_during_an_outage(tmp_path: Path) -> None:
    """A channel wanted while Redis is down, with a stream answered meanwhile (`owe`): what is published the
    moment Redis is back, before the reader comes back, is dispatched."""
    from service.broker import BrokerError
    from service.broker.redis import RedisBroker

    redis = RedisServer(tmp_path / "redis")
    redis.dir.mkdir()
    redis.start()
    broker = RedisBroker(redis.url, probe_interval=0.5)
    sink = _Sink()
    await broker.start(sink)
    try:
        await eventually(broker.ready, 10, "the reader connected")
        redis.kill()
        await eventually(lambda: not broker.ready(), 10, "the reader saw Redis go")
        broker.want("late")
        broker.owe("late", time.monotonic())
        await asyncio.to_thread(redis.start)
        published = 0
        for _ in range(500):  # at once: the reader is still backing off
            try:
                await broker.publish("late", b'"m%d"' % published)
                published += 1
            except BrokerError:
                await asyncio.sleep(0.01)
            if published == 5:
                break
        assert published == 5
        await asyncio.wait_for(broker.live("late"), 15)
        await eventually(lambda: len(sink.dispatched) >= 5, 10, lambda: f"5 dispatched: {sink.dispatched}")
        assert sink.dispatched == [f'"m{i}"' for i in range(5)]
    finally:
        await broker.close()
        redis.stop()
