"""Token verification keys: loading and checking them, before anything starts.

Below the settings in the import order (config.py calls `check_auth_settings` when it validates), so it raises
its own `InvalidSetting`, which config turns into a `ConfigError`; the authorizer (auth.py) builds its `Keys`
with `load_keys`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["HMAC_ALGORITHMS", "InvalidSetting", "Keys", "check_auth_settings", "check_secret", "check_signing_key",
           "load_keys"]

_HMAC = ("HS256", "HS384", "HS512")
_RSA = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
_EC_BY_CURVE = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
_EC = tuple(_EC_BY_CURVE.values())
_OKP = ("EdDSA",)
_MIN_SECRET_BYTES = 32  # RFC 7518 §3.2: an HS256 key at least as long as the hash
_GLOB_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.:-*?[]!")
_COOKIE_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!#$%&'*+-.^_`|~")
HMAC_ALGORITHMS = _HMAC


class InvalidSetting(ValueError):
    """An auth setting is malformed; the message names the variable and what to do."""


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
            raise InvalidSetting(f"JWT_PUBLIC_KEY uses the curve {key.curve.name}; use P-256 (ES256), P-384 or P-521")
        return (alg,)
    if isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return _OKP
    raise InvalidSetting("JWT_PUBLIC_KEY must be an RSA, EC (P-256/384/521) or Ed25519 public key")


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
            raise InvalidSetting(
                f"JWT_PUBLIC_KEY is neither PEM text nor a readable file ({exc.strerror}: {str(path)[:200]!r}); "
                "give the PEM text itself or the path of a .pem file"
            ) from None
    elif "\n" not in text and "\\n" in text:
        text = text.replace("\\n", "\n")  # PEM pasted into a one-line env var with escaped newlines
    if "PRIVATE KEY-----" in text:
        raise InvalidSetting(
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
        raise InvalidSetting(f"JWT_PUBLIC_KEY is not a valid PEM public key or certificate ({exc})") from None
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < 2048:
        raise InvalidSetting(f"JWT_PUBLIC_KEY is a {key.key_size}-bit RSA key; use 2048 bits or more")
    return key


def check_secret(secret: bytes) -> None:
    """The HS256 secret is long enough. Shared with `sse-relay-token`, so it never mints with a secret the relay
    would refuse to start with (PyJWT itself only warns)."""
    if len(secret) < _MIN_SECRET_BYTES:
        raise InvalidSetting(
            f"JWT_SECRET is {len(secret)} bytes; use at least {_MIN_SECRET_BYTES} random bytes, e.g. "
            "`python -c 'import secrets; print(secrets.token_urlsafe(48))'`"
        )


def check_signing_key(private_key: Any) -> None:
    """A private key whose public half the relay would accept as JWT_PUBLIC_KEY (RSA of 2048 bits or more)."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    if isinstance(private_key, rsa.RSAPrivateKey) and private_key.key_size < 2048:
        raise InvalidSetting(f"the private key is a {private_key.key_size}-bit RSA key; the relay refuses RSA keys "
                             "under 2048 bits (JWT_PUBLIC_KEY): make one of 2048 bits or more")


def load_keys(jwt_secret: str | None, jwt_public_key: str | None, jwt_algorithms: tuple[str, ...]) -> Keys:
    """Keys and accepted algorithms from the settings; every mistake is an InvalidSetting that says what to do."""
    secret = jwt_secret.encode() if jwt_secret else None
    if secret is not None:
        check_secret(secret)
    public = _load_public_key(jwt_public_key) if jwt_public_key else None
    derived = (("HS256",) if secret is not None else ()) + (_public_algorithms(public) if public is not None else ())
    algorithms = tuple(jwt_algorithms) or derived
    for alg in algorithms:
        if alg in _HMAC:
            if secret is None:
                raise InvalidSetting(f"JWT_ALGORITHMS lists {alg}, which needs JWT_SECRET; set it or drop {alg}")
        elif alg in _RSA + _EC + _OKP:
            if public is None:
                raise InvalidSetting(f"JWT_ALGORITHMS lists {alg}, which needs JWT_PUBLIC_KEY; set it or drop {alg}")
            family = _RSA if alg in _RSA else _EC if alg in _EC else _OKP
            if not set(_public_algorithms(public)) & set(family):
                raise InvalidSetting(f"JWT_ALGORITHMS lists {alg}, but JWT_PUBLIC_KEY is not a key for it")
        else:
            raise InvalidSetting(
                f"JWT_ALGORITHMS: {alg!r} is not supported; use HS256/384/512, RS256/384/512, PS256/384/512, "
                "ES256/384/512 or EdDSA ('none' is never accepted)"
            )
    return Keys(secret, public, algorithms)


def check_auth_settings(jwt_secret: str | None, jwt_public_key: str | None, jwt_algorithms: tuple[str, ...],
                        public_channels: tuple[str, ...], auth_cookie: str) -> None:
    """Called by `Settings.validate`: the auth settings, checked before anything starts."""
    load_keys(jwt_secret, jwt_public_key, jwt_algorithms)
    for pattern in public_channels:
        if not set(pattern) <= _GLOB_CHARS:
            raise InvalidSetting(
                f"PUBLIC_CHANNELS: {pattern!r} is not a channel glob; use channel characters "
                "(A-Z a-z 0-9 _ - . :) and * ? [ ] only, comma-separated"
            )
    if not auth_cookie or not set(auth_cookie) <= _COOKIE_CHARS:
        raise InvalidSetting(f"AUTH_COOKIE={auth_cookie!r} is not a valid cookie name; use letters, digits, _ or -")
