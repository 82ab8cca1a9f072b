"""At home in Python: mounting in FastAPI, publishing from workers, batch publish, presence, OpenAPI."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from starlette.routing import Mount, Route

from service import Relay, Settings, create_app
from service.publisher import AsyncPublisher, Publisher, PublishError

from .sse import SSEStream, open_streams
from .support import RedisServer, ServiceProcess, eventually, free_port, running_app

pytestmark = pytest.mark.timeout(60)


async def test_relay_mounted_in_fastapi_under_a_prefix() -> None:
    from fastapi import FastAPI

    relay = Relay(Settings.from_env({}, instance_id="embedded", public_channels=("news",)))
    app = FastAPI(lifespan=relay.lifespan)

    @app.get("/api/hello")
    async def hello() -> dict[str, str]:
        # the host app publishes in-process, no HTTP hop
        message_id = await relay.publish("news", {"from": "host"}, "note")
        return {"published": message_id}

    app.mount("/realtime", create_app(relay=relay))
    async with running_app(app) as url:
        async with SSEStream(f"{url}/realtime/channels/news/events") as r, httpx.AsyncClient(base_url=url) as c:
            assert (await c.get("/realtime/readyz")).status_code == 200
            resp = await c.post("/realtime/channels/news/messages", json={"data": {"from": "http"}})
            assert resp.status_code == 202
            hello = (await c.get("/api/hello")).json()
            await r.wait(
                lambda r: len([e for e in r.all_events if e.event in ("message", "note")]) >= 2
            )
            got = [(e.event, e.data["from"]) for e in r.all_events if e.event in ("message", "note")]
            assert got == [("message", "http"), ("note", "host")]
            assert r.all_events[-1].id == hello["published"]
            page = await c.get("/realtime/")
            assert page.status_code == 200 and "static/app.js" in page.text
            assert (await c.get("/realtime/static/app.js")).status_code == 200


async def test_mounted_without_lifespan_says_what_to_do() -> None:
    from fastapi import FastAPI

    app = FastAPI()
    app.mount("/realtime", create_app(Settings.from_env({})))
    async with running_app(app) as url, httpx.AsyncClient(base_url=url) as c:
        resp = await c.post("/realtime/channels/x/messages", json={"data": 1})
        assert resp.status_code == 503
        assert "relay.lifespan" in resp.json()["error"]["message"]


async def test_publish_before_the_lifespan_raises_what_the_routes_answer() -> None:
    """`relay.publish()` on a relay that was never started (or has stopped) raises the error the HTTP routes answer
    503 `not_started`, instead of returning an id for a message no stream of this relay will ever read."""
    from fastapi import FastAPI

    from service.broker import BrokerUnavailable
    from service.relay import NotStarted

    relay = Relay(Settings.from_env({}, instance_id="early"))
    app = FastAPI()
    app.mount("/realtime", create_app(relay=relay))
    with pytest.raises(NotStarted) as raised:
        await relay.publish("chat", {"too": "early"})
    assert isinstance(raised.value, BrokerUnavailable)  # existing `except BrokerUnavailable` handlers still apply
    async with running_app(app) as url, httpx.AsyncClient(base_url=url) as c:
        resp = await c.post("/realtime/channels/chat/messages", json={"data": 1})
        assert resp.status_code == 503 and resp.json()["error"] == {"code": "not_started", "message": str(raised.value)}
    async with relay.lifespan():
        assert await relay.publish("chat", {"now": "started"})
    with pytest.raises(NotStarted):
        await relay.publish("chat", {"too": "late"})


@pytest.mark.redis
async def test_sync_and_async_publishers_reach_subscribers_on_two_replicas(
    redis_server: RedisServer, services: list[ServiceProcess], tmp_path: Path
) -> None:
    services.extend(ServiceProcess(tmp_path, {"REDIS_URL": redis_server.url}, name=f"p{i}") for i in range(2))
    for s in services:
        s.start()
    readers = await open_streams([SSEStream(f"{s.url}/channels/jobs/events") for s in services], 10)
    sync_ids = await asyncio.to_thread(
        lambda: [Publisher(redis_server.url).publish("jobs", {"n": i, "via": "sync"}, "done") for i in range(5)]
    )
    async with AsyncPublisher(redis_server.url) as pub:
        async_ids = [await pub.publish("jobs", {"n": i, "via": "async"}, "done") for i in range(5)]
    for r in readers:
        await r.wait_count(10, "done")
        assert r.ids("done") == sync_ids + async_ids
        assert [d["via"] for d in r.data("done")] == ["sync"] * 5 + ["async"] * 5
    # what a worker published is history like anything else: a late client resumes through it
    async with SSEStream(f"{services[0].url}/channels/jobs/events", last_id=sync_ids[2]) as late:
        await late.wait_count(7, "done")
        assert late.ids("done") == sync_ids[3:] + async_ids
    for r in readers:
        await r.close()


def test_publisher_errors_are_explicit() -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    with pytest.raises(PublishError):
        Publisher(dead).publish("room", {"x": 1})
    with pytest.raises(ValueError):
        Publisher(dead).publish("bad name", 1)
    with pytest.raises(ValueError):
        Publisher(dead).publish("room", 1, event="relay.reset")

    async def main() -> None:
        async with AsyncPublisher(dead) as pub:
            with pytest.raises(PublishError):
                await pub.publish("room", 1)

    asyncio.run(main())


async def test_batch_publish_with_a_bad_item_among_good_ones(memory_url: str) -> None:
    async with SSEStream(f"{memory_url}/events?channel=a&channel=b") as r, httpx.AsyncClient(base_url=memory_url) as c:
        resp = await c.post("/publish", json={"messages": [
            {"channel": "a", "data": 1},
            {"channel": "b", "data": 2, "event": "e"},
            {"channel": "bad name", "data": 3},
            {"channel": "a", "data": 4, "event": "relay.fake"},
            {"channel": "a"},
            {"channel": "a", "data": 5},
        ]})
        assert resp.status_code == 200
        body = resp.json()
        assert body["published"] == 3 and body["failed"] == 3
        results = body["results"]
        assert [("id" in x) for x in results] == [True, True, False, False, False, True]
        assert results[2]["error"]["status"] == 400 and results[3]["error"]["status"] == 422
        await r.wait(lambda r: len([e for e in r.all_events if e.event in ("message", "e")]) == 3)
        got = [e.data["data"] for e in r.all_events if e.event in ("message", "e")]
        assert got == [1, 2, 5]
        assert (await c.post("/publish", json={"messages": []})).status_code == 422
        too_many = {"messages": [{"channel": "a", "data": i} for i in range(101)]}
        assert (await c.post("/publish", json=too_many)).status_code == 413


@pytest.mark.redis
async def test_presence_counts_across_replicas_and_recovers_after_kill_9(
    redis_server: RedisServer, services: list[ServiceProcess], tmp_path: Path
) -> None:
    env = {"REDIS_URL": redis_server.url, "PRESENCE_INTERVAL": "0.5"}
    services.extend(ServiceProcess(tmp_path, env, name=f"pr{i}") for i in range(2))
    for s in services:
        s.start()
    url = services[0].url

    async def subscribers_become(n: int, timeout: float = 10) -> None:
        async with httpx.AsyncClient() as c:
            async def there() -> bool:
                return bool((await c.get(f"{url}/channels/lobby")).json()["subscribers"] == n)

            await eventually(there, timeout, f"{n} subscribers to lobby")

    await subscribers_become(0)
    readers = await open_streams([SSEStream(f"{s.url}/channels/lobby/events") for s in services for _ in range(3)])
    await subscribers_become(6)
    async with httpx.AsyncClient() as c:
        info = (await c.get(f"{url}/channels/lobby")).json()
        assert info["instances"] == 2 and info["last_id"] is None
        published = (await c.post(f"{url}/channels/lobby/messages", json={"data": 1})).json()["id"]
        assert (await c.get(f"{url}/channels/lobby")).json()["last_id"] == published
    await readers[0].close()
    await subscribers_become(5)
    services[1].kill()  # its three subscribers vanish without a goodbye; its report expires (3 intervals)
    await subscribers_become(2, timeout=10)
    for r in readers:
        await r.close()
    await subscribers_become(0)


async def test_presence_of_thousands_of_rooms_is_reported_in_a_few_calls_and_every_count_is_right(
    redis_server: RedisServer,
) -> None:
    """A reconnect storm opens thousands of rooms at once: their counts reach Redis in batches (a script call per
    200 rooms, not one per room, which cost the storm's core and Redis's), and each room's count is its own, the
    rooms that emptied included."""
    import redis.asyncio as aioredis

    from service.presence import RedisPresence

    rooms = [f"room-{i}" for i in range(3000)]
    presence = RedisPresence(redis_server.url, "i1", interval=30.0)
    probe = aioredis.Redis.from_url(redis_server.url)
    try:
        await probe.config_resetstat()
        await presence.start()
        for i, room in enumerate(rooms):
            presence.changed(room, i % 7)  # every seventh room is empty again

        async def counted() -> bool:  # read straight from Redis: only the reports run scripts
            async with probe.pipeline(transaction=False) as pipe:
                for room in rooms:
                    pipe.hget(f"sse:{{{room}}}:counts", "i1")
                got = await pipe.execute()
            return got == [str(i % 7).encode() if i % 7 else None for i in range(len(rooms))]

        await eventually(counted, 10, "every room's count")
        stats = await probe.info("commandstats")
        reports = sum(stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in ("evalsha", "eval"))
        assert reports <= 2 * (3000 // 200 + 1), reports  # a call per 200 rooms (the first may be sent twice: EVAL)
        assert [await presence.count(r) for r in rooms[:8]] == [(i % 7, 1 if i % 7 else 0) for i in range(8)]
        assert await probe.exists("sse:{room-7}:presence") == 0, "an empty room leaves no entry"
    finally:
        await presence.close()
        await probe.aclose()


@pytest.mark.redis
async def test_presence_join_and_leave_events(
    redis_server: RedisServer, services: list[ServiceProcess], tmp_path: Path
) -> None:
    services.append(ServiceProcess(tmp_path, {"REDIS_URL": redis_server.url, "PRESENCE_EVENTS": "true"},
                                   name="pe").start())
    url = services[0].url
    async with SSEStream(f"{url}/channels/lobby/events") as watcher:
        other = SSEStream(f"{url}/channels/lobby/events")
        await other.__aenter__()
        await watcher.wait_count(1, "relay.join")
        await other.close()
        await watcher.wait_count(1, "relay.leave")
        assert watcher.named("relay.join")[-1].data["instance"] == "pe"


def test_openapi_document_matches_the_routes() -> None:
    from service.api import routes
    from service.openapi import OPENAPI

    app = create_app(Settings.from_env({}))
    served: set[tuple[str, str]] = set()
    for route in [*routes, *[r for r in app.routes if isinstance(r, Route)]]:
        assert isinstance(route, Route)
        for method in route.methods or ():
            if method != "HEAD":
                served.add((route.path, method.lower()))
    documented = {(path, method) for path, ops in OPENAPI["paths"].items() for method in ops}
    assert served == documented
    assert not [r for r in app.routes if not isinstance(r, (Route, Mount))]


async def test_openapi_is_served_and_valid(memory_url: str) -> None:
    from openapi_spec_validator import validate

    async with httpx.AsyncClient(base_url=memory_url) as c:
        doc = (await c.get("/openapi.json")).json()
    validate(doc)
    assert "/channels/{channel}/events" in doc["paths"]


async def test_the_consumer_example_resumes_through_a_server_restart(tmp_path: Path) -> None:
    """examples/consume.py against a real service that is killed and replaced mid-stream (same Redis)."""
    import sys

    from .support import ROOT

    redis = RedisServer(tmp_path / "r")
    redis.dir.mkdir()
    redis.start()
    env = {"REDIS_URL": redis.url, "PUBLIC_CHANNELS": "*", "PUBLISH_RATE_LIMIT": "0"}
    svc = ServiceProcess(tmp_path, env, name="ex").start()
    try:
        consumer = await asyncio.create_subprocess_exec(
            sys.executable, str(ROOT / "examples" / "consume.py"), svc.url, "ex", "--count", "6",
            stdout=asyncio.subprocess.PIPE, cwd=ROOT,
        )
        async with httpx.AsyncClient(base_url=svc.url) as c:
            async def published(i: int) -> None:
                assert (await c.post("/channels/ex/messages", json={"data": i})).status_code == 202

            async def subscribed() -> bool:
                # the consumer's stream joined, and its channel is live at this replica (its position is set)
                return bool((await c.get("/channels/ex")).json()["subscribers"] >= 1
                            and "sse_broker_channels_pending 0.0" in (await c.get("/metrics")).text)

            await eventually(subscribed, 10, "the consumer subscribed")
            for i in range(3):
                await published(i)
        svc.kill()
        svc.start()  # same port, same Redis: the example reconnects with its Last-Event-ID
        async with httpx.AsyncClient(base_url=svc.url) as c:
            for i in range(3, 6):
                assert (await c.post("/channels/ex/messages", json={"data": i})).status_code == 202
        out, _ = await asyncio.wait_for(consumer.communicate(), 30)
        assert [line.split()[-1] for line in out.decode().splitlines()] == ["0", "1", "2", "3", "4", "5"]
    finally:
        svc.kill()
        redis.stop()


async def test_the_consumer_example_gives_up_loudly_on_a_private_channel(memory_url: str, tmp_path: Path) -> None:
    """A 401 cannot be fixed by retrying: the example says so and exits, instead of hammering the relay."""
    import sys

    from service import Settings, create_app

    from .support import ROOT, running_app

    settings = Settings.from_env({}, instance_id="closed", public_channels=("chat",))
    async with running_app(create_app(settings)) as url:
        consumer = await asyncio.create_subprocess_exec(
            sys.executable, str(ROOT / "examples" / "consume.py"), url, "private-room",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
        )
        out, err = await asyncio.wait_for(consumer.communicate(), 20)
    assert consumer.returncode == 2, (out, err)
    assert b"giving up: 401" in err and b"token" in err
