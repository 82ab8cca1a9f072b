"""CORS for browsers: Starlette's middleware, answering only the origins listed in CORS_ORIGINS."""

from __future__ import annotations

from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import Message, Send

__all__ = ["StrictCORSMiddleware"]


class StrictCORSMiddleware(CORSMiddleware):
    """Starlette's CORS, but CORS headers (credentials included) only ever go to listed origins.

    Starlette adds `Access-Control-Allow-Credentials` and `-Expose-Headers` to every response that carries an
    Origin, listed or not. Browsers still block an unlisted origin (no Allow-Origin), but the policy is easier
    to audit when an unlisted origin gets no CORS header at all.
    """

    async def send(self, message: Message, send: Send, request_headers: Headers) -> None:
        origin = request_headers.get("origin")
        if message["type"] != "http.response.start" or origin is None or self.is_allowed_origin(origin):
            await super().send(message, send, request_headers)
            return
        headers = MutableHeaders(scope=message)
        headers["Vary"] = ", ".join([*headers.getlist("Vary"), "Origin"])
        await send(message)

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if not self.is_allowed_origin(request_headers["origin"]):
            for name in {k for k in response.headers if k.lower().startswith("access-control-")}:
                del response.headers[name]
        return response
