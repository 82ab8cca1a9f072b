"""CORS for browsers: Starlette's middleware, answering only the origins listed in CORS_ORIGINS."""

from __future__ import annotations

from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import Message, Send

from .errors import error_response

__all__ = ["StrictCORSMiddleware"]

# What Starlette names in its plain-text refusal ("Disallowed CORS origin, headers"), and what to do about each.
_WHAT_TO_DO = {
    "origin": "list the page's origin in CORS_ORIGINS",
    "method": "only GET and POST are allowed",
    "headers": "only Content-Type, Authorization, Last-Event-ID and Idempotency-Key may be sent",
    "private-network": "private network access is not allowed",
}


class StrictCORSMiddleware(CORSMiddleware):
    """Starlette's CORS, but CORS headers (credentials included) only ever go to listed origins, and a refused
    preflight is the service's JSON error like every other error (Starlette answers it in plain text).

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
        allowed = self.is_allowed_origin(request_headers["origin"])
        if response.status_code == 400:
            text = bytes(response.body).decode(errors="replace")
            failures = [part.strip() for part in text.removeprefix("Disallowed CORS").split(",") if part.strip()]
            advice = "; ".join(_WHAT_TO_DO.get(f, f) for f in failures)
            kept = {k: v for k, v in response.headers.items() if k.lower() not in ("content-length", "content-type")}
            response = error_response(
                400, f"CORS preflight refused ({', '.join(failures) or 'not allowed'}): {advice}", "cors_refused",
                headers=kept, refused=failures,
            )
        if not allowed:
            for name in {k for k in response.headers if k.lower().startswith("access-control-")}:
                del response.headers[name]
        return response
