"""Every Python snippet of README and docs/ runs against a live relay, failure paths included, and the examples do
what their headers say (issue 24: a docs consumer that looped 2,000 times in 3 s on a 401, examples that 401'd
or published what the page never shows)."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from service import Settings
from service.publisher import Publisher

from .sse import SSEStream
from .support import ROOT, RedisServer, ServiceProcess, eventually, free_port, running_app
from .test_readme import pages

pytestmark = pytest.mark.timeout(90)


def python_snippets() -> dict[str, str]:
    """Every ```python block of README and docs/, named `page:first line`."""
    found = {}
    for page in pages():
        for m in re.finditer(r"```python\n(.*?)```", page.read_text(), re.S):
            found[f"{page.relative_to(ROOT)}:{m.group(1).splitlines()[0]}"] = m.group(1)
    return found


def snippet(marker: str) -> str:
    hits = [body for body in python_snippets().values() if marker in body]
    assert len(hits) == 1, f"{len(hits)} Python snippets with {marker!r}"
    return hits[0]


MOUNT, PUBLISH, READ, MINT = "app.mount(", "Publisher(os.environ", "connect_sse(", "from service.tokens import mint"


def test_every_python_snippet_is_run_by_a_test_here() -> None:
    """A new snippet must get its test: each one is claimed by exactly one marker below."""
    for name, body in python_snippets().items():
        assert sum(marker in body for marker in (MOUNT, PUBLISH, READ, MINT)) == 1, f"{name} is not run by a test"
    assert len(python_snippets()) == 4


async def test_the_mount_snippet_serves_its_channel_out_of_the_box() -> None:
    """The mount example's `/realtime/channels/orders/events` answers 200 (it was 401) and gets the ship route's
    event."""
    namespace: dict[str, Any] = {}
    exec(compile(snippet(MOUNT), "docs/python.md", "exec"), namespace)  # noqa: S102 - the docs' own code
    async with running_app(namespace["app"]) as url, httpx.AsyncClient(base_url=url) as c:
        async with SSEStream(f"{url}/realtime/channels/orders/events") as stream:
            shipped = (await c.post("/orders/7/ship")).json()
            await stream.wait_count(1, "order")
            assert stream.named("order")[0].data == {"id": "7", "state": "shipped"}
            assert stream.named("order")[0].id == shipped["event_id"]


@pytest.mark.redis
async def test_the_publisher_snippet_reaches_a_stream(redis_server: RedisServer, services: list[ServiceProcess],
                                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    svc = ServiceProcess(tmp_path, {"REDIS_URL": redis_server.url, "PUBLIC_CHANNELS": "orders"}, name="pub")
    services.append(svc.start())
    monkeypatch.setenv("REDIS_URL", redis_server.url)
    async with SSEStream(f"{svc.url}/channels/orders/events") as stream:
        namespace: dict[str, Any] = {}
        await asyncio.to_thread(exec, compile(snippet(PUBLISH), "docs/python.md", "exec"), namespace)
        await namespace["notify"]()
        await stream.wait(lambda r: len(r.events) >= 2, 10, "both messages")
        assert [(e.event, e.data) for e in stream.events] == [
            ("order", {"id": 42, "state": "paid"}), ("message", {"id": 42})]


def test_the_mint_snippet_mints_what_the_relay_accepts() -> None:
    class User:
        id = "42"

    secret = "s" * 48
    namespace: dict[str, Any] = {"secret": secret, "user": User()}
    exec(compile(snippet(MINT), "docs/security.md", "exec"), namespace)
    claims = jwt.decode(namespace["token"], secret, algorithms=["HS256"])
    assert claims["sub"] == "42" and claims["sse"]["subscribe"] == ["user-42", "news"]


def _reader(tmp_path: Path, base: str) -> subprocess.Popen[str]:
    """docs/python.md's reader as a script of its own, pointed at `base` instead of the docs' port 8000."""
    body = snippet(READ)
    assert '"http://127.0.0.1:8000"' in body
    script = tmp_path / "read_stream.py"
    script.write_text(body.replace('"http://127.0.0.1:8000"', repr(base)))
    return subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT)


def test_the_reader_snippet_stops_on_a_401_and_says_why(tmp_path: Path, services: list[ServiceProcess]) -> None:
    svc = ServiceProcess(tmp_path, {"PUBLIC_CHANNELS": "chat"}, name="closed")  # `orders` is private by default
    services.append(svc.start())
    reader = _reader(tmp_path, svc.url)
    out, err = reader.communicate(timeout=30)
    assert reader.returncode == 1, (out, err)
    assert err.startswith("giving up: 401") and "unauthorized" in err and err.count("\n") <= 2, err


def test_the_reader_snippet_backs_off_from_a_closed_port(tmp_path: Path) -> None:
    """It used to reconnect 2,000 times in 3 s, silently; now each try says why, and the delays grow."""
    reader = _reader(tmp_path, f"http://127.0.0.1:{free_port()}")
    time.sleep(3.5)  # the behaviour under test is the pace over time: nothing to await instead
    reader.kill()
    _, err = reader.communicate(timeout=10)
    tries = [line for line in err.splitlines() if "reconnecting in" in line]
    assert 2 <= len(tries) <= 6 and all("ConnectError" in line for line in tries), err


@pytest.mark.redis
async def test_the_reader_snippet_resumes_from_the_greeting(redis_server: RedisServer, tmp_path: Path,
                                                            services: list[ServiceProcess]) -> None:
    """Cut right after `relay.hello`, a message published while it is away, then back: the reader resumes from
    the greeting's id and gets it (keeping only the ids of messages, it never did)."""
    svc = ServiceProcess(tmp_path, {"REDIS_URL": redis_server.url, "PUBLIC_CHANNELS": "orders"}, name="resume")
    services.append(svc.start())
    reader = _reader(tmp_path, svc.url)
    try:
        async with httpx.AsyncClient(base_url=svc.url) as c:
            async def joined() -> bool:
                return bool((await c.get("/channels/orders")).json()["subscribers"] >= 1
                            and "sse_broker_channels_pending 0.0" in (await c.get("/metrics")).text)

            await eventually(joined, 15, "the reader's stream joined")
        svc.kill()
        with Publisher(redis_server.url) as publisher:
            publisher.publish("orders", {"while": "away"}, event="order")
        svc.start()
        async with httpx.AsyncClient(base_url=svc.url) as c:
            assert (await c.post("/channels/orders/messages", json={"data": {"after": 1}, "event": "order"})).is_success
        assert reader.stdout is not None
        lines = [await asyncio.wait_for(asyncio.to_thread(reader.stdout.readline), 30) for _ in range(2)]
        assert lines == ['order {"while":"away"}\n', 'order {"after":1}\n'], lines
    finally:
        reader.kill()
        reader.communicate(timeout=10)


# -- the examples, as their headers say -----------------------------------------------------------------------------


def _uvicorn(log_path: Path, *args: str) -> subprocess.Popen[bytes]:
    """uvicorn as the example's header runs it, with none of the relay's settings from the test's environment."""
    env = {k: v for k, v in os.environ.items() if k not in {f.upper() for f in Settings.__dataclass_fields__}}
    with open(log_path, "wb") as log:
        return subprocess.Popen([str(Path(sys.executable).parent / "uvicorn"), *args], cwd=ROOT, env=env,
                                stdout=log, stderr=log)


async def test_the_fastapi_example_shows_what_it_ships(tmp_path: Path) -> None:
    """`uvicorn examples.fastapi_app:app`, then the ship route: the page's room gets a `chat` event with a name
    and a text, which the chat page shows (it shows `chat` events and the old chat's unnamed ones only)."""
    port = free_port()
    server = _uvicorn(tmp_path / "uvicorn.log", "examples.fastapi_app:app", "--port", str(port))
    url = f"http://127.0.0.1:{port}"
    try:
        async def up() -> bool:
            assert server.poll() is None, (tmp_path / "uvicorn.log").read_text()
            try:
                async with httpx.AsyncClient() as c:
                    return (await c.get(f"{url}/realtime/readyz")).status_code == 200
            except httpx.HTTPError:
                return False

        await eventually(up, 20, "the example app up")
        async with SSEStream(f"{url}/realtime/channels/chat/events") as page, httpx.AsyncClient(base_url=url) as c:
            assert (await c.post("/orders/99/ship")).json()["status"] == "shipped"
            await page.wait_count(1, "chat")
            assert page.named("chat")[0].data == {"name": "shop", "text": "order 99 shipped"}
            assert "chat" in (await c.get("/realtime/static/app.js")).text
    finally:
        server.terminate()
        server.wait(20)


@pytest.mark.redis
async def test_the_worker_example_publishes_to_the_room_anyone_can_read(
        redis_server: RedisServer, services: list[ServiceProcess], tmp_path: Path) -> None:
    svc = ServiceProcess(tmp_path, {"REDIS_URL": redis_server.url, "PUBLIC_CHANNELS": "chat"}, name="worker")
    services.append(svc.start())
    script = str(ROOT / "examples" / "worker_publish.py")
    no_url = subprocess.run([sys.executable, script, "chat", "x"], capture_output=True, text=True, timeout=30,
                            env={k: v for k, v in os.environ.items() if k != "REDIS_URL"})
    assert no_url.returncode == 2 and "REDIS_URL" in no_url.stderr
    async with SSEStream(f"{svc.url}/channels/chat/events") as page:  # no token: the header's channel is public
        done = await asyncio.to_thread(subprocess.run, [sys.executable, script, "chat", "report", "ready"],
                                       capture_output=True, text=True, timeout=30,
                                       env={**os.environ, "REDIS_URL": redis_server.url})
        assert done.returncode == 0, done.stderr
        await page.wait_count(1, "chat")
        assert page.named("chat")[0].data == {"name": "worker", "text": "report ready"}
        assert page.named("chat")[0].id == done.stdout.strip()
