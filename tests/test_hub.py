"""Unit tests of the hub and the subscriber: fan-out, wanted channels, floors, byte budgets, resets, held writes."""

from __future__ import annotations

import ast
import asyncio

import pytest

from service.connection import StreamWriter
from service.hub import Hub
from service.message import START, Message, Position
from service.metrics import Metrics
from service.subscriber import Subscriber
from service.uvicorn_glue import DirectWriter, _TickBatch

pytestmark = pytest.mark.timeout(10)


class SlowBroker:
    """Records wishes; becomes live only when the test says so (a broker that takes its time to subscribe)."""

    def __init__(self) -> None:
        self.wanted: set[str] = set()
        self.calls: list[tuple[str, str]] = []
        self.live_now: dict[str, asyncio.Event] = {}
        self.waited: dict[str, asyncio.Future[None]] = {}

    def want(self, channel: str) -> None:
        self.calls.append(("want", channel))
        self.wanted.add(channel)
        self.live_now.setdefault(channel, asyncio.Event())

    def unwant(self, channel: str) -> None:
        self.calls.append(("unwant", channel))
        self.wanted.discard(channel)

    def is_live(self, channel: str) -> bool:
        return self.live_now[channel].is_set()

    async def live(self, channel: str) -> None:
        await self.live_now[channel].wait()

    def when_live(self, channel: str) -> asyncio.Future[None] | None:
        if self.live_now[channel].is_set():
            return None
        if channel not in self.waited:
            self.waited[channel] = asyncio.ensure_future(self.live(channel))
        return self.waited[channel]

    def position(self, channel: str) -> Position:
        return START

    def stats(self) -> dict[str, float]:
        return {}


def _message(channel: str, n: int, size: int = 10) -> Message:
    return Message(channel, (1000 + n, 0), "ep", None, b'"' + b"x" * size + b'"')


async def _live_and_parked(sub: Subscriber, writer: StreamWriter) -> asyncio.Task[list[Message] | None]:
    """As a stream does: its connection attached, live (history sent), then parked waiting for its next batch,
    so the hub may write to it directly. The task ends when the stream has something to write itself."""
    sub.attach(writer)
    sub.go_live({})
    parked = asyncio.ensure_future(sub.next_batch(first=True))
    await asyncio.sleep(0)
    assert sub.writes_directly and not parked.done()
    return parked


def test_join_racing_leave_leaves_the_channel_wanted_with_its_subscriber() -> None:
    """The old race: a leave scheduled an unsubscribe that ran after a new join. Now both are synchronous
    wishes, in order, so whatever interleaving the tasks had, the last word is the join."""
    broker = SlowBroker()
    hub = Hub(broker, Metrics())  # type: ignore[arg-type]
    a, b = Subscriber(("room",), 10), Subscriber(("room",), 10)
    hub.add(a)
    hub.release(a)
    hub.add(b)
    assert broker.wanted == {"room"}
    assert broker.calls == [("want", "room"), ("unwant", "room"), ("want", "room")]
    hub.dispatch(_message("room", 1))
    assert len(b) == 1 and len(a) == 0


async def test_live_waits_for_the_broker_and_dispatch_reaches_only_joined_subscribers() -> None:
    broker = SlowBroker()
    hub = Hub(broker, Metrics())  # type: ignore[arg-type]
    sub = Subscriber(("a", "b"), 10)
    hub.add(sub)
    waiting = asyncio.create_task(hub.live(sub))
    await asyncio.sleep(0)
    assert not waiting.done()
    broker.live_now["a"].set()
    broker.live_now["b"].set()
    await asyncio.wait_for(waiting, 1)
    hub.dispatch(_message("a", 1))
    hub.dispatch(_message("c", 1))
    assert [m.channel for m in sub.take()] == ["a"]


async def test_streams_waiting_for_a_channel_share_its_wait_and_wake_for_pings_their_end_and_live() -> None:
    """Hub.when_live and Subscriber.wait_live (stream._Opening.wait_live): every stream waiting for a channel waits
    on the broker's one future; each is woken by the ticker's ping, its own end, or the channel going live."""
    broker = SlowBroker()
    hub = Hub(broker, Metrics())  # type: ignore[arg-type]
    a, b, c = Subscriber(("room",), 10), Subscriber(("room",), 10), Subscriber(("room",), 10)
    for sub in (a, b, c):
        hub.add(sub)
    pending = hub.when_live(a)
    assert pending is not None and hub.when_live(b) is pending and hub.when_live(c) is pending
    waits = {sub: asyncio.ensure_future(sub.wait_live(pending)) for sub in (a, b, c)}
    await asyncio.sleep(0)
    assert not any(w.done() for w in waits.values())
    a.heartbeat()  # a ping is due: only `a` wakes, and it takes the ping
    await asyncio.sleep(0)
    assert waits[a].done() and not waits[b].done() and a.take_ping()
    b.close("gone")
    await asyncio.sleep(0)
    assert waits[b].done() and not waits[c].done()
    waits[a] = asyncio.ensure_future(a.wait_live(pending))
    waits[a].cancel()  # a stream cancelled while it waits leaves the shared wait alone
    await asyncio.sleep(0)
    assert not pending.done()
    broker.live_now["room"].set()
    await asyncio.wait_for(waits[c], 1)
    assert hub.when_live(c) is None and pending.done() and not pending.cancelled()


def test_a_full_queue_cuts_the_subscriber_off_by_count_or_by_bytes() -> None:
    broker = SlowBroker()
    hub = Hub(broker, Metrics())  # type: ignore[arg-type]
    by_count = Subscriber(("r",), capacity=3, byte_capacity=1 << 20)
    by_bytes = Subscriber(("r",), capacity=1000, byte_capacity=3000)
    hub.add(by_count)
    hub.add(by_bytes)
    for n in range(4):
        hub.dispatch(_message("r", n, size=1000))
    assert by_count.closed_reason == "slow" and by_count.overflowed
    assert by_bytes.closed_reason == "slow" and by_bytes.queued_bytes <= 3000
    assert broker.wanted == set(), "both were released, so the channel is no longer wanted"


def test_floors_drop_what_history_sent_and_a_reset_clears_them() -> None:
    sub = Subscriber(("r",), 100)
    for n in range(5):
        sub.offer(_message("r", n))
    sub.go_live({"r": (1002, 0)})
    assert [m.key[0] for m in sub.take()] == [1003, 1004]
    sub.go_live({"r": (1010, 0)})
    sub.offer(_message("r", 9))  # at or below the floor: history already sent it
    reset = Message.control_event("r", "relay.reset", {"reason": "epoch"})
    sub.offer(reset)
    sub.offer(_message("r", 2))  # after a reset, ids of the new history may be lower: kept
    taken = sub.take()
    assert taken[0] is reset and [m.key[0] for m in taken[1:]] == [1002]


def test_a_message_is_held_in_one_encoding() -> None:
    m = Message("r", (5, 1), "abc", "chat", b'{"a":1}')
    assert m.id == "5-1-abc"
    assert bytes(m.frame) == b'id: 5-1-abc\nevent: chat\ndata: {"a":1}\n\n'
    assert m.chunk == b"%x\r\n%s\r\n" % (len(m.frame), bytes(m.frame))
    assert bytes(m.data) == b'{"a":1}'
    assert m.size == len(m.chunk), "the frame and data are views, not copies"


class _Conn:
    """The parts of uvicorn's request cycle a DirectWriter reads, with a transport that records each send."""

    def __init__(self) -> None:
        self.sends: list[bytes] = []
        self.transport = self
        self.flow = self
        self.write_paused = False
        self.chunked_encoding = False
        self.disconnected = False
        self.response_started = True
        self.response_complete = False
        self.closed = False  # closed under us, without uvicorn's flags knowing (uvloop then raises on write)

    def is_closing(self) -> bool:
        return False  # as a transport whose close uvicorn has not seen yet

    def write(self, data: bytes) -> None:
        if self.closed:
            raise RuntimeError("unable to perform operation on <TCPTransport closed=True>")
        self.sends.append(bytes(data))


async def test_direct_writes_of_one_turn_of_the_loop_reach_each_stream_in_one_send_in_order() -> None:
    """A read from Redis brings five messages, dispatched in one turn of the loop: each stream gets its own in one
    send at the end of that turn, in order; nothing above the writer holds or releases anything."""
    batch = _TickBatch()
    hub = Hub(SlowBroker(), Metrics())  # type: ignore[arg-type]
    conns = [_Conn() for _ in range(3)]
    parked = []
    for i, conn in enumerate(conns):
        sub = Subscriber(("a",) if i < 2 else ("b",), 100)
        hub.add(sub)
        parked.append(await _live_and_parked(sub, DirectWriter(conn, batch)))  # waiting: written directly
    messages = [Message.from_wire(ch, f"1-{n}", None, b'{"n":%d}' % n) for n, ch in enumerate("aabab")]
    for message in messages:
        hub.dispatch(message)
    assert all(conn.sends == [] for conn in conns), "nothing goes out before the turn ends"
    await asyncio.sleep(0)
    for conn, channel in zip(conns, "aab", strict=True):
        assert conn.sends == [b"".join(bytes(m.frame) for m in messages if m.channel == channel)], \
            "each stream's messages in one send, in order"
    hub.dispatch(Message.from_wire("b", "1-9", None, b"{}"))  # one message alone: its own send
    await asyncio.sleep(0)
    assert len(conns[2].sends) == 2
    assert not any(task.done() for task in parked), "no stream was woken"
    for task in parked:
        task.cancel()


async def test_a_stream_that_writes_itself_sends_the_direct_writes_held_for_it_first() -> None:
    """`flush()` before a stream's own bytes (its end, a ping): they never pass what the hub handed it."""
    batch = _TickBatch()
    conn = _Conn()
    writer = DirectWriter(conn, batch)
    message = Message.from_wire("a", "1-1", None, b"{}")
    assert writer.write(message)
    writer.flush()
    conn.write(b"0\r\n\r\n")  # the stream's own last chunk
    await asyncio.sleep(0)
    assert conn.sends == [bytes(message.frame), b"0\r\n\r\n"]


async def test_a_write_that_fails_ends_that_stream_alone_and_never_reaches_the_dispatcher() -> None:
    """A client's transport closed under us (uvicorn flagged another request of the connection, so the stream's
    flag says connected): the send raises in uvloop. Nothing may raise into the hub (the broker's reader calls
    it) or into the batch's flush; the other streams of the channel get the message, and the dead one is
    detached and ended at its next message."""
    batch = _TickBatch()
    hub = Hub(SlowBroker(), Metrics())  # type: ignore[arg-type]
    conns = [_Conn() for _ in range(3)]
    subs, parked = [], []
    for conn in conns:
        sub = Subscriber(("a",), 100)
        hub.add(sub)
        parked.append(await _live_and_parked(sub, DirectWriter(conn, batch)))
        subs.append(sub)
    conns[1].closed = True
    hub.dispatch(Message.from_wire("a", "1-1", None, b'{"n":1}'))  # must not raise
    await asyncio.sleep(0)  # nor the flush
    assert [len(c.sends) for c in conns] == [1, 0, 1]
    assert conns[1].disconnected
    hub.dispatch(Message.from_wire("a", "1-2", None, b'{"n":2}'))
    await asyncio.sleep(0)
    assert subs[1].closed_reason == "gone"
    assert [len(c.sends) for c in conns] == [2, 0, 2], "the dead stream is no longer offered anything"
    hub.dispatch(Message.from_wire("a", "1-3", None, b'{"n":3}'))
    await asyncio.sleep(0)
    assert [len(c.sends) for c in conns] == [3, 0, 3]
    assert parked[1].done() and parked[1].result() is None, "the dead stream's next batch is its end"
    for task in parked:
        task.cancel()


async def test_a_stream_whose_delivery_raises_is_ended_and_the_others_still_get_the_message() -> None:
    """Whatever a delivery raises (a bug in a writer, not a closed socket), dispatch goes on for the rest."""

    class Broken:
        disconnected = False

        def write(self, message: Message) -> bool:
            raise ValueError("a bug")

        def flush(self) -> None:
            return None

    hub = Hub(SlowBroker(), Metrics())  # type: ignore[arg-type]
    subs = [Subscriber(("a",), 100) for _ in range(3)]
    for sub in subs:
        hub.add(sub)
    parked = await _live_and_parked(subs[0], Broken())
    hub.dispatch(Message.from_wire("a", "1-1", None, b"{}"))
    assert subs[0].closed_reason == "failed"
    assert [len(s) for s in subs[1:]] == [1, 1]
    hub.dispatch(Message.from_wire("a", "1-2", None, b"{}"))
    assert [len(s) for s in subs[1:]] == [2, 2]
    assert await parked is None, "the failed stream ends"


def test_a_reset_into_the_history_a_stream_already_resumed_from_costs_it_nothing() -> None:
    """Redis came back empty; a stream resumed during the outage read the new history itself (its own reset, then
    every retained message). When the broker then notices the new epoch, its reset is not for that stream: it
    would get a second reset and every message again. A stream still on the old history gets it."""
    hub = Hub(SlowBroker(), Metrics())  # type: ignore[arg-type]
    resumed, behind = Subscriber(("a",), 100), Subscriber(("a",), 100)
    hub.add(resumed)
    hub.add(behind)
    resumed.go_live({"a": (200, 1)}, {"a": "new"})
    behind.go_live({"a": (100, 0)}, {"a": "old"})
    hub.reset("a", "epoch", "new")
    for n in (0, 1):  # the broker's replay of the new history from its start
        hub.dispatch(Message.from_wire("a", f"200-{n}-new", None, b"%d" % n))
    hub.dispatch(Message.from_wire("a", "300-0-new", None, b"9"))
    assert [m.id for m in resumed.take()] == ["300-0-new"], "no second reset, no message twice"
    assert [m.event or m.id for m in behind.take()] == ["relay.reset", "200-0-new", "200-1-new", "300-0-new"]


def test_a_subscriber_is_slots_only_and_its_fields_are_read_only_outside() -> None:
    """An idle stream holds no instance dict, and what other modules read cannot be assigned."""
    sub = Subscriber(("a",), 10)
    assert not hasattr(sub, "__dict__")
    assert all(name.startswith("_") for name in Subscriber.__slots__)
    for name in ("channels", "client", "user", "closed_reason", "single", "overflowed", "writes_directly"):
        with pytest.raises(AttributeError):
            setattr(sub, name, None)


def _subscriber_field_names() -> set[str]:
    """Every name a subscriber's state goes by: its slots, with and without the underscore, its properties, and
    the names its fields had when they were public."""
    names = {n for slot in Subscriber.__slots__ for n in (slot, slot.lstrip("_"))}
    names |= {n for n, v in vars(Subscriber).items() if isinstance(v, property)}
    return names | {"direct", "writer", "wrote", "ping_due", "parked", "origin", "floors", "epochs"}


def _assignments_to_fields(tree: ast.Module, fields: set[str]) -> list[tuple[int, str]]:
    """(line, source) of every assignment to an attribute named like a subscriber's field, except a class's own
    `self.<name>` in a class that is not a Subscriber (another class's field of the same name)."""
    found: list[tuple[int, str]] = []

    def targets_of(node: ast.AST) -> list[ast.expr]:
        if isinstance(node, ast.Assign):
            return list(node.targets)
        if isinstance(node, ast.AnnAssign | ast.AugAssign):
            return [node.target]
        if isinstance(node, ast.Delete):
            return list(node.targets)
        if isinstance(node, ast.For | ast.AsyncFor | ast.comprehension):
            return [node.target]
        if isinstance(node, ast.withitem) and node.optional_vars is not None:
            return [node.optional_vars]
        if isinstance(node, ast.NamedExpr):
            return [node.target]
        return []

    def flatten(target: ast.expr) -> list[ast.expr]:
        if isinstance(target, ast.Tuple | ast.List):
            return [t for e in target.elts for t in flatten(e)]
        if isinstance(target, ast.Starred):
            return flatten(target.value)
        if isinstance(target, ast.Subscript):  # sub.origin[channel] = ...: the field's contents
            return flatten(target.value)
        return [target]

    def visit(node: ast.AST, own_self: bool) -> None:
        if isinstance(node, ast.ClassDef):
            bases = {b.id if isinstance(b, ast.Name) else b.attr if isinstance(b, ast.Attribute) else "" for b in
                     node.bases}
            own_self = "Subscriber" not in bases
        for target in (t for raw in targets_of(node) for t in flatten(raw)):
            if isinstance(target, ast.Attribute) and target.attr in fields:
                if own_self and isinstance(target.value, ast.Name) and target.value.id in ("self", "cls"):
                    continue
                found.append((target.lineno, ast.unparse(target)))
        if isinstance(node, ast.Call) and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant):
            func = ast.unparse(node.func)
            if func in ("setattr", "object.__setattr__", "delattr") and node.args[1].value in fields:
                found.append((node.lineno, ast.unparse(node)))
        for child in ast.iter_child_nodes(node):
            visit(child, own_self)

    visit(tree, False)
    return found


def test_no_module_outside_subscriber_py_assigns_a_subscribers_fields() -> None:
    """A stream owns its state: pings, disconnects, direct writes and its end are decided in subscriber.py, and
    everyone else calls its methods. Any assignment elsewhere to an attribute named like one of its fields
    (through any name: `sub.x`, `self.sub.x`, `s.x`, a subclass's `self.x`, `setattr`) fails here."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    fields = _subscriber_field_names()
    sources = [p for d in ("service", "tests", "bench", "examples") for p in sorted((root / d).rglob("*.py"))]
    assert len(sources) > 50
    offenders = [f"{path.relative_to(root)}:{line}: {text}"
                 for path in sources if path != root / "service" / "subscriber.py"
                 for line, text in _assignments_to_fields(ast.parse(path.read_text(), str(path)), fields)]
    assert offenders == []
    # The scan finds what it is meant to find.
    planted = "sub.wrote = True\nself.sub._direct = w\nx.origin['a'] = p\nclass S(Subscriber):\n def f(self):\n" \
              "  self._queue = []\nsetattr(s, 'ping_due', True)\nclass Other:\n def f(self):\n  self.channels = ()"
    assert [line for line, _ in _assignments_to_fields(ast.parse(planted), fields)] == [1, 2, 3, 6, 7]
