"""The SSE wire format: every byte a stream writes is built here, with sse-starlette's `ServerSentEvent`.

One module, so the field order, the separator and what may appear on a line are decided in one place, by the
SSE library the service is specified with: sse-starlette's encoder writes the fields (comment, `id:`,
`event:`, `data:`, `retry:`, blank line) and strips CR/LF from ids and event names, so no value can open a field
of its own.

Choices, and why:

- **LF only** (`sep="\\n"`), not sse-starlette's default CRLF: every SSE parser accepts LF, it is one byte less
  per line, and the relay's frames are checked byte for byte by the tests (no CR anywhere in a stream).
- **JSON by `encode_data`** (orjson, U+0085/U+2028/U+2029 escaped), handed to `ServerSentEvent` as text,
  rather than `JSONServerSentEvent`: its `json.dumps(ensure_ascii=False)` leaves those three characters raw,
  and clients that split lines like `str.splitlines()` would cut the event there; orjson is also several
  times faster.
- **Once per message.** `message.Message` asks for its frame once, when the message is created, and every
  subscriber gets those bytes. `message_frame` has `ServerSentEvent` encode the event with an empty `data:`
  line and puts the data's bytes into that line: sse-starlette's encoder splits data on line ends with a
  regular expression, about 12 us per KiB (0.7 ms for a 60 KB message, paid again by every history read of it),
  and the relay's data is one line of JSON by construction (`one_line_json` makes sure of it). The result is
  byte for byte `ServerSentEvent(data).encode()`: checked when this module is imported (it falls back to the
  full encoder if an sse-starlette version ever writes the fields differently) and by tests/test_wire.py.
- Only a multi-channel stream's `id:` line is encoded per delivery (`id_line`): it is that client's cursor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from sse_starlette import ServerSentEvent

__all__ = ["PING", "SEP", "chunk", "comment", "control", "control_encoded", "encode_data", "id_line", "message_frame",
           "one_line_json", "ping_event", "retry"]

SEP = "\n"

# Characters JSON may carry raw inside strings but that str.splitlines()-style line splitters (httpx's
# aiter_lines, many Python SSE clients) treat as line ends: escaped, so every client sees one `data:` line.
_LINE_BREAKERS = ((b"\xc2\x85", b"\\u0085"), (b"\xe2\x80\xa8", b"\\u2028"), (b"\xe2\x80\xa9", b"\\u2029"))


def encode_data(value: Any) -> bytes:
    """The JSON of a message's data: compact, UTF-8, one line for every kind of client (JSON escapes CR/LF)."""
    data = orjson.dumps(value)
    if not data.isascii():  # the three are multi-byte: ASCII JSON (most of it) cannot hold one
        for raw, escaped in _LINE_BREAKERS:
            data = data.replace(raw, escaped)
    return data


def one_line_json(data: bytes) -> bytes:
    """`data` as the relay's own encoder writes it: one line of UTF-8. What the relay and its publishers write
    always is; bytes from another writer (straight into Redis) that are not are re-encoded, as the JSON they
    hold (pretty-printed JSON becomes compact) or else as a JSON string of their text."""
    one_line = data.find(b"\n") == -1 and data.find(b"\r") == -1  # (`in` raises and swallows a TypeError first)
    if one_line and data.isascii():  # the common case, decided without decoding
        return data
    try:
        text = data.decode()
    except UnicodeDecodeError:
        text = data.decode("utf-8", "replace")
    else:
        if one_line:
            return data
    try:
        return encode_data(orjson.loads(text))
    except orjson.JSONDecodeError:
        return encode_data(text)


def _event(data: str | None = None, event: str | None = None, id: str | None = None, retry: int | None = None,
           comment: str | None = None) -> bytes:
    return ServerSentEvent(data, event=event, id=id, retry=retry, comment=comment, sep=SEP).encode()


def _spliced(data: bytes, event: str | None, id: str | None) -> tuple[bytes, int]:
    empty = _event("", event, id)  # ... "data: \n\n": the data goes before the last two separators
    at = len(empty) - 2
    return empty[:at] + data + empty[at:], at


def _full(data: bytes, event: str | None, id: str | None) -> tuple[bytes, int]:
    frame = _event(data.decode(), event, id)
    return frame, len(frame) - len(data) - 2


def _formatted(data: bytes, event: str | None, id: str | None) -> tuple[bytes, int]:
    """The event as sse-starlette lays it out, formatted directly (its encoder, even spliced, was half of a
    message's creation on the delivery path). Only for an id and an event name without line breaks, which
    sse-starlette would strip: ours never have one (our ids, and names validated on publish); a foreign writer's
    may, and those take the spliced path."""
    if id is None:
        if event is None:
            return b"data: %s\n\n" % data, 6
        if "\n" in event or "\r" in event:
            return _spliced(data, event, id)
        head = b"event: %s\n" % event.encode()
    elif "\n" in id or "\r" in id or event is not None and ("\n" in event or "\r" in event):
        return _spliced(data, event, id)
    elif event is None:
        head = b"id: %s\n" % id.encode()
    else:
        head = b"id: %s\nevent: %s\n" % (id.encode(), event.encode())
    return b"%sdata: %s\n\n" % (head, data), len(head) + 6


def _exact(frame: Callable[[bytes, str | None, str | None], tuple[bytes, int]]) -> bool:
    """Whether `frame` writes what sse-starlette's encoder writes (checked at import: a sse-starlette that lays
    events out differently makes the service fall back to its encoder)."""
    sample = encode_data({"text": "héllo \u2028", "n": [1, 2.5, None]})
    for event, id in ((None, None), ("chat", None), (None, "1-0"), ("chat", "1732440000000-0-k2x9ab01"),
                      ("ünï/cödé", "5"), ("a\r\nb", "1-0\n"), ("x", "\r")):
        if frame(sample, event, id) != _full(sample, event, id):
            return False
    return True


_FRAME = _formatted if _exact(_formatted) and _exact(_spliced) else _spliced if _exact(_spliced) else _full


def message_frame(data: bytes, event: str | None = None, id: str | None = None) -> tuple[bytes, int]:
    """One event (`id:` and `event:` when given, `data:`) and the offset of the data in it.

    `data` must be one line of JSON (`one_line_json`); the frame is `ServerSentEvent(data).encode()`.
    """
    return _FRAME(data, event, id)


def _control_encoded(data: bytes, event: str, id: str | None, retry: int | None) -> bytes:
    return _event(data.decode(), event, id, retry)


def _control_formatted(data: bytes, event: str, id: str | None, retry: int | None) -> bytes:
    """A relay event as sse-starlette lays it out, formatted directly (its encoder was a twentieth of a stream's
    opening, for the greeting). `data` is one line (`encode_data`); an id or name with a line break, which
    sse-starlette would strip, or a `retry` that is not a plain int, takes its encoder."""
    if "\n" in event or "\r" in event or id is not None and ("\n" in id or "\r" in id) or (
            retry is not None and type(retry) is not int):
        return _control_encoded(data, event, id, retry)
    head = b"event: %s\n" % event.encode() if id is None else b"id: %s\nevent: %s\n" % (id.encode(), event.encode())
    return b"%sdata: %s\n%s" % (head, data, b"\n" if retry is None else b"retry: %d\n\n" % retry)


def _control_exact() -> bool:
    """Whether `_control_formatted` writes what sse-starlette's encoder writes (checked at import, as `_exact`)."""
    sample = encode_data({"instance": "héllo \u2028", "channels": ["a", "b"], "n": [1, 2.5, None]})
    for event, id, retry in (("relay.hello", "0", 3000), ("relay.hello", "a=1-0-ep,b=0", 1),
                             ("relay.reset", None, None), ("ünï", "1732440000000-0-k2x9ab01", None),
                             ("relay.unavailable", None, 4500), ("a\r\nb", "1-0\n", 5), ("x", "\r", None)):
        if _control_formatted(sample, event, id, retry) != _control_encoded(sample, event, id, retry):
            return False
    return True


_CONTROL = _control_formatted if _control_exact() else _control_encoded


def control(event: str, payload: Any, id: str | None = None, retry: int | None = None) -> bytes:
    """A relay event (`relay.hello`, `relay.reset`, `relay.expired`): named, JSON data, optionally an id and a
    `retry:` hint in the same block (a block without data is an empty event to some clients)."""
    return _CONTROL(encode_data(payload), event, id, retry)


def control_encoded(data: bytes, event: str, id: str | None = None, retry: int | None = None) -> bytes:
    """`control` for a payload already encoded (`encode_data`, or pieces of its output joined): the greeting's
    constant parts are encoded once per relay, not once per stream."""
    return _CONTROL(data, event, id, retry)


def _retry_formatted(ms: int) -> bytes:
    return b"retry: %d\n\n" % ms if type(ms) is int else _event(retry=ms)


# Formatted directly, as control events are (a drain or shutdown sends one to every stream), when it is what
# sse-starlette's encoder writes (checked at import).
_RETRY = _retry_formatted if all(_retry_formatted(ms) == _event(retry=ms) for ms in (0, 7, 1500, 10**9)) else (
    lambda ms: _event(retry=ms))


def retry(ms: int) -> bytes:
    """A `retry:` block alone: the reconnect delay, sent when a stream ends or is turned away."""
    return _RETRY(ms)


def comment(text: str) -> bytes:
    return _event(comment=text)


def ping_event() -> ServerSentEvent:
    """The heartbeat comment as an sse-starlette event (`EventSourceResponse(ping_message_factory=...)`)."""
    return ServerSentEvent(comment="ping", sep=SEP)


PING = ping_event().encode()


def id_line(value: str) -> bytes:
    """An `id:` line on its own: the head of a multi-channel event, whose id is that client's cursor and whose
    rest (`Message.envelope`) is shared. sse-starlette ends every event with a blank line; this is its first line."""
    return _event(id=value)[:-1]


def chunk(frame: bytes) -> tuple[bytes, int]:
    """`frame` as one HTTP/1.1 chunk (what the direct-write path puts on the socket), and where the frame starts."""
    prefix = b"%x\r\n" % len(frame)
    return b"".join((prefix, frame, b"\r\n")), len(prefix)
