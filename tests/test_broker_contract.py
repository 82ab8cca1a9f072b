"""One contract, three brokers: in-memory, Redis on fakeredis (fast), Redis on a real redis-server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from service.broker import Broker
from service.broker.memory import MemoryBroker
from service.broker.redis import RedisBroker
from service.broker.redis_format import keys_for
from service.message import Message, parse_id

from .support import RedisServer, wait_until

pytestmark = pytest.mark.timeout(30)


class Collect:
    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.changed = asyncio.Event()

    def dispatch(self, message: Message) -> None:
        self.messages.append(message)
        self.changed.set()

    async def wait_count(self, n: int, timeout: float = 5.0) -> None:
        await wait_until(self.changed, lambda: len(self.messages) >= n, timeout)


async def _ready(broker: Broker, timeout: float = 5.0) -> None:
    async def loop() -> None:
        while not broker.ready():
            await asyncio.sleep(0.01)
    await asyncio.wait_for(loop(), timeout)


@pytest.fixture(params=["memory", "fakeredis", "redis"])
async def make_broker(request: pytest.FixtureRequest, tmp_path) -> AsyncIterator[Callable[..., Broker]]:
    made: list[Broker] = []
    server = None
    if request.param == "redis":
        server = RedisServer(tmp_path)
        server.start()

    def make(**kw: object) -> Broker:
        if request.param == "memory":
            b: Broker = MemoryBroker(**kw)  # type: ignore[arg-type]
        elif request.param == "fakeredis":
            import fakeredis

            fake = fakeredis.FakeServer()
            b = RedisBroker(
                "redis://fake", probe_interval=0.5,
                command_client=fakeredis.FakeAsyncRedis(server=fake),
                subscriber_client=lambda host, port: fakeredis.FakeAsyncRedis(server=fake),
                **kw,  # type: ignore[arg-type]
            )
        else:
            assert server is not None
            b = RedisBroker(server.url, probe_interval=0.5, **kw)  # type: ignore[arg-type]
        made.append(b)
        return b

    make.kind = request.param  # type: ignore[attr-defined]
    yield make
    for b in made:
        await b.close()
    if server is not None:
        server.stop()


async def test_publish_history_and_live_delivery(make_broker: Callable[..., Broker]) -> None:
    broker = make_broker()
    sink = Collect()
    await broker.start(sink)
    await _ready(broker)
    await broker.subscribe("room")
    ids = [await broker.publish("room", b'{"n":%d}' % i, "ev" if i % 2 else None) for i in range(10)]
    await broker.publish("elsewhere", b"1")
    keys = [parse_id(i) for i in ids]
    assert keys == sorted(keys) and len(set(keys)) == 10
    await sink.wait_count(10)
    assert [m.id for m in sink.messages] == ids
    assert sink.messages[1].event == "ev" and sink.messages[0].event is None
    assert sink.messages[3].data == b'{"n":3}'

    history = await broker.history("room", parse_id(ids[4]))
    assert [m.id for m in history.messages] == ids[5:]
    assert history.complete
    everything = await broker.history("room", None)
    assert [m.id for m in everything.messages] == ids
    assert (await broker.history("room", (0, 0))).complete


async def test_unsubscribed_channels_are_not_delivered(make_broker: Callable[..., Broker]) -> None:
    broker = make_broker()
    sink = Collect()
    await broker.start(sink)
    await _ready(broker)
    await broker.subscribe("a")
    await broker.subscribe("b")
    await broker.unsubscribe("b")
    await broker.publish("b", b"1")
    await broker.publish("a", b"2")
    await sink.wait_count(1)
    assert [m.channel for m in sink.messages] == ["a"]


async def test_trimmed_history_is_reported_incomplete(make_broker: Callable[..., Broker]) -> None:
    broker = make_broker(history_size=5)
    await broker.start(Collect())
    await _ready(broker)
    ids = [await broker.publish("t", b"%d" % i) for i in range(300)]
    history = await broker.history("t", parse_id(ids[0]))
    assert not history.complete
    recent = await broker.history("t", parse_id(ids[-3]))
    assert recent.complete and [m.id for m in recent.messages] == ids[-2:]
    assert len((await broker.history("t", None)).messages) < 300


async def test_keys_share_one_hash_tag() -> None:
    stream, live = keys_for("sse", "room-1")
    assert stream == "sse:{room-1}:log" and live == "sse:{room-1}:live"
