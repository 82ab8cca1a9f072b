"""The ASGI application: routes, middleware and a lifespan that starts and stops the relay.

`create_app` is the public way in, for the standalone server and for embedding alike.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from itertools import chain
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import State
from starlette.middleware import Middleware
from starlette.middleware.errors import ServerErrorMiddleware
from starlette.requests import Request
from starlette.routing import Match, Mount
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .access import install_access_log_filter, record_request
from .admin import routes as admin_routes
from .api import publish_asgi, publish_route, routes, stream_routes
from .config import Settings
from .cors import StrictCORSMiddleware
from .errors import ApiError, error_response, exception_handlers
from .headers import raw_header
from .hooks import AuthCallable, PublishCallable
from .limits import HeaderLimit
from .logs import request_id
from .metrics import Metrics
from .relay import Relay
from .uvicorn_glue import UvicornEdge, answer_directly, start_directly

__all__ = ["create_app", "server_entry"]

log = logging.getLogger("service.app")

_SAFE_ID = re.compile(rb"[A-Za-z0-9._-]{1,64}")
_BAD_HEADER_VALUE = re.compile(rb"[\x00-\x08\x0A-\x1F\x7F]")  # what uvicorn refuses in a header value


class _RequestContext:
    """Adds `X-Relay-Instance` and `X-Request-ID` to every response, and the request id to every log record; when
    the answer starts, the request is counted and logged (access.record_request: a stream's line comes when it
    opens, with its time to first byte, as a stream has no end worth waiting for).

    A request id sent by a proxy (`X-Request-ID`, 1-64 safe characters) is kept, so logs join up across hops.
    """

    def __init__(self, app: ASGIApp, instance: str, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        self.header = (b"x-relay-instance", instance.encode())
        # Ids are a random prefix per process and a counter: unique across replicas and restarts without a
        # getrandom() system call and a UUID per request (uuid4 was a visible share of a publish's CPU).
        self._prefix = os.urandom(5).hex().encode()
        self._ids = itertools.count(1)
        # Answers written straight to uvicorn's connection carry this header as it is: only a valid header value.
        self.direct = _BAD_HEADER_VALUE.search(self.header[1]) is None

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        """Not a coroutine: it hands on the next layer's awaitable, so no frame of this layer stays suspended under
        a stream for its whole life."""
        if scope["type"] != "http":
            return self.app(scope, receive, send)
        return self.app(scope, receive, self.wrap(scope, send))

    def wrap(self, scope: Scope, send: Send) -> _SendWithHeaders:
        """The request's id set, and its `send` with the context's headers. The id is set in the context of the
        request's task and not reset: under uvicorn each request runs in a task of its own, and an app that mounts
        the relay logs the rest of that request under the same id."""
        rid = raw_header(scope, b"x-request-id")
        if rid is None or not _SAFE_ID.fullmatch(rid):
            rid = b"%s%06x" % (self._prefix, next(self._ids))
        request_id.set(rid.decode())
        return _SendWithHeaders(send, scope, self.header, rid, time.perf_counter(), self.metrics, self.direct)


class _SendWithHeaders:
    """The request's `send` with the context's headers added to its answer, which is counted and logged when it
    starts. A slotted object rather than a closure: under a stream it lives as long as the stream, and a
    closure over the same values is a function and five cells (~400 bytes and six objects for the
    collector to walk, per idle stream)."""

    __slots__ = ("direct", "instance", "metrics", "rid", "scope", "send", "started")

    def __init__(self, send: Send, scope: Scope, instance: tuple[bytes, bytes], rid: bytes, started: float,
                 metrics: Metrics, direct: bool = False) -> None:
        self.send, self.scope, self.instance, self.rid = send, scope, instance, rid
        self.started, self.metrics, self.direct = started, metrics, direct

    def __call__(self, message: Message) -> Awaitable[None]:
        """Not a coroutine: it hands on the server's `send` awaitable, adding no frame per write."""
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", ()), self.instance, (b"x-request-id", self.rid)]
            return self._start(message)
        return self.send(message)

    async def _start(self, message: Message) -> None:
        await self.send(message)
        record_request(self.scope, message["status"], self.started, self.metrics)

    def answer(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> bool:
        """A whole answer (`headers` with its content-length) written to uvicorn's connection at once, counted and
        logged; False when it cannot be (uvicorn_glue.answer_directly): send it as ASGI messages then."""
        if not self.direct or not answer_directly(
                self.send, status, [*headers, self.instance, (b"x-request-id", self.rid)], body):
            return False
        record_request(self.scope, status, self.started, self.metrics)
        return True

    def start_stream(self, status: int, headers: list[tuple[bytes, bytes]], first: bytes = b"") -> bool:
        """A streamed answer's head (chunked) and its first chunk written to uvicorn's connection, counted and
        logged; False when it cannot be (uvicorn_glue.start_directly): send `http.response.start` (and `first`)
        then."""
        if not self.direct or not start_directly(
                self.send, status, [*headers, self.instance, (b"x-request-id", self.rid)], first):
            return False
        record_request(self.scope, status, self.started, self.metrics)
        return True


class _FastRoutes:
    """Streams and single publishes go straight to their endpoint, below the middleware but above Starlette's
    router.

    A stream's ASGI call stays suspended for the stream's whole life, and every layer it passes through keeps a
    frame: the router, the route and Starlette's exception wrappers cost ~3 KiB per idle stream (bench/: 20% of
    the idle-stream memory). A publish is the hot request: those layers and Starlette's response classes cost
    more CPU than publishing itself. The endpoints are the same code the router runs; an `ApiError` gets the same
    JSON answer as everywhere else.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        """Not a coroutine (see HeaderLimit.__call__): what stays suspended under a stream is its response."""
        if scope["type"] == "http":
            method = scope["method"]
            if method == "POST" and not scope.get("root_path"):
                channel = _channel_in(scope["path"], "/messages")
                if channel is not None:
                    # What publish_route.matches finds, without its regex and child scope (not mounted: the path
                    # is the route's path).
                    scope["endpoint"] = publish_route.endpoint
                    scope["path_params"] = {"channel": channel}
                    scope["route"] = publish_route
                    return publish_asgi(scope, receive, send)
            if method == "POST":
                match, child = publish_route.matches(scope)
                if match is Match.FULL:
                    scope.update(child)
                    scope["route"] = publish_route  # as Starlette's router sets it: the template for logs, metrics
                    return publish_asgi(scope, receive, send)
            elif method in ("GET", "HEAD"):
                if not scope.get("root_path"):
                    channel = _channel_in(scope["path"], "/events")
                    if channel is not None:
                        route, open_stream_of = stream_routes[0]  # /channels/{channel}/events, as above
                        scope["endpoint"] = route.endpoint
                        scope["path_params"] = {"channel": channel}
                        scope["route"] = route
                        return _open(open_stream_of, scope, receive, send)(scope, receive, send)
                for route, open_stream_of in stream_routes:
                    match, child = route.matches(scope)
                    if match is Match.FULL:
                        scope.update(child)
                        scope["route"] = route
                        return _open(open_stream_of, scope, receive, send)(scope, receive, send)
        return self.app(scope, receive, send)


def _channel_in(path: str, suffix: str) -> str | None:
    """The `{channel}` of `/channels/{channel}<suffix>` as Starlette's router reads it (one or more characters, no
    `/`), or None."""
    if path.startswith("/channels/") and path.endswith(suffix):
        channel = path[10:len(path) - len(suffix)]
        if channel and "/" not in channel:
            return channel
    return None


def _open(open_stream_of: Callable[[Request], ASGIApp], scope: Scope, receive: Receive, send: Send) -> ASGIApp:
    """A stream endpoint's response; an `ApiError` as its JSON answer, and anything unexpected as the JSON 500 the
    exception handlers give elsewhere (these routes enter below Starlette's error middleware, see server_entry)."""
    try:
        return open_stream_of(Request(scope, receive, send))
    except ApiError as exc:
        return error_response(exc.status, exc.message, exc.code, exc.headers, **exc.details)
    except Exception:
        log.exception("unexpected error opening a stream", extra={"path": scope.get("path")})
        return error_response(500, "internal error; it was logged", "internal")


class _Entry:
    """What uvicorn calls (server_entry)."""

    def __init__(self, app: Starlette) -> None:
        self.app = app
        self._below: ASGIApp | None = None
        self._inline: _Inline | None = None

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        if scope["type"] == "http" and _fast(scope):
            below = self._below
            if below is None:
                stack = self.app.middleware_stack or self.app.build_middleware_stack()
                self.app.middleware_stack = stack
                below = self._below = stack.app if isinstance(stack, ServerErrorMiddleware) else stack
                self._inline = _Inline.of(below)
            scope["app"] = self.app
            inline = self._inline
            if inline is not None:
                return inline(scope, receive, send, below)
            return below(scope, receive, send)
        return self.app(scope, receive, send)


class _Inline:
    """The middleware `create_app` stacks above `_FastRoutes` (request context, CORS, header limit), run as one
    function call for the hot requests instead of one layer each: each layer cost a call and an awaitable per
    publish. CORS only acts on a request with an `Origin` header; such requests, and headers over the limit
    (the 431 is the layer's to answer), go down the stack itself. `of` gives None for any other stack."""

    __slots__ = ("context", "cors", "limit", "routes")

    def __init__(self, context: _RequestContext, cors: bool, limit: int, routes: _FastRoutes) -> None:
        self.context, self.cors, self.limit, self.routes = context, cors, limit, routes

    @classmethod
    def of(cls, below: ASGIApp) -> _Inline | None:
        layers: list[Any] = []
        app: Any = below
        while len(layers) < 5 and app is not None:
            layers.append(app)
            app = getattr(app, "app", None)
        kinds = [type(layer) for layer in layers]
        if kinds[:4] == [_RequestContext, StrictCORSMiddleware, HeaderLimit, _FastRoutes]:
            return cls(layers[0], True, layers[2].limit, layers[3])
        if kinds[:3] == [_RequestContext, HeaderLimit, _FastRoutes]:
            return cls(layers[0], False, layers[1].limit, layers[2])
        return None

    def __call__(self, scope: Scope, receive: Receive, send: Send, below: ASGIApp) -> Awaitable[None]:
        headers = scope["headers"]
        if self.cors and any(name == b"origin" for name, _ in headers):
            return below(scope, receive, send)
        if self.limit > 0 and sum(map(len, chain.from_iterable(headers))) > self.limit:
            return below(scope, receive, send)
        return self.routes(scope, receive, self.context.wrap(scope, send))


def _fast(scope: Scope) -> bool:
    """The requests `_FastRoutes` answers (a cheap first look; the routes decide)."""
    method: str = scope["method"]
    path: str = scope["path"]
    if method == "POST":
        return path.startswith("/channels/") and path.endswith("/messages")
    if method in ("GET", "HEAD"):
        return path in ("/events", "/server/events") or (path.startswith("/channels/") and path.endswith("/events"))
    return False


def server_entry(app: Starlette) -> ASGIApp:
    """The app as the standalone server runs it: streams and single publishes enter below Starlette's own
    outermost layers (its `__call__` and `ServerErrorMiddleware`), each of which keeps a frame suspended under every
    stream for its whole life (~900 bytes per idle stream, bench/mem_wrapper.py). Those requests meet our
    middleware and `_FastRoutes` as before; an unexpected error still gets the JSON 500 (`_open`, `publish_asgi`),
    and everything else goes through the whole app. Not a coroutine function: run it with `interface="asgi3"`."""
    return _Entry(app)


class _State(State):
    """`app.state`, with `relay` an attribute of its own. Starlette's `State` answers each attribute from its
    `__getattr__`, after the normal lookup has failed and built and formatted an `AttributeError`: the routes ask
    for the relay once or twice per request. Anything else set on it is kept as `State` keeps it."""

    def __init__(self, relay: Relay) -> None:
        super().__init__({"relay": relay})
        object.__setattr__(self, "relay", relay)

    def __setattr__(self, key: Any, value: Any) -> None:
        super().__setattr__(key, value)
        if key == "relay":
            object.__setattr__(self, "relay", value)

    def __delattr__(self, key: Any) -> None:
        super().__delattr__(key)
        if key == "relay":
            object.__delattr__(self, "relay")


def create_app(settings: Settings | None = None, relay: Relay | None = None, *,
               auth_hook: AuthCallable | None = None, publish_hook: PublishCallable | None = None) -> Starlette:
    """The relay as an ASGI app. Standalone it runs its own lifespan; mounted in another app (Starlette's Mount
    does not run a sub-app's lifespan) the host enters `relay.lifespan`:

        relay = Relay(Settings.from_env(), auth_hook=may_listen)
        app = FastAPI(lifespan=relay.lifespan)
        app.mount("/realtime", create_app(relay=relay))

    `auth_hook` / `publish_hook`: the app's own coroutines deciding who may listen and publish and what goes out
    (service/hooks.py, docs/security.md), for a relay this call creates; give them to `Relay` otherwise.
    """
    if relay is not None and (auth_hook is not None or publish_hook is not None):
        raise ValueError("give the hooks to the Relay you pass: Relay(settings, auth_hook=..., publish_hook=...)")
    settings = settings or (relay.settings if relay else Settings.from_env())
    relay = relay or Relay(settings, auth_hook=auth_hook, publish_hook=publish_hook)
    if not relay.edge_given:
        # Wherever the app is mounted, uvicorn is the likely server: its adapter gives direct writes and its exit
        # signal, and answers as the plain edge does under any other server.
        relay.use_edge(UvicornEdge())

    install_access_log_filter()  # uvicorn's access log, wherever the app runs: no query strings (tokens)
    middleware = [Middleware(_RequestContext, instance=settings.instance, metrics=relay.metrics)]
    if settings.cors_origins:
        middleware.append(
            Middleware(
                StrictCORSMiddleware,  # CORS headers only ever for listed origins
                allow_origins=list(settings.cors_origins),
                allow_credentials=settings.cors_allow_credentials,
                allow_methods=["GET", "POST"],
                # Idempotency-Key: a page on another origin retries a publish whose answer was lost (504)
                allow_headers=["Content-Type", "Authorization", "Last-Event-ID", "Idempotency-Key"],
                expose_headers=["X-Relay-Instance", "X-Request-ID", "Retry-After"],
            )
        )
    middleware.append(Middleware(HeaderLimit, limit=settings.max_header_bytes))  # inside CORS: 431s stay readable
    middleware.append(Middleware(_FastRoutes))
    app = Starlette(
        routes=[*routes, *admin_routes,
                Mount("/static", StaticFiles(directory=settings.frontend_dir, check_dir=False))],
        middleware=middleware,
        exception_handlers=exception_handlers,
        lifespan=relay.lifespan,
    )
    app.state = _State(relay)
    return app
