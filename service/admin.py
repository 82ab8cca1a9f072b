"""The admin API: what an operator or the app's backend asks of every replica at once.

`POST /admin/end` ends the streams of a user, of a channel, or of a user on a channel, on every replica, each with
a `relay.ended` event carrying the reason, and drops the authorization hook's remembered decisions for them, so
their reconnects ask the backend again (control.py says how it reaches the other replicas).

It is authenticated by its own key, ADMIN_API_KEY, in `Authorization: Bearer <key>` only: never a cookie (no
browser can be made to send it by another site), never a token of the clients' kind (a client's grants say what it
may read and write, not whom it may disconnect). No key configured: the admin API is closed (401).
"""

from __future__ import annotations

import hmac

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .api import _json_body, _relay, broker_error
from .broker import BrokerError
from .errors import ApiError

__all__ = ["routes"]

_MAX_REASON = 200
_MAX_USER = 128


def _check_key(request: Request, key: str | None) -> None:
    challenge = {"WWW-Authenticate": 'Bearer realm="sse-relay-admin"'}
    if key is None:
        raise ApiError(401, "the admin API is closed on this relay: set ADMIN_API_KEY to open it", headers=challenge)
    scheme, _, given = request.headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
        raise ApiError(401, "send the admin key as `Authorization: Bearer <ADMIN_API_KEY>`", headers=challenge)


async def end_streams(request: Request) -> Response:
    """`{"user": "alice"}`, `{"channel": "room1"}` or both, and an optional `"reason"` → 202 with the streams ended
    on this replica (the others end theirs when the command reaches them, within milliseconds)."""
    relay = _relay(request)
    _check_key(request, relay.settings.admin_api_key)
    body = await _json_body(request, 4096)
    if not isinstance(body, dict) or set(body) - {"user", "channel", "reason"}:
        raise ApiError(422, 'body must be {"user": ..., "channel": ..., "reason": ...} (user or channel required)')
    user, channel, reason = body.get("user"), body.get("channel"), body.get("reason", "ended by the service")
    for name, value, limit in (("user", user, _MAX_USER), ("channel", channel, _MAX_USER)):
        if value is not None and not (isinstance(value, str) and 0 < len(value) <= limit):
            raise ApiError(422, f"'{name}' must be a string of 1-{limit} characters", fields=[name])
    if user is None and channel is None:
        raise ApiError(422, "name a 'user' (the token's sub or the hook's user), a 'channel', or both",
                       fields=["user", "channel"])
    if not isinstance(reason, str) or len(reason) > _MAX_REASON:
        raise ApiError(422, f"'reason' must be a string of at most {_MAX_REASON} characters", fields=["reason"])
    try:
        ended = await relay.end_streams(user, channel, reason)
    except BrokerError as exc:
        raise broker_error(exc, "streams here were ended but the other replicas were not told") from None
    return JSONResponse({"user": user, "channel": channel, "reason": reason, "ended_here": ended}, status_code=202)


routes = [Route("/admin/end", end_streams, methods=["POST"])]
