"""Generated hostile input at every endpoint of a real `python -m service` process.

hypothesis throws methods, paths, channel names, query strings, headers (Last-Event-ID, Authorization, Cookie,
Origin, X-Forwarded-For, ...), tokens (garbage, forged, and validly signed with absurd claims) and bodies
(random bytes, random JSON, publish-shaped JSON with hostile fields) at the service, and raw bytes at its HTTP
parser. Each request has a timeout. Throughout, and checked at the end of each test:

- no answer is a 5xx, and none hangs;
- the service keeps serving (health, readiness, a real publish that a real subscriber receives);
- a subscriber that was connected all along, reading the raw bytes, saw only well-formed frames, and exactly
  one event per message the service said it accepted on its channels: nothing forged, nothing lost;
- the service logged no unexpected error.

Bounded: at most 200 examples per test, each request 5 s at most; the module runs in ~20 s.
"""

from __future__ import annotations

import base64
import json
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import jwt
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.tokens import mint

from .sse import SSEStream, StreamInThread, parse_strict
from .support import ServiceProcess

pytestmark = pytest.mark.timeout(120)

SECRET = "fuzz-" + secrets.token_urlsafe(40)
WATCHED = ("pub-a", "chat", "priv-a")  # the long-lived subscriber's channels: public, public, private
ADMIN = mint(SECRET, sub="admin", publish=["*"], subscribe=["*"], ttl=3600)
PUBLISHER = mint(SECRET, sub="pub", publish=["priv-*", "pub-*"], subscribe=["priv-*"], ttl=3600)
EXAMPLES = settings(
    max_examples=200, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)


class Target:
    def __init__(self, svc: ServiceProcess, sub: StreamInThread) -> None:
        self.svc, self.sub = svc, sub
        self.url = svc.url
        self.client = httpx.Client(base_url=svc.url, timeout=5.0)
        self.accepted = 0  # messages the service said it accepted on WATCHED channels
        self.statuses: dict[int, int] = {}

    def send(self, method: str, path: str, params: list[tuple[str, str]], headers: dict[str, Any],
             body: bytes | None) -> int:
        try:
            request = self.client.build_request(method, path, params=params, headers=headers, content=body)
            resp = self.client.send(request, stream=True)
        except (httpx.InvalidURL, httpx.LocalProtocolError):
            return 0  # httpx itself refuses to send it; the raw-socket test covers what it cannot say
        except httpx.TimeoutException:
            raise AssertionError(f"no answer within 5 s: {method} {path} {params} {headers}") from None
        try:
            status = resp.status_code
            if not resp.headers.get("content-type", "").startswith("text/event-stream"):
                resp.read()
                self._count(path, status, resp.content)
                assert b"[build-system]" not in resp.content and b"def verify(self" not in resp.content, path
        finally:
            resp.close()
        self.statuses[status] = self.statuses.get(status, 0) + 1
        assert status < 500, f"{status} for {method} {path} {params} {headers} {body!r:.300}"
        return status

    def _count(self, path: str, status: int, content: bytes) -> None:
        """Count what the service says it accepted, from its answers (not from what we think we sent)."""
        try:
            doc = orjson.loads(content)
        except orjson.JSONDecodeError:
            return
        if not isinstance(doc, dict):
            return
        if status == 202 and doc.get("channel") in WATCHED and "id" in doc:
            self.accepted += 1
        elif status == 200 and isinstance(doc.get("results"), list):
            self.accepted += sum(1 for r in doc["results"] if r.get("channel") in WATCHED and "id" in r)
        elif status == 200 and doc == {"status": "Message received successfully"}:
            self.accepted += 1  # the old chat's channel, `chat`

    def check_still_serving(self) -> None:
        """Health, a real publish reaching the long-lived subscriber, its stream well-formed and complete."""
        assert self.client.get("/healthz").status_code == 200
        assert self.client.get("/readyz").status_code == 200
        marker = secrets.token_hex(8)
        resp = self.client.post("/channels/priv-a/messages", json={"data": marker, "event": "marker"},
                                headers={"Authorization": f"Bearer {ADMIN}"})
        assert resp.status_code == 202
        self.accepted += 1
        needle = marker.encode() + b'"}\n\n'
        self.sub.wait(lambda s: needle in (s.raw or b""), 10, "the marker")
        events = parse_strict(self.sub.snapshot())
        delivered = [e for e in events if not e.event.startswith("relay.")]
        assert len(delivered) == self.accepted, (len(delivered), self.accepted, self.statuses)
        assert all(e.data["channel"] in WATCHED for e in delivered)
        log = self.svc.log()
        assert "unexpected error" not in log and "Traceback" not in log, log


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    svc = ServiceProcess(tmp, {
        "JWT_SECRET": SECRET, "PUBLIC_CHANNELS": "pub-*,chat", "ALLOW_QUERY_TOKEN": "true",
        "PUBLISH_RATE_LIMIT": "0",  # hostile publishes should reach validation, not stop at the rate limit
        "MAX_STREAMS_PER_CLIENT": "0", "HEARTBEAT_INTERVAL": "0.5", "CORS_ORIGINS": "https://app.example",
        "DRAIN_GRACE": "1",
    }, name="fuzz").start()
    stream = SSEStream(f"{svc.url}/events?" + "&".join(f"channel={c}" for c in WATCHED),
                       headers={"Authorization": f"Bearer {ADMIN}"}, keep_raw=True)
    try:
        with StreamInThread(stream) as sub:  # hypothesis runs the examples in this thread: the stream reads in its own
            target = Target(svc, sub)
            yield target
            target.client.close()
            assert stream.error is None and not stream.ended.is_set(), stream  # open all along
    finally:
        svc.stop()


# -- strategies ------------------------------------------------------------------------------------------------

CHANNEL_CHARS = "ABCZabcz019_.:-"
nasty_text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=60)
channels = st.one_of(
    st.sampled_from([*WATCHED, "pub-b", "priv-b", "x" * 128, "x" * 129, "relay.hello", ".", "a:b"]),
    st.text(alphabet=CHANNEL_CHARS, min_size=1, max_size=20),
    st.text(alphabet=CHANNEL_CHARS + "\n\r\x00 /%?#&=,\u2028é", max_size=30),
    nasty_text,
)
json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False), nasty_text,
    st.sampled_from(["\n\ndata: {\"forged\":1}\n\n", "\r\nevent: x\r\n", "\u2028id: 1\u2029", "\x00", "\\u0000"]),
)
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(nasty_text, inner, max_size=5),
    max_leaves=25,
)
event_names = st.one_of(
    st.sampled_from(["ok", "a.b", "x/y", "relay.hello", "relay.expired", "a\nb", "a\r\ndata: x", "", "e" * 65]),
    nasty_text, json_values,
)


def _publish_body(data: Any, event: Any, extra: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {"data": data, **extra}
    if event is not None:
        body["event"] = event
    return body


forging_events = st.sampled_from(["a\nb", "a\r\ndata: x", "x\n\ndata: {}", "ok\n", "\nid: 5", "ok\r", "a\u2028b"])
publish_bodies = st.builds(
    _publish_body, json_values, st.one_of(st.none(), forging_events, event_names),
    st.just({}) | st.dictionaries(st.sampled_from(["extra", "id", "channel", "retry"]), json_values, max_size=1),
)
batch_bodies = st.builds(
    lambda items: {"messages": items},
    st.lists(st.one_of(
        st.builds(lambda c, b: {"channel": c, **b}, channels, publish_bodies), json_values,
    ), max_size=6),
)
legacy_bodies = st.one_of(
    st.builds(lambda ms: {"messages": ms}, st.lists(
        st.fixed_dictionaries({"role": nasty_text | json_scalars, "content": nasty_text | json_scalars}), max_size=3)),
    st.dictionaries(nasty_text, json_values, max_size=3),
)


def _deep(depth: int) -> bytes:
    return b'{"data":' + b"[" * depth + b"]" * depth + b"}"


bodies = st.one_of(
    st.none(),
    st.binary(max_size=300),
    json_values.map(orjson.dumps),
    publish_bodies.map(orjson.dumps),
    batch_bodies.map(orjson.dumps),
    legacy_bodies.map(orjson.dumps),
    st.integers(min_value=1, max_value=3000).map(_deep),
    st.sampled_from([b'{"data": "\xff"}', b'{"data": 1e999}', b'{"data": "\\ud800"}', b"\x00" * 50,
                     b'{"data": "' + b"x" * 70_000 + b'"}']),
)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _forged(header: Any, payload: Any, signature: bytes) -> str:
    return ".".join((_b64(json.dumps(header).encode()), _b64(json.dumps(payload).encode()), _b64(signature)))


def _verifies(token: str) -> bool:
    try:
        jwt.decode(token, SECRET, algorithms=["HS256"], options={"require": ["exp"]})
        return True
    except jwt.PyJWTError:
        return False


def _signed(claims: dict[str, Any]) -> str:
    """Validly signed with the service's own secret, but with whatever claims: a buggy issuer, not an attacker."""
    return jwt.api_jws.PyJWS().encode(json.dumps(claims).encode(), SECRET, "HS256")  # no client-side checks


claims = st.dictionaries(
    st.sampled_from(["exp", "sub", "sse", "aud", "iss", "nbf", "iat", "jti"]),
    st.one_of(
        json_values,
        st.integers(min_value=int(time.time()) - 100, max_value=int(time.time()) + 10**6),
        st.fixed_dictionaries({}, optional={"publish": st.lists(nasty_text | json_scalars, max_size=3) | json_values,
                                            "subscribe": st.lists(nasty_text, max_size=3) | json_values}),
        st.integers(min_value=10**20, max_value=10**400),
    ),
    max_size=8,
)
tokens = st.one_of(
    st.sampled_from([ADMIN, PUBLISHER, "", "a.b.c", "Bearer", "null", ADMIN[:-5] + "AAAAA", ADMIN + "." + ADMIN]),
    st.text(alphabet="ABCabc012-_.=", max_size=200),
    st.builds(_forged, st.fixed_dictionaries({"alg": st.sampled_from(["HS256", "none", "RS256", "ES256", "HS512"])
                                              | json_scalars}, optional={"typ": json_scalars, "crit": json_values}),
              json_values | claims, st.binary(max_size=64)),
    claims.map(_signed),
)
header_bytes = st.binary(max_size=120).map(
    lambda b: bytes(c for c in b if c in b"\t" or 0x20 <= c <= 0x7E or c >= 0x80).strip()
)
headers = st.fixed_dictionaries({}, optional={
    "Last-Event-ID": st.one_of(header_bytes, st.sampled_from([b"0", b"1-0", b"pub-a=1-0,chat=2-0", b"9" * 40, b"-1"])),
    "Authorization": st.one_of(tokens.map(lambda t: f"Bearer {t}".encode(errors="replace")), header_bytes),
    "Cookie": st.one_of(tokens.map(lambda t: f"sse_token={t}".encode()), header_bytes),
    "Origin": st.one_of(st.sampled_from([b"https://app.example", b"null", b"https://evil.example"]), header_bytes),
    "X-Forwarded-For": header_bytes,
    "Content-Type": st.one_of(st.sampled_from([b"application/json", b"text/plain", b"multipart/form-data"]),
                              header_bytes),
    "Accept": st.sampled_from([b"text/event-stream", b"*/*"]),
    "Access-Control-Request-Method": st.sampled_from([b"POST", b"GET", b"DELETE"]),
})
paths = st.one_of(
    channels.map(lambda c: f"/channels/{quote(c, safe='')}/messages"),
    channels.map(lambda c: f"/channels/{quote(c, safe='')}/events"),
    channels.map(lambda c: f"/channels/{quote(c, safe='')}"),
    st.sampled_from(["/events", "/publish", "/server/send", "/server/events", "/healthz", "/readyz", "/metrics", "/",
                     "/openapi.json", "/static/app.js", "/static/../service/auth.py", "/static/%2e%2e/pyproject.toml",
                     "/channels", "/channels/", "//channels/chat/messages"]),
    nasty_text.map(lambda t: "/" + quote(t, safe="/%")),
)
queries = st.lists(
    st.tuples(st.sampled_from(["channel", "last_event_id", "token", "x"]), st.one_of(channels, tokens, nasty_text)),
    max_size=5,
)
methods = st.sampled_from(["GET", "POST", "POST", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])


# -- the tests -------------------------------------------------------------------------------------------------


def test_generated_requests_at_every_endpoint(target: Target) -> None:
    @EXAMPLES
    @given(method=methods, path=paths, params=queries, headers=headers, body=bodies)
    def fuzz(method: str, path: str, params: list[tuple[str, str]], headers: dict[str, Any], body: bytes | None) -> None:
        target.send(method, path, params, headers, body)

    fuzz()
    target.check_still_serving()
    assert sum(target.statuses.values()) >= 100, target.statuses  # most examples reached the service


def test_generated_publishes_with_generated_tokens(target: Target) -> None:
    """Publish-shaped requests only, so most examples get past routing and into auth and validation."""
    @EXAMPLES
    @given(channel=st.sampled_from(WATCHED) | channels, body=publish_bodies.map(orjson.dumps) | bodies, token=tokens,
           where=st.sampled_from(["header", "cookie", "query"]))
    def fuzz(channel: str, body: bytes | None, token: str, where: str) -> None:
        headers: dict[str, Any] = {}
        params: list[tuple[str, str]] = []
        if where == "header":
            headers["Authorization"] = f"Bearer {token}".encode(errors="replace")
        elif where == "cookie":
            headers["Cookie"] = f"sse_token={token}".encode(errors="replace")
        else:
            params.append(("token", token))
        status = target.send("POST", f"/channels/{quote(channel, safe='')}/messages", params, headers, body)
        if status and channel.startswith("priv-") and not _verifies(token):
            assert status in (400, 401, 403), (channel, token, status)  # a private channel never takes a stranger

    before = dict(target.statuses)
    fuzz()
    target.check_still_serving()
    seen = {code: n - before.get(code, 0) for code, n in target.statuses.items()}
    print("publish fuzz statuses:", seen)
    assert seen.get(202, 0) > 0 and seen.get(401, 0) > 0 and seen.get(422, 0) > 0, seen  # it reached every stage


def test_generated_streams_with_generated_cursors(target: Target) -> None:
    """Stream requests: each either refused with a 4xx or a 200 whose first bytes are well-formed."""
    @EXAMPLES
    @given(chans=st.lists(channels, min_size=0, max_size=4), last=headers, token=st.none() | tokens)
    def fuzz(chans: list[str], last: dict[str, Any], token: str | None) -> None:
        hdrs = dict(last)
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}".encode(errors="replace")
        params = [("channel", c) for c in chans]
        try:
            request = target.client.build_request("GET", "/events", params=params, headers=hdrs)
            resp = target.client.send(request, stream=True)
        except (httpx.InvalidURL, httpx.LocalProtocolError):
            return
        try:
            assert resp.status_code < 500
            if resp.status_code == 200:
                first = b""
                for chunk in resp.iter_raw():
                    first += chunk
                    if b"relay.hello" in first and first.endswith(b"\n\n"):
                        break
                parse_strict(first)
        finally:
            resp.close()

    fuzz()
    target.check_still_serving()


def test_raw_bytes_at_the_http_parser(target: Target) -> None:
    """Below httpx: arbitrary request lines and header bytes on a socket. An answer or a close, never a hang."""
    port = int(target.url.rsplit(":", 1)[1])

    @EXAMPLES
    @given(method=st.one_of(methods.map(str.encode), st.binary(max_size=10)),
           path=st.one_of(paths.map(str.encode), st.binary(max_size=80)),
           header_lines=st.lists(st.binary(max_size=80), max_size=5), body=st.binary(max_size=200))
    def fuzz(method: bytes, path: bytes, header_lines: list[bytes], body: bytes) -> None:
        request = method + b" " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        request += b"".join(h + b"\r\n" for h in header_lines) + b"\r\n" + body
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            try:
                s.sendall(request)
                s.shutdown(socket.SHUT_WR)
                head = b""
                while len(head) < 12 and (chunk := s.recv(12 - len(head))):
                    head += chunk
            except ConnectionResetError:
                return  # the server dropped a request it could not parse: fine
            except TimeoutError:
                raise AssertionError(f"no answer within 5 s to {request[:200]!r}") from None
        if head:
            assert head.startswith(b"HTTP/1.1 "), head
            assert head[9:10] != b"5", f"{head!r} for {request[:200]!r}"

    fuzz()
    target.check_still_serving()
