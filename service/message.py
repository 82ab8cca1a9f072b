"""The message: its id, its validation, and its SSE wire form.

One module holds the message format so the HTTP publish path, both brokers and any Python publisher agree
byte for byte.

Ids. A message id is `<ms>-<seq>-<epoch>`: the Redis Stream entry id (`<ms>-<seq>`, increasing per channel) and
the *epoch* of the channel's history, a short token that changes whenever that history is recreated (it
expired for good, Redis restarted without persistence, someone ran FLUSHALL). The epoch is what lets a resume
tell "you are up to date" from "the history you knew is gone": a cursor of another epoch gets `relay.reset`,
never a silent skip (Centrifugo's offset + epoch, in one string). Ids without an epoch (`<ms>-<seq>`, or a bare
`<ms>`) are still accepted as cursors, judged by the id alone. `0` is the position "before everything".

Encoding. A message is turned into its SSE frame once, when it is created (by `wire.message_frame`, with
sse-starlette's `ServerSentEvent`), and held in exactly one encoding: the frame wrapped as an HTTP/1.1 chunk
(`chunk`). The frame and the JSON data are views into it. Every subscriber of every replica-local stream is
handed the same object; a stalled client pins it, never a copy. Two other forms are built on first use, once per
message, for the streams that need them: the envelope of multi-channel streams, and the old chat's form for
`GET /server/events` (`legacy_chunk`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from . import wire
from .wire import encode_data

__all__ = [
    "CHANNEL_RE",
    "EVENT_NAME_RE",
    "MAX_ID_PART",
    "RESERVED_EVENT_PREFIX",
    "START",
    "Message",
    "MessageId",
    "Position",
    "encode_data",
    "format_id",
    "parse_position",
    "valid_channel",
    "valid_event",
]

MessageId = tuple[int, int]
MAX_ID_PART = 2**64 - 1  # Redis stream ids are two unsigned 64-bit integers; anything larger is not an id

CHANNEL_RE = re.compile(r"[A-Za-z0-9_.:-]+")
# Event names end up on an `event:` line: no whitespace or control characters, so nothing can forge a field.
EVENT_NAME_RE = re.compile(r"[A-Za-z0-9_.:/-]{1,64}")
_POSITION_RE = re.compile(r"([0-9]{1,20})(?:-([0-9]{1,20})(?:-([0-9a-z]{1,16}))?)?")  # ASCII: `\d` is any script's


def valid_channel(name: str, max_length: int) -> bool:
    return 0 < len(name) <= max_length and CHANNEL_RE.fullmatch(name) is not None


RESERVED_EVENT_PREFIX = "relay."


def valid_event(name: str) -> bool:
    """A publishable event name: the charset above, and not in the relay's own `relay.` namespace."""
    return EVENT_NAME_RE.fullmatch(name) is not None and not name.startswith(RESERVED_EVENT_PREFIX)


def format_id(key: MessageId, epoch: str | None = None) -> str:
    if key == (0, 0) and not epoch:
        return "0"
    return f"{key[0]}-{key[1]}-{epoch}" if epoch else f"{key[0]}-{key[1]}"


@dataclass(frozen=True, slots=True)
class Position:
    """Where a client stands in one channel: it has everything up to `key` of history generation `epoch`.

    `epoch` None: the cursor did not say (an old-style id, or `0`); it is then judged by the id alone.
    """

    key: MessageId
    epoch: str | None = None

    def __str__(self) -> str:
        return format_id(self.key, self.epoch)

    @property
    def is_start(self) -> bool:
        return self.key == (0, 0)


START = Position((0, 0), None)


def parse_position(raw: str | bytes | None) -> Position | None:
    """`"1700000000000-3-k2x9ab01"`, `"1700000000000-3"`, `"5"` (= `5-0`), `"0"`; None if malformed or out of
    range (Redis would reject parts above 2**64-1 as invalid input: a bad cursor, never an outage)."""
    if raw is None:
        return None
    text = raw.decode("ascii", "replace") if isinstance(raw, bytes) else raw
    m = _POSITION_RE.fullmatch(text.strip())
    if m is None:
        return None
    ms, seq = int(m.group(1)), int(m.group(2) or 0)
    if ms > MAX_ID_PART or seq > MAX_ID_PART:
        return None
    return Position((ms, seq), m.group(3))


LEGACY_EVENT = "chat"  # the page's event; the old chat's stream shows these in its own form


class Message:
    """One published message as the hub fans it out, or a control event of the relay (`control=True`).

    Control events (`relay.reset` sent to live streams when history under them was lost) have no id: they move
    no cursor and are never dropped as already seen.
    """

    __slots__ = ("_data_at", "_envelope", "_frame_at", "_legacy", "channel", "chunk", "control", "epoch", "event",
                 "id", "key")

    def __init__(self, channel: str, key: MessageId, epoch: str | None, event: str | None, data: bytes,
                 control: bool = False) -> None:
        self.channel = channel
        self.key = key
        self.epoch = epoch or None
        self.event = event or None
        self.control = control
        self.id = "" if control else format_id(key, self.epoch)
        frame, data_at = wire.message_frame(wire.one_line_json(data), self.event, self.id or None)
        self.chunk, self._frame_at = wire.chunk(frame)
        self._data_at = self._frame_at + data_at
        self._envelope: bytes | None = None
        self._legacy: bytes | None = None

    @classmethod
    def from_wire(cls, channel: str, raw_id: str, event: str | None, data: bytes) -> Message:
        """A message whose id came from the broker (`<ms>-<seq>[-<epoch>]`); ValueError if it is not one."""
        position = parse_position(raw_id)
        if position is None or position.is_start:
            raise ValueError(f"broker produced a malformed id {raw_id!r}")
        return cls(channel, position.key, position.epoch, event, data)

    @classmethod
    def control_event(cls, channel: str, event: str, payload: Any) -> Message:
        return cls(channel, (0, 0), None, event, encode_data(payload), control=True)

    @property
    def frame(self) -> memoryview:
        """The SSE event for a single-channel stream (`id:`, `event:` when named, `data:`): a view of `chunk`."""
        return memoryview(self.chunk)[self._frame_at:-2]

    @property
    def data(self) -> memoryview:
        """The message's JSON data: a view of `chunk`."""
        return memoryview(self.chunk)[self._data_at:-4]

    @property
    def size(self) -> int:
        """Bytes this message holds (what a subscriber's byte budget counts)."""
        size = len(self.chunk)
        if self._envelope is not None:
            size += len(self._envelope)
        if self._legacy is not None and self._legacy is not self.chunk:
            size += len(self._legacy)
        return size

    @property
    def envelope(self) -> bytes:
        """`event:`/`data:` lines for multi-channel streams, whose data says which channel it came from.

        The `id:` line of such a stream is a per-client cursor over all its channels, so it is written by the
        stream (`wire.id_line`), not cached here. Built only when a multi-channel stream needs it.
        """
        if self._envelope is None:
            if self.control:
                self._envelope = bytes(self.frame)
            else:
                data = b'{"channel":"%s","id":"%s","data":%s}' % (self.channel.encode(), self.id.encode(), self.data)
                self._envelope = wire.message_frame(data, self.event)[0]
        return self._envelope

    @property
    def legacy_chunk(self) -> bytes:
        """This message as the old chat's `GET /server/events` shows it, as an HTTP/1.1 chunk.

        A `chat` event of the page (`{"name", "text", ...}`) becomes what the old chat sent: an unnamed event
        whose data is `[{"role": <name>, "content": <text>}]`, with the same id. Anything else is `chunk`
        itself (old pages ignore named events; their own posts are already in their form). Built on first use,
        once per message, and only streams of the old contract ask for it.
        """
        if self._legacy is None:
            self._legacy = self.chunk
            if self.event == LEGACY_EVENT and not self.control:
                value = orjson.loads(self.data)
                if isinstance(value, dict) and isinstance(value.get("text"), str):
                    name = value.get("name")
                    said = [{"role": name if isinstance(name, str) else "", "content": value["text"]}]
                    self._legacy = wire.chunk(wire.message_frame(encode_data(said), None, self.id)[0])[0]
        return self._legacy

    @property
    def legacy_frame(self) -> memoryview:
        """`legacy_chunk` without its chunk framing: what a stream of the old contract writes."""
        legacy = self.legacy_chunk
        return memoryview(legacy)[legacy.index(b"\r\n") + 2:-2]

    def __repr__(self) -> str:
        return f"Message({self.channel!r}, {self.id!r}, event={self.event!r}, {len(self.chunk)} bytes)"
