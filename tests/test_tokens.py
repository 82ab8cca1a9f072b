"""Tokens: where a request may carry one (header, cookie, query only when enabled), how long a stream lives on
one, the keys that verify them (HS256, RS256/ES256 public keys, audience and issuer), the CLI that mints them,
and that a token never leaks (logs, error bodies, the settings' repr).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from service import Settings
from service.config import ConfigError
from service.tokens import mint

from .sse import SSEStream
from .support import ADMIN, ROOT, SECRET, ServiceProcess, bearer, eventually, expired_token, serve, token

pytestmark = pytest.mark.timeout(60)


# -- where a token is read, and for how long it holds ------------------------------------------------------------------


async def test_token_from_header_cookie_and_query_only_when_enabled() -> None:
    member = token(sub="alice", publish=["room-*"], subscribe=["room-*"])
    async with serve() as s, httpx.AsyncClient(base_url=s.url) as c:
        assert (await c.post("/channels/room-1/messages", json={"data": "h"}, headers=bearer(member))).status_code == 202
        resp = await c.post("/channels/room-1/messages", json={"data": "c"}, headers={"Cookie": f"sse_token={member}"})
        assert resp.status_code == 202
        resp = await c.post(f"/channels/room-1/messages?token={member}", json={"data": "q"})
        assert resp.status_code == 401 and "ALLOW_QUERY_TOKEN" in resp.json()["error"]["message"]
        assert (await c.get(f"/channels/room-1/events?token={member}")).status_code == 401
        async with SSEStream(f"{s.url}/channels/room-1/events?last_event_id=0", headers={"Cookie": f"sse_token={member}"}) as r:
            await r.wait_count(2)
        assert await s.history("room-1") == ["h", "c"]
    async with serve(allow_query_token=True, auth_cookie="relay_jwt") as s, httpx.AsyncClient(base_url=s.url) as c:
        assert (await c.post(f"/channels/room-1/messages?token={member}", json={"data": "q"})).status_code == 202
        for cookie, status in ((f"sse_token={member}", 401), (f"relay_jwt={member}", 202)):
            resp = await c.post("/channels/room-1/messages", json={"data": "c"}, headers={"Cookie": cookie})
            assert resp.status_code == status
        async with SSEStream(f"{s.url}/channels/room-1/events?last_event_id=0&token={member}") as r:
            await r.wait_count(2)
        assert await s.history("room-1") == ["q", "c"]


async def test_stream_ends_with_relay_expired_when_its_token_expires() -> None:
    short = mint(SECRET, subscribe=["room-*"], ttl=2)
    expires_at = jwt.decode(short, SECRET, algorithms=["HS256"])["exp"]
    async with serve() as s, httpx.AsyncClient(base_url=s.url) as c:
        private = SSEStream(f"{s.url}/channels/room-1/events", headers=bearer(short))
        public = SSEStream(f"{s.url}/channels/chat/events", headers=bearer(short))
        async with private, public:
            await c.post("/channels/room-1/messages", json={"data": "before"}, headers=ADMIN)
            await private.wait_count(1)
            await asyncio.wait_for(private.ended.wait(), 5)
            ended_at = time.time()
            assert [e.event for e in private.all_events][-1] == "relay.expired"
            assert private.all_events[-1].data["expired_at"] == expires_at
            assert expires_at - 0.05 <= ended_at <= expires_at + 1.0
            # reconnecting with the expired token is refused; a public stream is not tied to the token
            assert (await c.get("/channels/room-1/events", headers=bearer(short))).status_code == 401
            await c.post("/channels/chat/messages", json={"data": "still here"})
            await public.wait_count(1)
            assert not public.ended.is_set()
        await eventually(lambda: not s.relay.streams, 5, "the server noticed the streams closing", every=0.02)


# -- keys --------------------------------------------------------------------------------------------------------------


def _hs256(claims: dict[str, Any], secret: bytes) -> str:
    """Sign by hand: PyJWT itself refuses a PEM key as an HMAC secret, an attacker's script would not."""
    def b64(raw: bytes) -> bytes:
        return base64.urlsafe_b64encode(raw).rstrip(b"=")

    signing_input = b64(orjson.dumps({"alg": "HS256", "typ": "JWT"})) + b"." + b64(orjson.dumps(claims))
    return (signing_input + b"." + b64(hmac.new(secret, signing_input, hashlib.sha256).digest())).decode()


def _pem(private_key: Any) -> tuple[bytes, str]:
    private = private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
    public = private_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                    serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public.decode()


@pytest.mark.parametrize("kind", ["RS256", "ES256"])
async def test_public_key_tokens(kind: str, tmp_path: Path) -> None:
    key = rsa.generate_private_key(65537, 2048) if kind == "RS256" else ec.generate_private_key(ec.SECP256R1())
    private_pem, public_pem = _pem(key)
    other_private, _ = _pem(rsa.generate_private_key(65537, 2048) if kind == "RS256" else ec.generate_private_key(ec.SECP256R1()))
    key_file = tmp_path / "relay.pub.pem"
    key_file.write_text(public_pem)
    # the key as a path for RSA, as PEM text for EC: both forms are accepted
    source = str(key_file) if kind == "RS256" else public_pem
    async with serve(jwt_secret=None, jwt_public_key=source) as s, httpx.AsyncClient(base_url=s.url) as c:
        assert s.relay.authorizer.keys.algorithms == (kind,)
        good = mint(serialization.load_pem_private_key(private_pem, None), publish=["room-*"], algorithm=kind)
        wrong_key = mint(serialization.load_pem_private_key(other_private, None), publish=["room-*"], algorithm=kind)
        # algorithm confusion: an HS256 token whose "secret" is the public key must never verify
        confused = _hs256({"exp": int(time.time()) + 60, "sse": {"publish": ["*"]}}, public_pem.encode())
        for tok, status in [(wrong_key, 401), (confused, 401), (token(publish=["*"]), 401), (good, 202)]:
            resp = await c.post("/channels/room-1/messages", json={"data": status}, headers=bearer(tok))
            assert resp.status_code == status, resp.text
        assert await s.history("room-1") == [202]
        # the CLI mints with the private key file
        pem_file = tmp_path / "signer.pem"
        pem_file.write_bytes(private_pem)
        cli = subprocess.run([sys.executable, "-m", "service.tokens", "--private-key", str(pem_file), "--sub", "bob",
                              "--publish", "room-*", "--ttl", "60"], capture_output=True, text=True, cwd=ROOT, check=True)
        resp = await c.post("/channels/room-2/messages", json={"data": "cli"}, headers=bearer(cli.stdout.strip()))
        assert resp.status_code == 202


async def test_audience_and_issuer_are_enforced_when_configured() -> None:
    async with serve(jwt_audience="relay", jwt_issuer="https://auth.example") as s, httpx.AsyncClient(base_url=s.url) as c:
        cases = [
            (mint(SECRET, publish=["*"]), 401),  # no aud
            (mint(SECRET, publish=["*"], audience="other", issuer="https://auth.example"), 401),
            (mint(SECRET, publish=["*"], audience="relay", issuer="https://evil.example"), 401),
            (mint(SECRET, publish=["*"], audience="relay", issuer="https://auth.example"), 202),
        ]
        for tok, status in cases:
            resp = await c.post("/channels/room-1/messages", json={"data": status}, headers=bearer(tok))
            assert resp.status_code == status, resp.text
        assert await s.history("room-1") == [202]
    async with serve() as s, httpx.AsyncClient(base_url=s.url) as c:
        # no JWT_AUDIENCE: a token meant for some other service (it has an aud) is not accepted here
        resp = await c.post("/channels/room-1/messages", json={"data": 1},
                            headers=bearer(mint(SECRET, publish=["*"], audience="billing")))
        assert resp.status_code == 401 and "JWT_AUDIENCE" in resp.json()["error"]["message"]


def test_cli_mints_a_token_for_the_channels_asked(tmp_path: Path) -> None:
    env = {"JWT_SECRET": SECRET, "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-m", "service.tokens", "--sub", "alice", "--publish", "room-*", "--subscribe", "room-*,lobby",
         "--ttl", "3600"], capture_output=True, text=True, env=env, cwd=ROOT, check=True,
    )
    claims = jwt.decode(out.stdout.strip(), SECRET, algorithms=["HS256"])
    assert claims["sub"] == "alice"
    assert claims["sse"] == {"publish": ["room-*"], "subscribe": ["room-*", "lobby"]}
    assert 3590 <= claims["exp"] - time.time() <= 3600
    missing = subprocess.run([sys.executable, "-m", "service.tokens", "--publish", "x"], capture_output=True,
                             text=True, env={"PATH": "/usr/bin:/bin"}, cwd=ROOT, check=False)
    assert missing.returncode != 0 and "JWT_SECRET" in missing.stderr


@pytest.mark.parametrize(("env", "says"), [
    ({"JWT_SECRET": "short"}, "at least 32"),
    ({"JWT_PUBLIC_KEY": "/nonexistent/key.pem"}, "the path of a .pem file"),
    ({"JWT_PUBLIC_KEY": "-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----"}, "not a valid PEM"),
    ({"JWT_SECRET": "x" * 40, "JWT_ALGORITHMS": "RS256"}, "needs JWT_PUBLIC_KEY"),
    ({"JWT_SECRET": "x" * 40, "JWT_ALGORITHMS": "none"}, "never accepted"),
    ({"AUTH_COOKIE": "a;b"}, "AUTH_COOKIE"),
])
def test_bad_token_settings_stop_the_service_with_what_to_do(env: dict[str, str], says: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(says)):
        Settings.from_env(env)


def test_private_key_given_as_public_key_is_refused() -> None:
    private_pem, _ = _pem(ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(ConfigError, match="public half"):
        Settings.from_env({"JWT_PUBLIC_KEY": private_pem.decode()})


# -- a token never leaks -----------------------------------------------------------------------------------------------


async def test_query_token_never_reaches_the_logs(tmp_path: Path) -> None:
    """ALLOW_QUERY_TOKEN on, debug logging: the token appears in no log line, whatever the request's fate."""
    member = token(sub="carol", publish=["room-*"], subscribe=["room-*"])
    svc = ServiceProcess(tmp_path, {"JWT_SECRET": SECRET, "ALLOW_QUERY_TOKEN": "true", "LOG_LEVEL": "debug",
                                    "PUBLIC_CHANNELS": "chat"}, name="querylog").start()
    try:
        async with httpx.AsyncClient(base_url=svc.url, timeout=5) as c:
            assert (await c.post(f"/channels/room-1/messages?token={member}", json={"data": 1})).status_code == 202
            assert (await c.post(f"/channels/vip/messages?token={member}", json={"data": 1})).status_code == 403
            assert (await c.post(f"/channels/room-1/messages?token={member}", content=b"{bad")).status_code == 400
            assert (await c.post(f"/channels/room-1/messages?token={member}x", json={"data": 1})).status_code == 401
            async with SSEStream(f"{svc.url}/channels/room-1/events?token={member}") as stream:
                assert stream.statuses == [200]
    finally:
        svc.stop()
    log = svc.log_path.read_text()
    assert "relay started" in log  # the log is there and was written at debug level
    signature = member.rsplit(".", 1)[1]
    assert signature not in log and member.split(".")[1] not in log


async def test_error_bodies_never_echo_the_token() -> None:
    """Error bodies name the problem, never the token (they may end up in a browser console or a log)."""
    async with serve() as s, httpx.AsyncClient(base_url=s.url) as c:
        for tok in (token(publish=["x"]), expired_token(), "a.b.c", token(publish=["room-*"])[:-3] + "abc"):
            resp = await c.post("/channels/room-1/messages", json={"data": 1}, headers=bearer(tok))
            assert resp.status_code in (401, 403)
            assert tok not in resp.text and (len(tok) < 20 or tok.split(".")[-1] not in resp.text)
        assert await s.history("room-1") == []


def test_settings_repr_hides_the_secret() -> None:
    settings = Settings.from_env({"JWT_SECRET": SECRET})
    assert SECRET not in repr(settings)
    assert json.dumps([row for row in Settings.describe() if row[0] == "JWT_SECRET"])  # documented like any other
