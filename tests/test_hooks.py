"""Your backend decides (issue 27): the authorization hook, the publish hook, ending a user's streams on every
replica, and what happens when the backend is slow, down or talking nonsense.

In this event loop: the hooks as the app's own coroutines (a FastAPI app mounting the relay), the failure modes,
and the hook client's own bounds (coalescing, the cache's ceiling, forgetting). In processes of their own: a
FastAPI backend with a cookie session (tests/hook_backend.py) in front of two relay replicas on a real
redis-server: allowed, denied, banned mid-stream, moderated, the backend slow, garbage or gone; and a reconnect
storm of 2,000 streams whose hook calls stay bounded.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from fastapi import FastAPI, Request
from playwright.async_api import Page, async_playwright, expect

from service import Settings, create_app
from service.hooks import AuthDecision, AuthHook, AuthQuestion, HookFailed, PublishQuestion
from service.relay import Relay

from .sse import SSEStream, open_streams, wait_all
from .support import (
    ROOT,
    SECRET,
    Nginx,
    RedisServer,
    ServiceProcess,
    bearer,
    free_port,
    running_app,
    token,
    wait_port,
)
from .test_browser import CHROMIUM_ARGS, WAIT_MS, chromium_path, say

pytestmark = pytest.mark.timeout(120)

ADMIN_KEY = "admin-key-" + "x" * 20


# -- the hooks as the app's own coroutines, in a mounted app ----------------------------------------------------


class ChatApp:
    """What an app embedding the relay writes: a session cookie, a ban list, and the two hooks."""

    def __init__(self) -> None:
        self.sessions = {"s-alice": "alice", "s-bob": "bob"}
        self.banned: set[str] = set()
        self.auth_calls: list[AuthQuestion] = []
        self.stored: list[Any] = []

    async def may(self, question: AuthQuestion) -> dict[str, Any]:
        self.auth_calls.append(question)
        request: Request = question.request
        user = self.sessions.get(request.cookies.get("session", ""))
        if user is None or user in self.banned:
            return {"allow": False, "reason": "banned" if user else "log in first"}
        return {"allow": all(c.startswith("room-") for c in question.channels), "user": user, "cache_seconds": 30}

    async def moderate(self, question: PublishQuestion) -> dict[str, Any]:
        text = question.data.get("text", "") if isinstance(question.data, dict) else ""
        if "spam" in text:
            return {"accept": False, "status": 422, "code": "spam", "message": "no spam here"}
        self.stored.append((question.user, question.channel, question.data))
        return {"accept": True, "data": {"text": text.replace("badword", "***"), "by": question.user}}


async def test_embedded_hooks_in_a_mounted_fastapi_app() -> None:
    chat = ChatApp()
    settings = Settings.from_env({}, heartbeat_interval=0.2, jwt_secret=SECRET, publish_rate_limit=0,
                                 max_streams_per_client=0, instance_id="embedded")
    relay = Relay(settings, auth_hook=chat.may, publish_hook=chat.moderate)
    app = FastAPI(lifespan=relay.lifespan)
    app.mount("/rt", create_app(relay=relay))
    alice, bob = {"Cookie": "session=s-alice"}, {"Cookie": "session=s-bob"}
    async with running_app(app) as url, httpx.AsyncClient(base_url=url + "/rt") as c:
        # No session: the backend says no, the stream gets 403 and publishing nothing.
        anon = await c.get("/channels/room-1/events")
        assert anon.status_code == 403 and anon.json()["error"]["code"] == "denied"
        assert "log in first" in anon.json()["error"]["message"]
        assert (await c.post("/channels/room-1/messages", json={"data": {}})).status_code == 403
        # Public and token-granted channels never reach the hook.
        calls = len(chat.auth_calls)
        assert (await c.post("/channels/chat/messages", json={"data": {"text": "hi"}})).status_code == 202
        tok = bearer(token(sub="svc", publish=["ops-*"], subscribe=["ops-*"]))
        assert (await c.post("/channels/ops-1/messages", json={"data": {"text": "x"}}, headers=tok)).status_code == 202
        assert len(chat.auth_calls) == calls
        async with SSEStream(f"{url}/rt/channels/room-1/events", headers=alice) as a, \
                SSEStream(f"{url}/rt/events?channel=room-1&channel=chat", headers=bob) as b:
            # The hook saw the private channel alone, with the session's cookie.
            assert chat.auth_calls[-1].channels == ("room-1",) and chat.auth_calls[-1].cookie == "session=s-bob"
            # Moderated on the way: replaced, stored by the app, or refused with the app's own status.
            resp = await c.post("/channels/room-1/messages", json={"data": {"text": "a badword"}, "event": "chat"},
                                headers=alice)
            assert resp.status_code == 202, resp.text
            spam = await c.post("/channels/room-1/messages", json={"data": {"text": "spam!"}}, headers=alice)
            assert spam.status_code == 422 and spam.json()["error"]["code"] == "spam"
            await a.wait_count(1, "chat")
            assert a.data("chat") == [{"text": "a ***", "by": "alice"}]
            # (every client publish meets the publish hook, the public room's and the token holder's too)
            assert chat.stored[-1] == ("alice", "room-1", {"text": "a badword"})
            assert [user for user, _, _ in chat.stored] == [None, "svc", "alice"]
            # The hook's user is who the relay counts: the presence and the end command know her.
            assert (await c.get("/channels/room-1", headers=alice)).json()["subscribers"] == 2
            calls = len(chat.auth_calls)
            chat.banned.add("alice")
            assert await relay.end_streams(user="alice", reason="banned") == 1
            await a.ended.wait()
            assert a.data("relay.ended") == [{"reason": "banned"}]
            assert not b.ended.is_set()
            # Her next open asks the app again (the cached allow is gone), and is refused.
            again = await c.get("/channels/room-1/events", headers=alice)
            assert again.status_code == 403 and "banned" in again.json()["error"]["message"]
            assert len(chat.auth_calls) == calls + 1
            metrics = (await c.get("/metrics")).text
            assert 'sse_hook_calls_total{hook="auth"}' in metrics and 'sse_hook_calls_total{hook="publish"}' in metrics
            assert 'sse_auth_hook_saved_total{by="cache"}' in metrics
            assert 'sse_auth_hook_denied_total{action="subscribe"} 2.0' in metrics
            # Ending a channel ends everyone's streams on it, whoever authorized them.
            assert await relay.end_streams(channel="room-1", reason="room closed") == 1
            await b.ended.wait()
            assert b.data("relay.ended") == [{"reason": "room closed"}]


# -- failing closed ----------------------------------------------------------------------------------------------


async def _relay_with(hook: Any, **overrides: Any) -> Relay:
    options: dict[str, Any] = {"heartbeat_interval": 0.2, "publish_rate_limit": 0, "max_streams_per_client": 0,
                               "hook_timeout": 0.2, "retry_ms": 1000}
    options.update(overrides)
    return Relay(Settings.from_env({}, **options), auth_hook=hook if callable(hook) else None)


@pytest.mark.parametrize("behaviour", ["slow", "raises", "garbage", "unreachable"])
async def test_a_hook_without_a_usable_answer_refuses_in_bounded_time(behaviour: str) -> None:
    """Fail closed: publish 503 named for the failure, stream 200 + `relay.unavailable` + `retry:` (an EventSource
    comes back by itself later), never an allow, a hang or a 500."""
    async def hook(question: AuthQuestion) -> Any:
        if behaviour == "slow":
            await asyncio.sleep(30)
        if behaviour == "raises":
            raise KeyError("session")
        return "yes"

    kind = {"slow": "timeout", "raises": "invalid", "garbage": "invalid", "unreachable": "unreachable"}[behaviour]
    if behaviour == "unreachable":
        settings = Settings.from_env({}, heartbeat_interval=0.2, hook_timeout=0.5, retry_ms=1000,
                                     auth_hook_url=f"http://127.0.0.1:{free_port()}/hook")
        relay = Relay(settings)
    else:
        relay = await _relay_with(hook)
    async with running_app(create_app(relay=relay)) as url, httpx.AsyncClient(base_url=url) as c:
        started = time.monotonic()
        resp = await c.post("/channels/room/messages", json={"data": 1}, headers={"Cookie": "session=x"})
        assert time.monotonic() - started < 1.5
        assert resp.status_code == 503 and resp.json()["error"]["code"] == f"auth_hook_{kind}", resp.text
        assert resp.headers["retry-after"] == "1"
        stream = SSEStream(f"{url}/channels/room/events").start()
        await asyncio.wait_for(stream.ended.wait(), 3)
        assert stream.statuses == [200] and stream.hellos == 0 and 500 <= (stream.retry or 0) <= 1500
        assert stream.data("relay.unavailable")[0]["reason"] == f"auth_hook_{kind}"
        assert (await relay.broker.history("room", None, 10)).messages == []
        assert relay.auth_hook is not None and relay.auth_hook.failures.get(kind, 0) >= 2


async def test_a_publish_hook_answer_outside_the_contract_publishes_nothing() -> None:
    answers: list[Any] = [{"accept": True, "data": "x" * 70000}, {"accept": False, "status": 500},
                          {"accept": "yes"}, {"accept": False, "code": "bad code!"}, ["accept"]]

    async def moderate(question: PublishQuestion) -> Any:
        return answers.pop(0)

    relay = Relay(Settings.from_env({}, public_channels=("*",), publish_rate_limit=0), publish_hook=moderate)
    async with running_app(create_app(relay=relay)) as url, httpx.AsyncClient(base_url=url) as c:
        while answers:
            resp = await c.post("/channels/room/messages", json={"data": "hi"})
            assert resp.status_code == 503 and resp.json()["error"]["code"] == "publish_hook_invalid", resp.text
        assert (await relay.broker.history("room", None, 10)).messages == []


async def test_calls_in_flight_are_capped_and_the_wait_for_a_slot_is_bounded() -> None:
    release = asyncio.Event()
    in_flight = 0
    peak = 0

    async def hook(question: AuthQuestion) -> dict[str, Any]:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            await release.wait()
        finally:
            in_flight -= 1
        return {"allow": True}

    relay = await _relay_with(hook, hook_concurrency=4)
    async with running_app(create_app(relay=relay)) as url, httpx.AsyncClient(base_url=url, timeout=5) as c:
        answers = await asyncio.gather(*(
            c.post("/channels/room/messages", json={"data": i}, headers={"Cookie": f"session={i}"}) for i in range(12)))
        codes = [r.json()["error"]["code"] for r in answers]
        # four calls at a time; the others waited for a slot until the same deadline, then were refused as busy
        assert peak == 4 and set(codes) == {"auth_hook_busy", "auth_hook_timeout"}, codes
        assert all(r.status_code == 503 for r in answers)


async def test_identical_questions_share_one_call_and_the_cache_has_a_ceiling() -> None:
    calls = 0
    gate = asyncio.Event()

    async def hook(question: AuthQuestion) -> AuthDecision:
        nonlocal calls
        calls += 1
        await gate.wait()
        return AuthDecision(True, question.cookie, cache_seconds=60)

    hook_client = AuthHook(hook, timeout=2, concurrency=8, cache_size=10)
    same = AuthQuestion("subscribe", ("room",), "127.0.0.1", "session=a")
    waiting = [asyncio.ensure_future(hook_client.decide(same)) for _ in range(500)]
    await asyncio.sleep(0)
    gate.set()
    assert {d.user for d in await asyncio.gather(*waiting)} == {"session=a"}
    assert calls == 1 and hook_client.coalesced == 499
    assert (await hook_client.decide(same)).allow and calls == 1  # remembered
    for i in range(50):
        await hook_client.decide(AuthQuestion("subscribe", ("room",), "127.0.0.1", f"session={i}"))
    assert len(hook_client) == 10 and calls == 51
    # Forgetting a user drops their decisions; a call in flight when it happens is not remembered.
    assert hook_client.forget(user="session=49") == 1
    gate.clear()
    pending = asyncio.ensure_future(hook_client.decide(AuthQuestion("subscribe", ("x",), "a", "session=x")))
    await asyncio.sleep(0)
    hook_client.forget(user="session=x")
    gate.set()
    assert (await pending).allow
    assert calls == 53  # asked twice: the first answer may predate the ban
    await hook_client.close()


async def test_failures_are_not_remembered_and_waiters_all_get_them() -> None:
    async def hook(question: AuthQuestion) -> Any:
        await asyncio.sleep(0.01)
        return {"allow": "maybe"}

    hook_client = AuthHook(hook, timeout=1)
    question = AuthQuestion("publish", ("room",), "a", "c")
    results = await asyncio.gather(*(hook_client.decide(question) for _ in range(20)), return_exceptions=True)
    assert all(isinstance(r, HookFailed) and r.kind == "invalid" for r in results)
    assert hook_client.calls == 1 and len(hook_client) == 0
    await hook_client.close()


# -- a real backend in its own process, two replicas, a real Redis ----------------------------------------------


class Backend:
    """tests/hook_backend.py under uvicorn, on a free port."""

    def __init__(self, tmp: Path, port: int, relay_url: str, cache_seconds: float = 60) -> None:
        self.port = port
        self.log_path = tmp / f"backend-{self.port}.log"
        self.env = {**os.environ, "RELAY_URL": relay_url, "ADMIN_API_KEY": ADMIN_KEY,
                    "CACHE_SECONDS": str(cache_seconds), "SLOW_SECONDS": "3"}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Backend:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "tests.hook_backend:app", "--host", "127.0.0.1", "--port",
                 str(self.port), "--log-level", "warning", "--no-access-log"],
                cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        wait_port(self.port, 15)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    async def login(self, user: str) -> dict[str, str]:
        async with httpx.AsyncClient(base_url=self.url) as c:
            resp = await c.post("/login", json={"user": user})
            return {"Cookie": f"session={resp.cookies['session']}"}

    async def call(self, path: str, body: dict[str, Any] | None = None) -> Any:
        async with httpx.AsyncClient(base_url=self.url, timeout=10) as c:
            resp = await (c.post(path, json=body) if body is not None else c.get(path))
            assert resp.status_code == 200, resp.text
            return resp.json()


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", appendonly=False)
    server.dir.mkdir()
    server.start()
    yield server
    server.stop()


def _replicas(tmp: Path, redis: RedisServer, backend_port: int, services: list[ServiceProcess],
              **env: str) -> list[ServiceProcess]:
    base = {"REDIS_URL": redis.url, "PUBLIC_CHANNELS": "chat", "HEARTBEAT_INTERVAL": "0.5", "RETRY_MS": "500",
            "AUTH_HOOK_URL": f"http://127.0.0.1:{backend_port}/hooks/auth",
            "PUBLISH_HOOK_URL": f"http://127.0.0.1:{backend_port}/hooks/publish",
            "ADMIN_API_KEY": ADMIN_KEY, "LOG_LEVEL": "warning", **env}
    replicas = [ServiceProcess(tmp, base, name=f"r{i}") for i in range(2)]
    services.extend(replicas)
    for r in replicas:
        r.start(wait_ready=False)
    for r in replicas:
        r.wait_ready()
    return replicas


async def test_a_cookie_backend_over_two_replicas(tmp_path: Path, redis: RedisServer,
                                                  services: list[ServiceProcess]) -> None:
    backend_port = free_port()
    a, b = _replicas(tmp_path, redis, backend_port, services)
    backend = Backend(tmp_path, backend_port, a.url).start()
    try:
        alice, bob, carol = [await backend.login(u) for u in ("alice", "bob", "carol")]
        async with httpx.AsyncClient(timeout=5) as c:
            # Denied: no session, or a channel the backend keeps for someone else.
            for url in (a.url, b.url):
                assert (await c.get(f"{url}/channels/room-1/events")).status_code == 403
                denied = await c.get(f"{url}/channels/private-bob/events", headers=alice)
                assert denied.status_code == 403 and "alice may not subscribe" in denied.json()["error"]["message"]
            streams = [SSEStream(f"{a.url}/channels/room-1/events", headers=alice),
                       SSEStream(f"{b.url}/events?channel=room-1&channel=private-alice", headers=alice),
                       SSEStream(f"{b.url}/channels/room-1/events", headers=bob)]
            await open_streams(streams, 10)
            a1, a2, b1 = streams
            # Allowed and moderated: masked on the way, refused with the backend's status, stored by the backend.
            ok = await c.post(f"{b.url}/channels/room-1/messages", headers={**alice, "Origin": b.url},
                              json={"data": {"text": "hello badword"}, "event": "chat"})
            assert ok.status_code == 202, ok.text
            spam = await c.post(f"{a.url}/channels/room-1/messages", headers=bob, json={"data": {"text": "spam"}})
            assert spam.status_code == 422 and spam.json()["error"] == {"code": "spam", "message": "no spam here"}
            # A browser on another site cannot publish with the cookie (CSRF), and the backend is not even asked.
            calls = (await backend.call("/stats"))["publish_calls"]
            csrf = await c.post(f"{a.url}/channels/room-1/messages", headers={**bob, "Origin": "https://evil.example"},
                                json={"data": {"text": "x"}})
            assert csrf.status_code == 403 and csrf.json()["error"]["code"] == "cross_site_publish"
            await wait_all(streams[:3:2], lambda s: len(s.named("chat")) == 1, 10, "the chat message")
            assert a1.data("chat") == [{"text": "hello ***"}]
            assert (await backend.call("/stats"))["publish_calls"] == calls
            assert [h["user"] for h in await backend.call("/history")] == ["alice"]

            # Banned mid-stream: the backend bans her and asks replica a; her streams end on both replicas.
            banned = await backend.call("/ban", {"user": "alice"})
            assert banned["relay_status"] == 202 and banned["relay"]["ended_here"] == 1
            await asyncio.wait_for(asyncio.gather(a1.ended.wait(), a2.ended.wait()), 5)
            assert a1.data("relay.ended") == a2.data("relay.ended") == [{"reason": "banned"}]
            assert not b1.ended.is_set()
            # Her cached allow is gone everywhere: the reconnect asks the backend, which refuses.
            for url in (a.url, b.url):
                again = await c.get(f"{url}/channels/room-1/events", headers=alice)
                assert again.status_code == 403 and "banned" in again.json()["error"]["message"]
            await backend.call("/unban", {"user": "alice"})
            # (the backend let the relay cache the ban for 5 s: unbanning takes that long at most)
            resp = await c.post(f"{a.url}/channels/room-1/messages", headers=bob, json={"data": {"text": "still"}})
            assert resp.status_code == 202
            await b1.wait(lambda s: len(s.events) == 2, 5, "bob's stream goes on")

            # The backend misbehaves: carol (never cached) is refused by name, bob (cached) still streams.
            for mode, kind in (("garbage", "invalid"), ("error", "invalid"), ("slow", "timeout")):
                await backend.call("/mode", {"mode": mode})
                started = time.monotonic()
                resp = await c.post(f"{a.url}/channels/room-1/messages", headers=carol, json={"data": 1})
                assert resp.status_code == 503 and resp.json()["error"]["code"] == f"auth_hook_{kind}", resp.text
                assert time.monotonic() - started < 1.5
                turned = SSEStream(f"{b.url}/channels/room-1/events", headers=carol).start()
                await asyncio.wait_for(turned.ended.wait(), 5)
                assert turned.statuses == [200] and turned.data("relay.unavailable")[0]["reason"] == f"auth_hook_{kind}"
                async with SSEStream(f"{b.url}/channels/room-1/events", headers=bob) as cached:
                    assert cached.hellos == 1
            backend.stop()
            resp = await c.post(f"{b.url}/channels/room-1/messages", headers=carol, json={"data": 1})
            assert resp.json()["error"]["code"] == "auth_hook_unreachable"
            # bob is still allowed from the cache, but his message cannot be moderated: nothing goes out.
            resp = await c.post(f"{a.url}/channels/room-1/messages", headers=bob, json={"data": {"text": "hm"}})
            assert resp.status_code == 503 and resp.json()["error"]["code"] == "publish_hook_unreachable"
            assert len(b1.events) == 2
            for s in streams:
                await s.close()
    finally:
        backend.stop()


async def test_reconnect_storm_of_2000_streams_makes_a_bounded_number_of_hook_calls(
        tmp_path: Path, redis: RedisServer, services: list[ServiceProcess]) -> None:
    """2,000 streams of 100 sessions over 20 rooms open at once across two replicas, twice: with a cold cache the
    backend is asked at most once per distinct question per replica (100 × 2), never more than HOOK_CONCURRENCY
    at a time per replica; with a warm one not at all. Every stream is greeted both times."""
    backend_port = free_port()
    replicas = _replicas(tmp_path, redis, backend_port, services, HOOK_CONCURRENCY="16", HOOK_TIMEOUT="2")
    backend = Backend(tmp_path, backend_port, replicas[0].url).start()
    try:
        sessions = [await backend.login(f"user{i}") for i in range(100)]

        def storm() -> list[SSEStream]:
            return [SSEStream(f"{replicas[i % 2].url}/channels/room-{(i // 2) % 20}/events",
                              headers=sessions[(i // 2) % 100], reconnect=True, retry_delay=0.5)
                    for i in range(2000)]

        for round_, bound in (("cold", 200), ("warm", 0)):
            before = (await backend.call("/stats"))["auth_calls"]
            started = time.monotonic()
            streams = await open_streams(storm(), 90)
            took = time.monotonic() - started
            calls = (await backend.call("/stats"))["auth_calls"] - before
            # A stream turned away (the hook too slow for HOOK_TIMEOUT on a loaded box) comes back like an
            # EventSource after its `retry:`, and may cost one more call: counted, and shown.
            refused = Counter(e["reason"] for s in streams for e in s.data("relay.unavailable"))
            print(f"\n{round_} cache: 2000 streams greeted in {took:.1f}s, {calls} hook calls, turned away "
                  f"for a while: {dict(refused) or 'none'}")
            assert calls <= bound + refused.total(), f"{round_}: {calls} hook calls for 2000 streams"
            for s in streams:
                await s.close()
        stats = await backend.call("/stats")
        assert stats["max_in_flight"] <= 32, stats
    finally:
        backend.stop()


async def test_admin_api_is_closed_without_its_key() -> None:
    if True:
        relay = Relay(Settings.from_env({}, admin_api_key=ADMIN_KEY))
        async with running_app(create_app(relay=relay)) as url, httpx.AsyncClient(base_url=url) as c:
            for headers in ({}, {"Authorization": "Bearer nope"}, {"Cookie": f"x={ADMIN_KEY}"}):
                resp = await c.post("/admin/end", json={"user": "a"}, headers=headers)
                assert resp.status_code == 401 and resp.headers["www-authenticate"].startswith("Bearer")
            key = {"Authorization": f"Bearer {ADMIN_KEY}"}
            assert (await c.post("/admin/end", json={}, headers=key)).status_code == 422
            resp = await c.post("/admin/end", json={"channel": "room"}, headers=key)
            assert resp.status_code == 202 and resp.json()["ended_here"] == 0
        closed = Relay(Settings.from_env({}))
        async with running_app(create_app(relay=closed)) as url, httpx.AsyncClient(base_url=url) as c:
            resp = await c.post("/admin/end", json={"user": "a"}, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
            assert resp.status_code == 401 and "ADMIN_API_KEY" in resp.json()["error"]["message"]


# -- the chat page with a cookie session, through the shipped nginx, in Chromium ---------------------------------


async def test_chat_page_with_a_cookie_session_through_nginx(
        tmp_path: Path, redis: RedisServer, services: list[ServiceProcess]) -> None:
    """Two people log in at the backend (a cookie, then a redirect to the page), chat in a private room through
    nginx in front of two replicas, one of them is moderated, then banned: her page is told and stays out, his
    goes on; a visitor without a session never gets in."""
    backend_port = free_port()
    base = {"REDIS_URL": redis.url, "PUBLIC_CHANNELS": "chat", "HEARTBEAT_INTERVAL": "1", "RETRY_MS": "300",
            "AUTH_HOOK_URL": f"http://127.0.0.1:{backend_port}/hooks/auth",
            "PUBLISH_HOOK_URL": f"http://127.0.0.1:{backend_port}/hooks/publish",
            "ADMIN_API_KEY": ADMIN_KEY, "LOG_LEVEL": "warning"}
    replicas = [ServiceProcess(tmp_path, base, name=f"replica-{x}") for x in "ab"]
    nginx = Nginx([r.port for r in replicas])
    for r in replicas:  # nginx passes Host without its port: the page's origin is listed (docs/security.md)
        r.env["CORS_ORIGINS"] = nginx.url
    services.extend(replicas)
    for r in replicas:
        r.start(wait_ready=False)
    for r in replicas:
        r.wait_ready()
    backend = Backend(tmp_path, backend_port, replicas[0].url).start()
    nginx.start()
    errors: list[str] = []
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)

        async def open_page(url: str, name: str | None = None) -> Page:
            """A person of their own (a fresh context: cookies, localStorage); JS errors fail the test."""
            context = await browser.new_context()
            context.set_default_timeout(WAIT_MS)
            page = await context.new_page()
            page.on("pageerror", lambda exc: errors.append(f"{url}: {exc}"))
            await page.goto(url)
            if name is not None:
                await expect(page.locator("#status")).to_have_attribute("data-state", "connected")
                await page.get_by_label("Display name").fill(name)
            return page

        try:
            await _chat_through_nginx(backend, nginx, open_page)
        finally:
            await browser.close()
            backend.stop()
            nginx.stop()
    assert errors == [], f"JavaScript errors on the page: {errors}"


async def _chat_through_nginx(backend: Backend, nginx: Nginx, open_page: Any) -> None:
    """The conversation the test above sets up: allowed, moderated, banned, and a visitor kept out."""
    room = f"{nginx.url}/?room=room-1"
    alice = await open_page(f"{backend.url}/enter?user=alice&next={quote(room)}", "alice")
    bob = await open_page(f"{backend.url}/enter?user=bob&next={quote(room)}", "bob")
    await say(alice, "hello badword")
    await expect(bob.locator("#messages .text")).to_have_text(["hello ***"])
    await expect(bob.locator("#messages .who")).to_have_text(["alice"])
    assert [h["user"] for h in await backend.call("/history")] == ["alice"]
    await say(bob, "hi alice")
    await expect(alice.locator("#messages .text")).to_have_text(["hello ***", "hi alice"])

    banned = await backend.call("/ban", {"user": "alice"})
    assert banned["relay_status"] == 202
    # Her stream ends (relay.ended), the browser reconnects, the backend refuses: the page says so and waits.
    await expect(alice.locator("#status")).to_have_attribute("data-state", "offline")
    await expect(alice.locator("#status")).to_contain_text("this room is private: the backend refused subscribe on "
                                                           "'room-1': banned")
    await say(bob, "still here")
    await expect(bob.locator("#messages .text")).to_have_text(["hello ***", "hi alice", "still here"])
    await expect(bob.locator("#status")).to_have_attribute("data-state", "connected")
    await expect(alice.locator("#messages .text")).to_have_text(["hello ***", "hi alice"])

    visitor = await open_page(room)
    await expect(visitor.locator("#status")).to_contain_text("not logged in")
