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

Tokens are read from `Authorization: Bearer <jwt>`, else the cookie AUTH_COOKIE (what a browser's EventSource
can send), else, only with ALLOW_QUERY_TOKEN=true, the `token` query parameter (never logged: the service logs
paths, not query strings). A cookie is ambient, so a *publish* authorised by a cookie must come from the
service's own origin or a CORS_ORIGINS origin (or carry no Origin at all, i.e. not from a browser): otherwise a
page on another site could make a logged-in browser publish (CSRF).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import jwt
from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message, Send

from .config import ConfigError
from .errors import ApiError
from .ratelimit import TrustedProxies, client_ip

if TYPE_CHECKING:
    from .config import Settings
    from .relay import Relay

__all__ = [
    "PUBLISH",
    "SUBSCRIBE",
    "Access",
    "Authorizer",
    "Keys",
    "Principal",
    "StrictCORSMiddleware",
    "check_publish",
    "check_read",
    "check_stream",
    "load_keys",
    "validate_auth_settings",
]

PUBLISH = "publish"
SUBSCRIBE = "subscribe"

_HMAC = ("HS256", "HS384", "HS512")
_RSA = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
_EC_BY_CURVE = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
_EC = tuple(_EC_BY_CURVE.values())
_OKP = ("EdDSA",)
_MIN_SECRET_BYTES = 32  # RFC 7518 §3.2: an HS256 key at least as long as the hash
_MAX_TOKEN_CHARS = 8192
_MAX_PATTERNS = 256
_MAX_PATTERN_CHARS = 256
_GLOB_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.:-*?[]!")
_COOKIE_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!#$%&'*+-.^_`|~")


# -- keys ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Keys:
    """The verification keys and the algorithms accepted with them."""

    secret: bytes | None
    public: Any | None  # a `cryptography` public key object
    algorithms: tuple[str, ...]

    @property
    def configured(self) -> bool:
        return self.secret is not None or self.public is not None

    def key_for(self, alg: str) -> Any | None:
        """The key for a token's `alg`, chosen by us: a token never picks HMAC-with-the-public-key."""
        if alg not in self.algorithms:
            return None
        return self.secret if alg in _HMAC else self.public


def _public_algorithms(key: Any) -> tuple[str, ...]:
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

    if isinstance(key, rsa.RSAPublicKey):
        return ("RS256",)
    if isinstance(key, ec.EllipticCurvePublicKey):
        alg = _EC_BY_CURVE.get(key.curve.name)
        if alg is None:
            raise ConfigError(f"JWT_PUBLIC_KEY uses the curve {key.curve.name}; use P-256 (ES256), P-384 or P-521")
        return (alg,)
    if isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return _OKP
    raise ConfigError("JWT_PUBLIC_KEY must be an RSA, EC (P-256/384/521) or Ed25519 public key")


def _load_public_key(raw: str) -> Any:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    text = raw.strip()
    if not text.startswith("-----BEGIN"):
        path = Path(text).expanduser()
        try:
            text = path.read_text().strip()
        except OSError as exc:
            raise ConfigError(
                f"JWT_PUBLIC_KEY is neither PEM text nor a readable file ({exc.strerror}: {str(path)[:200]!r}); "
                "give the PEM text itself or the path of a .pem file"
            ) from None
    elif "\n" not in text and "\\n" in text:
        text = text.replace("\\n", "\n")  # PEM pasted into a one-line env var with escaped newlines
    if "PRIVATE KEY-----" in text:
        raise ConfigError(
            "JWT_PUBLIC_KEY holds a private key; the relay only verifies: give it the public half "
            "(`openssl pkey -in key.pem -pubout`) and keep the private key with whoever mints tokens"
        )
    data = text.encode()
    try:
        key = (
            x509.load_pem_x509_certificate(data).public_key()
            if "BEGIN CERTIFICATE" in text
            else load_pem_public_key(data)
        )
    except ValueError as exc:
        raise ConfigError(f"JWT_PUBLIC_KEY is not a valid PEM public key or certificate ({exc})") from None
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < 2048:
        raise ConfigError(f"JWT_PUBLIC_KEY is a {key.key_size}-bit RSA key; use 2048 bits or more")
    return key


def load_keys(settings: Settings) -> Keys:
    """Keys and accepted algorithms from the settings; every mistake is a ConfigError that says what to do."""
    secret = settings.jwt_secret.encode() if settings.jwt_secret else None
    if secret is not None and len(secret) < _MIN_SECRET_BYTES:
        raise ConfigError(
            f"JWT_SECRET is {len(secret)} bytes; use at least {_MIN_SECRET_BYTES} random bytes, e.g. "
            "`python -c 'import secrets; print(secrets.token_urlsafe(48))'`"
        )
    public = _load_public_key(settings.jwt_public_key) if settings.jwt_public_key else None
    derived = (("HS256",) if secret is not None else ()) + (_public_algorithms(public) if public is not None else ())
    algorithms = tuple(settings.jwt_algorithms) or derived
    for alg in algorithms:
        if alg in _HMAC:
            if secret is None:
                raise ConfigError(f"JWT_ALGORITHMS lists {alg}, which needs JWT_SECRET; set it or drop {alg}")
        elif alg in _RSA + _EC + _OKP:
            if public is None:
                raise ConfigError(f"JWT_ALGORITHMS lists {alg}, which needs JWT_PUBLIC_KEY; set it or drop {alg}")
            family = _RSA if alg in _RSA else _EC if alg in _EC else _OKP
            if not set(_public_algorithms(public)) & set(family):
                raise ConfigError(f"JWT_ALGORITHMS lists {alg}, but JWT_PUBLIC_KEY is not a key for it")
        else:
            raise ConfigError(
                f"JWT_ALGORITHMS: {alg!r} is not supported; use HS256/384/512, RS256/384/512, PS256/384/512, "
                "ES256/384/512 or EdDSA ('none' is never accepted)"
            )
    return Keys(secret, public, algorithms)


def validate_auth_settings(settings: Settings) -> None:
    """Called by `Settings.validate`: the auth and limit settings, checked before anything starts."""
    load_keys(settings)
    for pattern in settings.public_channels:
        if not set(pattern) <= _GLOB_CHARS:
            raise ConfigError(
                f"PUBLIC_CHANNELS: {pattern!r} is not a channel glob; use channel characters "
                "(A-Z a-z 0-9 _ - . :) and * ? [ ] only, comma-separated"
            )
    if not settings.auth_cookie or not set(settings.auth_cookie) <= _COOKIE_CHARS:
        raise ConfigError(
            f"AUTH_COOKIE={settings.auth_cookie!r} is not a valid cookie name; use letters, digits, _ or -"
        )


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


def _unauthorized(message: str, error: str | None = None) -> ApiError:
    challenge = 'Bearer realm="sse-relay"' + (f', error="{error}"' if error else "")
    return ApiError(401, message, headers={"WWW-Authenticate": challenge})


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
        self.keys = load_keys(settings)
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
        header = request.headers.get("authorization")
        if header:
            scheme, _, value = header.strip().partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                return value.strip(), "header"
        cookie = request.cookies.get(self.cookie)
        if cookie:
            return cookie, "cookie"
        if self.allow_query:
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

    def authorize(self, request: Request, action: str, channels: Sequence[str]) -> Access:
        """Raise 401/403 unless the request may `action` every one of `channels`; say who the client is."""
        private = [c for c in channels if not self.is_public(c)]
        found = self.token(request)
        principal: Principal | None = None
        if not private:
            # Open channels need no token; a valid one still names the client for the limits.
            if found is not None:
                try:
                    principal = self.verify(found[0])
                except ApiError:
                    principal = None
            return self._access(request, principal, None)
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
            raise ApiError(
                403,
                f"the token does not grant {action} on channel {denied[0]!r}; "
                f'its claim "sse": {{"{action}": [...]}} must list a pattern matching it',
                headers={"WWW-Authenticate": 'Bearer realm="sse-relay", error="insufficient_scope"'},
            )
        if action == PUBLISH and source == "cookie" and not self._origin_trusted(request):
            raise ApiError(
                403,
                "a publish authorised by a cookie must come from this service's own origin or one listed in "
                "CORS_ORIGINS; send the token in the Authorization header instead",
                "cross_site_publish",
            )
        return self._access(request, principal, principal.expires_at)

    def _access(self, request: Request, principal: Principal | None, expires_at: float | None) -> Access:
        if principal is not None and principal.sub:
            return Access(f"sub:{principal.sub}", principal.sub, expires_at)
        return Access(f"ip:{client_ip(request, self.trusted_proxies)}", None, expires_at)

    def _origin_trusted(self, request: Request) -> bool:
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


async def check_publish(request: Request, relay: Relay, channels: Sequence[str], cost: int = 1) -> Access:
    """Before publishing to `channels`: authorization (401/403), then the client's publish rate (429)."""
    access = relay.authorizer.authorize(request, PUBLISH, channels)
    wait = await relay.rate_limiter.hit(access.client, cost)
    if wait is not None:
        relay.metrics.publish_rejected.labels("rate_limited").inc()
        raise ApiError(
            429,
            f"this client is over the publish rate limit of {relay.rate_limiter.rate:g} messages/second "
            f"(PUBLISH_RATE_LIMIT); nothing was published, retry after {wait:.2f} s",
            headers={"Retry-After": str(max(1, math.ceil(wait)))},
            retry_after_ms=math.ceil(wait * 1000),
        )
    return access


def check_stream(request: Request, relay: Relay, channels: Sequence[str]) -> Access:
    """Before opening a stream: authorization (401/403), then the client's own stream limit (429)."""
    access = relay.authorizer.authorize(request, SUBSCRIBE, channels)
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


def check_read(request: Request, relay: Relay, channels: Sequence[str]) -> Access:
    """Reading about a channel (presence, last id) needs what subscribing to it needs."""
    return relay.authorizer.authorize(request, SUBSCRIBE, channels)


# -- browsers -----------------------------------------------------------------------------------------------------


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
