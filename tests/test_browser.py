"""The chat page in a real browser: Debian's chromium driven by Playwright, against redis and two replicas.

What a person does is what is tested: open a room by link, type and press Enter, watch messages arrive from
another replica, lose the replica the page is on, read hostile text as text, use the old chat page, and use a
phone. No browser is ever downloaded: Playwright drives `/usr/bin/chromium` through `executable_path`.

A small asyncio TCP proxy in this file stands in for the load balancer: every new connection goes to the first
backend that accepts it, so when the page's replica dies its EventSource reconnect lands on the other one.
With `prefix`, it also serves the service under a path prefix (one request per connection, prefix stripped),
which is how the page's relative URLs are proven.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http.server
import shutil
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from playwright.async_api import Browser, BrowserContext, Locator, Page, Route, async_playwright, expect

from .sse import SSEStream
from .support import ROOT, RedisServer, ServiceProcess, free_port

pytestmark = [pytest.mark.timeout(90), pytest.mark.redis, pytest.mark.slow]

WAIT_MS = 10_000  # every Playwright wait below is bounded by this (or an explicit smaller/larger timeout)
expect.set_options(timeout=WAIT_MS)

LEGACY_DIR = Path(__file__).resolve().parent / "legacy_chat"
SCREENSHOT = ROOT / "docs" / "screenshot.png"
PHONE_SCREENSHOT = ROOT / "docs" / "screenshot-phone.png"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str:
    path = shutil.which("chromium") or (Path("/usr/bin/chromium").exists() and "/usr/bin/chromium")
    if not path:
        pytest.fail(
            "chromium is not installed: run `bash .ci/run` or `apt-get install chromium` "
            "(the browser tests never download a browser)"
        )
    return str(path)


# -- a load balancer of our own ------------------------------------------------------------------------------


class Proxy:
    """TCP proxy on a free loopback port: each new connection goes to the first backend that accepts it."""

    def __init__(self, backends: list[int], prefix: str = "") -> None:
        self.backends = backends
        self.prefix = prefix.encode()
        self.port = free_port()
        self.routed: list[int] = []  # the backend port each connection went to, in order
        self.routed_at: list[float] = []  # and when (time.monotonic())
        self._gate = asyncio.Event()  # cleared: new connections wait (a load balancer not yet routing)
        self._gate.set()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> Proxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.close()
        if self._server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    def hold(self) -> None:
        """New connections wait, unanswered, until `release()` (as a balancer whose backend list is updating)."""
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    def drop(self) -> None:
        """Cut every open connection, as a network blip does."""
        for w in list(self._writers):
            w.close()

    def _rewrite(self, head: bytes) -> bytes:
        """Strip the prefix from the target; ask for `Connection: close` (one request per connection)."""
        lines = head.rstrip(b"\r\n").split(b"\r\n")
        method, target, version = lines[0].split(b" ", 2)
        if target == self.prefix or target.startswith((self.prefix + b"/", self.prefix + b"?")):
            target = target[len(self.prefix) :]
            if not target.startswith(b"/"):
                target = b"/" + target
        headers = [h for h in lines[1:] if not h.lower().startswith((b"connection:", b"keep-alive:"))]
        return (
            b"\r\n".join([b" ".join((method, target, version)), *headers, b"Connection: close"]) + b"\r\n\r\n"
        )

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            await self._gate.wait()
            for port in self.backends:
                with contextlib.suppress(OSError):
                    upstream = await asyncio.open_connection("127.0.0.1", port)
                    self.routed.append(port)
                    self.routed_at.append(time.monotonic())
                    break
            if upstream is None:
                return  # nobody is up: the client sees the connection close, as behind a real balancer
            up_reader, up_writer = upstream
            self._writers.add(up_writer)
            if self.prefix:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
                    return
                up_writer.write(self._rewrite(head))
            pipes = [
                asyncio.create_task(self._pipe(reader, up_writer)),
                asyncio.create_task(self._pipe(up_reader, writer)),
            ]
            # Either side ending ends the connection: a dead replica must look like a dropped stream.
            _, pending = await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        finally:
            for w in (writer, upstream[1] if upstream else None):
                if w is not None:
                    self._writers.discard(w)
                    w.close()

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while chunk := await src.read(65536):
                dst.write(chunk)
                await dst.drain()


# -- fixtures ------------------------------------------------------------------------------------------------


class Cluster:
    def __init__(self, redis: RedisServer, a: ServiceProcess, b: ServiceProcess) -> None:
        self.redis, self.a, self.b = redis, a, b


@pytest.fixture
def legacy_origin() -> Iterator[str]:
    """The old chat page served by a static HTTP server of its own: a different origin than the service."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(LEGACY_DIR))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture
def cluster(
    redis_server: RedisServer, services: list[ServiceProcess], tmp_path: Path, legacy_origin: str
) -> Cluster:
    """A redis-server and two replicas, quick to notice and announce a reconnect."""
    env = {
        "REDIS_URL": redis_server.url,
        "HEARTBEAT_INTERVAL": "1",
        "RETRY_MS": "300",
        "DRAIN_GRACE": "1",
        "CORS_ORIGINS": legacy_origin,
        "LOG_LEVEL": "warning",
    }
    a = ServiceProcess(tmp_path, env, name="replica-a")
    b = ServiceProcess(tmp_path, env, name="replica-b")
    services.extend([a, b])
    a.start(wait_ready=False)
    b.start(wait_ready=False)
    a.wait_ready()
    b.wait_ready()
    return Cluster(redis_server, a, b)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            await b.close()


OpenPage = Callable[..., Awaitable[Page]]


@pytest.fixture
async def open_page(browser: Browser) -> AsyncIterator[OpenPage]:
    """Opens a page in a fresh context (own localStorage, like another person); JS errors fail the test."""
    contexts: list[BrowserContext] = []
    errors: list[str] = []

    async def open_(url: str, name: str | None = None, **context_args: object) -> Page:
        context = await browser.new_context(**context_args)  # type: ignore[arg-type]
        context.set_default_timeout(WAIT_MS)
        contexts.append(context)
        page = await context.new_page()
        page.on("pageerror", lambda exc: errors.append(f"{url}: {exc}"))
        await page.goto(url)
        await expect(page.locator("#status")).to_have_attribute("data-state", "connected")
        if name is not None:
            await page.get_by_label("Display name").fill(name)
        return page

    yield open_
    for context in contexts:
        await context.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"


async def publish(base: str, room: str, name: str, text: str) -> str:
    async with httpx.AsyncClient(base_url=base, timeout=5) as c:
        r = await c.post(
            f"/channels/{room}/messages", json={"event": "chat", "data": {"name": name, "text": text}}
        )
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


async def say(page: Page, text: str) -> None:
    """Type a message the way a person does and press Enter."""
    box = page.get_by_label("Message")
    await box.fill(text)
    await box.press("Enter")
    await expect(box).to_have_value("")  # cleared only once the server accepted it


def texts(page: Page) -> Locator:
    return page.locator("#messages .text")


# -- tests ---------------------------------------------------------------------------------------------------


async def test_message_typed_on_one_replica_appears_on_the_other(
    cluster: Cluster, open_page: OpenPage
) -> None:
    alice = await open_page(f"{cluster.a.url}/?room=lobby", "alice", viewport={"width": 1000, "height": 640})
    bob = await open_page(f"{cluster.b.url}/#lobby", "bob", viewport={"width": 1000, "height": 640})
    await expect(alice.locator("#replica")).to_have_text("replica-a")
    await expect(bob.locator("#replica")).to_have_text("replica-b")
    await expect(alice.locator("#room-name")).to_have_text("lobby")
    await expect(bob.locator("#room-name")).to_have_text("lobby")

    await say(alice, "hi bob, this went through replica-a")
    await expect(texts(bob)).to_have_text(["hi bob, this went through replica-a"])
    await expect(bob.locator("#messages .who")).to_have_text(["alice"])
    await say(bob, "hi alice! replica-b here.\nSecond line, kept as a line.")
    long_text = (
        "A long message wraps inside its bubble instead of widening the page: "
        + "https://example.com/"
        + "a-very-long-path-segment-" * 8
    )
    await say(alice, long_text)
    conversation = [
        "hi bob, this went through replica-a",
        "hi alice! replica-b here.\nSecond line, kept as a line.",
        long_text,
    ]
    for page in (alice, bob):
        await expect(texts(page)).to_have_text(conversation, use_inner_text=False)
        await expect(page.locator("#messages .who")).to_have_text(["alice", "bob", "alice"])
        assert await page.evaluate(
            "document.documentElement.scrollWidth <= document.documentElement.clientWidth"
        )
    # Own messages are told apart from others'.
    await expect(alice.locator("#messages .msg.mine")).to_have_count(2)
    await expect(bob.locator("#messages .msg.mine")).to_have_count(1)

    # A newcomer joining later gets the room's history, and the name chosen is remembered on reload.
    carol = await open_page(f"{cluster.b.url}/?room=lobby", "carol", viewport={"width": 1000, "height": 640})
    await expect(texts(carol)).to_have_text(conversation, use_inner_text=False)
    await carol.reload()
    await expect(carol.get_by_label("Display name")).to_have_value("carol")
    await expect(texts(carol)).to_have_text(conversation, use_inner_text=False)
    await say(carol, "hello both, I just joined")
    await expect(texts(alice)).to_have_count(4)
    await expect(texts(bob)).to_have_count(4)
    SCREENSHOT.parent.mkdir(exist_ok=True)
    await bob.screenshot(path=str(SCREENSHOT))


@pytest.mark.parametrize("stop", ["kill -9", "SIGTERM"])
async def test_page_survives_its_replica_stopping_and_shows_each_message_once(
    cluster: Cluster, open_page: OpenPage, stop: str
) -> None:
    proxy = await Proxy([cluster.a.port, cluster.b.port]).start()
    try:
        page = await open_page(f"{proxy.url}/?room=failover", "dana")
        await expect(page.locator("#replica")).to_have_text("replica-a")
        # Record every connection state the page shows, to check the person was told about the drop.
        await page.evaluate("""() => {
            const s = document.getElementById('status'); window.__states = [s.dataset.state];
            new MutationObserver(() => window.__states.push(s.dataset.state))
                .observe(s, {attributes: true, childList: true, characterData: true, subtree: true});
        }""")
        await publish(cluster.b.url, "failover", "erin", "before the stop")
        await expect(texts(page)).to_have_text(["before the stop"])

        if stop == "kill -9":
            cluster.a.kill()
        else:
            cluster.a.signal(signal.SIGTERM)
        during = [
            f"sent while the replica was {'dead' if stop == 'kill -9' else 'draining'} #{i}" for i in range(5)
        ]
        for text in during:
            await publish(cluster.b.url, "failover", "erin", text)
        if stop == "SIGTERM":
            assert await asyncio.to_thread(cluster.a.wait, 15) == 0, cluster.a.log()

        await expect(page.locator("#replica")).to_have_text("replica-b")
        await expect(page.locator("#status")).to_have_attribute("data-state", "connected")
        await expect(texts(page)).to_have_text(["before the stop", *during])
        # A duplicate would come before this message on the same stream: once it is here, the list is final.
        await say(page, "and I can still talk")
        expected = ["before the stop", *during, "and I can still talk"]
        await expect(texts(page)).to_have_text(expected)
        shown = await texts(page).all_text_contents()
        assert shown == expected and all(shown.count(t) == 1 for t in expected)
        states = await page.evaluate("window.__states")
        assert "reconnecting" in states and states[-1] == "connected", states
        assert cluster.b.port in proxy.routed
    finally:
        await proxy.close()


@pytest.mark.parametrize("which", ["old chat page", "chat page"])
async def test_quiet_page_whose_replica_dies_before_any_message_misses_nothing(
    cluster: Cluster, open_page: OpenPage, browser: Browser, legacy_origin: str, which: str
) -> None:
    """Exactly once from the first byte: a page that has seen no message at all still resumes, from the id of
    its greeting (`relay.hello`), which the browser's EventSource keeps as its last event id."""
    proxy = await Proxy([cluster.a.port, cluster.b.port]).start()
    context = await browser.new_context()
    try:
        if which == "old chat page":
            page = await context.new_page()
            await page.goto(f"{legacy_origin}/index.html?base={proxy.url}")
            await expect(page.locator("#status")).to_have_text("connected")
            shown = page.locator("#log li")
        else:
            page = await open_page(f"{proxy.url}/?room=quiet", "gus")
            shown = texts(page)
        # the greeting has arrived (and with it the position): the stream is live on replica a
        async with httpx.AsyncClient(timeout=5) as c:
            info = (await c.get(f"{cluster.a.url}/channels/{'chat' if which == 'old chat page' else 'quiet'}")).json()
        assert info["subscribers"] >= 1
        await expect(shown).to_have_count(0)
        proxy.hold()  # the page's reconnect waits until the three are published, whatever the machine's load
        cluster.a.kill()
        killed = len(proxy.routed)
        texts_sent = [f"quiet #{i}" for i in range(3)]
        async with httpx.AsyncClient(base_url=cluster.b.url, timeout=5) as c:
            for text in texts_sent:
                if which == "old chat page":
                    r = await c.post("/server/send", json={"messages": [{"role": "user", "content": text}]})
                    assert r.status_code == 200, r.text
                else:
                    await publish(cluster.b.url, "quiet", "hal", text)
        published_at = time.monotonic()
        proxy.release()
        expected = [f"user: {t}" for t in texts_sent] if which == "old chat page" else texts_sent
        await expect(shown).to_have_text(expected)
        # the page's reconnect landed on replica b after all three were published
        reconnects = [at for port, at in zip(proxy.routed[killed:], proxy.routed_at[killed:], strict=True)
                      if port == cluster.b.port]
        assert reconnects and reconnects[0] > published_at
        # nothing more arrives: a sentinel through the same replica comes after any duplicate would
        async with httpx.AsyncClient(base_url=cluster.b.url, timeout=5) as c:
            if which == "old chat page":
                await c.post("/server/send", json={"messages": [{"role": "user", "content": "end"}]})
            else:
                await publish(cluster.b.url, "quiet", "hal", "end")
        await expect(shown).to_have_text([*expected, "user: end" if which == "old chat page" else "end"])
    finally:
        await context.close()
        await proxy.close()


async def test_page_rebuilds_its_view_when_its_place_in_history_expired(
    cluster: Cluster, services: list[ServiceProcess], tmp_path: Path, open_page: OpenPage
) -> None:
    # A replica keeping only ~10 messages per room (Redis trims approximately, in whole stream nodes).
    short = ServiceProcess(
        tmp_path,
        {
            "REDIS_URL": cluster.redis.url,
            "HISTORY_SIZE": "10",
            "RETRY_MS": "300",
            "HEARTBEAT_INTERVAL": "1",
            "LOG_LEVEL": "warning",
        },
        name="replica-short",
    )
    services.append(short)
    short.start()
    proxy = await Proxy([short.port]).start()
    try:
        page = await open_page(f"{proxy.url}/?room=expiry", "olga")
        for i in range(3):
            await publish(short.url, "expiry", "pat", f"old {i}")
        await expect(texts(page)).to_have_text(["old 0", "old 1", "old 2"])

        proxy.backends = []  # the page is cut off and cannot get back in ...
        proxy.drop()
        await expect(page.locator("#status")).to_have_attribute("data-state", "reconnecting")
        async with httpx.AsyncClient(base_url=short.url, timeout=5) as c:  # ... while the room moves on
            for i in range(400):
                r = await c.post(
                    "/channels/expiry/messages",
                    json={"event": "chat", "data": {"name": "pat", "text": f"new {i}"}},
                )
                assert r.status_code == 202
        proxy.backends = [short.port]

        # Its last id is gone: the relay sends relay.reset and replays what it retains; the page starts over.
        await expect(texts(page).last).to_have_text("new 399")
        await expect(page.locator("#status")).to_have_attribute("data-state", "connected")
        shown = await texts(page).all_text_contents()
        first = int(shown[0].split()[1])
        assert shown == [f"new {i}" for i in range(first, 400)], shown[:5]
        assert first > 3  # really trimmed, so this was a reset and not a plain resume
    finally:
        await proxy.close()


async def test_html_and_script_in_messages_show_as_text_and_never_run(
    cluster: Cluster, open_page: OpenPage
) -> None:
    page = await open_page(f"{cluster.a.url}/?room=xss", "mallory")
    img = "<img src=x onerror=window.__pwned=1>"
    script = "<script>window.__pwned=1</script>"
    await say(page, img)
    await say(page, script)
    # The same through the other paths a message can take: a hostile name, and the old chat's list format.
    await publish(cluster.b.url, "xss", '<img src=y onerror="window.__pwned=2">', "<b>bold?</b>")
    async with httpx.AsyncClient(base_url=cluster.b.url, timeout=5) as c:
        r = await c.post(
            "/channels/xss/messages",
            json={"data": [{"role": "<svg onload=window.__pwned=3>", "content": "<iframe src=x></iframe>"}]},
        )
        assert r.status_code == 202
    await expect(texts(page)).to_have_text([img, script, "<b>bold?</b>", "<iframe src=x></iframe>"])
    await expect(page.locator("#messages .who")).to_have_text(
        ["mallory", "mallory", '<img src=y onerror="window.__pwned=2">', "<svg onload=window.__pwned=3>"]
    )
    await say(page, "a last, plain message")  # later than any image error or script would have run
    await expect(texts(page)).to_have_count(5)
    await expect(
        page.locator("#messages img, #messages script, #messages svg, #messages iframe, #messages b")
    ).to_have_count(0)
    assert await page.evaluate("typeof window.__pwned") == "undefined"


async def test_old_chat_page_works_against_the_service_unchanged(
    cluster: Cluster, open_page: OpenPage, browser: Browser, legacy_origin: str
) -> None:
    new_page = await open_page(f"{cluster.a.url}/?room=chat", "frank")
    posts: list[tuple[str, str | None]] = []
    new_page.on("request", lambda r: posts.append((r.url, r.post_data)) if r.method == "POST" else None)
    old = await browser.new_context()
    try:
        legacy = await old.new_page()
        await legacy.goto(f"{legacy_origin}/index.html?base={cluster.b.url}")
        await expect(legacy.locator("#status")).to_have_text("connected")
        await legacy.get_by_label("Say").fill("hello from the old page <i>as text</i>")
        await legacy.get_by_label("Say").press("Enter")
        await expect(legacy.locator("#log li")).to_have_text(["user: hello from the old page <i>as text</i>"])
        # the new page shows what old pages post (unnamed events, a list of {role, content}) ...
        await expect(texts(new_page)).to_have_text(["hello from the old page <i>as text</i>"])
        await expect(new_page.locator("#messages .who")).to_have_text(["user"])
        # ... and publishes as docs/chat-page.md says, in every room: `chat` events on channels/chat/messages
        await say(new_page, "hello from the new page")
        assert [(url.removeprefix(cluster.a.url), orjson.loads(body or "null")["event"]) for url, body in posts] == [
            ("/channels/chat/messages", "chat")]
        sent = orjson.loads(posts[0][1] or "null")["data"]
        assert sent["name"] == "frank" and sent["text"] == "hello from the new page"
        assert abs(sent["ts"] - time.time() * 1000) < 60_000
        # old pages still see it: their stream shows the page's chat events in the old form
        await expect(legacy.locator("#log li")).to_have_text(
            ["user: hello from the old page <i>as text</i>", "frank: hello from the new page"]
        )
        await expect(texts(new_page)).to_have_text(["hello from the old page <i>as text</i>", "hello from the new page"])
        # and so does a client listening for `chat` events: the page's message is one
        async with SSEStream(f"{cluster.b.url}/channels/chat/events?last_event_id=0") as reader:
            await reader.wait_count(1, "chat")
            assert [d["text"] for d in reader.data("chat")] == ["hello from the new page"]
        # every message shows a time: the sender's, or (old pages send none) when the relay accepted it
        times = new_page.locator("#messages .msg time")
        await expect(times).to_have_count(2)
        for stamp in await times.evaluate_all("els => els.map(e => Date.parse(e.dateTime))"):
            assert abs(stamp - time.time() * 1000) < 60_000
    finally:
        await old.close()


async def test_page_loads_without_a_failed_request_and_has_its_icon(cluster: Cluster, browser: Browser) -> None:
    context = await browser.new_context()
    try:
        page = await context.new_page()
        failed: list[str] = []
        console: list[str] = []
        page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)
        page.on("requestfailed", lambda r: failed.append(f"failed {r.url}"))
        page.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
        await page.goto(f"{cluster.a.url}/?room=icons")
        await expect(page.locator("#status")).to_have_attribute("data-state", "connected")
        # the page names its icon (so no browser asks for a /favicon.ico that is not there), and it is served
        href = await page.locator('link[rel="icon"]').evaluate("el => el.href")
        assert href == f"{cluster.a.url}/static/favicon.svg"
        icon = await page.request.get(href)
        assert icon.status == 200 and icon.headers["content-type"].startswith("image/svg+xml")
        await say(page, "no errors here")
        await expect(texts(page)).to_have_text(["no errors here"])
        assert failed == [] and console == [], (failed, console)
    finally:
        await context.close()


async def test_private_room_shows_only_its_explanation(
    services: list[ServiceProcess], tmp_path: Path, browser: Browser
) -> None:
    svc = ServiceProcess(tmp_path, {"PUBLIC_CHANNELS": "chat", "LOG_LEVEL": "warning"}, name="private")
    services.append(svc)
    svc.start()
    context = await browser.new_context()
    try:
        page = await context.new_page()
        await page.goto(f"{svc.url}/?room=secret")
        await expect(page.locator("#status")).to_contain_text("this room is private")
        await expect(page.locator("#status")).to_have_attribute("data-state", "offline")
        empty_hint = "el => getComputedStyle(el, '::before').content"
        assert await page.locator("#messages").evaluate(empty_hint) == "none"
        # the public room, by the form: the invitation to talk is back, and so is the connection
        room = page.get_by_label("Room")
        await room.fill("chat")
        await room.press("Enter")
        await expect(page.locator("#status")).to_have_attribute("data-state", "connected")
        assert "Say hello" in await page.locator("#messages").evaluate(empty_hint)
    finally:
        await context.close()


async def test_rooms_by_link_and_by_form_under_a_path_prefix(cluster: Cluster, open_page: OpenPage) -> None:
    proxy = await Proxy([cluster.a.port], prefix="/relay").start()
    try:
        await publish(cluster.b.url, "alpha", "gus", "in alpha")
        await publish(cluster.b.url, "beta", "gus", "in beta")
        page = await open_page(f"{proxy.url}/relay/#alpha", "hana")
        await expect(texts(page)).to_have_text(["in alpha"])
        await expect(page).to_have_title("#alpha · sse-relay chat")

        room = page.get_by_label("Room")
        await room.fill("beta")
        await room.press("Enter")
        await expect(page).to_have_url(f"{proxy.url}/relay/?room=beta")
        await expect(texts(page)).to_have_text(["in beta"])
        await say(page, "posted under the prefix")
        await expect(texts(page)).to_have_text(["in beta", "posted under the prefix"])

        await page.go_back()
        await expect(page.locator("#room-name")).to_have_text("alpha")
        await expect(texts(page)).to_have_text(["in alpha"])
        await expect(page.locator("#status")).to_have_attribute("data-state", "connected")
    finally:
        await proxy.close()


async def test_view_follows_new_messages_unless_scrolled_up(cluster: Cluster, open_page: OpenPage) -> None:
    page = await open_page(f"{cluster.a.url}/?room=scroll", "ivan", viewport={"width": 800, "height": 500})
    for i in range(30):
        await publish(cluster.a.url, "scroll", "jo", f"line {i}")
    await expect(texts(page).last).to_have_text("line 29")
    await expect(texts(page).last).to_be_in_viewport()
    hint = page.get_by_role("button", name="New messages")
    await expect(hint).to_be_hidden()

    await page.locator("#messages").evaluate("el => { el.scrollTop = 0; }")
    await publish(cluster.a.url, "scroll", "jo", "arrived while reading above")
    await expect(hint).to_be_visible()
    await expect(texts(page).first).to_be_in_viewport()  # the reader was not yanked down
    await expect(texts(page).last).not_to_be_in_viewport()
    await hint.click()
    await expect(texts(page).last).to_have_text("arrived while reading above")
    await expect(texts(page).last).to_be_in_viewport()
    await expect(hint).to_be_hidden()


async def test_send_error_is_shown_and_the_typed_text_kept(cluster: Cluster, open_page: OpenPage) -> None:
    page = await open_page(f"{cluster.a.url}/?room=errors", "kim")
    cluster.redis.kill()
    box = page.get_by_label("Message")
    await box.fill("please do not lose me")
    await box.press("Enter")
    await expect(page.get_by_role("alert")).to_contain_text("Not sent")
    await expect(page.get_by_role("alert")).to_contain_text("broker is unavailable")
    await expect(box).to_have_value("please do not lose me")

    cluster.redis.start()
    # The person presses Enter again until it goes through; each press is one bounded attempt.
    for _ in range(50):
        await box.press("Enter")
        with contextlib.suppress(AssertionError):
            await expect(box).to_have_value("", timeout=300)
            break
    await expect(box).to_have_value("")
    await expect(page.get_by_role("alert")).to_be_hidden()
    await expect(texts(page)).to_have_text(["please do not lose me"])


async def test_a_send_whose_answer_was_lost_is_retried_without_appearing_twice(
    cluster: Cluster, open_page: OpenPage
) -> None:
    """The relay publishes the message but its answer never reaches the page (the test drops it on the way back,
    as a proxy or a network cut after the request would). The person presses Enter again: the retry carries the
    same Idempotency-Key, so the room shows the message once, and both pages agree."""
    page = await open_page(f"{cluster.a.url}/?room=lost_answer", "lee")
    other = await open_page(f"{cluster.b.url}/?room=lost_answer", "max")
    keys: list[str | None] = []
    dropped = asyncio.Event()

    async def drop_first_answer(route: Route) -> None:
        keys.append(await route.request.header_value("idempotency-key"))
        if dropped.is_set():
            await route.continue_()
            return
        answer = await route.fetch()  # the relay gets the request and publishes it
        assert answer.status == 202, await answer.text()
        dropped.set()
        await route.abort("connectionreset")  # ...and the page never sees the answer

    await page.route("**/channels/lost_answer/messages", drop_first_answer)
    box = page.get_by_label("Message")
    await box.fill("said once, sent twice")
    await box.press("Enter")
    await expect(page.get_by_role("alert")).to_contain_text("No answer from the server")
    await expect(box).to_have_value("said once, sent twice")
    await box.press("Enter")
    await expect(box).to_have_value("")
    await expect(page.get_by_role("alert")).to_be_hidden()
    assert len(keys) == 2 and keys[0] and keys[0] == keys[1], keys
    # A marker after it: had the retry been published again, the copy would come before the marker.
    await say(other, "and this came after")
    for p in (page, other):
        await expect(texts(p)).to_have_text(["said once, sent twice", "and this came after"])
    # The next message is a new one, with a key of its own.
    await say(page, "a new message")
    assert len(keys) == 3 and keys[2] != keys[0], keys
    await expect(texts(other)).to_have_text(["said once, sent twice", "and this came after", "a new message"])


async def test_phone_sized_screen_is_usable(cluster: Cluster, open_page: OpenPage) -> None:
    page = await open_page(
        f"{cluster.a.url}/?room=phone",
        "lee",
        viewport={"width": 390, "height": 844},
        device_scale_factor=2,
        is_mobile=True,
        has_touch=True,
    )
    for label in ("Room", "Display name", "Message"):
        await expect(page.get_by_label(label)).to_be_visible()
        await expect(page.get_by_label(label)).to_be_in_viewport()
    for name in ("Send", "Join"):
        await expect(page.get_by_role("button", name=name)).to_be_in_viewport()
    await expect(page.get_by_role("status")).to_have_text("Connected")
    await expect(page.locator("#replica")).to_have_text("replica-a")
    await say(page, "x" * 600)  # one unbreakable word, far wider than the screen
    await say(page, "short one")
    await expect(texts(page)).to_have_count(2)
    assert await page.evaluate("document.documentElement.scrollWidth") <= 390
    assert await page.evaluate("document.getElementById('messages').scrollWidth") <= await page.evaluate(
        "document.getElementById('messages').clientWidth"
    )
    box = await texts(page).first.bounding_box()
    assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390
    await expect(page.get_by_label("Message")).to_be_in_viewport()
    PHONE_SCREENSHOT.parent.mkdir(exist_ok=True)
    await page.screenshot(path=str(PHONE_SCREENSHOT))
