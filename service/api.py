"""HTTP endpoints: publish, stream, the old chat's contract, probes and metrics.

Handlers only validate and translate; the relay does the work. Bad input is answered with a 4xx and a JSON
body before anything is published.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from .auth import PUBLISH, SUBSCRIBE, Access, AuthError
from .broker import (
    BrokerBusy,
    BrokerError,
    IdempotencyKeyReused,
    OutcomeUnknown,
    Published,
    RateCharge,
    RateLimited,
)
from .errors import ApiError, error_response
from .headers import header, query_value
from .hooks import AuthQuestion, HookFailed, PublishQuestion
from .limits import within_json_depth
from .logs import request_id
from .message import encode_data, valid_channel, valid_event
from .metrics import CONTENT_TYPE_LATEST
from .openapi import OPENAPI
from .ratelimit import NoRateLimit
from .relay import NotStarted, Relay
from .stream import open_stream, refuse_stream

__all__ = ["routes"]

log = logging.getLogger("service.api")

# -- who may, and how often (the checks every endpoint runs; auth.py decides, this answers) -------------


def _authorize(request: Request, relay: Relay, action: str, channels: Sequence[str]) -> Access | tuple[str, ...]:
    """Public channels, then a valid token's grants (auth.py); channels left for the hook come back as a tuple."""
    try:
        return relay.authorizer.authorize(request, action, channels, hooked=relay.auth_hook is not None)
    except AuthError as exc:
        raise ApiError(exc.status, exc.message, exc.code, exc.headers) from None


def _headers_of(request: Request) -> tuple[str | None, str | None]:
    return header(request.scope, b"cookie"), header(request.scope, b"authorization")


async def ask_backend(request: Request, relay: Relay, action: str, channels: tuple[str, ...]) -> Access:
    """The authorization hook's decision on `channels` (hooks.py): 403 `denied` when it refuses; raises
    HookFailed when it gives no usable answer (each route answers that its own way)."""
    hook = relay.auth_hook
    assert hook is not None
    authorizer = relay.authorizer
    cookie, authorization = _headers_of(request)
    if action == PUBLISH and cookie and not authorizer.origin_trusted(request):
        # A cookie is ambient: another site's page must not publish as a logged-in browser (CSRF)
        raise ApiError(
            403, "a publish from a browser carrying cookies must come from this service's own origin or one listed "
            "in CORS_ORIGINS", "cross_site_publish",
        )
    address = authorizer.address(request)
    decision = await hook.decide(AuthQuestion(action, channels, address, cookie, authorization, request_id.get(),
                                              request))
    if not decision.allow:
        relay.metrics.hook_denied(action)
        said = f": {decision.reason}" if decision.reason else ""
        raise ApiError(403, f"the backend refused {action} on {', '.join(map(repr, channels))}{said}", "denied",
                       reason=decision.reason)
    user = decision.user
    return Access(f"sub:{user}" if user else f"ip:{address}", user, None)


def hook_unavailable(exc: HookFailed, action: str = "nothing was published") -> ApiError:
    """The answer to a hook that gave no usable answer: 503 (fail closed), the failure named for what it is."""
    return ApiError(503, f"{exc}; {action}, retry after the delay", f"{exc.hook}_hook_{exc.kind}",
                    headers={"Retry-After": "1"})


async def _access(request: Request, relay: Relay, action: str, channels: Sequence[str]) -> Access:
    found = _authorize(request, relay, action, channels)
    if isinstance(found, Access):
        return found
    return await _asked(request, relay, action, found)


async def _asked(request: Request, relay: Relay, action: str, found: tuple[str, ...]) -> Access:
    """The backend's decision on the channels `_authorize` left for it (403, or 503 when it gives no answer)."""
    try:
        return await ask_backend(request, relay, action, found)
    except HookFailed as exc:
        raise hook_unavailable(exc, "nothing was done" if action == SUBSCRIBE else "nothing was published") from None


async def check_publish(request: Request, relay: Relay, channels: Sequence[str], cost: int = 1) -> Access:
    """Before publishing to `channels`: authorization (401/403, or the hook's 403/503), then the client's publish
    rate (429)."""
    access = await _access(request, relay, PUBLISH, channels)
    wait = await relay.rate_limiter.hit(access.client, cost)
    if wait is not None:
        raise _rate_limited(relay, wait)
    return access


def _rate_limited(relay: Relay, wait: float) -> ApiError:
    relay.metrics.publish_rejected.labels("rate_limited").inc()
    return ApiError(
        429,
        f"this client is over the publish rate limit of {relay.rate_limiter.rate:g} messages/second "
        f"(PUBLISH_RATE_LIMIT); nothing was published, retry after {wait:.2f} s",
        headers={"Retry-After": str(max(1, math.ceil(wait)))},
        retry_after_ms=math.ceil(wait * 1000),
    )


def _charge_in_publish(relay: Relay, access: Access) -> RateCharge | None:
    """The publisher's rate as part of the publish's own step, when the broker can take it and nothing runs
    between the check and the publish that the check protects (a publish hook: the limiter keeps a client from
    flooding the backend, so it is asked first, on its own). None: `hit` it first. Either way a refused publish
    gets the same 429 and is neither published nor charged; charged in the publish, a body that is refused as
    malformed (400/422) is not charged either."""
    if relay.publish_hook is not None or not relay.broker.charges_rates:
        return None
    return relay.rate_limiter.charge(access.client)


def _stream_limit(relay: Relay, access: Access) -> Access:
    """The client's own stream limit (429)."""
    limit = relay.settings.max_streams_per_client
    if limit and relay.client_streams.get(access.client, 0) >= limit:
        raise ApiError(
            429,
            f"this client already has {limit} open streams on this instance (MAX_STREAMS_PER_CLIENT); close one. "
            "One stream can carry many channels: /events?channel=a&channel=b",
            "too_many_streams",
            headers={"Retry-After": str(max(1, math.ceil(relay.settings.retry_ms / 1000)))},
        )
    return access


async def check_read(request: Request, relay: Relay, channels: Sequence[str]) -> Access:
    """Reading about a channel (presence, last id) needs what subscribing to it needs."""
    return await _access(request, relay, SUBSCRIBE, channels)


async def moderate(request: Request, relay: Relay, access: Access, channel: str, data: Any,
                   event: str | None) -> Any:
    """The publish hook's verdict on one message (hooks.py): the data to publish (the backend may replace it), or
    the backend's own 4xx; 503 `publish_hook_*` when it gives no usable answer. Without a hook: `data`."""
    hook = relay.publish_hook
    if hook is None:
        return data
    cookie, authorization = _headers_of(request)
    try:
        decision = await hook.decide(PublishQuestion(channel, event, data, access.user,
                                                     relay.authorizer.address(request), cookie, authorization,
                                                     request_id.get(), request))
    except HookFailed as exc:
        relay.metrics.publish_rejected.labels(f"publish_hook_{exc.kind}").inc()
        raise hook_unavailable(exc) from None
    if not decision.accept:
        relay.metrics.publish_rejected.labels("moderated").inc()
        raise ApiError(decision.status, decision.message, decision.code)
    if not decision.replaced:
        return data
    limit, depth = relay.settings.max_message_bytes, relay.settings.max_json_depth
    if len(encode_data(decision.data)) > limit or not within_json_depth(decision.data, depth):
        relay.metrics.publish_rejected.labels("publish_hook_invalid").inc()
        raise ApiError(503, f"the publish hook replaced the data with more than {limit} bytes or {depth} levels "
                       "(MAX_MESSAGE_BYTES, MAX_JSON_DEPTH); nothing was published", "publish_hook_invalid",
                       headers={"Retry-After": "1"})
    return decision.data


def _relay(request: Request) -> Relay:
    relay: Relay = request.app.state.relay
    if not relay.started:
        raise ApiError(503, NotStarted.MESSAGE, "not_started")
    return relay


def _channel(relay: Relay, name: str) -> str:
    if not valid_channel(name, relay.settings.max_channel_length):
        raise ApiError(
            400,
            f"invalid channel name {name[:80]!r}: use 1-{relay.settings.max_channel_length} characters "
            "from A-Z a-z 0-9 _ - . :",
            "invalid_channel",
        )
    return name


async def _json_body(request: Request, limit: int) -> Any:
    declared = header(request.scope, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"body is {declared} bytes; the limit is {limit} (MAX_MESSAGE_BYTES)")
    relay: Relay = request.app.state.relay
    receive = request.receive
    body = relay.edge.whole_body(receive)  # all there already (nearly always): taken at once
    if body is None:
        body = await _read_body(receive, limit)
    elif len(body) > limit:
        raise ApiError(413, f"body is over the limit of {limit} bytes (MAX_MESSAGE_BYTES)")
    if not body:
        raise ApiError(400, "empty body: send a JSON object", "malformed_json")
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"body is not valid JSON (UTF-8): {exc}", "malformed_json") from None
    depth = relay.settings.max_json_depth
    # Each level opens with a bracket: a body with no more brackets than the limit (counted in C, those inside
    # strings too) cannot nest deeper, and most bodies are decided without walking the value.
    if body.count(b"{") + body.count(b"[") > depth and not within_json_depth(value, depth):
        raise ApiError(400, f"body nests deeper than {depth} levels (MAX_JSON_DEPTH)", "too_deep")
    return value


async def _read_body(receive: Receive, limit: int) -> bytes:
    """The body as the ASGI messages come (Request.stream()'s machinery costs more than this)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            # Gone before its body arrived (or it stalled past REQUEST_TIMEOUT): nothing to answer, nothing to log.
            raise ApiError(400, "the client went away before its body arrived", "client_disconnected")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"body is over the limit of {limit} bytes (MAX_MESSAGE_BYTES)")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


_IDEMPOTENCY_KEY = re.compile(r"[A-Za-z0-9_.:-]{1,128}")


def broker_error(exc: BrokerError, action: str = "nothing was published") -> ApiError:
    """The HTTP answer to a broker failure: what happened, named for what it is, and what to do."""
    if isinstance(exc, OutcomeUnknown):
        return ApiError(
            504, "the broker did not confirm in time: the message may or may not have been published; retry with "
            "the same Idempotency-Key to get its id without publishing it twice", "outcome_unknown",
            headers={"Retry-After": "1"}, kind=exc.kind,
        )
    if isinstance(exc, NotStarted):
        return ApiError(503, exc.MESSAGE, "not_started")
    if exc.kind == "loading":
        # Redis restarted and is reading its data back (AOF/RDB): it answers in seconds, the outage is over.
        return ApiError(503, f"Redis is loading its data after a restart; {action}, retry after the delay", "loading",
                        headers={"Retry-After": "1"}, kind=exc.kind)
    if isinstance(exc, BrokerBusy):
        return ApiError(503, f"this instance is out of Redis connections for now; {action}, retry after the delay",
                        "busy", headers={"Retry-After": "1"}, kind=exc.kind)
    return ApiError(503, f"the broker is unavailable ({exc.kind}); {action}, retry after the delay", "unavailable",
                    headers={"Retry-After": "1"}, kind=exc.kind)


def _idempotency_key(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or _IDEMPOTENCY_KEY.fullmatch(value) is None:
        raise ApiError(400, f"{where} must be 1-128 characters from A-Z a-z 0-9 _ - . :", "invalid_idempotency_key")
    return value


async def _publish(relay: Relay, channel: str, data: Any, event: str | None, key: str | None = None,
                   charge: RateCharge | None = None) -> Published:
    try:
        return await relay.publish_message(channel, data, event, key, charge)
    except BrokerError as exc:
        raise broker_error(exc) from None
    except RateLimited as exc:
        raise _rate_limited(relay, exc.wait) from None
    except IdempotencyKeyReused as exc:
        raise ApiError(422, str(exc), "idempotency_key_reused", first_id=exc.first_id) from None


def _validate_publish(body: Any) -> tuple[Any, str | None]:
    if not isinstance(body, dict):
        raise ApiError(422, 'body must be a JSON object like {"data": ..., "event": "name"}')
    unknown = sorted(set(body) - {"data", "event"})
    if unknown:
        raise ApiError(422, f"unknown fields {unknown}: only 'data' and 'event' are accepted", fields=unknown)
    if "data" not in body:
        raise ApiError(422, "field 'data' is required (any JSON value)", fields=["data"])
    event = body.get("event")
    if event is not None:
        if not isinstance(event, str) or not valid_event(event):
            raise ApiError(
                422,
                "'event' must be 1-64 characters from A-Z a-z 0-9 _ - . : / and not start with 'relay.'",
                fields=["event"],
            )
    return body["data"], event


async def _publish_one(request: Request) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """POST /channels/{channel}/messages, to the point of its 202: (body, headers). Raises ApiError."""
    relay = _relay(request)
    channel = _channel(relay, request.path_params["channel"])
    key = _idempotency_key(header(request.scope, b"idempotency-key"), "the Idempotency-Key header")
    # 401/403 before the body is even read; the backend is asked only for what the token rules leave to it (each
    # step that has nothing to do is skipped, not awaited: a publish is the hot request)
    found = _authorize(request, relay, PUBLISH, (channel,))
    access = found if isinstance(found, Access) else await _asked(request, relay, PUBLISH, found)
    charge = _charge_in_publish(relay, access)
    if charge is None and type(relay.rate_limiter) is not NoRateLimit:
        wait = await relay.rate_limiter.hit(access.client)  # 429 before the body is even read
        if wait is not None:
            raise _rate_limited(relay, wait)
    data, event = _validate_publish(await _json_body(request, relay.settings.max_message_bytes))
    if relay.publish_hook is not None:
        data = await moderate(request, relay, access, channel, data, event)
    published = await _publish(relay, channel, data, event, key, charge)
    # The id and the channel name are from safe charsets: no JSON escaping to do.
    if not published.duplicate:
        body = b'{"id":"%s","channel":"%s"}' % (published.id.encode(), channel.encode())
        return body, [_JSON, (b"content-length", b"%d" % len(body))]
    body = b'{"id":"%s","channel":"%s","duplicate":true}' % (published.id.encode(), channel.encode())
    return body, [_JSON, (b"content-length", b"%d" % len(body)), (b"idempotent-replayed", b"true")]


_JSON = (b"content-type", b"application/json")


async def publish(request: Request) -> Response:
    body, headers = await _publish_one(request)
    response = Response(body, status_code=202)
    response.raw_headers = headers
    return response


async def publish_asgi(scope: Scope, receive: Receive, send: Send) -> None:
    """The same endpoint without Starlette's router, request/response wrappers and exception middleware, which
    cost more than the publish itself (see app._FastRoutes): the 202 is prepared bytes, written at once under
    uvicorn (`answer`), else two `send`s."""
    try:
        body, headers = await _publish_one(Request(scope, receive))
    except ApiError as exc:
        await error_response(exc.status, exc.message, exc.code, exc.headers, **exc.details)(scope, receive, send)
        return
    except Exception:  # (it enters below Starlette's error middleware: app.server_entry) the same JSON 500
        log.exception("unexpected error publishing", extra={"path": scope.get("path")})
        await error_response(500, "internal error; it was logged", "internal")(scope, receive, send)
        return
    answer = getattr(send, "answer", None)  # app._SendWithHeaders: the whole 202 in one write, when it can
    if answer is None or not answer(202, headers, body):
        await send({"type": "http.response.start", "status": 202, "headers": headers})
        await send({"type": "http.response.body", "body": body})


async def publish_batch(request: Request) -> Response:
    """Many messages, one or several channels, one call; each item answered on its own, order per channel kept."""
    relay = _relay(request)
    body = await _json_body(request, relay.settings.max_message_bytes * 4)
    items = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(items, list) or not items or set(body) != {"messages"}:
        raise ApiError(422, 'body must be {"messages": [{"channel": ..., "data": ..., "event": ...}, ...]}')
    if len(items) > relay.settings.max_batch:
        raise ApiError(413, f"{len(items)} messages; a batch may carry at most {relay.settings.max_batch} (MAX_BATCH)")
    # All or nothing: every channel of the batch must be allowed, and the batch counts its size against the rate.
    named = {i["channel"] for i in items if isinstance(i, dict) and isinstance(i.get("channel"), str)}
    access = await check_publish(
        request, relay, sorted(c for c in named if valid_channel(c, relay.settings.max_channel_length)),
        cost=len(items))
    results: list[dict[str, Any]] = []
    for index, item in enumerate(items):
        try:
            if not isinstance(item, dict) or not isinstance(item.get("channel"), str):
                raise ApiError(422, "each item needs a string 'channel' next to 'data' (and optional 'event')")
            channel = _channel(relay, item["channel"])
            key = _idempotency_key(item.get("idempotency_key"), "'idempotency_key'")
            data, event = _validate_publish({k: v for k, v in item.items() if k not in ("channel", "idempotency_key")})
            if len(encode_data(data)) > relay.settings.max_message_bytes:
                raise ApiError(413, f"item over the limit of {relay.settings.max_message_bytes} bytes")
            data = await moderate(request, relay, access, channel, data, event)
            published = await _publish(relay, channel, data, event, key)
            result: dict[str, Any] = {"index": index, "channel": channel, "id": published.id}
            if published.duplicate:
                result["duplicate"] = True
            results.append(result)
        except ApiError as exc:
            results.append({"index": index, "error": {"code": exc.code, "message": exc.message, "status": exc.status}})
    ok = sum(1 for r in results if "id" in r)
    return JSONResponse({"published": ok, "failed": len(results) - ok, "results": results})


async def channel_info(request: Request) -> Response:
    """Presence across all replicas and the newest id: what a dashboard or a 'who is here' badge needs."""
    relay = _relay(request)
    channel = _channel(relay, request.path_params["channel"])
    await check_read(request, relay, (channel,))
    try:
        subscribers, instances = await relay.presence.count(channel)
        last_id = await relay.broker.last_id(channel)
    except BrokerError as exc:
        raise broker_error(exc, "nothing was read") from None
    return JSONResponse(
        {"channel": channel, "subscribers": subscribers, "instances": instances, "last_id": last_id}
    )


def _last_event_id(request: Request) -> str | None:
    # The header wins: EventSource sends it on every reconnect while the URL keeps the first connect's query.
    scope = request.scope
    return header(scope, b"last-event-id") or (
        request.query_params.get("last_event_id") if query_value(scope, b"last_event_id") else None)


# The stream endpoints are plain functions (nothing in them waits): app._FastRoutes calls them and hands the
# response on without a coroutine frame of its own staying suspended under the stream; the router gets them
# wrapped (`_endpoint`).


class _AfterHook:
    """A stream the authorization hook must decide on: an ASGI app that asks it, then streams or answers.

    Only such streams pay for this object and its suspended frame; the rest open without an await (see
    app._FastRoutes). A denial is a 403 (an EventSource stops, which is right for a ban); a hook that gives no
    usable answer gets `stream.refuse_stream` (200, `relay.unavailable`, `retry:`), never a 503 that would make a
    browser give up after a backend blip."""

    __slots__ = ("channels", "legacy", "private", "relay", "request")

    def __init__(self, request: Request, relay: Relay, channels: tuple[str, ...], private: tuple[str, ...],
                 legacy: bool) -> None:
        self.request, self.relay, self.channels, self.private, self.legacy = request, relay, channels, private, legacy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        relay, request = self.relay, self.request
        response: ASGIApp
        try:
            access = _stream_limit(relay, await ask_backend(request, relay, SUBSCRIBE, self.private))
            response = open_stream(relay, self.channels, _last_event_id(request), access.client, None, access.user,
                                   legacy=self.legacy)
        except HookFailed as exc:
            response = refuse_stream(relay, f"auth_hook_{exc.kind}", str(exc))
        except ApiError as exc:
            response = error_response(exc.status, exc.message, exc.code, exc.headers, **exc.details)
        except Exception:
            log.exception("unexpected error opening a stream", extra={"path": scope.get("path")})
            response = error_response(500, "internal error; it was logged", "internal")
        del self.request  # the stream holds what it needs; the request object goes
        await response(scope, receive, send)


def _stream(request: Request, relay: Relay, channels: tuple[str, ...], legacy: bool = False) -> ASGIApp:
    """A stream of `channels`: authorization (401/403/429, or the hook's), then the stream."""
    found = _authorize(request, relay, SUBSCRIBE, channels)
    if not isinstance(found, Access):
        return _AfterHook(request, relay, channels, found, legacy)
    access = _stream_limit(relay, found)
    return open_stream(relay, channels, _last_event_id(request), access.client, access.expires_at, access.user,
                       legacy=legacy)


def channel_events(request: Request) -> ASGIApp:
    relay = _relay(request)
    return _stream(request, relay, (_channel(relay, request.path_params["channel"]),))


def events(request: Request) -> ASGIApp:
    relay = _relay(request)
    names: list[str] = []
    for value in request.query_params.getlist("channel"):
        for name in value.split(","):
            if name and name not in names:
                names.append(_channel(relay, name))
    if not names:
        raise ApiError(400, "name at least one channel: /events?channel=a&channel=b", "invalid_channel")
    limit = relay.settings.max_channels_per_stream
    if len(names) > limit:
        raise ApiError(400, f"{len(names)} channels; one stream may join at most {limit} (MAX_CHANNELS_PER_STREAM)")
    return _stream(request, relay, tuple(names))


# -- the old chat's contract ---------------------------------------------------------------------------------


def _legacy_422(message: str) -> JSONResponse:
    # FastAPI's shape (`detail`) next to ours, so clients of the old service keep parsing it.
    response = error_response(422, message)
    body = orjson.loads(response.body)
    body["detail"] = [{"loc": ["body", "messages"], "msg": message, "type": "value_error"}]
    return JSONResponse(body, status_code=422)


async def legacy_send(request: Request) -> Response:
    relay = _relay(request)
    access = await check_publish(request, relay, (relay.settings.default_channel,))
    try:
        body = await _json_body(request, relay.settings.max_message_bytes)
    except ApiError as exc:
        if exc.status == 413:
            raise
        return _legacy_422(exc.message)
    messages = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(messages, list) or not messages:
        return _legacy_422("field 'messages' is required: a non-empty list of {role, content}")
    for item in messages:
        if not (isinstance(item, dict) and isinstance(item.get("role"), str) and isinstance(item.get("content"), str)):
            return _legacy_422("each message needs string fields 'role' and 'content'")
    key = _idempotency_key(header(request.scope, b"idempotency-key"), "the Idempotency-Key header")
    messages = await moderate(request, relay, access, relay.settings.default_channel, messages, None)
    published = await _publish(relay, relay.settings.default_channel, messages, None, key)
    if published.duplicate:  # the old contract's body, marked as on every publish route
        return JSONResponse({"status": "Message received successfully", "duplicate": True},
                            headers={"Idempotent-Replayed": "true"})
    return JSONResponse({"status": "Message received successfully"})


def legacy_events(request: Request) -> ASGIApp:
    relay = _relay(request)
    return _stream(request, relay, (relay.settings.default_channel,), legacy=True)


# -- probes, metrics, page -----------------------------------------------------------------------------------


async def healthz(request: Request) -> Response:
    relay: Relay = request.app.state.relay
    return JSONResponse({"status": "ok", "instance": relay.settings.instance})


async def readyz(request: Request) -> Response:
    """Can this instance serve streams (started, not draining, not full)? Deliberately not whether Redis
    answers: that is shared by every replica, and `/healthz/broker` reports it."""
    relay: Relay = request.app.state.relay
    reason = relay.not_ready_reason()
    body = {"status": "ready" if reason is None else "not ready", "instance": relay.settings.instance,
            "broker": "up" if relay.broker_up() else "down"}
    if reason is None:
        return JSONResponse(body)
    return JSONResponse({**body, "reason": reason}, status_code=503)


async def broker_health(request: Request) -> Response:
    """Does this instance reach its broker (every Redis pub/sub connection up)? For alerts, not for routing."""
    relay: Relay = request.app.state.relay
    stats = relay.broker.stats() if relay.started else {}
    body = {"status": "up" if relay.broker_up() else "down", "instance": relay.settings.instance,
            "broker": "redis" if relay.settings.redis_url else "memory",
            "channels_pending": int(stats.get("channels_pending", 0))}
    return JSONResponse(body, status_code=200 if relay.broker_up() else 503)


async def metrics(request: Request) -> Response:
    relay = _relay(request)
    return Response(relay.metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def index(request: Request) -> Response:
    relay: Relay = request.app.state.relay
    return FileResponse(f"{relay.settings.frontend_dir}/index.html", headers={"Cache-Control": "no-cache"})


async def openapi(request: Request) -> Response:
    return JSONResponse(OPENAPI)


def _endpoint(open_stream_of: Callable[[Request], ASGIApp]) -> Callable[[Request], Awaitable[ASGIApp]]:
    """A stream endpoint as the router wants it (a coroutine function; a plain one would go to a thread)."""
    async def endpoint(request: Request) -> ASGIApp:
        return open_stream_of(request)

    endpoint.__name__ = open_stream_of.__name__
    return endpoint


# The hot routes, also taken straight to their endpoints by app._FastRoutes (matched by these same Routes).
publish_route = Route("/channels/{channel}/messages", publish, methods=["POST"])
stream_routes: list[tuple[Route, Callable[[Request], ASGIApp]]] = [
    (Route("/channels/{channel}/events", _endpoint(channel_events), methods=["GET"]), channel_events),
    (Route("/events", _endpoint(events), methods=["GET"]), events),
    (Route("/server/events", _endpoint(legacy_events), methods=["GET"]), legacy_events),
]

routes = [
    publish_route,
    Route("/channels/{channel}", channel_info, methods=["GET"]),
    Route("/publish", publish_batch, methods=["POST"]),
    *(route for route, _ in stream_routes),
    Route("/server/send", legacy_send, methods=["POST"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/healthz/broker", broker_health, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/openapi.json", openapi, methods=["GET"]),
    Route("/", index, methods=["GET"]),
]
