"""The channel policy: who may publish and subscribe where. PUBLIC_CHANNELS opens channels to anyone (the
unconfigured relay opens only the demo room `chat`), the old endpoints follow DEFAULT_CHANNEL's policy, and a
private channel takes a token whose `publish`/`subscribe` claims name it.

Every refusal is checked twice: the status code, and that nothing happened (the channel's history, which every
publish lands in, is unchanged; a subscriber sees nothing; no stream was opened).
"""

from __future__ import annotations

import re
import time

import httpx
import jwt
import pytest

from service import Settings, create_app
from service.config import ConfigError
from service.relay import Relay
from service.tokens import mint

from .sse import SSEStream
from .support import ADMIN, SECRET, Served, bearer, eventually, expired_token, running_app, serve, token

pytestmark = pytest.mark.timeout(60)


# -- the default stays friendly ----------------------------------------------------------------------------------------


async def test_unconfigured_relay_serves_the_chat_room_and_closes_every_other_channel() -> None:
    settings = Settings.from_env({}, heartbeat_interval=0.2)  # nothing configured: the real defaults
    relay = Relay(settings)
    async with running_app(create_app(settings, relay)) as url, httpx.AsyncClient(base_url=url) as c:
        served = Served(url, relay)
        async with SSEStream(f"{url}/channels/chat/events") as page, SSEStream(f"{url}/server/events") as old:
            assert (await c.post("/channels/chat/messages", json={"data": {"text": "hi"}})).status_code == 202
            resp = await c.post("/server/send", json={"messages": [{"role": "user", "content": "hello"}]})
            assert resp.status_code == 200 and resp.json() == {"status": "Message received successfully"}
            await page.wait_count(2)
            await old.wait_count(2)
            assert old.data("message")[-1] == [{"role": "user", "content": "hello"}]

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
        await eventually(lambda: relay.streams == set(), 2, lambda: f"no stream left open: {relay.streams}")


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


# -- the claims --------------------------------------------------------------------------------------------------------


PUBLISH_CASES = [
    ("no token", {}, 401),
    ("not a jwt", bearer("abc.def"), 401),
    ("other secret", bearer(mint("other-" + "y" * 40, publish=["*"])), 401),
    ("expired", bearer(expired_token()), 401),
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
        async with SSEStream(f"{s.url}/channels/room-1/events", headers=ADMIN) as live:
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
            assert live.data("message") == ["member"]
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
            ("/channels/room-1/events", bearer(expired_token()), 401),
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
        async with SSEStream(f"{s.url}/events?channel=room-1&channel=chat", headers=member) as r:
            await c.post("/channels/room-1/messages", json={"data": "in"}, headers=ADMIN)
            await r.wait_count(1)
            assert r.data("message")[0]["data"] == "in"


@pytest.mark.parametrize(("env", "says"), [
    ({"PUBLIC_CHANNELS": "chat,room one"}, "PUBLIC_CHANNELS"),
])
def test_bad_policy_settings_stop_the_service_with_what_to_do(env: dict[str, str], says: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(says)):
        Settings.from_env(env)
