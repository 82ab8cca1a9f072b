"""The ASGI application: routes, middleware and a lifespan that starts and stops the relay.

`create_app` is the public way in, for the standalone server and for embedding alike.
"""

from __future__ import annotations

import itertools
import os
import re

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.routing import Match, Mount
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .api import publish_asgi, publish_route, routes, stream_routes
from .config import Settings
from .cors import StrictCORSMiddleware
from .errors import ApiError, error_response, exception_handlers
from .limits import HeaderLimit
from .logs import request_id
from .relay import Relay

__all__ = ["create_app"]

_SAFE_ID = re.compile(rb"[A-Za-z0-9._-]{1,64}")


class _RequestContext:
    """Adds `X-Relay-Instance` and `X-Request-ID` to every response, and the request id to every log record.

    A request id sent by a proxy (`X-Request-ID`, 1-64 safe characters) is kept, so logs join up across hops.
    """

    def __init__(self, app: ASGIApp, instance: str) -> None:
        self.app = app
        self.header = (b"x-relay-instance", instance.encode())
        # Ids are a random prefix per process and a counter: unique across replicas and restarts without a
        # getrandom() system call and a UUID per request (uuid4 was a visible share of a publish's CPU).
        self._prefix = os.urandom(5).hex().encode()
        self._ids = itertools.count(1)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = next((v for k, v in scope["headers"] if k == b"x-request-id"), b"")
        if not _SAFE_ID.fullmatch(rid):
            rid = b"%s%06x" % (self._prefix, next(self._ids))
        token = request_id.set(rid.decode())
        extra = [self.header, (b"x-request-id", rid)]

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *extra]
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            request_id.reset(token)


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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            match, child = publish_route.matches(scope)
            if match is Match.FULL:
                scope.update(child)
                await publish_asgi(scope, receive, send)
                return
        elif scope["type"] == "http" and scope["method"] in ("GET", "HEAD"):
            for route in stream_routes:
                match, child = route.matches(scope)
                if match is Match.FULL:
                    scope.update(child)
                    request = Request(scope, receive, send)
                    try:
                        response: ASGIApp = await route.endpoint(request)
                    except ApiError as exc:
                        response = error_response(exc.status, exc.message, exc.code, exc.headers, **exc.details)
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)


def create_app(settings: Settings | None = None, relay: Relay | None = None) -> Starlette:
    """The relay as an ASGI app. Standalone it runs its own lifespan; mounted in another app (Starlette's Mount
    does not run a sub-app's lifespan) the host enters `relay.lifespan`:

        relay = Relay(Settings.from_env())
        app = FastAPI(lifespan=relay.lifespan)
        app.mount("/realtime", create_app(relay=relay))
    """
    settings = settings or (relay.settings if relay else Settings.from_env())
    relay = relay or Relay(settings)

    middleware = [Middleware(_RequestContext, instance=settings.instance)]
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
        routes=[*routes, Mount("/static", StaticFiles(directory=settings.frontend_dir, check_dir=False))],
        middleware=middleware,
        exception_handlers=exception_handlers,
        lifespan=relay.lifespan,
    )
    app.state.relay = relay
    return app
