"""One contract, three brokers: in-memory, Redis on fakeredis (fast), Redis on a real redis-server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from service.broker import Broker
from service.broker.memory import MemoryBroker
from service.broker.redis import RedisBroker
from service.broker.redis_format import keys_for
from service.message import START, Message, Position, parse_position

from .support import Changes, RedisServer, eventually

pytestmark = pytest.mark.timeout(30)


class Collect:
    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.resets: list[tuple[str, str]] = []
        self.positions: dict[str, Position] = {}
        self.changed = Changes()

    def dispatch(self, message: Message) -> None:
        self.messages.append(message)
        self.changed.notify()

    def reset(self, channel: str, reason: str, epoch: str | None = None) -> None:
        self.resets.append((channel, reason))
        self.changed.notify()

    def established(self, channel: str, position: Position) -> None:
        self.positions[channel] = position

    async def wait_count(self, n: int, timeout: float = 5.0) -> None:
        await eventually(lambda: len(self.messages) >= n, timeout, f"{n} messages dispatched", on=self.changed)


async def _ready(broker: Broker, timeout: float = 5.0) -> None:
    await eventually(broker.ready, timeout, "the broker ready", every=0.01)


async def _want(broker: Broker, *channels: str) -> None:
    for channel in channels:
        broker.want(channel)
    for channel in channels:
        await asyncio.wait_for(broker.live(channel), 5)


def _key(message_id: str) -> tuple[int, int]:
    position = parse_position(message_id)
    assert position is not None
    return position.key


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
    await _want(broker, "room")
    ids = [(await broker.publish("room", b'{"n":%d}' % i, "ev" if i % 2 else None)).id for i in range(10)]
    await broker.publish("elsewhere", b"1")
    keys = [_key(i) for i in ids]
    assert keys == sorted(keys) and len(set(keys)) == 10
    epochs = {parse_position(i).epoch for i in ids}  # type: ignore[union-attr]
    assert len(epochs) == 1 and None not in epochs, "every id carries the channel's epoch"
    await sink.wait_count(10)
    assert [m.id for m in sink.messages] == ids
    assert sink.messages[1].event == "ev" and sink.messages[0].event is None
    assert bytes(sink.messages[3].data) == b'{"n":3}'
    assert str(broker.position("room")) == ids[-1]

    page = await broker.history("room", parse_position(ids[4]), 100)
    assert [m.id for m in page.messages] == ids[5:] and page.complete and not page.more
    everything = await broker.history("room", None, 100)
    assert [m.id for m in everything.messages] == ids
    assert (await broker.history("room", START, 100)).complete
    first = await broker.history("room", START, 3)
    assert [m.id for m in first.messages] == ids[:3] and first.more
    assert (await broker.last_id("room")) == ids[-1]


async def test_unwanted_channels_are_not_delivered(make_broker: Callable[..., Broker]) -> None:
    broker = make_broker()
    sink = Collect()
    await broker.start(sink)
    await _ready(broker)
    await _want(broker, "a", "b")
    broker.unwant("b")
    await broker.publish("b", b"1")
    await broker.publish("a", b"2")
    await sink.wait_count(1)
    await broker.publish("a", b"3")  # a sentinel: order per channel means anything from b would be in by now
    await sink.wait_count(2)
    assert [m.channel for m in sink.messages] == ["a", "a"]


async def test_join_racing_leave_ends_subscribed(make_broker: Callable[..., Broker]) -> None:
    """The hub's join/leave race: unwant then want again before the broker acted on either."""
    broker = make_broker()
    sink = Collect()
    await broker.start(sink)
    await _ready(broker)
    await _want(broker, "r")
    for _ in range(20):
        broker.unwant("r")
        broker.want("r")
    await asyncio.wait_for(broker.live("r"), 5)
    published = await broker.publish("r", b"1")
    await sink.wait_count(1)
    assert [m.id for m in sink.messages] == [published.id]


async def test_trimmed_history_is_reported_incomplete(make_broker: Callable[..., Broker]) -> None:
    broker = make_broker(history_size=5)
    await broker.start(Collect())
    await _ready(broker)
    ids = [(await broker.publish("t", b"%d" % i)).id for i in range(300)]
    page = await broker.history("t", parse_position(ids[0]), 100)
    assert not page.complete and page.reason == "expired"
    recent = await broker.history("t", parse_position(ids[-3]), 100)
    assert recent.complete and [m.id for m in recent.messages] == ids[-2:]
    assert len((await broker.history("t", None, 1000)).messages) < 300
    assert not (await broker.history("t", START, 100)).complete, "`0` after trimming: something is gone"


async def test_hostile_positions_are_judged_not_retried(make_broker: Callable[..., Broker]) -> None:
    broker = make_broker()
    await broker.start(Collect())
    await _ready(broker)
    last = (await broker.publish("h", b"1")).id
    position = parse_position(last)
    assert position is not None
    future = Position((position.key[0] + 3_600_000, 0), position.epoch)
    assert (await broker.history("h", future, 10)).reason == "future"
    other_epoch = Position(position.key, "zzzzzzzz")
    assert (await broker.history("h", other_epoch, 10)).reason == "epoch"
    huge = Position((2**64 - 1, 2**64 - 1), None)
    assert (await broker.history("h", huge, 10)).reason == "future"
    assert (await broker.history("nothing-here", Position((5, 0), "abc"), 10)).reason == "epoch"


async def test_idempotency_key_returns_the_first_id(make_broker: Callable[..., Broker]) -> None:
    broker = make_broker()
    sink = Collect()
    await broker.start(sink)
    await _ready(broker)
    await _want(broker, "i")
    first = await broker.publish("i", b"1", None, "key-1")
    again = await broker.publish("i", b"1", None, "key-1")
    other = await broker.publish("i", b"2", None, "key-2")
    assert not first.duplicate and again.duplicate and again.id == first.id and other.id != first.id
    await sink.wait_count(2)
    assert [m.id for m in sink.messages] == [first.id, other.id]
    assert [m.id for m in (await broker.history("i", None, 10)).messages] == [first.id, other.id]


async def test_idempotency_key_reused_for_another_message_is_refused(make_broker: Callable[..., Broker]) -> None:
    """The same key with other data, or another event, is refused and publishes nothing (answering the first id
    would tell the caller its new message went out); the same body still gets the first id; on another channel
    the key is another key (keys are scoped to their channel)."""
    from service.broker import IdempotencyKeyReused

    broker = make_broker()
    sink = Collect()
    await broker.start(sink)
    await _ready(broker)
    await _want(broker, "r")
    first = await broker.publish("r", b'{"n":1}', "order", "key-1")
    for data, event in ((b'{"n":2}', "order"), (b'{"n":1}', "other"), (b'{"n":1}', None)):
        with pytest.raises(IdempotencyKeyReused) as refused:
            await broker.publish("r", data, event, "key-1")
        assert refused.value.first_id == first.id and "key-1" in str(refused.value)
    again = await broker.publish("r", b'{"n":1}', "order", "key-1")
    assert again.duplicate and again.id == first.id
    elsewhere = await broker.publish("r2", b'{"n":2}', "order", "key-1")
    assert not elsewhere.duplicate
    await sink.wait_count(1)
    assert [m.id for m in (await broker.history("r", None, 10)).messages] == [first.id]


async def test_keys_share_one_hash_tag() -> None:
    stream, live = keys_for("sse", "room-1")
    assert stream == "sse:{room-1}:log" and live == "sse:{room-1}:live"
