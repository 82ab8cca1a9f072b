"""Hostile input: bodies, channel names, stream parameters and cursors that try to break the parser or forge a
field into another client's stream. Each gets a clear 4xx and publishes nothing; subscribers reading the raw bytes
(checked by `parse_strict`) see exactly the frames that were sent, whatever the data holds.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest

from .sse import SSEStream, parse_strict
from .support import serve

pytestmark = pytest.mark.timeout(60)


def _nested(depth: int) -> bytes:
    return b'{"data":' + b"[" * depth + b"]" * depth + b"}"


async def _chunked(body: bytes) -> AsyncIterator[bytes]:
    for i in range(0, len(body), 8192):
        yield body[i:i + 8192]


BAD_BODIES = [
    ("unknown field", b'{"data": 1, "admin": true}', 422),
    ("no data", b'{"event": "x"}', 422),
    ("not an object", b'[1, 2]', 422),
    ("event not a string", b'{"data": 1, "event": 5}', 422),
    ("event with newline", b'{"data": 1, "event": "a\\n\\ndata: forged"}', 422),
    ("event with CR", b'{"data": 1, "event": "a\\rid: 9"}', 422),
    ("event with NUL", b'{"data": 1, "event": "a\\u0000"}', 422),
    ("event with space", b'{"data": 1, "event": "a b"}', 422),
    ("event too long", b'{"data": 1, "event": "' + b"e" * 65 + b'"}', 422),
    ("reserved event", b'{"data": 1, "event": "relay.reset"}', 422),
    ("empty body", b"", 400),
    ("not json", b"{data: 1}", 400),
    ("invalid utf-8", b'{"data": "\xff\xfe"}', 400),
    ("lone surrogate", b'{"data": "\\ud800"}', 400),
    ("number overflow", b'{"data": 1e400}', 400),
    ("nested past MAX_JSON_DEPTH", _nested(100), 400),
    ("nested past orjson's limit", _nested(5000), 400),
    ("huge", b'{"data": "' + b"x" * 70_000 + b'"}', 413),
]


async def test_hostile_bodies_get_a_clear_4xx_and_publish_nothing() -> None:
    async with serve(public_channels=("*",)) as s, httpx.AsyncClient(base_url=s.url) as c:
        async with SSEStream(f"{s.url}/channels/t/events") as live:
            for case, body, status in BAD_BODIES:
                resp = await c.post("/channels/t/messages", content=body, headers={"Content-Type": "application/json"})
                assert resp.status_code == status, (case, resp.text)
                error = resp.json()["error"]
                assert error["message"] and error["code"], case
                chunked = await c.post("/channels/t/messages", content=_chunked(body))  # no Content-Length
                assert chunked.status_code == status, (case, "chunked")
                batch = await c.post("/publish", content=b'{"messages": [' + body + b"]}")
                assert batch.status_code < 500
                assert batch.status_code != 200 or batch.json()["published"] == 0, case
            deep = await c.post("/channels/t/messages", content=_nested(100))
            assert deep.json()["error"]["code"] == "too_deep" and "MAX_JSON_DEPTH" in deep.json()["error"]["message"]
            assert (await c.post("/channels/t/messages", content=_nested(60))).status_code == 202  # within the limit
            await live.wait_count(1)
            assert len(live.data("message")) == 1
        assert len(await s.history("t")) == 1


async def test_hostile_channel_names_and_stream_parameters() -> None:
    async with serve(public_channels=("*",), max_channels_per_stream=3) as s, httpx.AsyncClient(base_url=s.url) as c:
        bad_paths = ["/channels/a%0Adata:%20x/messages", "/channels/a%0D%0Aevent:x/messages",
                     "/channels/a%20b/messages", f"/channels/{'x' * 129}/messages", "/channels/%00/messages",
                     "/channels/caf%C3%A9/messages"]
        for path in bad_paths:
            resp = await c.post(path, json={"data": 1})
            assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_channel", path
            assert (await c.get(path.replace("/messages", "/events"))).status_code == 400
        for query in ["channel=a%0Adata:x", "channel=a&channel=b&channel=c&channel=d", "channel=", ""]:
            assert (await c.get(f"/events?{query}")).status_code == 400, query
        assert s.relay.streams == set()
        # a hostile Last-Event-ID is only ever echoed as JSON, inside the client's own reset event
        hostile = "1\n\ndata: {\"forged\": true}\n\nid: 9"
        async with SSEStream(f"{s.url}/channels/t/events?{urlencode({'last_event_id': hostile})}", keep_raw=True) as raw:
            await raw.wait(lambda s: b"relay.reset" in (s.raw or b""))
        events = parse_strict(bytes(raw.raw or b""))
        assert [e.event for e in events] == ["relay.hello", "relay.reset"]
        assert events[1].data["last_event_id"] == hostile
        async with SSEStream(f"{s.url}/events?channel=t&channel=u", last_id="t=1-0,x=\tdata:", keep_raw=True) as raw:
            await raw.wait(lambda s: b"relay.reset" in (s.raw or b""))
        assert [e.event for e in parse_strict(bytes(raw.raw or b""))] == ["relay.hello", "relay.reset"]
        assert await s.history("t") == []


async def test_no_input_injects_a_field_into_another_clients_stream() -> None:
    """Subscribers read raw bytes while hostile publishes happen; every frame they get is exactly what was sent."""
    hostile_strings = [
        "\n\ndata: {\"forged\": true}\n\n", "\r\nevent: admin\r\n", "\rid: 999\r", "id: 1\nretry: 1\n",
        "\x00\x01\x1b[31m", "\u2028data: x\u2029", "\x85event: y", ": comment\n\n", "🙂" * 10, "\\n\\r",
    ]
    async with serve(public_channels=("*",)) as s, httpx.AsyncClient(base_url=s.url) as c:
        async with SSEStream(f"{s.url}/channels/t/events", keep_raw=True) as single, \
                SSEStream(f"{s.url}/events?channel=t&channel=u", keep_raw=True) as multi:
            sent: list[Any] = []
            for text in hostile_strings:
                for data in (text, {text: [text]}, [text, 1]):
                    assert (await c.post("/channels/t/messages", json={"data": data})).status_code == 202
                    sent.append(data)
                # the same text as an event name or a channel is refused, as an id it is never accepted
                assert (await c.post("/channels/t/messages", json={"data": 1, "event": text})).status_code == 422
                resp = await c.post("/publish", json={"messages": [{"channel": text, "data": 1}]})
                assert resp.status_code == 200 and resp.json()["published"] == 0
                resp = await c.post("/server/send", json={"messages": [{"role": text, "content": text}]})
                assert resp.status_code == 200  # the old contract takes any strings, on its own channel
            assert (await c.post("/channels/t/messages", json={"data": "end", "event": "done"})).status_code == 202
            await single.wait(lambda s: b'data: "end"\n\n' in (s.raw or b""))
            await multi.wait(lambda s: b'"data":"end"}\n\n' in (s.raw or b""))
            single_events = [e for e in parse_strict(bytes(single.raw or b"")) if not e.event.startswith("relay.")]
            multi_events = [e for e in parse_strict(bytes(multi.raw or b"")) if not e.event.startswith("relay.")]
        assert [e.data for e in single_events] == [*sent, "end"]
        assert [e.data["data"] for e in multi_events] == [*sent, "end"]
        assert {e.event for e in single_events} == {"message", "done"}


async def test_data_has_no_characters_that_splitlines_clients_break_on() -> None:
    """U+2028/U+2029/U+0085 are escaped in data: clients that split lines like str.splitlines() (httpx's
    aiter_lines, many hand-written Python SSE clients) would otherwise see a line break there."""
    async with serve(public_channels=("*",)) as s, httpx.AsyncClient(base_url=s.url) as c:
        async with SSEStream(f"{s.url}/channels/t/events", keep_raw=True) as raw:
            await c.post("/channels/t/messages", json={"data": "a\u2028\u2028event: forged\u2028data: 1\u2028\u2028"})
            await c.post("/channels/t/messages", json={"data": "end", "event": "done"})
            await raw.wait(lambda s: b'data: "end"\n\n' in (s.raw or b""))
        text = bytes(raw.raw or b"").decode()
        lines = text.splitlines()
        assert not [line for line in lines if line.startswith("event: forged")]
        assert text.count("\n") == len(lines)
