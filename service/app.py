"""The ASGI application: routes, middleware and a lifespan that starts and stops the relay.

`create_app` is the public way in, for the standalone server and for embedding alike.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .api import routes
from .config import Settings
from .errors import exception_handlers
from .relay import Relay

__all__ = ["create_app"]


class _InstanceHeader:
    """Adds `X-Relay-Instance` to every response, so a client or a test can tell which replica answered."""

    def __init__(self, app: ASGIApp, instance: str) -> None:
        self.app = app
        self.header = (b"x-relay-instance", instance.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), self.header]
            await send(message)

        await self.app(scope, receive, send_with_header)


def create_app(settings: Settings | None = None, relay: Relay | None = None) -> Starlette:
    """The relay as an ASGI app. Standalone it runs its own lifespan; mounted in another app (Starlette's Mount
    does not run a sub-app's lifespan) the host enters `relay.lifespan`:

        relay = Relay(Settings.from_env())
        app = FastAPI(lifespan=relay.lifespan)
        app.mount("/realtime", create_app(relay=relay))
    """
    settings = settings or (relay.settings if relay else Settings.from_env())
    relay = relay or Relay(settings)

    middleware = [Middleware(_InstanceHeader, instance=settings.instance)]
    if settings.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(settings.cors_origins),
                allow_credentials=settings.cors_allow_credentials,
                allow_methods=["GET", "POST"],
                allow_headers=["Content-Type", "Authorization", "Last-Event-ID"],
                expose_headers=["X-Relay-Instance", "Retry-After"],
            )
        )
    app = Starlette(
        routes=[*routes, Mount("/static", StaticFiles(directory=settings.frontend_dir, check_dir=False))],
        middleware=middleware,
        exception_handlers=exception_handlers,  # type: ignore[arg-type]
        lifespan=relay.lifespan,
    )
    app.state.relay = relay
    return app
