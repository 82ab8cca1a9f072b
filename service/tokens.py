"""Mint a token for the relay: `python -m service.tokens` or `sse-relay-token`, and `mint()` for Python backends.

    JWT_SECRET=... python -m service.tokens --sub alice --publish 'room-*' --subscribe 'room-*' --ttl 3600
    python -m service.tokens --private-key signer.pem --sub bob --subscribe 'news' --ttl 600   # RS256/ES256

It prints the token on stdout (and nothing else), so `TOKEN=$(python -m service.tokens ...)` works. In a real
deployment your backend mints tokens the same way (any JWT library will do) after it has decided who the user
is; this CLI is for trying the relay, scripts and ops. It refuses what the relay would refuse (a JWT_SECRET under
32 bytes, an RSA key under 2048 bits: the checks are the relay's own, service/keys.py), so it never mints a
token for a relay that will not start. Exit status: 0 a token was printed, 2 a bad option, key or secret.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jwt

from .keys import InvalidSetting, check_secret, check_signing_key
from .version import __version__

__all__ = ["mint"]


def mint(
    key: str | bytes | Any,
    *,
    sub: str | None = None,
    publish: Sequence[str] = (),
    subscribe: Sequence[str] = (),
    ttl: float = 3600,
    algorithm: str = "HS256",
    audience: str | None = None,
    issuer: str | None = None,
    now: float | None = None,
) -> str:
    """A signed JWT granting `publish`/`subscribe` on the given channel globs for `ttl` seconds."""
    issued = int(now if now is not None else time.time())
    claims: dict[str, Any] = {
        "iat": issued,
        "exp": issued + int(ttl),
        "jti": uuid.uuid4().hex,
        "sse": {"publish": list(publish), "subscribe": list(subscribe)},
    }
    if sub is not None:
        claims["sub"] = sub
    if audience is not None:
        claims["aud"] = audience
    if issuer is not None:
        claims["iss"] = issuer
    return jwt.encode(claims, key, algorithm=algorithm)


def _algorithm_for(private_key: Any) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    if isinstance(private_key, rsa.RSAPrivateKey):
        return "RS256"
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        return {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}[private_key.curve.name]
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        return "EdDSA"
    raise SystemExit("sse-relay-token: the private key must be RSA, EC (P-256/384/521) or Ed25519")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="sse-relay-token",
        description="Mint a JWT for sse-relay. The key is JWT_SECRET (HS256) or --private-key (RS256/ES256/EdDSA).",
        epilog="exit status: 0 the token is on stdout; 2 a bad option, or a key or secret the relay would refuse. "
               "Making a key pair: docs/security.md.",
    )
    parser.add_argument("--version", action="version", version=f"sse-relay-token {__version__}")
    parser.add_argument("--sub", help="who the token is for (also the client's identity for rate limits)")
    parser.add_argument("--publish", action="append", default=[], metavar="GLOB",
                        help="channel glob it may publish to (repeat, or comma-separate)")
    parser.add_argument("--subscribe", action="append", default=[], metavar="GLOB",
                        help="channel glob it may subscribe to (repeat, or comma-separate)")
    parser.add_argument("--ttl", type=float, default=3600, help="seconds until it expires (default 3600)")
    parser.add_argument("--private-key", metavar="PEM", help="PEM file of a private key, for RS256/ES256/EdDSA")
    parser.add_argument("--algorithm", help="override the algorithm (default HS256, or from the private key)")
    parser.add_argument("--audience", default=os.environ.get("JWT_AUDIENCE") or None, help="aud claim (JWT_AUDIENCE)")
    parser.add_argument("--issuer", default=os.environ.get("JWT_ISSUER") or None, help="iss claim (JWT_ISSUER)")
    args = parser.parse_args(argv)

    def globs(values: list[str]) -> list[str]:
        return [g.strip() for v in values for g in v.split(",") if g.strip()]

    if args.ttl <= 0:
        parser.error("--ttl must be positive: the relay refuses tokens without a future expiry")
    key: Any
    if args.private_key:
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        try:
            key = load_pem_private_key(Path(args.private_key).read_bytes(), password=None)
        except (OSError, ValueError) as exc:
            parser.error(f"cannot read the private key {args.private_key!r}: {exc}")
        try:
            check_signing_key(key)
        except InvalidSetting as exc:
            parser.error(f"--private-key {args.private_key!r}: {exc}")
        algorithm = args.algorithm or _algorithm_for(key)
    else:
        secret = os.environ.get("JWT_SECRET", "")
        if not secret:
            parser.error("set JWT_SECRET (the relay's HS256 secret) or pass --private-key")
        try:
            check_secret(secret.encode())  # the relay's own minimum: it would refuse to start with a shorter one
        except InvalidSetting as exc:
            parser.error(str(exc))
        key, algorithm = secret, args.algorithm or "HS256"
    publish, subscribe = globs(args.publish), globs(args.subscribe)
    if not publish and not subscribe:
        print("sse-relay-token: warning: no --publish or --subscribe: the token grants no private channel",
              file=sys.stderr)
    print(mint(key, sub=args.sub, publish=publish, subscribe=subscribe, ttl=args.ttl, algorithm=algorithm,
               audience=args.audience, issuer=args.issuer))


if __name__ == "__main__":
    main()
