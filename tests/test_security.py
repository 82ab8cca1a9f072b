"""Only who belongs: tokens, the channel policy, limits, CORS and hostile input.

Every refusal is checked twice: the status code, and that nothing happened (the channel's history, which every
publish lands in, is unchanged; a subscriber sees nothing; no stream was opened).

Most tests run the embedded default behind a real uvicorn server in this event loop (`serve`); the rate limit
across replicas runs two `python -m service` processes on a real redis-server.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import re
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from service import Settings, create_app
from service.config import ConfigError
from service.relay import Relay
from service.tokens import mint

from .support import ROOT, RedisServer, ServiceProcess, SSEReader, running_app

pytestmark = pytest.mark.timeout(60)

SECRET = "test-" + secrets.token_urlsafe(40)


def token(**claims: Any) -> str:
    claims.setdefault("ttl", 86400)  # minted at collection time; the suite may run long before these tests
    return mint(SECRET, **claims)


def bearer(tok: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}"}


ADMIN = bearer(token(sub="admin", publish=["*"], subscribe=["*"]))


@dataclass
class Served:
    url: str
    relay: Relay

    async def history(self, channel: str) -> list[Any]:
        """Data of every message the channel retains: what a `?last_event_id=0` reader would replay."""
        return [orjson.loads(bytes(m.data)) for m in (await self.relay.broker.history(channel, None, 10_000)).messages]

    async def replay(self, channel: str, headers: dict[str, str] | None = None) -> list[Any]:
        """The same through HTTP: a `last_event_id=0` stream read until a marker published after it arrives."""
        marker = {"marker": secrets.token_hex(4)}
        async with httpx.AsyncClient(base_url=self.url) as c:
            assert (await c.post(f"/channels/{channel}/messages", json={"data": marker}, headers=ADMIN)).status_code == 202
        async with SSEReader([f"{self.url}/channels/{channel}/events?last_event_id=0"], headers=headers or ADMIN) as r:
            await r.wait_for(lambda r: any(e.event == "message" and e.json() == marker for e in r.events))
            data = [e.json() for e in r.data_events()]
        return data[: data.index(marker)]


@contextlib.asynccontextmanager
async def serve(**overrides: Any) -> AsyncIterator[Served]:
    """A relay with a token key, the demo room `chat` public, limits off unless the test sets them."""
    options: dict[str, Any] = {"heartbeat_interval": 0.2, "instance_id": "sec", "jwt_secret": SECRET,
                               "publish_rate_limit": 0, "max_streams_per_client": 0}
    options.update(overrides)
    settings = Settings.from_env(options.pop("environ", {}), **options)
    relay = Relay(settings)
    async with running_app(create_app(settings, relay)) as url:
        yield Served(url, relay)


async def until(condition: Any, what: str, timeout: float = 5.0) -> None:
    """Server-side state that has no event to await (a disconnect noticed): poll it, with a deadline."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


# -- the raw stream, read byte for byte ------------------------------------------------------------------------

_ONE_ID = rb"(?:0|\d{1,20}-\d{1,20}(?:-[0-9a-z]{1,16})?)"
_ID_RE = re.compile(_ONE_ID + rb"|[A-Za-z0-9_.:-]+=" + _ONE_ID + rb"(?:,[A-Za-z0-9_.:-]+=" + _ONE_ID + rb")*")
_NAME_RE = re.compile(rb"[A-Za-z0-9_.:/-]{1,64}")


def parse_strict(raw: bytes) -> list[dict[str, Any]]:
    """Parse an SSE byte stream the way the relay promises to write it, failing on anything else.

    Lines end with LF; an event is optional `id:`, optional `event:`, one `data:` line of JSON;
    other blocks are `retry:` or `:` comments. A forged field would show up as a second `data:`/`event:`/`id:`
    line, an unknown field, a stray CR, or data that is not JSON.
    """
    cr = raw.find(b"\r")
    assert cr < 0, f"a CR in the stream (SSE parsers break the line there): {raw[max(0, cr - 300):cr + 100]!r}"
    blocks = raw.split(b"\n\n")
    blocks.pop()  # what follows the last blank line is an event still being written
    events = []
    for block in blocks:
        fields: dict[str, Any] = {}
        for line in block.split(b"\n"):
            if line.startswith(b":"):
                continue
            name, sep, value = line.partition(b": ")
            assert sep, f"malformed line {line[:120]!r}"
            key = name.decode("ascii", "replace")
            assert key in ("retry", "id", "event", "data"), f"unexpected field {line[:120]!r}"
            assert key not in fields, f"field {key!r} twice in one event: {block[:200]!r}"
            if key == "retry":
                assert value.isdigit(), line
            elif key == "id":
                assert _ID_RE.fullmatch(value), f"malformed id {value[:120]!r}"
            elif key == "event":
                assert _NAME_RE.fullmatch(value), f"malformed event name {value[:120]!r}"
            fields[key] = value
        if "data" in fields:
            fields["data"] = orjson.loads(fields["data"])  # raises on anything that is not one JSON value
            fields["event"] = fields.get("event", b"message").decode()
            events.append(fields)
        else:
            assert set(fields) <= {"retry"}, f"an event without data: {block[:200]!r}"
    return events


class RawStream:
    """Collects the raw bytes of one stream in a background task."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        self.url, self.headers = url, headers or {}
        self.raw = bytearray()
        self.status: int | None = None
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> RawStream:
        self._task = asyncio.create_task(self._run())
        await self.wait_for(lambda raw: b"relay.hello" in raw)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        async with httpx.AsyncClient(timeout=httpx.Timeout(5.0, read=None)) as c:
            async with c.stream("GET", self.url, headers=self.headers) as resp:
                self.status = resp.status_code
                async for chunk in resp.aiter_raw():
                    self.raw += chunk
                    self._changed.set()
        self._changed.set()

    async def wait_for(self, predicate: Any, timeout: float = 10.0) -> None:
        async def loop() -> None:
            while not predicate(bytes(self.raw)):
                if self._task is not None and self._task.done():
                    self._task.result()
                    raise AssertionError(f"stream ended (status {self.status}) before the condition was met")
                self._changed.clear()
                await self._changed.wait()
        await asyncio.wait_for(loop(), timeout)


# -- the default stays friendly ----------------------------------------------------------------------------------


async def test_unconfigured_relay_serves_the_chat_room_and_closes_every_other_channel() -> None:
    settings = Settings.from_env({}, heartbeat_interval=0.2)  # nothing configured: the real defaults
    relay = Relay(settings)
    async with running_app(create_app(settings, relay)) as url, httpx.AsyncClient(base_url=url) as c:
        served = Served(url, relay)
        async with SSEReader([f"{url}/channels/chat/events"]) as page, SSEReader([f"{url}/server/events"]) as old:
            assert (await c.post("/channels/chat/messages", json={"data": {"text": "hi"}})).status_code == 202
            resp = await c.post("/server/send", json={"messages": [{"role": "user", "content": "hello"}]})
            assert resp.status_code == 200 and resp.json() == {"status": "Message received successfully"}
            await page.wait_count(2)
            await old.wait_count(2)
            assert old.data_events()[-1].json() == [{"role": "user", "content": "hello"}]

        # Any other channel is private, and with no key configured nobody can get in, not even with a token.
        forged = bearer(jwt.encode({"exp": int(time.time()) + 60, "sse": {"publish": ["*"]}}, "x" * 32))
        for headers in ({}, forged):
            resp = await c.post("/channels/room/messages", json={"data": "no"}, headers=headers)
            assert resp.status_code == 401
            message = resp.json()["error"]["message"]
            assert "JWT_SECRET" in message and "JWT_PUBLIC_KEY" in message and "PUBLIC_CHANNELS" in message
            assert resp.headers["www-authenticate"].startswith("Bearer")
            assert (await c.get("/channels/room/events", headers=headers)).status_code == 401
            assert (await c.get("/events?channel=chat&channel=room", headers=headers)).status_code == 401
        assert await served.history("room") == []
        # the two streams above have closed (the disconnect sweep runs twice a second); none was opened since
        for _ in range(40):
            if not relay.streams:
                break
            await asyncio.sleep(0.05)
        assert relay.streams == set()


async def test_default_channel_follows_the_policy() -> None:
    """The old endpoints publish to DEFAULT_CHANNEL: open when PUBLIC_CHANNELS matches it, private otherwise."""
    async with serve(default_channel="lobby") as s, httpx.AsyncClient(base_url=s.url) as c:
        body = {"messages": [{"role": "user", "content": "x"}]}
        assert (await c.post("/server/send", json=body)).status_code == 401
        assert (await c.get("/server/events")).status_code == 401
        assert await s.history("lobby") == []
        ok = bearer(token(publish=["lobby"], subscribe=["lobby"]))
        assert (await c.post("/server/send", json=body, headers=ok)).status_code == 200
        assert await s.history("lobby") == [body["messages"]]
    async with serve(default_channel="lobby", public_channels=("lob*",)) as s, httpx.AsyncClient(base_url=s.url) as c:
        assert (await c.post("/server/send", json={"messages": [{"role": "a", "content": "b"}]})).status_code == 200


# -- tokens ------------------------------------------------------------------------------------------------------


def _expired() -> str:
    return mint(SECRET, publish=["*"], subscribe=["*"], ttl=60, now=time.time() - 120)


PUBLISH_CASES = [
    ("no token", {}, 401),
    ("not a jwt", bearer("abc.def"), 401),
    ("other secret", bearer(mint("other-" + "y" * 40, publish=["*"])), 401),
    ("expired", bearer(_expired()), 401),
    ("no exp", bearer(jwt.encode({"sse": {"publish": ["*"]}}, SECRET, "HS256")), 401),
    ("alg none", bearer(jwt.encode({"exp": int(time.time()) + 60, "sse": {"publish": ["*"]}}, None, "none")), 401),
    ("sse claim not an object", bearer(jwt.encode({"exp": int(time.time()) + 60, "sse": ["*"]}, SECRET, "HS256")), 401),
    ("subscribe only", bearer(token(subscribe=["room-*"])), 403),
    ("other channels", bearer(token(publish=["other-*"])), 403),
    ("case differs", bearer(token(publish=["ROOM-*"])), 403),
]


@pytest.mark.parametrize(("case", "headers", "status"), PUBLISH_CASES, ids=[c[0] for c in PUBLISH_CASES])
async def test_private_publish_needs_a_valid_token_with_the_publish_claim(
    case: str, headers: dict[str, str], status: int
) -> None:
    async with serve() as s, httpx.AsyncClient(base_url=s.url) as c:
        async with SSEReader([f"{s.url}/channels/room-1/events"], headers=ADMIN) as live:
            resp = await c.post("/channels/room-1/messages", json={"data": "intruder"}, headers=headers)
            assert resp.status_code == status, resp.text
            assert resp.json()["error"]["code"] == {401: "unauthorized", 403: "forbidden"}[status]
            assert "Bearer" in resp.headers["www-authenticate"]
            batch = await c.post("/publish", json={"messages": [{"channel": "room-1", "data": "intruder"}]},
                                 headers=headers)
            assert batch.status_code == status
            # the positive control, through the same endpoints
            ok = bearer(token(publish=["room-*"]))
            assert (await c.post("/channels/room-1/messages", json={"data": "member"}, headers=ok)).status_code == 202
            await live.wait_count(1)
            assert [e.json() for e in live.data_events()] == ["member"]
        assert await s.replay("room-1") == ["member"]


async def test_batch_is_all_or_nothing_across_channels() -> None:
    async with serve() as s, httpx.AsyncClient(base_url=s.url) as c:
        items = [{"channel": "room-1", "data": 1}, {"channel": "secret", "data": 2}, {"channel": "chat", "data": 3}]
        resp = await c.post("/publish", json={"messages": items}, headers=bearer(token(publish=["room-*"])))
        assert resp.status_code == 403 and "'secret'" in resp.json()["error"]["message"]
        for channel in ("room-1", "secret", "chat"):
            assert await s.history(channel) == []
        resp = await c.post("/publish", json={"messages": items}, headers=bearer(token(publish=["room-*", "secret"])))
        assert resp.status_code == 200 and resp.json()["published"] == 3


async def test_private_streams_need_the_subscribe_claim_and_nothing_opens_without_it() -> None:
    async with serve() as s, httpx.AsyncClient(base_url=s.url) as c:
        cases = [
            ("/channels/room-1/events", {}, 401),
            ("/channels/room-1/events", bearer("garbage"), 401),
            ("/channels/room-1/events", bearer(_expired()), 401),
            ("/channels/room-1/events", bearer(token(publish=["room-*"])), 403),
            ("/events?channel=chat&channel=room-1", {}, 401),
            ("/events?channel=room-1&channel=room-2&channel=vip", bearer(token(subscribe=["room-*"])), 403),
            ("/channels/room-1", bearer(token(publish=["*"])), 403),  # presence and last id are reads too
        ]
        for path, headers, status in cases:
            resp = await c.get(path, headers=headers)
            assert resp.status_code == status, (path, resp.text)
            assert s.relay.streams == set()
        # public channels need nothing, and a token that cannot be verified does not spoil them
        assert (await c.get("/channels/chat", headers=bearer("garbage"))).status_code == 200
        member = bearer(token(subscribe=["room-*"]))
        async with SSEReader([f"{s.url}/events?channel=room-1&channel=chat"], headers=member) as r:
            await c.post("/channels/room-1/messages", json={"data": "in"}, headers=ADMIN)
            await r.wait_count(1)
            assert r.data_events()[0].json()["data"] == "in"


async def test_token_from_header_cookie_and_query_only_when_enabled() -> None:
    member = token(sub="alice", publish=["room-*"], subscribe=["room-*"])
    async with serve() as s, httpx.AsyncClient(base_url=s.url) as c:
        assert (await c.post("/channels/room-1/messages", json={"data": "h"}, headers=bearer(member))).status_code == 202
        resp = await c.post("/channels/room-1/messages", json={"data": "c"}, headers={"Cookie": f"sse_token={member}"})
        assert resp.status_code == 202
        resp = await c.post(f"/channels/room-1/messages?token={member}", json={"data": "q"})
        assert resp.status_code == 401 and "ALLOW_QUERY_TOKEN" in resp.json()["error"]["message"]
        assert (await c.get(f"/channels/room-1/events?token={member}")).status_code == 401
        async with SSEReader([f"{s.url}/channels/room-1/events?last_event_id=0"], headers={"Cookie": f"sse_token={member}"}) as r:
            await r.wait_count(2)
        assert await s.history("room-1") == ["h", "c"]
    async with serve(allow_query_token=True, auth_cookie="relay_jwt") as s, httpx.AsyncClient(base_url=s.url) as c:
        assert (await c.post(f"/channels/room-1/messages?token={member}", json={"data": "q"})).status_code == 202
        for cookie, status in ((f"sse_token={member}", 401), (f"relay_jwt={member}", 202)):
            resp = await c.post("/channels/room-1/messages", json={"data": "c"}, headers={"Cookie": cookie})
            assert resp.status_code == status
        async with SSEReader([f"{s.url}/channels/room-1/events?last_event_id=0&token={member}"], headers={}) as r:
            await r.wait_count(2)
        assert await s.history("room-1") == ["q", "c"]


async def test_cookie_publish_from_another_site_is_refused() -> None:
    """A cookie is sent by the browser on its own: a page elsewhere must not publish with it (CSRF)."""
    member = token(publish=["room-*"])
    async with serve(cors_origins=("https://app.example",)) as s, httpx.AsyncClient(base_url=s.url) as c:
        own_origin = s.url
        for origin, status in [("https://evil.example", 403), ("null", 403), (own_origin, 202),
                               ("https://app.example", 202)]:
            resp = await c.post("/channels/room-1/messages", json={"data": origin},
                                headers={"Origin": origin, "Cookie": f"sse_token={member}"})
            assert resp.status_code == status, (origin, resp.text)
        # the header is not ambient: a page can only send it if it holds the token, so no Origin rule applies
        resp = await c.post("/channels/room-1/messages", json={"data": "header"},
                            headers={**bearer(member), "Origin": "https://evil.example"})
        assert resp.status_code == 202
        assert await s.history("room-1") == [own_origin, "https://app.example", "header"]


async def test_stream_ends_with_relay_expired_when_its_token_expires() -> None:
    short = mint(SECRET, subscribe=["room-*"], ttl=2)
    expires_at = jwt.decode(short, SECRET, algorithms=["HS256"])["exp"]
    async with serve() as s, httpx.AsyncClient(base_url=s.url) as c:
        private = SSEReader([f"{s.url}/channels/room-1/events"], headers=bearer(short))
        public = SSEReader([f"{s.url}/channels/chat/events"], headers=bearer(short))
        async with private, public:
            await c.post("/channels/room-1/messages", json={"data": "before"}, headers=ADMIN)
            await private.wait_count(1)
            await asyncio.wait_for(private.ended.wait(), 5)
            ended_at = time.time()
            assert [e.event for e in private.events][-1] == "relay.expired"
            assert private.events[-1].json()["expired_at"] == expires_at
            assert expires_at - 0.05 <= ended_at <= expires_at + 1.0
            # reconnecting with the expired token is refused; a public stream is not tied to the token
            assert (await c.get("/channels/room-1/events", headers=bearer(short))).status_code == 401
            await c.post("/channels/chat/messages", json={"data": "still here"})
            await public.wait_count(1)
            assert not public.ended.is_set()
        await until(lambda: not s.relay.streams, "the server never noticed the streams closing")


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
    ({"PUBLIC_CHANNELS": "chat,room one"}, "PUBLIC_CHANNELS"),
    ({"AUTH_COOKIE": "a;b"}, "AUTH_COOKIE"),
    ({"PUBLISH_RATE_LIMIT": "-1"}, "PUBLISH_RATE_LIMIT"),
    ({"CORS_ORIGINS": "*", "CORS_ALLOW_CREDENTIALS": "true"}, "list the origins"),
])
def test_bad_security_settings_stop_the_service_with_what_to_do(env: dict[str, str], says: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(says)):
        Settings.from_env(env)


def test_private_key_given_as_public_key_is_refused() -> None:
    private_pem, _ = _pem(ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(ConfigError, match="public half"):
        Settings.from_env({"JWT_PUBLIC_KEY": private_pem.decode()})


def test_query_token_never_reaches_the_logs(tmp_path: Path) -> None:
    """ALLOW_QUERY_TOKEN on, debug logging: the token appears in no log line, whatever the request's fate."""
    member = token(sub="carol", publish=["room-*"], subscribe=["room-*"])
    svc = ServiceProcess(tmp_path, {"JWT_SECRET": SECRET, "ALLOW_QUERY_TOKEN": "true", "LOG_LEVEL": "debug",
                                    "PUBLIC_CHANNELS": "chat"}, name="querylog").start()
    try:
        with httpx.Client(base_url=svc.url, timeout=5) as c:
            assert c.post(f"/channels/room-1/messages?token={member}", json={"data": 1}).status_code == 202
            assert c.post(f"/channels/vip/messages?token={member}", json={"data": 1}).status_code == 403
            assert c.post(f"/channels/room-1/messages?token={member}", content=b"{bad").status_code == 400
            assert c.post(f"/channels/room-1/messages?token={member}x", json={"data": 1}).status_code == 401
            with c.stream("GET", f"/channels/room-1/events?token={member}") as resp:
                assert resp.status_code == 200
                for chunk in resp.iter_raw():
                    if b"relay.hello" in chunk:
                        break
    finally:
        svc.stop()
    log = svc.log_path.read_text()
    assert "relay started" in log  # the log is there and was written at debug level
    signature = member.rsplit(".", 1)[1]
    assert signature not in log and member.split(".")[1] not in log


# -- limits ------------------------------------------------------------------------------------------------------


async def test_publish_rate_limit_per_client_answers_429_with_retry_after() -> None:
    # 1/s: deterministic however slow this machine is (bursts are checked on a fake clock further down)
    async with serve(publish_rate_limit=1) as s, httpx.AsyncClient(base_url=s.url) as c:
        assert (await c.post("/channels/chat/messages", json={"data": "first"})).status_code == 202
        refused = await c.post("/channels/chat/messages", json={"data": "over"})
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "rate_limited"
        assert "PUBLISH_RATE_LIMIT" in refused.json()["error"]["message"]
        assert refused.headers["retry-after"] == "1"
        wait_ms = refused.json()["error"]["retry_after_ms"]
        assert 0 < wait_ms <= 1000
        # every publish path counts against the same client
        legacy = await c.post("/server/send", json={"messages": [{"role": "u", "content": "x"}]})
        assert legacy.status_code == 429
        assert (await c.post("/publish", json={"messages": [{"channel": "chat", "data": "b"}]})).status_code == 429
        # another client (a token's sub) has its own budget, even on a public channel
        bob = bearer(token(sub="bob"))
        assert (await c.post("/channels/chat/messages", json={"data": "bob"}, headers=bob)).status_code == 202
        assert await s.history("chat") == ["first", "bob"]
        await asyncio.sleep(wait_ms / 1000 + 0.05)  # the rule is about time: wait what the relay said
        assert (await c.post("/channels/chat/messages", json={"data": "later"})).status_code == 202
        assert await s.history("chat") == ["first", "bob", "later"]


async def test_rate_limit_client_is_the_forwarded_address_only_from_a_trusted_proxy() -> None:
    for trusted in ((), ("127.0.0.1",)):
        async with serve(publish_rate_limit=1, trust_proxy_headers=trusted) as s, httpx.AsyncClient(base_url=s.url) as c:
            codes = []
            for chain in ("6.6.6.6, 203.0.113.1", "6.6.6.7, 203.0.113.2", "6.6.6.8, not-an-ip", "7.7.7.7, 203.0.113.1"):
                resp = await c.post("/channels/chat/messages", json={"data": chain}, headers={"X-Forwarded-For": chain})
                codes.append(resp.status_code)
            # Nobody trusted: the header is ignored, all four are the peer, only the first passes. The peer trusted:
            # the rightmost hop is the client (two addresses, two buckets); a hop that is not an address leaves the
            # peer as the client (a third bucket); the leftmost hop, which the client wrote, never counts.
            assert codes == ([202, 429, 429, 429] if not trusted else [202, 202, 202, 429])


async def test_streams_per_client_limit_is_429_and_instance_capacity_is_200_retry() -> None:
    async with serve(max_streams_per_client=2) as s, httpx.AsyncClient(base_url=s.url) as c:
        async with SSEReader([f"{s.url}/channels/chat/events"]) as a, SSEReader([f"{s.url}/events?channel=chat"]):
            resp = await c.get("/server/events")
            assert resp.status_code == 429 and resp.json()["error"]["code"] == "too_many_streams"
            assert resp.headers["retry-after"]
            assert len(s.relay.streams) == 2
            # another client is not affected
            async with SSEReader([f"{s.url}/channels/chat/events"], headers=bearer(token(sub="dave"))):
                assert len(s.relay.streams) == 3
            await a.close()
            await until(lambda: s.relay.client_streams.get("ip:127.0.0.1", 0) == 1, "closed stream still counted")
            async with SSEReader([f"{s.url}/channels/chat/events"]):
                pass
    async with serve(max_streams=1) as s, httpx.AsyncClient(base_url=s.url) as c:
        async with SSEReader([f"{s.url}/channels/chat/events"]):
            async with c.stream("GET", "/channels/chat/events") as resp:
                assert resp.status_code == 200
                body = await resp.aread()  # ends by itself
            assert body.startswith(b"retry: ") and b"relay.hello" not in body


@pytest.mark.redis
async def test_rate_limit_holds_across_replicas(redis_server: RedisServer, tmp_path: Path) -> None:
    env = {"REDIS_URL": redis_server.url, "PUBLISH_RATE_LIMIT": "5", "PUBLIC_CHANNELS": "*"}
    replicas = [ServiceProcess(tmp_path, env, name=f"rl{i}") for i in range(2)]
    try:
        for r in replicas:
            r.start(wait_ready=False)
        for r in replicas:
            r.wait_ready()
        async with httpx.AsyncClient(timeout=5) as c:
            started = time.monotonic()
            results = []
            for i in range(20):
                replica = replicas[i % 2]
                resp = await c.post(f"{replica.url}/channels/rl/messages", json={"data": i})
                results.append((replica.name, resp.status_code))
            elapsed = time.monotonic() - started
            accepted = [name for name, status in results if status == 202]
            refused = [name for name, status in results if status == 429]
            # 5 at once plus 5/s, shared: an in-process limit per replica would have let 10 through at once
            assert 5 <= len(accepted) <= 5 + int(5 * elapsed) + 1, (results, elapsed)
            assert set(refused) == {"rl0", "rl1"}, results
            keys = subprocess.run(["redis-cli", "-p", str(redis_server.port), "--scan", "--pattern", "sse:rl:*"],
                                  capture_output=True, text=True, check=True).stdout.split()
            assert keys == ["sse:rl:ip:127.0.0.1"]
            # what was refused was not published
            got = (await c.get(f"{replicas[0].url}/channels/rl")).json()
            assert got["last_id"] is not None
        async with SSEReader([f"{replicas[1].url}/channels/rl/events?last_event_id=0"]) as r:
            await r.wait_count(len(accepted))  # history comes as one chunk: nothing else can follow
            assert [e.json() for e in r.data_events()] == [i for i, (_, status) in enumerate(results) if status == 202]
    finally:
        for r in replicas:
            r.stop()


async def test_redis_rate_limiter_fails_open_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    from service.ratelimit import RedisRateLimiter

    from .support import free_port

    limiter = RedisRateLimiter(f"redis://127.0.0.1:{free_port()}/0", "sse", rate=1)
    try:
        with caplog.at_level("WARNING", logger="service.ratelimit"):
            assert [await limiter.hit("ip:1.2.3.4") for _ in range(3)] == [None, None, None]
        assert limiter.failures == 3
        assert len([r for r in caplog.records if "not rate limited" in r.getMessage()]) == 1  # logged, not flooded
    finally:
        await limiter.close()


async def test_memory_limiter_charges_batches_and_forgets_idle_clients() -> None:
    from service.ratelimit import MemoryRateLimiter

    now = [100.0]
    limiter = MemoryRateLimiter(rate=10, clock=lambda: now[0])
    assert await limiter.hit("a", cost=25) is None  # a full bucket lets a big batch through once...
    wait = await limiter.hit("a")
    # ...and then the client owes it: 25 messages at 10/s, less the burst of 10 it may always have in hand
    assert wait is not None and wait == pytest.approx(1.6, abs=0.01)
    now[0] += 1.5
    assert await limiter.hit("a") is not None
    now[0] += 0.1
    assert await limiter.hit("a") is None
    # a burst of 10 at once, the 11th waits a tenth of a second
    assert [await limiter.hit("burst") for _ in range(10)] == [None] * 10
    assert await limiter.hit("burst") == pytest.approx(0.1)
    limiter._PRUNE_AT = 3  # type: ignore[misc]
    for name in "bcd":
        await limiter.hit(name)
    now[0] += 60
    await limiter.hit("e")
    assert set(limiter._tat) == {"e"}


# -- input hardening ---------------------------------------------------------------------------------------------


def _nested(depth: int) -> bytes:
    return b'{"data":' + b"[" * depth + b"]" * depth + b"}"


async def _chunked(body: bytes) -> AsyncIterator[bytes]:
    for i in range(0, len(body), 8192):
        yield body[i:i + 8192]


BAD_BODIES = [
    ("unknown field", b'{"data": 1, "admin": true}', 422),
    ("no data", b'{"event": "x"}', 422),
    ("not an object", b'[1, 2]', 422),
    ("event not a string", b'{"data": 1, "event": 5}', 422),
    ("event with newline", b'{"data": 1, "event": "a\\n\\ndata: forged"}', 422),
    ("event with CR", b'{"data": 1, "event": "a\\rid: 9"}', 422),
    ("event with NUL", b'{"data": 1, "event": "a\\u0000"}', 422),
    ("event with space", b'{"data": 1, "event": "a b"}', 422),
    ("event too long", b'{"data": 1, "event": "' + b"e" * 65 + b'"}', 422),
    ("reserved event", b'{"data": 1, "event": "relay.reset"}', 422),
    ("empty body", b"", 400),
    ("not json", b"{data: 1}", 400),
    ("invalid utf-8", b'{"data": "\xff\xfe"}', 400),
    ("lone surrogate", b'{"data": "\\ud800"}', 400),
    ("number overflow", b'{"data": 1e400}', 400),
    ("nested past MAX_JSON_DEPTH", _nested(100), 400),
    ("nested past orjson's limit", _nested(5000), 400),
    ("huge", b'{"data": "' + b"x" * 70_000 + b'"}', 413),
]


async def test_hostile_bodies_get_a_clear_4xx_and_publish_nothing() -> None:
    async with serve(public_channels=("*",)) as s, httpx.AsyncClient(base_url=s.url) as c:
        async with SSEReader([f"{s.url}/channels/t/events"]) as live:
            for case, body, status in BAD_BODIES:
                resp = await c.post("/channels/t/messages", content=body, headers={"Content-Type": "application/json"})
                assert resp.status_code == status, (case, resp.text)
                error = resp.json()["error"]
                assert error["message"] and error["code"], case
                chunked = await c.post("/channels/t/messages", content=_chunked(body))  # no Content-Length
                assert chunked.status_code == status, (case, "chunked")
                batch = await c.post("/publish", content=b'{"messages": [' + body + b"]}")
                assert batch.status_code < 500
                assert batch.status_code != 200 or batch.json()["published"] == 0, case
            deep = await c.post("/channels/t/messages", content=_nested(100))
            assert deep.json()["error"]["code"] == "too_deep" and "MAX_JSON_DEPTH" in deep.json()["error"]["message"]
            assert (await c.post("/channels/t/messages", content=_nested(60))).status_code == 202  # within the limit
            await live.wait_count(1)
            assert len(live.data_events()) == 1
        assert len(await s.history("t")) == 1


async def test_hostile_channel_names_and_stream_parameters() -> None:
    async with serve(public_channels=("*",), max_channels_per_stream=3) as s, httpx.AsyncClient(base_url=s.url) as c:
        bad_paths = ["/channels/a%0Adata:%20x/messages", "/channels/a%0D%0Aevent:x/messages",
                     "/channels/a%20b/messages", f"/channels/{'x' * 129}/messages", "/channels/%00/messages",
                     "/channels/caf%C3%A9/messages"]
        for path in bad_paths:
            resp = await c.post(path, json={"data": 1})
            assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_channel", path
            assert (await c.get(path.replace("/messages", "/events"))).status_code == 400
        for query in ["channel=a%0Adata:x", "channel=a&channel=b&channel=c&channel=d", "channel=", ""]:
            assert (await c.get(f"/events?{query}")).status_code == 400, query
        assert s.relay.streams == set()
        # a hostile Last-Event-ID is only ever echoed as JSON, inside the client's own reset event
        hostile = "1\n\ndata: {\"forged\": true}\n\nid: 9"
        async with RawStream(f"{s.url}/channels/t/events?{urlencode({'last_event_id': hostile})}") as raw:
            await raw.wait_for(lambda b: b"relay.reset" in b)
        events = parse_strict(bytes(raw.raw))
        assert [e["event"] for e in events] == ["relay.hello", "relay.reset"]
        assert events[1]["data"]["last_event_id"] == hostile
        async with RawStream(f"{s.url}/events?channel=t&channel=u", headers={"Last-Event-ID": "t=1-0,x=\tdata:"}) as raw:
            await raw.wait_for(lambda b: b"relay.reset" in b)
        assert [e["event"] for e in parse_strict(bytes(raw.raw))] == ["relay.hello", "relay.reset"]
        assert await s.history("t") == []


async def test_oversized_headers_get_431_before_anything_runs() -> None:
    async with serve(public_channels=("*",), max_header_bytes=4096) as s, httpx.AsyncClient(base_url=s.url) as c:
        resp = await c.post("/channels/t/messages", json={"data": 1}, headers={"Cookie": "a=" + "x" * 5000})
        assert resp.status_code == 431 and "MAX_HEADER_BYTES" in resp.json()["error"]["message"]
        assert (await c.get("/channels/t/events", headers={"X-Junk": "y" * 5000})).status_code == 431
        assert await s.history("t") == [] and s.relay.streams == set()
        assert (await c.post("/channels/t/messages", json={"data": 1}, headers={"Cookie": "a=b"})).status_code == 202


async def test_no_input_injects_a_field_into_another_clients_stream() -> None:
    """Subscribers read raw bytes while hostile publishes happen; every frame they get is exactly what was sent."""
    hostile_strings = [
        "\n\ndata: {\"forged\": true}\n\n", "\r\nevent: admin\r\n", "\rid: 999\r", "id: 1\nretry: 1\n",
        "\x00\x01\x1b[31m", "\u2028data: x\u2029", "\x85event: y", ": comment\n\n", "🙂" * 10, "\\n\\r",
    ]
    async with serve(public_channels=("*",)) as s, httpx.AsyncClient(base_url=s.url) as c:
        async with RawStream(f"{s.url}/channels/t/events") as single, \
                RawStream(f"{s.url}/events?channel=t&channel=u") as multi:
            sent: list[Any] = []
            for text in hostile_strings:
                for data in (text, {text: [text]}, [text, 1]):
                    assert (await c.post("/channels/t/messages", json={"data": data})).status_code == 202
                    sent.append(data)
                # the same text as an event name or a channel is refused, as an id it is never accepted
                assert (await c.post("/channels/t/messages", json={"data": 1, "event": text})).status_code == 422
                resp = await c.post("/publish", json={"messages": [{"channel": text, "data": 1}]})
                assert resp.status_code == 200 and resp.json()["published"] == 0
                resp = await c.post("/server/send", json={"messages": [{"role": text, "content": text}]})
                assert resp.status_code == 200  # the old contract takes any strings, on its own channel
            assert (await c.post("/channels/t/messages", json={"data": "end", "event": "done"})).status_code == 202
            await single.wait_for(lambda b: b'data: "end"\n\n' in b)
            await multi.wait_for(lambda b: b'"data":"end"}\n\n' in b)
            single_events = [e for e in parse_strict(bytes(single.raw)) if not e["event"].startswith("relay.")]
            multi_events = [e for e in parse_strict(bytes(multi.raw)) if not e["event"].startswith("relay.")]
        assert [e["data"] for e in single_events] == [*sent, "end"]
        assert [e["data"]["data"] for e in multi_events] == [*sent, "end"]
        assert {e["event"] for e in single_events} == {"message", "done"}


async def test_data_has_no_characters_that_splitlines_clients_break_on() -> None:
    """U+2028/U+2029/U+0085 are escaped in data: clients that split lines like str.splitlines() (httpx's
    aiter_lines, many hand-written Python SSE clients) would otherwise see a line break there."""
    async with serve(public_channels=("*",)) as s, httpx.AsyncClient(base_url=s.url) as c:
        async with RawStream(f"{s.url}/channels/t/events") as raw:
            await c.post("/channels/t/messages", json={"data": "a\u2028\u2028event: forged\u2028data: 1\u2028\u2028"})
            await c.post("/channels/t/messages", json={"data": "end", "event": "done"})
            await raw.wait_for(lambda b: b'data: "end"\n\n' in b)
        text = bytes(raw.raw).decode()
        lines = text.splitlines()
        assert not [line for line in lines if line.startswith("event: forged")]
        assert text.count("\n") == len(lines)


# -- CORS --------------------------------------------------------------------------------------------------------


async def test_cors_allowlist_and_credentials_only_for_listed_origins() -> None:
    allowed = "https://app.example"
    async with serve(cors_origins=(allowed,), cors_allow_credentials=True) as s, httpx.AsyncClient(base_url=s.url) as c:
        resp = await c.get("/healthz", headers={"Origin": allowed})
        assert resp.headers["access-control-allow-origin"] == allowed
        assert resp.headers["access-control-allow-credentials"] == "true"
        assert "Origin" in resp.headers["vary"]
        for evil in ("https://evil.example", "https://app.example.evil.example", "null"):
            resp = await c.get("/healthz", headers={"Origin": evil})
            assert not [h for h in resp.headers if h.startswith("access-control-")], (evil, resp.headers)
            pre = await c.options("/channels/room-1/messages", headers={
                "Origin": evil, "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type"})
            assert pre.status_code == 400
            assert not [h for h in pre.headers if h.startswith("access-control-")], evil
        pre = await c.options("/channels/room-1/messages", headers={
            "Origin": allowed, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == allowed
        assert "authorization" in pre.headers["access-control-allow-headers"].lower()
        assert pre.headers["access-control-allow-credentials"] == "true"
        # a refused preflight publishes nothing (the browser would not send the POST); the POST itself is still
        # subject to the token rules
        assert await s.history("room-1") == []
    async with serve() as s, httpx.AsyncClient(base_url=s.url) as c:  # no CORS_ORIGINS: no CORS at all
        resp = await c.get("/healthz", headers={"Origin": allowed})
        assert not [h for h in resp.headers if h.startswith("access-control-")]


async def test_error_bodies_never_echo_the_token() -> None:
    """Error bodies name the problem, never the token (they may end up in a browser console or a log)."""
    async with serve() as s, httpx.AsyncClient(base_url=s.url) as c:
        for tok in (token(publish=["x"]), _expired(), "a.b.c", token(publish=["room-*"])[:-3] + "abc"):
            resp = await c.post("/channels/room-1/messages", json={"data": 1}, headers=bearer(tok))
            assert resp.status_code in (401, 403)
            assert tok not in resp.text and (len(tok) < 20 or tok.split(".")[-1] not in resp.text)
        assert await s.history("room-1") == []


def test_settings_repr_hides_the_secret() -> None:
    settings = Settings.from_env({"JWT_SECRET": SECRET})
    assert SECRET not in repr(settings)
    assert json.dumps([row for row in Settings.describe() if row[0] == "JWT_SECRET"])  # documented like any other
