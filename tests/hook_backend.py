"""A small chat backend of the kind the hooks are for: FastAPI, a cookie session, bans, moderation, its own
history. tests/test_hooks.py runs it in a process of its own (`BackendProcess`), in front of relay replicas.

- `POST /login {"user"}` sets the `session` cookie (an opaque id; the sessions live in this process);
  `GET /enter?user=...&next=<url>` does the same for a browser and sends it on to `next`.
- `POST /hooks/auth`: the relay's authorization hook (service/hooks.py has the contract). A logged-in user may
  listen to and publish on `room-*` and listen to `private-<user>`; a banned one nothing. Decisions may be cached
  for `CACHE_SECONDS` (env, default 30).
- `POST /hooks/publish`: the publish hook. `badword` is masked, a message saying `spam` is refused 422 `spam`, and
  every accepted message lands in this app's own history (`GET /history`).
- `POST /ban {"user"}` bans and asks the relay to end the user's streams (`RELAY_URL`, `ADMIN_API_KEY` env);
  `POST /unban {"user"}`.
- `POST /mode {"mode": "ok" | "slow" | "garbage" | "error"}`: how the hooks answer (slow: `SLOW_SECONDS`, 2 s).
- `GET /stats`: calls per hook and the calls' distinct questions, for the tests' bounds.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from typing import Any

import httpx
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, RedirectResponse

app = FastAPI()

SESSIONS: dict[str, str] = {}
BANNED: set[str] = set()
HISTORY: list[dict[str, Any]] = []
STATE: dict[str, Any] = {"mode": "ok", "auth_calls": 0, "publish_calls": 0, "in_flight": 0, "max_in_flight": 0}
CACHE_SECONDS = float(os.environ.get("CACHE_SECONDS", "30"))
SLOW_SECONDS = float(os.environ.get("SLOW_SECONDS", "2"))


def _user(request: Request) -> str | None:
    return SESSIONS.get(request.cookies.get("session", ""))


async def _misbehave() -> Response | None:
    mode = STATE["mode"]
    if mode == "slow":
        await asyncio.sleep(SLOW_SECONDS)
    elif mode == "garbage":
        return Response(b"<html>oops</html>", media_type="text/html")
    elif mode == "error":
        return Response(b"internal", status_code=500)
    return None


@app.post("/login")
async def login(body: dict[str, str], response: Response) -> dict[str, str]:
    sid = secrets.token_urlsafe(16)
    SESSIONS[sid] = body["user"]
    response.set_cookie("session", sid, httponly=True, samesite="lax")
    return {"user": body["user"], "session": sid}


@app.get("/enter")
async def enter(user: str, next: str) -> Response:
    """A login as a browser does it: the session cookie, then back to the chat page (another port, same host:
    cookies do not care about ports)."""
    sid = secrets.token_urlsafe(16)
    SESSIONS[sid] = user
    response = RedirectResponse(next, status_code=303)
    response.set_cookie("session", sid, httponly=True, samesite="lax")
    return response


@app.post("/hooks/auth")
async def auth_hook(request: Request) -> Response:
    STATE["auth_calls"] += 1
    STATE["in_flight"] += 1
    STATE["max_in_flight"] = max(STATE["max_in_flight"], STATE["in_flight"])
    try:
        odd = await _misbehave()
        if odd is not None:
            return odd
        question = await request.json()
        user = _user(request)
        if user is None:
            return JSONResponse({"allow": False, "reason": "not logged in"})
        if user in BANNED:
            return JSONResponse({"allow": False, "reason": "banned", "cache_seconds": 5})
        mine = {f"private-{user}"} if question["action"] == "subscribe" else set()
        if all(c.startswith("room-") or c in mine for c in question["channels"]):
            return JSONResponse({"allow": True, "user": user, "cache_seconds": CACHE_SECONDS})
        return JSONResponse({"allow": False, "reason": f"{user} may not {question['action']} there"})
    finally:
        STATE["in_flight"] -= 1


@app.post("/hooks/publish")
async def publish_hook(request: Request) -> Response:
    STATE["publish_calls"] += 1
    odd = await _misbehave()
    if odd is not None:
        return odd
    message = await request.json()
    data = message["data"]
    text = data.get("text", "") if isinstance(data, dict) else ""
    if "spam" in text:
        return JSONResponse({"accept": False, "status": 422, "code": "spam", "message": "no spam here"})
    HISTORY.append({"user": message["user"], "channel": message["channel"], "data": data})
    if "badword" in text:
        return JSONResponse({"accept": True, "data": {**data, "text": text.replace("badword", "***")}})
    return JSONResponse({"accept": True})


@app.post("/ban")
async def ban(body: dict[str, str]) -> dict[str, Any]:
    BANNED.add(body["user"])
    async with httpx.AsyncClient(timeout=5) as client:
        answer = await client.post(f"{os.environ['RELAY_URL']}/admin/end",
                                   json={"user": body["user"], "reason": "banned"},
                                   headers={"Authorization": f"Bearer {os.environ['ADMIN_API_KEY']}"})
    return {"relay_status": answer.status_code, "relay": answer.json()}


@app.post("/unban")
async def unban(body: dict[str, str]) -> dict[str, str]:
    BANNED.discard(body["user"])
    return {"user": body["user"]}


@app.post("/mode")
async def mode(body: dict[str, str]) -> dict[str, str]:
    STATE["mode"] = body["mode"]
    return {"mode": STATE["mode"]}


@app.get("/stats")
async def stats() -> dict[str, Any]:
    return {**STATE, "history": len(HISTORY)}


@app.get("/history")
async def history() -> list[dict[str, Any]]:
    return HISTORY
