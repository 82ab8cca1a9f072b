"""Commands every replica obeys: "end the streams of this user (or of this channel)".

An operator (or the app, `Relay.end_streams`) asks one replica; that replica ends its own matching streams at once
and publishes the command on a control channel that every replica's relay listens to, through the broker like any
message: with Redis it is a Stream entry plus a pub/sub message, so a replica whose Redis connection was down
when it was sent gets it from the gap fill once it is back (the same guarantee as a chat message); on the
in-memory broker (one process) it comes straight back. Each replica then ends its matching streams with a
`relay.ended` event saying why, and forgets the authorization hook's remembered decisions for that user or
channel, so the reconnect that follows asks the backend again (which refuses it, if the user is banned).

The control channel's name, `relay/control`, is outside the charset of channel names (`/`): no client can
publish to it or listen to it. The replica that sent a command skips its own copy (it applied it before sending,
and applying it twice could end a stream the backend allowed again in between).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from .broker import Broker
from .hub import Hub
from .message import encode_data
from .subscriber import Subscriber
from .tasks import cancel_and_wait

__all__ = ["CONTROL_CHANNEL", "ENDED_EVENT", "Control", "EndCommand"]

log = logging.getLogger("service.control")

CONTROL_CHANNEL = "relay/control"
ENDED_EVENT = "relay.ended"
_COMMAND_EVENT = "relay.end"
_QUEUE = 10000  # commands waiting to be applied before the listener falls behind and re-joins


@dataclass(frozen=True, slots=True)
class EndCommand:
    """End the streams of `user`, or on `channel`, or of `user` on `channel`; `reason` goes to their clients."""

    user: str | None
    channel: str | None
    reason: str

    def matches(self, user: str | None, channels: tuple[str, ...]) -> bool:
        return ((self.user is None or user == self.user)
                and (self.channel is None or self.channel in channels))


class Control:
    """Sends commands to every replica and applies those of the others (`apply`: the relay's own hand)."""

    def __init__(self, broker: Broker, hub: Hub, apply: Callable[[EndCommand], int]) -> None:
        self._broker, self._hub, self._apply = broker, hub, apply
        self._origin = secrets.token_hex(8)  # this process (INSTANCE_ID may be shared by WORKERS)
        self._task: asyncio.Task[None] | None = None
        self.live = asyncio.Event()
        self.received = 0

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._listen(), name="control-listener")

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def send(self, command: EndCommand) -> int:
        """Apply `command` here, then send it to every other replica. Returns the streams ended here; raises a
        `BrokerError` when it could not be sent (the others did not get it; this replica did)."""
        ended = self._apply(command)
        payload = {"user": command.user, "channel": command.channel, "reason": command.reason,
                   "origin": self._origin}
        await self._broker.publish(CONTROL_CHANNEL, encode_data(payload), _COMMAND_EVENT)
        return ended

    async def _listen(self) -> None:
        """A subscriber of the control channel, like a stream with no client: re-joined if it ever falls behind."""
        while True:
            sub = Subscriber((CONTROL_CHANNEL,), _QUEUE, "relay:control")
            self._hub.add_internal(sub)
            try:
                await self._hub.live(sub)
                self.live.set()
                while (batch := await sub.next_batch()) is not None:
                    for message in batch:
                        self._receive(bytes(message.data), message.event)
            finally:
                self.live.clear()
                self._hub.release_internal(sub)
            log.warning("control listener fell behind; joining again", extra={"reason": sub.closed_reason})

    def _receive(self, data: bytes, event: str | None) -> None:
        if event != _COMMAND_EVENT:
            return
        try:
            value: Any = orjson.loads(data)
            if value.get("origin") == self._origin:
                return
            user, channel, reason = value.get("user"), value.get("channel"), value.get("reason")
            if not (isinstance(reason, str) and (isinstance(user, str) or isinstance(channel, str))):
                raise ValueError("not a command")
            command = EndCommand(user if isinstance(user, str) else None,
                                 channel if isinstance(channel, str) else None, reason)
        except (ValueError, AttributeError):
            log.warning("ignored a malformed control message")
            return
        self.received += 1
        self._apply(command)
