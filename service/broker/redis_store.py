"""Publishing and reading history: a Stream per channel for history and pub/sub for live delivery, written in one
Lua step (`redis_format.PUBLISH_SCRIPT`), and history read back a bounded page at a time.

Every command goes through the one budget (`CommandBudget`); resumes additionally share `history_reads` slots, so
a storm of resumes can neither take the connections publishes need nor hold Redis for long: each history read is
one bounded page (a plain XRANGE with COUNT, judged by `HISTORY_META_SCRIPT` read right after it), and the next
page is asked for only when the client took the previous one.

Behind Sentinel, while a failover is under way publishes wait for the new master (up to REDIS_POOL_TIMEOUT, then
503 `failover`) instead of being acknowledged by a primary about to be replaced.

The page functions (`page_of`, the id helpers) are shared with the gap fill (`redis_cursors`), which reads the
same pages on behalf of live subscribers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from redis import exceptions as rx

from ..message import MAX_ID_PART, Message, MessageId, Position, parse_position
from .base import (
    BrokerUnavailable,
    IdempotencyKeyReused,
    OutcomeUnknown,
    Page,
    Published,
    RateCharge,
    RateLimited,
    judge_resume,
)
from .redis_commands import Script
from .redis_format import (
    HISTORY_META_SCRIPT,
    PUBLISH_SCRIPT,
    TAIL_SCRIPT,
    keys_for,
    meta_key,
    parse_history_meta,
    publish_args,
    publish_keys,
)
from .redis_link import RedisLink

__all__ = ["RedisStore", "as_text", "id_of", "page_of", "range_start"]


def as_text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def range_start(after: MessageId | None) -> str:
    """XRANGE's inclusive start for "after `after`" (the exclusive `(` form rejects the largest id)."""
    if after is None or after == (0, 0):
        return "-"
    ms, seq = after
    if seq < MAX_ID_PART:
        return f"{ms}-{seq + 1}"
    return f"{ms + 1}-0" if ms < MAX_ID_PART else "+"


def id_of(raw: str) -> MessageId:
    position = parse_position(raw) if raw else None
    return position.key if position is not None else (0, 0)


def page_of(channel: str, after: Position | None, meta: list[Any], entries: list[Any], limit: int) -> Page:
    """A page of XRANGE `entries`, judged by the HISTORY_META_SCRIPT reply `meta` read right after them."""
    epoch, top, lost, exists, trimmed, first = parse_history_meta(meta)
    if after is not None:
        reason = judge_resume(after, epoch=epoch or None, top=id_of(top), lost=id_of(lost), exists=exists,
                              trimmed=trimmed, first=id_of(first))
        if reason is not None:
            return Page([], False, reason)
    messages = [_message_of(channel, entry, epoch) for entry in entries]
    return Page(messages, True, None, len(messages) >= limit)


def _message_of(channel: str, entry: Any, epoch: str) -> Message:
    raw_id, fields = entry
    values = fields if isinstance(fields, dict) else dict(zip(fields[::2], fields[1::2], strict=False))
    position = parse_position(raw_id)
    assert position is not None
    return Message(channel, position.key, epoch or None, as_text(values.get(b"e", b"")), values.get(b"d", b"null"))


class RedisStore:
    def __init__(
        self,
        link: RedisLink,
        *,
        history_size: int,
        history_ttl: float,
        meta_ttl: float,
        idempotency_ttl: float,
        history_reads: int,
        wait_replicas: int,
        wait_timeout: float,
        reroute: Callable[[], Awaitable[None]],
    ) -> None:
        """`reroute`: re-read the Cluster's slot map and move the readers (the routing part's), awaited before a
        publish that met a moved slot is sent again."""
        self._link = link
        self._commands = link.commands
        self._budget = link.budget
        self._watcher = link.watcher
        self._fail = link.fail
        self._prefix = link.prefix
        self._reroute = reroute
        self._maxlen = history_size
        self._ttl_ms = int(history_ttl * 1000)
        self._meta_ttl_ms = int(max(meta_ttl, history_ttl) * 1000)
        self._idem_ttl_ms = int(idempotency_ttl * 1000)
        self._wait_replicas = wait_replicas
        self._wait_timeout_ms = int(wait_timeout * 1000)
        self._publish_command = "SPUBLISH" if link.target.sharded else "PUBLISH"
        self._publish_script = Script(PUBLISH_SCRIPT)
        self._history_slots = asyncio.Semaphore(history_reads)

    async def publish(self, channel: str, data: bytes, event: str | None = None,
                      idempotency_key: str | None = None, charge: RateCharge | None = None) -> Published:
        """`charge`: the publisher's rate, charged in the same script (one round trip, not two); never on a Cluster,
        where the publisher's key is in another slot than the channel's."""
        rate = None
        if charge is not None:
            if self._link.target.sharded:
                raise ValueError("a Cluster does not charge rates in the publish's step (charges_rates is false)")
            rate = (f"{charge.interval_us:.3f}", f"{charge.tolerance_us:.3f}", charge.cost)
        keys = publish_keys(self._prefix, channel, idempotency_key, charge.key if charge is not None else None)
        args = publish_args(data, event, self._maxlen, self._ttl_ms, self._meta_ttl_ms, self._publish_command,
                            self._idem_ttl_ms if idempotency_key else 0, rate)
        if self._watcher is not None and self._watcher.failing_over:
            # The primary may be replaced any moment now: what it acknowledged from here on could be thrown away
            # when it is demoted. Wait for the new master instead (what runs on it is kept).
            if not await self._watcher.settled(self._budget.wait):
                raise self._fail(BrokerUnavailable(
                    f"publish: a Sentinel failover is under way; no new master within {self._budget.wait}s",
                    "failover"), "publish", channel=channel)
        for attempt in (1, 2):
            try:
                async with self._budget.slot("publish"):
                    if self._wait_replicas:
                        raw, replicas = await self._publish_and_wait(keys, args)
                        if replicas < self._wait_replicas:
                            raise OutcomeUnknown(
                                f"publish: stored on the primary but only {replicas} of {self._wait_replicas} "
                                f"replicas confirmed it within {self._wait_timeout_ms} ms (REDIS_WAIT_REPLICAS)",
                                "not_replicated")
                    else:
                        raw = await self._commands.eval(self._publish_script, keys, args)
                # Inside the `try`: an answer that is not the script's {id, duplicate} is a failure named like
                # any other (503), never a 500.
                message_id, seen = raw
                seen = int(seen)
                break
            except (rx.MovedError, rx.AskError) as exc:
                # The slot moved and the command did not run: learn the new owner and send it there, once.
                if attempt == 2:
                    raise self._fail(exc, "publish", channel=channel) from exc
                await self._reroute()
            except Exception as exc:
                raise self._fail(exc, "publish", channel=channel) from exc
        else:
            raise AssertionError("unreachable: the second attempt returns or raises")
        if seen == 3:
            raise RateLimited(int(as_text(message_id)) / 1_000_000)
        if seen == 2:
            raise IdempotencyKeyReused(channel, idempotency_key or "", as_text(message_id))
        return Published(as_text(message_id), bool(seen))

    async def _publish_and_wait(self, keys: list[str], args: list[Any]) -> tuple[Any, int]:
        """Publish and WAIT back to back on the same multiplexed connection (nothing of anyone else's between
        them): 202 only once `wait_replicas` replicas have the message. WAIT counts the replicas that have
        everything this connection wrote up to it, so it covers this publish (and any written just before)."""
        raw, replicas = await self._commands.eval_then(
            self._publish_script, keys, args, [("WAIT", self._wait_replicas, self._wait_timeout_ms)])
        return raw, int(replicas)

    async def history(self, channel: str, after: Position | None, limit: int) -> Page:
        stream, _ = keys_for(self._prefix, channel)
        start = range_start(after.key if after is not None else None)
        try:
            mux = self._commands.mux(self._link.node_for(channel), "read")
            async with self._history_slots, self._budget.slot("history read"):
                # In this order on one connection: the page, then its judgement (see HISTORY_META_SCRIPT).
                entries, meta = await mux.call_many([
                    ("XRANGE", stream, start, "+", "COUNT", limit),
                    ("EVAL", HISTORY_META_SCRIPT, 2, stream, meta_key(self._prefix, channel))])
            # Inside the `try`: a reply that cannot be parsed is a broker failure (the stream waits and retries),
            # never an exception that reaches the client as a 500.
            return page_of(channel, after, meta, entries, limit)
        except Exception as exc:
            raise self._fail(exc, "history read", channel=channel) from exc

    async def last_id(self, channel: str) -> str | None:
        stream, _ = keys_for(self._prefix, channel)
        try:
            mux = self._commands.mux(self._link.node_for(channel), "read")
            async with self._budget.slot("last id"):
                epoch, top = await mux.call("EVAL", TAIL_SCRIPT, 2, stream, meta_key(self._prefix, channel))
        except Exception as exc:
            raise self._fail(exc, "last id", channel=channel) from exc
        top, epoch = as_text(top), as_text(epoch)
        return f"{top}-{epoch}" if top and epoch else top or None
