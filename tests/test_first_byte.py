"""Exactly once from the first byte: a stream's greeting carries its position, so a client that drops before any
message resumes (on another replica) with nothing missed and nothing doubled. Single channel, several channels
at once, and the old chat's `/server/events`.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest

from .sse import SSEStream, open_streams
from .support import RawHTTP, RedisServer, ServiceProcess

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]


def _pair(services: list[ServiceProcess], tmp_path: Path, redis_server: RedisServer) -> list[ServiceProcess]:
    new = [ServiceProcess(tmp_path, {"REDIS_URL": redis_server.url, "HEARTBEAT_INTERVAL": "1"}, name=f"r{i}")
           for i in range(2)]
    services.extend(new)
    for s in new:
        s.start()
    return new


async def _post(port: int, path: str, body: object) -> bytes:
    conn = RawHTTP(port)
    try:
        status, _, data = await conn.post(path, body)
    finally:
        conn.close()
    assert status in (200, 202), data
    return data


async def test_greeting_position_on_several_quiet_channels_resumes_each_on_another_replica(
    redis_server: RedisServer, services: list[ServiceProcess], tmp_path: Path
) -> None:
    a, b = _pair(services, tmp_path, redis_server)
    # one channel has history from before the stream joined; two are brand new
    old_id = orjson.loads(await _post(b.port, "/channels/q1/messages", {"data": "before"}))["id"]
    stream = (await open_streams([SSEStream([f"{a.url}/events?channel=q1&channel=q2&channel=q3",
                                             f"{b.url}/events?channel=q1&channel=q2&channel=q3"],
                                            reconnect=True, retry_delay=0.3)]))[0]
    assert stream.hello_id == f"q1={old_id},q2=0,q3=0", "the greeting's id is the cursor over all channels"
    assert stream.events == []
    a.kill()  # dropped before any message
    sent = {}
    for channel in ("q1", "q2", "q3"):
        sent[channel] = [orjson.loads(await _post(b.port, f"/channels/{channel}/messages", {"data": f"{channel}-{i}"}))
                         ["id"] for i in range(2)]
    await stream.wait(lambda s: len(s.events) >= 6, 10)
    got = {c: [d["id"] for d in stream.data() if d["channel"] == c] for c in ("q1", "q2", "q3")}
    assert got == sent, "each channel's messages after the greeting, once, in order; not the one before it"
    assert stream.connects == 2 and stream.resets == []
    await stream.close()


async def test_old_chat_stream_greets_with_its_position_and_resumes_from_it(
    redis_server: RedisServer, services: list[ServiceProcess], tmp_path: Path
) -> None:
    a, b = _pair(services, tmp_path, redis_server)
    stream = (await open_streams([SSEStream([f"{a.url}/server/events", f"{b.url}/server/events"],
                                            reconnect=True, retry_delay=0.3)]))[0]
    assert stream.hello_id == "0", "an empty channel's position is before everything"
    a.kill()
    for i in range(3):
        await _post(b.port, "/server/send", {"messages": [{"role": "user", "content": f"m{i}"}]})
    await stream.wait(lambda s: len(s.events) >= 3, 10)
    # what old pages see is unchanged: unnamed events whose data is the posted list
    assert [(e.event, e.data) for e in stream.events] == [
        ("message", [{"role": "user", "content": f"m{i}"}]) for i in range(3)]
    await stream.close()


async def test_a_fresh_stream_on_a_channel_with_history_starts_after_it(
    redis_server: RedisServer, services: list[ServiceProcess], tmp_path: Path
) -> None:
    a, b = _pair(services, tmp_path, redis_server)
    ids = [orjson.loads(await _post(a.port, "/channels/h/messages", {"data": i}))["id"] for i in range(3)]
    stream = (await open_streams([SSEStream(f"{b.url}/channels/h/events")]))[0]
    assert stream.hello_id == ids[-1]
    later = await open_streams([SSEStream(f"{a.url}/channels/h/events", last_id=stream.hello_id)])
    new = orjson.loads(await _post(a.port, "/channels/h/messages", {"data": 3}))["id"]
    await asyncio.gather(*(s.wait(lambda s: len(s.events) >= 1, 5) for s in (stream, *later)))
    assert stream.ids() == [new] and later[0].ids() == [new]
    await asyncio.gather(*(s.close() for s in (stream, *later)))
