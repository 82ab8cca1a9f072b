"""Other sites: CORS headers only for the listed origins (credentials only when asked for), and a page elsewhere
cannot publish with the cookie the browser sends on its own (CSRF).
"""

from __future__ import annotations

import re

import httpx
import pytest

from service import Settings
from service.config import ConfigError

from .support import bearer, serve, token

pytestmark = pytest.mark.timeout(60)


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
            # the JSON error body every other error has (Starlette's own is plain text "Disallowed CORS origin")
            assert pre.headers["content-type"] == "application/json", pre.text
            assert pre.json()["error"]["code"] == "cors_refused" and "CORS_ORIGINS" in pre.json()["error"]["message"]
        pre = await c.options("/channels/room-1/messages", headers={
            "Origin": allowed, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, idempotency-key"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == allowed
        allowed_headers = pre.headers["access-control-allow-headers"].lower()
        assert "authorization" in allowed_headers and "idempotency-key" in allowed_headers
        assert pre.headers["access-control-allow-credentials"] == "true"
        # a listed origin asking for a header that is not allowed: JSON too, and readable by the page
        pre = await c.options("/channels/room-1/messages", headers={
            "Origin": allowed, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "x-evil"})
        assert pre.status_code == 400 and pre.json()["error"]["refused"] == ["headers"], pre.text
        assert pre.headers["access-control-allow-origin"] == allowed
        # a refused preflight publishes nothing (the browser would not send the POST); the POST itself is still
        # subject to the token rules
        assert await s.history("room-1") == []
    async with serve() as s, httpx.AsyncClient(base_url=s.url) as c:  # no CORS_ORIGINS: no CORS at all
        resp = await c.get("/healthz", headers={"Origin": allowed})
        assert not [h for h in resp.headers if h.startswith("access-control-")]


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


@pytest.mark.parametrize(("env", "says"), [
    ({"CORS_ORIGINS": "*", "CORS_ALLOW_CREDENTIALS": "true"}, "list the origins"),
])
def test_bad_cors_settings_stop_the_service_with_what_to_do(env: dict[str, str], says: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(says)):
        Settings.from_env(env)
