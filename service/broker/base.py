"""The broker seam: the one interface between the instance and whatever carries messages between instances.

Two implementations sit behind it (`memory` for one process, `redis` for many). Everything above it, the hub,
the streams and the HTTP API, is the same code for both, so one replica and fifty behave alike.

The broker pushes what it receives into a `Sink` (the hub). It never waits on a subscriber: `Sink.dispatch` is
synchronous and only enqueues.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from ..message import Message, MessageId

__all__ = ["Broker", "BrokerUnavailable", "History", "Sink"]


class BrokerUnavailable(RuntimeError):
    """The broker cannot be reached right now: the caller answers 503 with Retry-After, never drops silently."""


@dataclass(slots=True)
class History:
    """Messages after a given id. `complete` is False when some of them were already trimmed away."""

    messages: list[Message] = field(default_factory=list)
    complete: bool = True


class Sink(Protocol):
    def dispatch(self, message: Message) -> None:
        """Deliver a message to local subscribers. The broker calls it per channel in id order, each id once."""


@runtime_checkable
class Broker(Protocol):
    async def start(self, sink: Sink) -> None:
        """Begin receiving; from now on messages of subscribed channels go to `sink`."""

    async def close(self) -> None: ...

    async def publish(self, channel: str, data: bytes, event: str | None = None) -> str:
        """Store the message in the channel's history and send it live; return its id. Raises BrokerUnavailable."""

    async def history(self, channel: str, after: MessageId | None) -> History:
        """Retained messages with id > `after` (all retained when None). Raises BrokerUnavailable."""

    async def last_id(self, channel: str) -> str | None:
        """Id of the newest retained message of `channel`, None when it has none. Raises BrokerUnavailable."""

    async def subscribe(self, channel: str) -> None:
        """Start receiving `channel`. Never raises for an outage: it is subscribed as soon as the broker is back."""

    async def unsubscribe(self, channel: str) -> None: ...

    def ready(self) -> bool:
        """True while messages published anywhere reach this instance."""
