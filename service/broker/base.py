"""The broker seam: the one interface between the instance and whatever carries messages between instances.

Two implementations sit behind it (`memory` for one process, `redis` for many). Everything above it, the hub,
the streams and the HTTP API, is the same code for both, so one replica and fifty behave alike.

Subscriptions are wishes, not calls that can fail: the hub says which channels it `want`s, synchronously, and
the broker converges on that set by itself (batching, retrying, re-subscribing after any fault) until every
wanted channel is live. A stream awaits `live(channel)` before it reads its position, so "subscribed" is a
fact it can rely on rather than something an error path may have skipped.

The broker pushes what it receives into a `Sink` (the hub). It never waits on a subscriber: `Sink.dispatch` is
synchronous and only enqueues.

Failures are named for what they are (each maps to its own HTTP answer and metric):
- `BrokerUnavailable`: the broker could not be reached or refused the command; it did not happen.
- `BrokerBusy`: a local budget (the command pool) stayed exhausted; it did not happen, the broker may be fine.
- `OutcomeUnknown`: the command was sent and its answer lost (a timeout, a connection dropped mid-reply);
  it may have happened. A publish retried with the same idempotency key cannot double.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from ..message import Message, MessageId, Position

__all__ = [
    "Broker",
    "BrokerBusy",
    "BrokerError",
    "BrokerUnavailable",
    "IdempotencyKeyReused",
    "OutcomeUnknown",
    "Page",
    "Published",
    "RateCharge",
    "RateLimited",
    "Sink",
    "judge_resume",
]


class BrokerError(RuntimeError):
    """Base of the broker's failures; `kind` names the cause for logs and metrics (`oom`, `timeout`, ...)."""

    kind = "error"

    def __init__(self, message: str, kind: str | None = None) -> None:
        super().__init__(message)
        if kind is not None:
            self.kind = kind


class BrokerUnavailable(BrokerError):
    """Not done: the broker cannot be reached or refused it (down, OOM, read-only, cluster down)."""

    kind = "unavailable"


class BrokerBusy(BrokerError):
    """Not done: a local resource (the command pool) stayed exhausted for its wait limit."""

    kind = "busy"


class OutcomeUnknown(BrokerError):
    """Sent, but the answer was lost: it may or may not have happened."""

    kind = "timeout"


class IdempotencyKeyReused(ValueError):
    """An idempotency key already used on this channel, within IDEMPOTENCY_TTL, for a publish with another event or
    data: nothing was published. Answering the first id would tell the caller its new message went out (Stripe's
    API answers the same mistake with an error too); the caller has a bug, or needs a new key."""

    def __init__(self, channel: str, key: str, first_id: str) -> None:
        super().__init__(
            f"Idempotency-Key {key!r} was already used on channel {channel!r} for a different message (id "
            f"{first_id}): nothing was published; send a new key for a new message, or the same body to retry")
        self.channel, self.key, self.first_id = channel, key, first_id


@dataclass(frozen=True, slots=True)
class RateCharge:
    """A publisher's rate, charged in the publish's own step (with Redis: the same script, no round trip of its
    own): the key of the publisher's theoretical arrival time, the GCRA interval and tolerance in µs, the cost.
    Made by `ratelimit.RedisRateLimiter.charge`; given only to a broker whose `charges_rates` is true."""

    key: str
    interval_us: float
    tolerance_us: float
    cost: int = 1


class RateLimited(Exception):
    """The publisher is over its rate (`RateCharge`): nothing was published and nothing was charged; `wait` is
    how many seconds until it may publish again."""

    def __init__(self, wait: float) -> None:
        super().__init__(f"over the publish rate: retry in {wait:.3f} s")
        self.wait = wait


@dataclass(frozen=True, slots=True)
class Published:
    id: str
    duplicate: bool = False  # an earlier publish with the same idempotency key; `id` is that message's


@dataclass(slots=True)
class Page:
    """One bounded read of a channel's history after a position.

    `complete` False: something after the position is gone (`reason`: `expired` trimmed or aged out, `epoch`
    the history was recreated, `future` the position is ahead of the channel); the caller resets the client
    and reads what is retained from the start. `more`: a further page may follow `messages[-1]`.
    """

    messages: list[Message] = field(default_factory=list)
    complete: bool = True
    reason: str | None = None
    more: bool = False


def judge_resume(after: Position, *, epoch: str | None, top: MessageId, lost: MessageId, exists: bool,
                 trimmed: bool, first: MessageId) -> str | None:
    """Why resuming after `after` would skip messages (a reset reason), or None when nothing is missing.

    What the broker knows of a channel: its history `epoch` (None: no history at all), `top` the last id ever
    added in that epoch, `lost` the last id of a stream that expired while the epoch lived on, whether the
    stream `exists`, whether it was ever `trimmed`, and its `first` retained id.
    """
    if epoch is None and not exists:
        # No trace of the channel: nothing was published, or everything (meta included) is gone.
        return None if after.is_start else "epoch" if after.epoch else "expired"
    if after.epoch is not None and epoch is not None and after.epoch != epoch:
        return "epoch"
    if after.key > top:
        return "future"
    if after.key < lost:
        return "expired"
    if not exists:
        return None if after.key >= top else "expired"
    if trimmed and after.key < first:
        # An id just below the first retained one is reported even when it was the last one trimmed: a
        # needless reset at the exact boundary (what follows is all retained history), never a silent loss.
        return "expired"
    return None


class Sink(Protocol):
    def dispatch(self, message: Message) -> None:
        """Deliver a message to local subscribers. The broker calls it per channel in id order, each id once."""

    def reset(self, channel: str, reason: str, epoch: str | None = None) -> None:
        """History under the channel's live subscribers was lost (recreated, or trimmed past a gap fill). `epoch`:
        the history's epoch from now on, when known: a subscriber that already resumed into it lost nothing."""

    def established(self, channel: str, position: Position) -> None:
        """A newly wanted channel's position became known (its tail was read): everything after it will be
        dispatched. Called once per wanted channel, before any of its messages is dispatched."""


@runtime_checkable
class Broker(Protocol):
    async def start(self, sink: Sink) -> None:
        """Begin receiving; from now on messages of wanted channels go to `sink`."""

    async def close(self) -> None: ...

    # Whether `publish` takes a `RateCharge` (charges the publisher's rate in the same step).
    charges_rates: bool

    async def publish(self, channel: str, data: bytes, event: str | None = None,
                      idempotency_key: str | None = None, charge: RateCharge | None = None) -> Published:
        """Store the message in the channel's history and send it live. Raises a `BrokerError`, or `RateLimited`
        when `charge` finds the publisher over its rate (only where `charges_rates`: others raise ValueError).

        Calls are applied in the order they are made (a pipelined connection's publishes rely on it, see
        api._publish_one): whatever a call waits for before its command is queued (a free command slot, the
        connection opening) is waited for first come, first served."""

    async def history(self, channel: str, after: Position | None, limit: int) -> Page:
        """Up to `limit` retained messages after `after`, oldest first, judged for completeness; `after` None:
        from the first retained message, not judged (what a client reads after a reset)."""

    async def last_id(self, channel: str) -> str | None:
        """Id of the newest message of `channel`, None when it has none. Raises a `BrokerError`."""

    def want(self, channel: str) -> None:
        """Local subscribers want `channel`: subscribe it, and keep it subscribed through any fault."""

    def unwant(self, channel: str) -> None:
        """No local subscriber wants `channel` any more."""

    def is_live(self, channel: str) -> bool:
        """`live(channel)` would return at once."""

    async def live(self, channel: str) -> None:
        """Return once every message after `position(channel)` is certain to be dispatched (wanted channels)."""

    def when_live(self, channel: str) -> asyncio.Future[None] | None:
        """None when `live(channel)` would return at once; else a future done when it would. Shared by every
        caller (a stream waiting for its room waits on it through a callback, without a task of its own): never
        cancel it or await it where the awaiting task may be cancelled."""

    def owe(self, channel: str, since: float) -> None:
        """A stream of `channel` was answered (its 200 went out) before the channel's position was known, and it
        joined at `since` (`time.monotonic()` of this process): the position, once known, must come no later than
        what Redis's clock read at that moment (less a margin for clocks), so that every message published after
        the stream connected is dispatched. Nothing to do once the position is known."""

    def position(self, channel: str) -> Position | None:
        """The channel's position on this instance: everything after it will be dispatched to the sink from now
        on. None while a newly wanted channel's position is not known yet (`Sink.established` tells it)."""

    def ready(self) -> bool:
        """True while messages published anywhere reach this instance."""

    def stats(self) -> dict[str, float]:
        """Gauges and counters for /metrics (`channels_pending`, `errors.<kind>`, ...)."""
