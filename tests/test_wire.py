"""The wire format (service/wire.py): every frame is sse-starlette's `ServerSentEvent(...).encode()` with LF, once
per message; the old chat's form of the page's messages; data from other writers kept to one line."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sse_starlette import ServerSentEvent

from service import wire
from service.message import Message

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
names = st.none() | st.from_regex(r"[A-Za-z0-9_.:/-]{1,64}", fullmatch=True)


def reference(data: bytes, event: str | None = None, id: str | None = None) -> bytes:
    """What sse-starlette writes for this event, encoding it whole."""
    return ServerSentEvent(data.decode(), event=event, id=id, sep="\n").encode()


@given(json_values, names)
def test_message_frames_are_sse_starlettes_byte_for_byte(value: object, event: str | None) -> None:
    data = wire.encode_data(value)
    m = Message("room", (1732440000000, 7), "k2x9ab01", event, data)
    assert bytes(m.frame) == reference(data, event, "1732440000000-7-k2x9ab01")
    assert bytes(m.data) == data and orjson.loads(m.data) == orjson.loads(orjson.dumps(value))
    assert m.chunk == b"%x\r\n%s\r\n" % (len(m.frame), bytes(m.frame))
    assert b"\r" not in bytes(m.frame) and bytes(m.frame).count(b"\n\n") == 1
    envelope = m.envelope
    assert envelope == reference(b'{"channel":"room","id":"1732440000000-7-k2x9ab01","data":%s}' % data, event)


def test_relay_events_pings_and_retry_hints_are_sse_starlettes() -> None:
    hello = wire.control("relay.hello", {"instance": "a", "channels": ["chat"]}, "0", 3000)
    assert hello == ServerSentEvent('{"instance":"a","channels":["chat"]}', event="relay.hello", id="0", retry=3000,
                                    sep="\n").encode()
    assert hello == b'id: 0\nevent: relay.hello\ndata: {"instance":"a","channels":["chat"]}\nretry: 3000\n\n'
    assert wire.PING == b": ping\n\n" == wire.ping_event().encode()
    assert wire.retry(1500) == b"retry: 1500\n\n"
    assert wire.id_line("a=1-0,b=0") == b"id: a=1-0,b=0\n"
    # a hostile cursor echoed in a reset stays one line of JSON
    reset = wire.control("relay.reset", {"last_event_id": "x\u2028\x85\ny"})
    assert reset.count(b"\n") == 3 and b"\xe2\x80\xa8" not in reset and b"\xc2\x85" not in reset


def test_control_events_have_no_id() -> None:
    m = Message.control_event("r", "relay.reset", {"reason": "epoch"})
    assert bytes(m.frame) == b'event: relay.reset\ndata: {"reason":"epoch"}\n\n'
    assert m.envelope == bytes(m.frame) and m.legacy_chunk is m.chunk


@pytest.mark.parametrize("raw, expected", [
    (b'{\n  "a": 1\n}', b'{"a":1}'),  # pretty-printed JSON from another writer: compacted
    (b"not json\r\nat all", b'"not json\\r\\nat all"'),  # not JSON: kept as a JSON string of its text
    (b'"\xff"', b'"\xef\xbf\xbd"'),  # invalid UTF-8: replaced
    (b'{"a":"one line"}', b'{"a":"one line"}'),  # what the relay writes: as it is (the same object)
])
def test_data_from_other_writers_becomes_one_line(raw: bytes, expected: bytes) -> None:
    m = Message("r", (1, 0), None, None, raw)
    assert bytes(m.data) == expected
    assert bytes(m.frame) == b"id: 1-0\ndata: %s\n\n" % expected


def test_the_old_chat_sees_the_pages_messages_in_its_own_form_built_once() -> None:
    said = Message("chat", (5, 1), "ep", "chat", wire.encode_data({"name": "ann", "text": "hi <b>", "ts": 17}))
    legacy = said.legacy_chunk
    assert bytes(said.legacy_frame) == b'id: 5-1-ep\ndata: [{"role":"ann","content":"hi <b>"}]\n\n'
    assert legacy == b"%x\r\n%s\r\n" % (len(said.legacy_frame), bytes(said.legacy_frame))
    assert said.legacy_chunk is legacy, "cached on the message: once per message, not per stream"
    assert said.size == len(said.chunk) + len(legacy)
    # an old page's own post, and anything that is not the page's chat message, goes as it is
    for event, value in ((None, [{"role": "user", "content": "x"}]), ("chat", {"text": 5}), ("n", {"text": "x"}),
                         ("chat", ["not", "an", "object"])):
        m = Message("chat", (6, 0), None, event, wire.encode_data(value))
        assert m.legacy_chunk is m.chunk and m.size == len(m.chunk)
    nameless = Message("chat", (7, 0), None, "chat", b'{"text":"who?"}')
    assert bytes(nameless.legacy_frame) == b'id: 7-0\ndata: [{"role":"","content":"who?"}]\n\n'


@given(json_values, st.none() | st.text(max_size=12), st.none() | st.text(max_size=30))
def test_any_event_name_and_id_frame_as_sse_starlette_frames_them(value: object, event: str | None,
                                                                  id: str | None) -> None:
    """Frames are formatted directly, not through sse-starlette's encoder: whatever the event name and id (a
    foreign writer's, with line breaks or any text), the bytes are sse-starlette's, and the data's offset is
    right."""
    data = wire.one_line_json(wire.encode_data(value))
    frame, at = wire.message_frame(data, event, id)
    assert frame == ServerSentEvent(data.decode(), event=event, id=id, sep="\n").encode()
    assert frame[at:at + len(data)] == data and frame[at + len(data):] == b"\n\n"


@given(json_values, st.text(min_size=1, max_size=12), st.none() | st.text(max_size=30),
       st.none() | st.integers(0, 10**9))
def test_relay_events_frame_as_sse_starlette_frames_them(value: object, event: str, id: str | None,
                                                        retry: int | None) -> None:
    """Relay events (`relay.hello`, `relay.reset`, ...) are formatted directly too: whatever the name, id and
    `retry:`, the bytes are sse-starlette's."""
    frame = wire.control(event, value, id, retry)
    assert frame == ServerSentEvent(wire.encode_data(value).decode(), event=event, id=id, retry=retry,
                                    sep="\n").encode()


@given(st.text(max_size=20), st.text(max_size=20), st.lists(st.from_regex(r"[A-Za-z0-9_.:-]{1,16}", fullmatch=True),
                                                            min_size=1, max_size=4))
def test_the_greeting_json_is_encoded_once_per_relay_and_stays_the_whole_objects(
        instance: str, default_channel: str, channels: list[str]) -> None:
    from service.relay import hello_json

    head, tail = hello_json(instance, default_channel)
    assert head + wire.encode_data(channels) + tail == wire.encode_data(
        {"instance": instance, "channels": channels, "default_channel": default_channel})


@given(st.integers(0, 10**12))
def test_retry_hints_frame_as_sse_starlette_frames_them(ms: int) -> None:
    assert wire.retry(ms) == ServerSentEvent(retry=ms, sep="\n").encode()
