"""The message: its id, its validation, and its SSE wire form.

One module holds the message format so the HTTP publish path, both brokers and any Python publisher agree
byte for byte. Ids have the Redis Stream form `<ms>-<seq>` on both brokers, so a client's `Last-Event-ID` means
the same thing whichever broker or replica it comes back to.

A message is encoded to SSE bytes once (`Message.frame`), when the hub first sees it; every subscriber is handed
the same bytes object.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import orjson

__all__ = [
    "EVENT_NAME_RE",
    "RESERVED_EVENT_PREFIX",
    "CHANNEL_RE",
    "Message",
    "MessageId",
    "encode_data",
    "format_id",
    "parse_id",
    "valid_channel",
    "valid_event",
]

MessageId = tuple[int, int]

CHANNEL_RE = re.compile(r"[A-Za-z0-9_.:-]+")
# Event names end up on an `event:` line: no whitespace or control characters, so nothing can forge a field.
EVENT_NAME_RE = re.compile(r"[A-Za-z0-9_.:/-]{1,64}")
_ID_RE = re.compile(r"(\d{1,20})(?:-(\d{1,20}))?")


def valid_channel(name: str, max_length: int) -> bool:
    return 0 < len(name) <= max_length and CHANNEL_RE.fullmatch(name) is not None


RESERVED_EVENT_PREFIX = "relay."


def valid_event(name: str) -> bool:
    """A publishable event name: the charset above, and not in the relay's own `relay.` namespace."""
    return EVENT_NAME_RE.fullmatch(name) is not None and not name.startswith(RESERVED_EVENT_PREFIX)


def parse_id(raw: str | bytes | None) -> MessageId | None:
    """`"1700000000000-3"` → (1700000000000, 3); a bare `"5"` means `5-0`; anything else → None."""
    if raw is None:
        return None
    text = raw.decode("ascii", "replace") if isinstance(raw, bytes) else raw
    m = _ID_RE.fullmatch(text.strip())
    if m is None:
        return None
    return int(m.group(1)), int(m.group(2) or 0)


def format_id(mid: MessageId) -> str:
    return f"{mid[0]}-{mid[1]}"


# Characters JSON may carry raw inside strings but that str.splitlines()-style line splitters (httpx's
# aiter_lines, many Python SSE clients) treat as line ends: escaped, so every client sees one `data:` line.
_LINE_BREAKERS = ((b"\xc2\x85", b"\\u0085"), (b"\xe2\x80\xa8", b"\\u2028"), (b"\xe2\x80\xa9", b"\\u2029"))


def encode_data(value: Any) -> bytes:
    """The JSON of a message's data: compact, UTF-8, one line for every kind of client (JSON escapes CR/LF)."""
    data = orjson.dumps(value)
    for raw, escaped in _LINE_BREAKERS:
        if raw in data:
            data = data.replace(raw, escaped)
    return data


@dataclass(slots=True, eq=False)
class Message:
    """One published message as the hub fans it out. `data` is already JSON (bytes)."""

    channel: str
    id: str
    key: MessageId
    event: str | None
    data: bytes
    _frame: bytes | None = field(default=None, repr=False)
    _envelope: bytes | None = field(default=None, repr=False)
    _chunk: bytes | None = field(default=None, repr=False)

    @classmethod
    def create(cls, channel: str, id: str, event: str | None, data: bytes) -> Message:
        key = parse_id(id)
        if key is None:
            raise ValueError(f"broker produced a malformed id {id!r}")
        return cls(channel, id, key, event or None, data)

    @property
    def frame(self) -> bytes:
        """The SSE event for a single-channel stream: `id:`, `event:` when named, `data:`."""
        if self._frame is None:
            self._frame = b"".join((b"id: ", self.id.encode(), b"\n", self._event_and_data(self.data)))
        return self._frame

    @property
    def chunk(self) -> bytes:
        """`frame` as one HTTP/1.1 chunk, for writing straight to a chunked response (`sse.DirectWriter`)."""
        if self._chunk is None:
            frame = self.frame
            self._chunk = b"%x\r\n%s\r\n" % (len(frame), frame)
        return self._chunk

    @property
    def envelope(self) -> bytes:
        """`event:`/`data:` lines for multi-channel streams, whose data says which channel it came from.

        The `id:` line of such a stream is a per-client cursor over all its channels, so it is written by the
        stream, not cached here.
        """
        if self._envelope is None:
            body = b'{"channel":"%s","id":"%s","data":%s}' % (self.channel.encode(), self.id.encode(), self.data)
            self._envelope = self._event_and_data(body)
        return self._envelope

    def _event_and_data(self, data: bytes) -> bytes:
        if self.event:
            return b"event: " + self.event.encode() + b"\ndata: " + data + b"\n\n"
        return b"data: " + data + b"\n\n"
