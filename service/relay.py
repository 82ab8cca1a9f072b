"""The relay: the one object that talks to both the broker and the hub (the "node" of Centrifuge).

Every publish goes through the broker, even when the only subscribers are local, so one instance and many
behave the same. It also owns the instance's lifecycle: readiness, the open-streams registry and draining.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from .auth import Authorizer
from .broker import Broker, BrokerError, BrokerUnavailable, Published, RateCharge, create_broker
from .config import Settings
from .connection import Edge, PlainEdge
from .control import ENDED_EVENT, Control, EndCommand
from .hooks import AuthCallable, AuthHook, PublishCallable, PublishHook
from .hub import Hub
from .message import Message, encode_data
from .metrics import Metrics
from .presence import LocalPresence, Presence, RedisPresence
from .ratelimit import RateLimiter, create_rate_limiter
from .sse import server_starting
from .subscriber import Subscriber
from .tasks import cancel_and_wait

__all__ = ["NotStarted", "Relay"]

log = logging.getLogger("service.relay")


class NotStarted(BrokerUnavailable):
    """The relay's lifespan never ran (or has ended): nothing can be published. The HTTP routes answer it 503
    `not_started` with this same message; `relay.publish()` raises it, rather than hand the message to a broker
    that no stream reads from."""

    kind = "not_started"
    MESSAGE = ("the relay is not running: when mounting it in another app, enter `relay.lifespan` in that app's "
               "lifespan (docs/python.md: mount it in your app)")

    def __init__(self) -> None:
        super().__init__(self.MESSAGE)


def hello_json(instance: str, default_channel: str) -> tuple[bytes, bytes]:
    """The JSON of a stream's greeting (`relay.hello`, stream._Opening.greeting) around its channels, encoded once
    per relay: `{"instance":...,"channels":` and `,"default_channel":...}`. Joined around the JSON of the channels
    list it is `encode_data` of the whole object (orjson writes keys in order, without spaces)."""
    head = encode_data({"instance": instance})[:-1] + b',"channels":'
    return head, b',"default_channel":' + encode_data(default_channel) + b"}"


class Relay:
    def __init__(self, settings: Settings, broker: Broker | None = None, *,
                 auth_hook: AuthCallable | None = None, publish_hook: PublishCallable | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[object]] = asyncio.sleep, edge: Edge | None = None) -> None:
        """`auth_hook` / `publish_hook`: the app's own coroutines deciding who may listen and publish, and what is
        published (service/hooks.py has the contract); they replace AUTH_HOOK_URL / PUBLISH_HOOK_URL.
        `clock`/`sleep` pace the drain (a fake pair in unit tests). `edge`: the server as the relay sees it
        (connection.Edge); `app.create_app` and `server.serve` give uvicorn's, and without one streams run on
        plain ASGI (`use_edge` sets it later, before the first stream)."""
        self._clock, self._sleep = clock, sleep
        self.edge: Edge = edge if edge is not None else PlainEdge()
        self.edge_given = edge is not None
        self.settings = settings
        self.metrics = Metrics()
        self.broker = broker if broker is not None else create_broker(settings)
        self.presence: Presence = (
            RedisPresence(settings.redis_url, settings.instance, settings.redis_key_prefix, settings.presence_interval)
            if settings.redis_url
            else LocalPresence()
        )
        self.hub = Hub(self.broker, self.metrics, self.presence.changed)
        self.metrics.watch_broker(self.broker.stats)
        # Read when collected, so a worker's periodic snapshot (WORKERS > 1) has it as fresh as a scrape does.
        self.metrics.broker_up.set_function(lambda: 1 if self.broker_up() else 0)
        self.streams: set[Subscriber] = set()
        # Read when collected, not set per stream opened and closed (a prometheus_client update takes a lock).
        self.metrics.streams_open.set_function(lambda: len(self.streams))
        # The greeting's JSON but its channels (stream._Opening.greeting): the same for every stream.
        self.hello_json = hello_json(settings.instance, settings.default_channel)
        # Who may publish/subscribe, publish rate per client (own Redis client with REDIS_URL), streams per client.
        self.authorizer = Authorizer(settings)
        self.rate_limiter: RateLimiter = create_rate_limiter(settings)
        self.client_streams: dict[str, int] = {}
        # Your backend decides (hooks.py): who may listen or publish beyond public channels and tokens, what goes out
        auth_target = auth_hook or settings.auth_hook_url
        self.auth_hook: AuthHook | None = AuthHook(
            auth_target, timeout=settings.hook_timeout, concurrency=settings.hook_concurrency,
            cache_size=settings.auth_hook_cache_size, max_cache_seconds=settings.auth_hook_max_cache_seconds,
        ) if auth_target else None
        publish_target = publish_hook or settings.publish_hook_url
        self.publish_hook: PublishHook | None = PublishHook(
            publish_target, timeout=settings.hook_timeout, concurrency=settings.hook_concurrency,
        ) if publish_target else None
        if self.auth_hook is not None or self.publish_hook is not None:
            self.metrics.watch_hooks(self._hook_stats)
        # Commands every replica obeys (control.py): end a user's or a channel's streams
        self.control = Control(self.broker, self.hub, self._end_here)
        self.draining = False
        self.started = False
        self._drain_done: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._drain_started = False
        self._timers: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        if self.started:
            return
        self._drain_done = asyncio.Event()
        server_starting()
        await self.broker.start(self.hub)
        await self.presence.start()
        await self.control.start()
        loop = asyncio.get_running_loop()
        self._timers = [loop.create_task(self._heartbeat(), name="heartbeat"),
                        loop.create_task(self._sweep(), name="exit-and-disconnect-sweep")]
        if self.metrics.shared is not None:
            self._timers.append(loop.create_task(self.metrics.shared.run(), name="worker-metrics"))
        self.started = True
        log.info(
            "relay started",
            extra={"broker": "redis" if self.settings.redis_url else "memory", "instance": self.settings.instance},
        )

    async def close(self) -> None:
        if not self.started:
            return
        for sub in list(self.streams):
            sub.close("shutdown")
        await cancel_and_wait(*self._timers)
        self._timers = []
        await self.control.close()
        for hook in (self.auth_hook, self.publish_hook):
            if hook is not None:
                await hook.close()
        await self.presence.close()
        await self.broker.close()
        await self.rate_limiter.close()
        self.started = False
        if self.metrics.shared is not None:
            self.metrics.shared.close()

    @contextlib.asynccontextmanager
    async def lifespan(self, app: object = None) -> AsyncIterator[None]:
        """Run the relay for the life of an app: `FastAPI(lifespan=relay.lifespan)`, or enter it in yours."""
        await self.start()
        try:
            yield
        finally:
            await self.close()

    def use_edge(self, edge: Edge) -> None:
        """The server this relay runs under, when it was built without one (see `__init__`)."""
        self.edge, self.edge_given = edge, True

    def ready(self) -> bool:
        """Can this instance take streams? Started, not draining, not full. Not whether the broker answers:
        every replica shares it, so its outage would take every replica out of the load balancer at once, and
        streams opened during an outage are accepted and filled when it ends. `broker_up` says that."""
        return self.not_ready_reason() is None

    def not_ready_reason(self) -> str | None:
        if not self.started:
            return "starting"
        if self.draining:
            return "draining"
        if len(self.streams) >= self.settings.max_streams:
            return "full"
        return None

    def broker_up(self) -> bool:
        """Do messages published anywhere reach this instance right now?"""
        return self.started and self.broker.ready()

    async def publish(self, channel: str, data: Any, event: str | None = None,
                      idempotency_key: str | None = None) -> str:
        """Publish a JSON value; returns its id (with `idempotency_key`, a repeat returns the first id).

        Raises `NotStarted` (a `BrokerUnavailable`: the lifespan never ran), `BrokerUnavailable`/`BrokerBusy` (not
        published) or `OutcomeUnknown` (maybe published: retry with the same key); never accepts and then
        drops."""
        return (await self.publish_message(channel, data, event, idempotency_key)).id

    async def publish_message(self, channel: str, data: Any, event: str | None = None,
                              idempotency_key: str | None = None, charge: RateCharge | None = None) -> Published:
        """`publish`, telling also whether the key made it a repeat of an earlier publish. `charge`: the publisher's
        rate, taken in the same step by a broker that `charges_rates` (raises `RateLimited` when over it)."""
        if not self.started:
            self.metrics.publish_rejected.labels(NotStarted.kind).inc()
            raise NotStarted()
        payload = encode_data(data)
        try:
            published = await self.broker.publish(channel, payload, event, idempotency_key, charge)
        except BrokerError as exc:
            self.metrics.publish_rejected.labels(exc.kind).inc()
            raise
        if not published.duplicate:
            self.metrics.published_message()
        return published

    # -- ending streams on every replica ------------------------------------------------------------------------

    async def end_streams(self, user: str | None = None, channel: str | None = None,
                          reason: str = "ended by the service") -> int:
        """End every stream of `user` (the token's `sub` or the hook's `user`), or on `channel`, or of `user` on
        `channel`, on every replica, each with a `relay.ended` event carrying `reason`; remembered authorization
        decisions for them are dropped everywhere, so their reconnects ask the backend again.

        Returns the streams ended on this replica. Raises `NotStarted`, or a `BrokerError` when the other
        replicas could not be told (this one has applied it)."""
        if user is None and channel is None:
            raise ValueError("name a user, a channel, or both")
        if not self.started:
            raise NotStarted()
        return await self.control.send(EndCommand(user, channel, reason))

    def _hook_stats(self) -> dict[str, dict[str, float]]:
        stats = {}
        if self.auth_hook is not None:
            stats["auth"] = self.auth_hook.stats()
        if self.publish_hook is not None:
            stats["publish"] = self.publish_hook.stats()
        return stats

    def _end_here(self, command: EndCommand) -> int:
        """Apply an end command on this replica (from here or from another one)."""
        if self.auth_hook is not None:
            self.auth_hook.forget(command.user, command.channel)
        ended = 0
        for sub in list(self.streams):
            if sub.closed_reason is None and command.matches(sub.user, sub.channels):
                sub.offer(Message.control_event(sub.channels[0], ENDED_EVENT, {"reason": command.reason}))
                sub.close("ended")
                ended += 1
        log.info("streams ended", extra={"user": command.user, "channel": command.channel,
                                         "reason": command.reason, "streams": ended})
        return ended

    # -- streams ---------------------------------------------------------------------------------------------

    def admit(self) -> str | None:
        """Why a new stream must be turned away (with a 200 and a `retry:` hint), or None to accept it."""
        reason = self.not_ready_reason()
        return None if reason == "starting" else reason

    def register(self, sub: Subscriber) -> None:
        self.streams.add(sub)
        self.client_streams[sub.client] = self.client_streams.get(sub.client, 0) + 1
        self._announce("relay.join", sub)

    def unregister(self, sub: Subscriber) -> None:
        if sub not in self.streams:
            return
        self.streams.discard(sub)
        if (left := self.client_streams.pop(sub.client, 1) - 1) > 0:
            self.client_streams[sub.client] = left
        self.hub.release(sub)
        self.metrics.stream_closed(sub.closed_reason or "gone")
        self._announce("relay.leave", sub)
        if self.draining and not self.streams and self._drain_done is not None:
            self._drain_done.set()

    def _announce(self, event: str, sub: Subscriber) -> None:
        """Join/leave events (PRESENCE_EVENTS): published like any message, so every replica's clients see them."""
        if not self.settings.presence_events or not self.started:
            return
        for channel in sub.channels:
            task = asyncio.get_running_loop().create_task(self._publish_quietly(channel, event, sub))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _publish_quietly(self, channel: str, event: str, sub: Subscriber) -> None:
        try:
            await self.broker.publish(
                channel, encode_data({"instance": self.settings.instance, "user": sub.user}), event
            )
        except BrokerError:
            pass  # presence events are best effort; counts stay right through GET /channels/{channel}

    async def _heartbeat(self) -> None:
        """One ticker for all streams instead of a timer each: every half interval, each stream decides whether
        a ping is due (`Subscriber.heartbeat`: nothing written since the last tick, and its response does not
        ping by itself), so no stream is silent longer than HEARTBEAT_INTERVAL."""
        half = self.settings.heartbeat_interval / 2
        while True:
            await asyncio.sleep(half)
            for sub in list(self.streams):
                sub.heartbeat()

    async def _sweep(self) -> None:
        """Twice a second: end the streams whose client left (`Subscriber.check_connection`: uvicorn flags its
        request cycle; a flag read per stream is far cheaper than a task per stream waiting for
        `http.disconnect`), and end every stream when the ASGI server begins to exit on its own (an embedding
        app's uvicorn waits for open connections before it shuts down, and a stream never ends by itself; the
        standalone server drains instead)."""
        while True:
            await asyncio.sleep(0.5)
            if not self.streams:
                continue
            Subscriber.check_connections(list(self.streams))
            if self.draining:
                continue
            if self.edge.exiting():
                log.info("server exiting: closing streams", extra={"streams": len(self.streams)})
                for sub in list(self.streams):
                    sub.close("shutdown")

    def jittered_retry_ms(self) -> int:
        base = self.settings.retry_ms
        return int(base * random.uniform(0.5, 1.5))

    async def drain(self, grace: float | None = None) -> None:
        """Stop taking streams and close the open ones spread over `grace` seconds, then return.

        Spreading matters: closing thousands of streams at once sends them all to the other replicas in the
        same instant. Each stream gets a `retry:` hint with jitter on its way out.
        """
        if self._drain_started:
            return
        self._drain_started = True
        self.draining = True
        grace = self.settings.drain_grace if grace is None else grace
        started = self._clock()
        log.info("draining", extra={"streams": len(self.streams), "grace_s": grace})
        subs = list(self.streams)
        random.shuffle(subs)
        window = grace * 0.8
        for i, sub in enumerate(subs):
            due = started + window * (i + 1) / (len(subs) + 1)
            delay = due - self._clock()
            if delay > 0:
                await self._sleep(delay)
            sub.close("drain")
        if self.streams and self._drain_done is not None:
            remaining = max(0.1, grace - (self._clock() - started))
            try:
                async with asyncio.timeout(remaining):
                    await self._drain_done.wait()
            except TimeoutError:
                log.warning("drain grace ended with streams still open", extra={"streams": len(self.streams)})
        log.info("drained", extra={"seconds": round(self._clock() - started, 2)})
