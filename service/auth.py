"""Who may publish and who may listen: JWT verification, the channel policy, and the checks every endpoint runs.

The policy, in full:

- Channels matching a PUBLIC_CHANNELS glob (default `chat`, the demo room; `*` opens every channel) are open to
  anyone, for publishing and subscribing. A valid token there only names the client for the limits.
- Every other channel is private. It needs a JWT signed with JWT_SECRET (HS256) or the key of JWT_PUBLIC_KEY
  (RS256/ES256/...), with an `exp`, whose claim `"sse": {"publish": [globs], "subscribe": [globs]}` matches the
  channel (`fnmatch`, case-sensitive). No key configured: private channels are closed (401), never open.
- Missing, malformed, wrongly signed or expired token → 401 (with `WWW-Authenticate: Bearer`); a valid token
  without a matching grant → 403.
- A stream's token is checked once, at connect; the stream ends when the token expires (`relay.expired`).
- With an authorization hook (AUTH_HOOK_URL or a coroutine, hooks.py), a request for private channels that
  carries no valid token is not refused here: `authorize(..., hooked=True)` returns those channels and the
  backend decides them (api.ask_backend). A valid token still decides by its grants alone; public channels never
  reach the hook.

Tokens are read from `Authorization: Bearer <jwt>`, else the cookie AUTH_COOKIE (what a browser's EventSource
can send), else, only with ALLOW_QUERY_TOKEN=true, the `token` query parameter (never logged: the service logs
paths, not query strings). A cookie is ambient, so a *publish* authorised by a cookie must come from the
service's own origin or a CORS_ORIGINS origin (or carry no Origin at all, i.e. not from a browser): otherwise a
page on another site could make a logged-in browser publish (CSRF).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any
from urllib.parse import urlsplit

import jwt
from starlette.requests import Request

from .clients import TrustedProxies, client_ip
from .config import Settings
from .headers import header, query_value
from .keys import load_keys

__all__ = ["PUBLISH", "SUBSCRIBE", "Access", "AuthError", "Authorizer", "Principal"]

PUBLISH = "publish"
SUBSCRIBE = "subscribe"

_MAX_TOKEN_CHARS = 8192
_MAX_PATTERNS = 256
_MAX_PATTERN_CHARS = 256


# -- tokens and the policy ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Principal:
    """A verified token."""

    sub: str | None
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    expires_at: float

    def may(self, action: str, channel: str) -> bool:
        patterns = self.publish if action == PUBLISH else self.subscribe
        return any(fnmatchcase(channel, p) for p in patterns)


@dataclass(frozen=True, slots=True)
class Access:
    """What a request was granted: who the client is (for limits) and when its stream must end."""

    client: str  # "sub:<token sub>" or "ip:<address>"
    user: str | None  # the token's `sub`
    expires_at: float | None  # set when a private channel needed the token


class AuthError(Exception):
    """A refusal: 401 (no valid token) or 403 (no grant), with what to do. The HTTP edge (api.py) answers it."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


def _unauthorized(message: str, error: str | None = None) -> AuthError:
    challenge = 'Bearer realm="sse-relay"' + (f', error="{error}"' if error else "")
    return AuthError(401, message, headers={"WWW-Authenticate": challenge})


def _patterns(value: Any, name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if (
        not isinstance(value, list)
        or len(value) > _MAX_PATTERNS
        or not all(isinstance(p, str) and 0 < len(p) <= _MAX_PATTERN_CHARS for p in value)
    ):
        raise _unauthorized(
            f"the token's sse.{name} claim must be a list of channel globs (strings); mint it again",
            "invalid_token",
        )
    return tuple(value)


class Authorizer:
    _CACHE_SIZE = 4096

    def __init__(self, settings: Settings) -> None:
        self.keys = load_keys(settings.jwt_secret, settings.jwt_public_key, settings.jwt_algorithms)
        self.public_patterns = tuple(settings.public_channels)
        self.open_all = "*" in self.public_patterns
        self.cookie = settings.auth_cookie
        self.allow_query = settings.allow_query_token
        self.audience = settings.jwt_audience
        self.issuer = settings.jwt_issuer
        self.trusted_proxies = TrustedProxies(settings.trusted_proxy_networks())
        self.trusted_origins = frozenset(o for o in settings.cors_origins if o != "*")
        self._jwt = jwt.PyJWT(options={"require": ["exp"], "enforce_minimum_key_length": True})
        self._cache: OrderedDict[str, Principal] = OrderedDict()

    def is_public(self, channel: str) -> bool:
        return self.open_all or any(fnmatchcase(channel, p) for p in self.public_patterns)

    def token(self, request: Request) -> tuple[str, str] | None:
        """(token, where it came from): the Authorization header, the cookie, or the query when allowed."""
        scope = request.scope
        authorization = header(scope, b"authorization")
        if authorization:
            scheme, _, value = authorization.strip().partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                return value.strip(), "header"
        cookie = request.cookies.get(self.cookie) if header(scope, b"cookie") is not None else None
        if cookie:
            return cookie, "cookie"
        if self.allow_query and query_value(scope, b"token"):
            query = request.query_params.get("token")
            if query:
                return query, "query"
        return None

    def verify(self, token: str) -> Principal:
        now = time.time()
        cached = self._cache.get(token)
        if cached is not None:
            if cached.expires_at > now:
                self._cache.move_to_end(token)
                return cached
            del self._cache[token]
            raise _unauthorized("the token has expired; get a new one", "invalid_token")
        if len(token) > _MAX_TOKEN_CHARS:
            raise _unauthorized(f"the token is over {_MAX_TOKEN_CHARS} characters", "invalid_token")
        try:
            alg = jwt.get_unverified_header(token).get("alg")
        except (jwt.PyJWTError, ValueError, TypeError):
            raise _unauthorized("the token is not a JWT", "invalid_token") from None
        key = self.keys.key_for(alg) if isinstance(alg, str) else None
        if key is None or not isinstance(alg, str):
            raise _unauthorized(
                f"tokens signed with {str(alg)[:20]!r} are not accepted here; "
                f"accepted: {', '.join(self.keys.algorithms) or 'none (no key configured)'}",
                "invalid_token",
            )
        try:
            claims = self._jwt.decode(
                token, key, algorithms=[alg], audience=self.audience, issuer=self.issuer, leeway=0
            )
        except jwt.ExpiredSignatureError:
            raise _unauthorized("the token has expired; get a new one", "invalid_token") from None
        except jwt.MissingRequiredClaimError as exc:
            raise _unauthorized(f"the token has no {exc.claim!r} claim; tokens must expire", "invalid_token") from None
        except jwt.InvalidAudienceError:
            raise _unauthorized(
                "the token's audience (aud) is not this service's JWT_AUDIENCE", "invalid_token"
            ) from None
        except jwt.InvalidIssuerError:
            raise _unauthorized("the token's issuer (iss) is not JWT_ISSUER", "invalid_token") from None
        except jwt.ImmatureSignatureError:
            raise _unauthorized("the token is not valid yet (nbf/iat in the future)", "invalid_token") from None
        except (jwt.PyJWTError, ValueError, TypeError):
            raise _unauthorized("the token is invalid: bad signature or malformed", "invalid_token") from None
        grants = claims.get("sse")
        if grants is None:
            grants = {}
        if not isinstance(grants, dict):
            raise _unauthorized('the token\'s "sse" claim must be an object {"publish": [...], "subscribe": [...]}',
                                "invalid_token")
        sub = claims.get("sub")
        try:
            expires_at = float(claims["exp"])  # PyJWT checked it is an integer in the future; it may be huge
        except (OverflowError, TypeError, ValueError):
            raise _unauthorized("the token's exp is not a usable time", "invalid_token") from None
        principal = Principal(
            sub=sub if isinstance(sub, str) and sub else None,
            publish=_patterns(grants.get("publish"), "publish"),
            subscribe=_patterns(grants.get("subscribe"), "subscribe"),
            expires_at=expires_at,
        )
        self._cache[token] = principal
        if len(self._cache) > self._CACHE_SIZE:
            self._cache.popitem(last=False)
        return principal

    def authorize(self, request: Request, action: str, channels: Sequence[str], hooked: bool = False
                  ) -> Access | tuple[str, ...]:
        """Raise 401/403 unless the request may `action` every one of `channels`; say who the client is.

        `hooked` (an authorization hook is configured): a request for private channels that carries no valid
        token returns those channels instead, for the hook to decide (api.py asks it). A valid token still
        decides by its grants alone, and public channels never reach the hook."""
        private = [c for c in channels if not self.is_public(c)]
        found = self.token(request)
        principal: Principal | None = None
        if not private:
            # Open channels need no token; a valid one still names the client for the limits.
            if found is not None:
                try:
                    principal = self.verify(found[0])
                except AuthError:
                    principal = None
            return self._access(request, principal, None)
        if hooked:
            if found is None or not self.keys.configured:
                return tuple(private)
            try:
                self.verify(found[0])
            except AuthError:
                # Not a token of ours: the Authorization header or a cookie may be the backend's own credential.
                return tuple(private)
        channel = private[0]
        if not self.keys.configured:
            raise _unauthorized(
                f"channel {channel!r} is private and this relay has no token key: set JWT_SECRET or JWT_PUBLIC_KEY "
                "to admit token holders, or list the channel in PUBLIC_CHANNELS to open it"
            )
        if found is None:
            hint = (
                " (a `token` query parameter was sent, but ALLOW_QUERY_TOKEN is off)"
                if "token" in request.query_params and not self.allow_query
                else ""
            )
            raise _unauthorized(
                f"channel {channel!r} is private: send a token as `Authorization: Bearer <jwt>` or in the "
                f"{self.cookie!r} cookie{hint}"
            )
        token, source = found
        principal = self.verify(token)
        denied = [c for c in private if not principal.may(action, c)]
        if denied:
            raise AuthError(
                403,
                f"the token does not grant {action} on channel {denied[0]!r}; "
                f'its claim "sse": {{"{action}": [...]}} must list a pattern matching it',
                headers={"WWW-Authenticate": 'Bearer realm="sse-relay", error="insufficient_scope"'},
            )
        if action == PUBLISH and source == "cookie" and not self.origin_trusted(request):
            raise AuthError(
                403,
                "a publish authorised by a cookie must come from this service's own origin or one listed in "
                "CORS_ORIGINS; send the token in the Authorization header instead",
                "cross_site_publish",
            )
        return self._access(request, principal, principal.expires_at)

    def address(self, request: Request) -> str:
        """The client's address, as the limits and the hooks see it (TRUST_PROXY_HEADERS)."""
        return client_ip(request, self.trusted_proxies)

    def _access(self, request: Request, principal: Principal | None, expires_at: float | None) -> Access:
        if principal is not None and principal.sub:
            return Access(f"sub:{principal.sub}", principal.sub, expires_at)
        return Access(f"ip:{client_ip(request, self.trusted_proxies)}", None, expires_at)

    def origin_trusted(self, request: Request) -> bool:
        """May a publish riding on ambient credentials (a cookie) come from this request's Origin (CSRF)?"""
        origin = request.headers.get("origin")
        if origin is None:
            return True  # browsers send Origin with every POST; no Origin means no browser, so no CSRF
        if origin in self.trusted_origins:
            return True
        host = request.headers.get("host")
        try:
            netloc = urlsplit(origin).netloc
        except ValueError:
            return False
        return bool(host) and netloc.lower() == str(host).lower()


# -- the checks the endpoints run ----------------------------------------------------------------------------------
