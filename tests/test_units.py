"""Unit tests of cursor parsing, resume judgement, the drain's pacing (a fake clock), the per-message metrics and
uvicorn_glue's light event."""

from __future__ import annotations

import asyncio

import pytest

from service.broker.base import judge_resume
from service.config import Settings
from service.message import MAX_ID_PART, START, Position, parse_position
from service.relay import Relay
from service.stream import parse_cursor
from service.subscriber import Subscriber

pytestmark = pytest.mark.timeout(10)


@pytest.mark.parametrize(("raw", "expected"), [
    ("0", START),
    ("5", Position((5, 0))),
    ("1700000000000-3", Position((1700000000000, 3))),
    ("1700000000000-3-k2x9ab01", Position((1700000000000, 3), "k2x9ab01")),
    (f"{MAX_ID_PART}-{MAX_ID_PART}", Position((MAX_ID_PART, MAX_ID_PART))),
    (f"{MAX_ID_PART + 1}-0", None),  # Redis would reject it as an invalid id: malformed, not an outage
    ("99999999999999999999", None),
    ("1-2-UPPER", None),
    ("1--2", None),
    ("", None),
    ("x", None),
    ("\u0661-2", None),  # other scripts' digits (a cursor from `?last_id=`): not an id Redis could have made
    ("1-\uff12", None),
])
def test_positions_parse_or_are_malformed(raw: str, expected: Position | None) -> None:
    assert parse_position(raw) == expected


def test_cursors_of_single_and_multi_channel_streams() -> None:
    assert parse_cursor(None, ("a",)) == ({}, False)
    assert parse_cursor("7-1-ep", ("a", "b")) == ({"a": Position((7, 1), "ep"), "b": Position((7, 1), "ep")}, False)
    assert parse_cursor("a=7-1-ep,b=0", ("a", "b")) == ({"a": Position((7, 1), "ep"), "b": START}, False)
    assert parse_cursor("a=7-1,c=3", ("a", "b")) == ({}, True)  # a channel the stream does not have
    assert parse_cursor("a=7-1,b=zzz", ("a", "b")) == ({}, True)
    assert parse_cursor("x" * 10_000, ("a",)) == ({}, True)


@pytest.mark.parametrize(("after", "state", "reason"), [
    (Position((10, 0), "e1"), {"epoch": "e1", "top": (12, 0), "first": (5, 0)}, None),
    (Position((10, 0), "e0"), {"epoch": "e1", "top": (12, 0), "first": (5, 0)}, "epoch"),
    (Position((99, 0), "e1"), {"epoch": "e1", "top": (12, 0), "first": (5, 0)}, "future"),
    (Position((3, 0), "e1"), {"epoch": "e1", "top": (12, 0), "first": (5, 0), "trimmed": True}, "expired"),
    (Position((3, 0), "e1"), {"epoch": "e1", "top": (12, 0), "first": (5, 0), "trimmed": False}, None),
    (Position((10, 0), "e1"), {"epoch": "e1", "top": (12, 0), "lost": (11, 0), "first": (12, 0)}, "expired"),
    (Position((12, 0), "e1"), {"epoch": "e1", "top": (12, 0), "exists": False}, None),  # expired, nothing missed
    (Position((11, 0), "e1"), {"epoch": "e1", "top": (12, 0), "exists": False}, "expired"),
    (START, {"epoch": None, "top": (0, 0), "exists": False}, None),
    (Position((5, 0), "e1"), {"epoch": None, "top": (0, 0), "exists": False}, "epoch"),  # all of it gone
    (START, {"epoch": "e1", "top": (12, 0), "first": (5, 0), "trimmed": True}, "expired"),
])
def test_resume_judgement(after: Position, state: dict[str, object], reason: str | None) -> None:
    full = {"epoch": None, "top": (0, 0), "lost": (0, 0), "exists": True, "trimmed": False, "first": (0, 0), **state}
    assert judge_resume(after, **full) == reason  # type: ignore[arg-type]


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


class _Leaving(Subscriber):
    """A stream whose client goes as soon as it is closed (its generator would unregister it)."""

    relay: Relay
    closed_at: float

    def close(self, reason: str) -> None:
        super().close(reason)
        self.closed_at = self.relay._clock()
        self.relay.unregister(self)


async def test_drain_spreads_closes_over_most_of_the_grace_and_returns_when_all_left() -> None:
    clock = _Clock()
    relay = Relay(Settings.from_env({}, drain_grace=10.0), clock=clock, sleep=clock.sleep)
    await relay.start()
    try:
        subs = []
        for _ in range(9):
            sub = _Leaving(("chat",), 10)
            sub.relay = relay
            relay.register(sub)
            subs.append(sub)
        await asyncio.wait_for(relay.drain(), 5)
        assert relay.draining and relay.streams == set()
        times = sorted(s.closed_at - 100.0 for s in subs)
        assert times == pytest.approx([8.0 * (i + 1) / 10 for i in range(9)])  # evenly over 80 % of the grace
        assert all(s.closed_reason == "drain" for s in subs)
        assert relay.admit() == "draining"
    finally:
        await relay.close()


def test_per_message_metrics_read_as_prometheus_client_would_write_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hot counters are plain integers exposed at scrape time: the exposition must be what a prometheus_client
    Counter and Histogram fed the same observations would print (names, bucket bounds, cumulative counts, sum)."""
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    import service.metrics as metrics_module
    from service.message import Message

    now = 1_800_000_000.0
    monkeypatch.setattr(metrics_module.time, "time", lambda: now)
    ages = [-0.5, 0.0, 0.0004, 0.001, 0.0031, 0.01, 0.2, 0.9999, 1.0, 2.5, 7.0]  # ahead of us, on bounds, past all
    reference = CollectorRegistry()
    histogram = Histogram("sse_publish_to_dispatch_seconds", "x", buckets=metrics_module.LATENCY_BUCKETS,
                          registry=reference)
    ours = metrics_module.Metrics()
    for i, age in enumerate(ages):
        sent_ms = round((now - age) * 1000)
        ours.received_message(Message("room", (sent_ms, i), None, None, b"1"))
        histogram.observe(max(0.0, now - sent_ms / 1000))
    ours.fanned_out(3)
    ours.fanned_out(0)
    ours.published_message()

    def lines(text: bytes, prefix: str) -> list[str]:
        return [line for line in text.decode().splitlines() if line.startswith(prefix)]

    prefix = "sse_publish_to_dispatch_seconds_"
    assert lines(ours.render(), prefix) == [x for x in lines(generate_latest(reference), prefix) if "_created" not in x]
    text = ours.render().decode()
    assert f"sse_messages_received_total {float(len(ages))}" in text
    assert "sse_messages_delivered_total 3.0" in text and "sse_messages_published_total 1.0" in text


async def test_light_event_behaves_as_asyncio_event_for_what_uvicorn_calls() -> None:
    """uvicorn's flow control and request cycle call set, clear, is_set and wait: the same answers from both."""
    from service.uvicorn_glue import LightEvent

    for make in (asyncio.Event, LightEvent):
        event = make()
        assert not event.is_set()
        waiters = [asyncio.ensure_future(event.wait()) for _ in range(3)]
        cancelled = asyncio.ensure_future(event.wait())
        await asyncio.sleep(0)
        cancelled.cancel()
        await asyncio.sleep(0)
        assert not any(w.done() for w in waiters)
        event.set()
        assert await asyncio.gather(*waiters) == [True, True, True]
        assert event.is_set() and await event.wait() is True  # set: returns at once
        event.clear()
        again = asyncio.ensure_future(event.wait())
        await asyncio.sleep(0)
        assert not again.done()
        event.set()
        assert await again is True
    assert LightEvent(True).is_set()


def test_every_part_finds_the_uvicorn_internals_it_needs() -> None:
    """uvicorn_protocol leaves out (with a warning) any guard whose uvicorn internals moved: on the uvicorn the
    project declares, none may be left out, and the composed protocol has every part."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    from service.uvicorn_protocol import PARTS, guarded_protocol, missing_internals

    assert {part.__name__: missing_internals(part) for part in PARTS} == {part.__name__: [] for part in PARTS}
    composed = guarded_protocol(10.0, 5, ())
    assert composed.__mro__[1:len(PARTS) + 1] == PARTS
    assert issubclass(composed, HttpToolsProtocol)
    assert guarded_protocol(10.0, 5, ()).open_by_address is not composed.open_by_address  # type: ignore[attr-defined]


async def test_the_guards_add_one_attribute_to_a_connection_so_its_dict_stays_shared() -> None:
    """The parts keep their per-connection state in one object (`guards`): every attribute of their own pushed
    uvicorn's protocol past the keys CPython shares between instances, and each connection got a dict of its
    own (~1.3 KiB per idle stream). After the same request, the guarded protocol has uvicorn's attributes and
    `guards`, nothing else."""
    import asyncio
    from typing import Any

    import uvicorn
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    from uvicorn.server import ServerState

    from service.uvicorn_protocol import guarded_protocol

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 202, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    class Transport:
        def __init__(self) -> None:
            self.written = b""

        def pause_reading(self) -> None: ...

        def resume_reading(self) -> None: ...

        def close(self) -> None: ...

        def write(self, data: Any) -> None:
            self.written += bytes(data)

        def get_extra_info(self, name: str, default: Any = None) -> Any:
            return {"peername": ("127.0.0.2", 40000), "sockname": ("127.0.0.1", 8000)}.get(name, default)

        def is_closing(self) -> bool:
            return False

    keys = {}
    for cls in (HttpToolsProtocol, guarded_protocol(10.0, 5, ())):
        config = uvicorn.Config(app, http=cls, ws="none", lifespan="off", log_config=None)
        config.load()
        protocol = config.http_protocol_class(config=config, server_state=ServerState(), app_state={})
        transport = Transport()
        protocol.connection_made(transport)
        protocol.data_received(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n{}")
        for _ in range(20):
            if b"ok" in transport.written:
                break
            await asyncio.sleep(0)
        assert transport.written.startswith(b"HTTP/1.1 202") and transport.written.endswith(b"ok")
        keys[cls] = set(vars(protocol))
        protocol.connection_lost(None)
    plain, guarded = keys.values()
    assert guarded - plain == {"guards"} and plain - guarded == set()


async def test_a_connection_set_up_by_lean_start_is_the_one_uvicorn_sets_up() -> None:
    """LeanStart does uvicorn's `__init__` and `connection_made` itself (the per-server lookups once): every
    attribute uvicorn sets, in uvicorn's order, with the same value, or for the per-connection objects one of the
    same kind in the same state. And a uvicorn whose set-up code changed gets uvicorn's own (the part is left
    out)."""
    from typing import Any, ClassVar

    import httptools
    import uvicorn
    from uvicorn.protocols.http.flow_control import FlowControl
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    from uvicorn.server import ServerState

    from service.uvicorn_protocol import PARTS, LeanStart, Part, guarded_protocol, missing_internals

    class Transport:
        def get_extra_info(self, name: str, default: Any = None) -> Any:
            return {"peername": ("127.0.0.2", 40000), "sockname": ("127.0.0.1", 8000)}.get(name, default)

        def is_closing(self) -> bool:
            return False

    async def app(scope: Any, receive: Any, send: Any) -> None: ...

    state, transport = ServerState(), Transport()
    made = {}
    for cls in (HttpToolsProtocol, guarded_protocol(10.0, 0, (), parts=[LeanStart])):
        config = uvicorn.Config(app, http=cls, ws="none", lifespan="off", log_config=None, timeout_keep_alive=7,
                                root_path="/r")
        both = []
        for _ in range(2):  # the second connection takes the per-server values from the cache
            protocol = cls(config=config, server_state=state, app_state={"a": 1}, _loop=None)
            protocol.connection_made(transport)  # type: ignore[arg-type]
            assert protocol in state.connections
            both.append(dict(vars(protocol)))
        made[cls] = both
    (plain, _), (lean, lean_again) = made.values()
    assert list(lean) == list(lean_again) == [*plain, "guards"]
    assert {k: v for k, v in lean_again.items() if k not in ("parser", "flow", "pipeline", "guards")} == {
        k: v for k, v in lean.items() if k not in ("parser", "flow", "pipeline", "guards")}
    for key, value in plain.items():
        ours = lean[key]
        if key == "parser":
            assert type(ours) is type(value) is httptools.HttpRequestParser
        elif key == "flow":
            assert type(ours) is FlowControl and ours._transport is transport  # noqa: SLF001
            assert (ours.read_paused, ours.write_paused, ours._is_writable_event.is_set()) == (False, False, True)  # noqa: SLF001
        elif key == "pipeline":
            assert not ours and not value
            ours.appendleft("b")
            ours.appendleft("a")
            assert (ours.pop(), ours.pop()) == ("b", "a")
        elif key in ("config", "app"):
            assert type(ours) is type(value)
        else:
            assert ours == value, key
    assert (lean["server"], lean["client"], lean["scheme"], lean["timeout_keep_alive"], lean["root_path"]) == (
        ("127.0.0.1", 8000), ("127.0.0.2", 40000), "http", 7, "/r")

    class Changed(LeanStart):
        mirrors: ClassVar[dict[str, tuple[str, ...]]] = {**LeanStart.mirrors, "protocol.__init__": ("config",)}

    assert missing_internals(Changed) == ["protocol.__init__ (changed)"]  # what leaves a part out at import
    # Left out, the other parts run on uvicorn's own set-up.
    without = guarded_protocol(10.0, 0, (), parts=[p for p in PARTS if p is not LeanStart])
    protocol = without(config=config, server_state=state, app_state={})
    protocol.connection_made(transport)  # type: ignore[arg-type]
    assert Part in without.__mro__ and LeanStart not in without.__mro__ and protocol.guards.due is not None


def test_a_part_whose_internals_moved_is_left_out_and_the_rest_still_compose() -> None:
    from typing import ClassVar

    from service.uvicorn_protocol import Part, guarded_protocol, missing_internals

    class Moved(Part):
        needs: ClassVar[dict[str, tuple[str, ...]]] = {"protocol": ("a_method_uvicorn_never_had",)}

    assert missing_internals(Moved) == ["protocol.a_method_uvicorn_never_had"]
    composed = guarded_protocol(10.0, 5, (), parts=[Moved])
    assert Moved not in composed.__mro__


async def test_the_command_budget_serves_waiters_in_order_and_times_the_oldest_out_first() -> None:
    import asyncio

    from service.broker.base import BrokerBusy
    from service.broker.redis_errors import CommandBudget

    budget = CommandBudget(2, 0.2)
    await budget.acquire("a")
    await budget.acquire("b")
    assert budget.in_use == 2
    order: list[str] = []

    async def take(name: str) -> None:
        await budget.acquire(name)
        order.append(name)

    waiters = [asyncio.ensure_future(take(n)) for n in ("c", "d", "e")]
    await asyncio.sleep(0)
    assert budget.waiting == 3
    budget.release()
    budget.release()
    await asyncio.sleep(0)
    assert order == ["c", "d"], "first come, first served; a released slot goes straight to the next in line"
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(BrokerBusy) as busy:
        await waiters[2]
    assert busy.value.kind == "busy" and 0.1 < loop.time() - started < 0.5
    assert budget.in_use == 2 and budget.waiting == 0


async def test_a_waiter_cancelled_as_its_slot_arrives_passes_the_slot_on() -> None:
    import asyncio

    from service.broker.redis_errors import CommandBudget

    budget = CommandBudget(1, 5.0)
    await budget.acquire("held")
    first = asyncio.ensure_future(budget.acquire("first"))
    second = asyncio.ensure_future(budget.acquire("second"))
    await asyncio.sleep(0)
    budget.release()  # handed to `first`...
    first.cancel()  # ...which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await first
    await asyncio.wait_for(second, 1)
    assert budget.in_use == 1, "the slot was passed on, not lost"
    budget.release()
    assert budget.in_use == 0


@pytest.mark.parametrize("suffix", ["/messages", "/events"])
def test_the_fast_routes_read_the_channel_of_a_path_as_the_router_does(suffix: str) -> None:
    """app._FastRoutes reads `{channel}` from the path itself for publishes and channel streams (the regex and
    child scope of Starlette's Route.matches were a visible share of a publish): it must find exactly what the
    router finds, and nothing where the router finds nothing."""
    from starlette.routing import Match, Route

    from service.app import _channel_in

    route = Route("/channels/{channel}" + suffix, lambda request: None)
    for channel in ["a", "", "a/b", "%2F", "é", "a.b:c", " ", "x" * 300, "..", "a\x00"]:
        for path in [f"/channels/{channel}{suffix}", f"/channels/{channel}{suffix}/", f"/channels/{channel}{suffix}x",
                     f"/channel/{channel}{suffix}", f"/channels{suffix}"]:
            match, child = route.matches({"type": "http", "path": path, "method": "GET", "root_path": ""})
            expected = child["path_params"]["channel"] if match is not Match.NONE else None
            assert _channel_in(path, suffix) == expected, path


def test_a_header_read_from_the_scope_is_what_starlette_reads() -> None:
    """service/headers.py answers as `Request.headers.get` does (the first value, Latin-1, None when absent), and
    its query pre-check never says "absent" for a query Starlette would find the name in."""
    from starlette.requests import Request

    from service.headers import header, query_value

    raw = [(b"host", b"a"), (b"x-dup", b"1"), (b"x-dup", b"2"), (b"x-latin", "café".encode("latin-1"))]
    scope = {"type": "http", "headers": raw, "query_string": b""}
    request = Request(scope)
    for name in ("host", "x-dup", "x-latin", "authorization", "cookie"):
        assert header(scope, name.encode()) == request.headers.get(name)
    for query in (b"", b"token=x", b"a=1&token=", b"%74oken=x", b"tok%65n=y", b"x=token", b"tokens=1"):
        scope = {"type": "http", "headers": [], "query_string": query}
        if "token" in Request(scope).query_params:
            assert query_value(scope, b"token"), query


async def test_a_send_is_timed_only_once_it_waits_and_then_as_if_awaited_whole() -> None:
    """sse._within: a send that completes at once arms no timer; one that waits is awaited under the timeout, its
    result and exceptions handed through, and one that waits too long is cancelled inside and raises TimeoutError."""
    from service.sse import _within

    log: list[object] = []

    async def at_once(message: dict[str, object]) -> None:
        log.append(message["n"])

    async def waits(message: dict[str, object]) -> None:
        for _ in range(3):
            await asyncio.sleep(0)
        fut = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(0.01, fut.set_result, message["n"])
        log.append(await fut)

    async def fails(message: dict[str, object]) -> None:
        await asyncio.sleep(0)
        raise OSError("gone")

    async def stalls(message: dict[str, object]) -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            log.append("cancelled")
            raise

    await _within(at_once, {"n": 1}, 1.0)  # type: ignore[arg-type]
    await _within(waits, {"n": 2}, 1.0)  # type: ignore[arg-type]
    assert log == [1, 2]
    with pytest.raises(OSError, match="gone"):
        await _within(fails, {"n": 3}, 1.0)  # type: ignore[arg-type]
    with pytest.raises(TimeoutError):
        await _within(stalls, {"n": 4}, 0.05)  # type: ignore[arg-type]
    assert log[-1] == "cancelled"
    task = asyncio.ensure_future(_within(stalls, {"n": 5}, 5.0))  # type: ignore[arg-type]
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert log[-1] == "cancelled" and len(log) == 4, "a cancellation from outside reaches the send, not a timeout"
