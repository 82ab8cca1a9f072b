"""Metrics move as messages flow; logs are structured JSON with request ids when asked for."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import orjson
import pytest

from .sse import SSEStream, open_streams
from .support import RedisServer, ServiceProcess

pytestmark = [pytest.mark.timeout(60), pytest.mark.redis]


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


async def test_metrics_count_what_flows(redis_server: RedisServer, services: list[ServiceProcess],
                                        tmp_path: Path) -> None:
    services.append(ServiceProcess(tmp_path, {"REDIS_URL": redis_server.url}, name="m").start())
    url = services[0].url
    async with httpx.AsyncClient(base_url=url) as c:
        before = (await c.get("/metrics")).text
        assert _metric(before, "sse_streams_open") == 0
        readers = await open_streams([SSEStream(f"{url}/channels/metered/events") for _ in range(3)])
        for i in range(10):
            assert (await c.post("/channels/metered/messages", json={"data": i})).status_code == 202
        for r in readers:
            await r.wait_count(10)
        after = (await c.get("/metrics")).text
        assert _metric(after, "sse_streams_open") == 3
        assert _metric(after, "sse_channels_active") == 1
        assert _metric(after, "sse_messages_published_total") - _metric(before, "sse_messages_published_total") == 10
        assert _metric(after, "sse_messages_received_total") == 10
        assert _metric(after, "sse_messages_delivered_total") == 30
        assert _metric(after, "sse_publish_to_dispatch_seconds_count") == 10
        assert _metric(after, "sse_slow_client_disconnects_total") == 0
        assert (await c.post("/channels/metered/messages", content=b"{bad")).status_code == 400
        for r in readers:
            await r.close()


async def test_json_logs_carry_request_ids(redis_server: RedisServer, services: list[ServiceProcess],
                                           tmp_path: Path) -> None:
    env = {"REDIS_URL": redis_server.url, "LOG_FORMAT": "json", "LOG_LEVEL": "debug"}
    svc = ServiceProcess(tmp_path, env, name="jsonlog").start()
    services.append(svc)
    async with SSEStream(f"{svc.url}/channels/logged/events", headers={"X-Request-ID": "req-42"}):
        pass
    async with httpx.AsyncClient() as c:
        resp = await c.get(f"{svc.url}/healthz")
        assert re.fullmatch(r"[0-9a-f]{16}", resp.headers["x-request-id"])
        resp = await c.get(f"{svc.url}/healthz", headers={"X-Request-ID": "bad id <script>"})
        assert re.fullmatch(r"[0-9a-f]{16}", resp.headers["x-request-id"]), "unsafe ids are replaced"
    svc.stop()
    lines = [orjson.loads(line) for line in svc.log_path.read_text().splitlines() if line.strip()]
    assert all({"ts", "level", "logger", "msg", "instance"} <= set(doc) for doc in lines)
    opened = [doc for doc in lines if doc["msg"] == "stream opened"]
    assert opened and opened[0]["request_id"] == "req-42" and opened[0]["instance"] == "jsonlog"


async def test_one_log_line_and_metrics_per_request_never_a_query_string(services: list[ServiceProcess],
                                                                          tmp_path: Path) -> None:
    """Every request writes one `request` line at info (method, route template, status, duration, client, request
    id) and is counted by route template and status; nothing of a query string (where `?token=` rides) is logged."""
    env = {"LOG_FORMAT": "json", "PUBLIC_CHANNELS": "chat", "ALLOW_QUERY_TOKEN": "true"}
    svc = ServiceProcess(tmp_path, env, name="reqlog").start()
    services.append(svc)
    async with httpx.AsyncClient(base_url=svc.url) as c:
        assert (await c.post("/channels/chat/messages", json={"data": 1}, headers={"X-Request-ID": "pub-1"})).status_code == 202
        assert (await c.post("/channels/secret/messages?token=eyJhbGciOiSECRET", json={"data": 1})).status_code == 401
        assert (await c.get("/nowhere?token=eyJhbGciOiSECRET")).status_code == 404
        async with SSEStream(f"{svc.url}/channels/chat/events?token=eyJhbGciOiSECRET"):
            pass
        metrics = (await c.get("/metrics")).text
    assert 'sse_http_requests_total{method="POST",route="/channels/{channel}/messages",status="202"} 1.0' in metrics
    assert 'sse_http_requests_total{method="POST",route="/channels/{channel}/messages",status="401"} 1.0' in metrics
    assert 'sse_http_requests_total{method="GET",route="unmatched",status="404"} 1.0' in metrics
    assert 'sse_http_request_duration_seconds_count{method="GET",route="/channels/{channel}/events",status="200"} 1.0' in metrics
    svc.stop()
    text = svc.log_path.read_text()
    assert "SECRET" not in text and "token=" not in text, "a query string reached the log"
    lines = [orjson.loads(line) for line in text.splitlines() if line.strip()]
    requests = [doc for doc in lines if doc["msg"] == "request"]
    assert {(d["method"], d["route"], d["status"]) for d in requests} >= {
        ("POST", "/channels/{channel}/messages", 202), ("POST", "/channels/{channel}/messages", 401),
        ("GET", "unmatched", 404), ("GET", "/channels/{channel}/events", 200)}
    first = next(d for d in requests if d["status"] == 202)
    assert first["request_id"] == "pub-1" and first["client"] == "127.0.0.1" and first["duration_ms"] >= 0
    assert first["level"] == "info"


def test_uvicorn_access_log_loses_its_query_string_wherever_the_app_runs() -> None:
    """`create_app` filters uvicorn's access logger: under `uvicorn examples.fastapi_app:app` it logged
    `GET .../events?token=eyJ...`."""
    import logging

    from service import Settings, create_app
    from service.access import StripQueryString

    create_app(Settings.from_env({}))
    access = logging.getLogger("uvicorn.access")
    assert [f for f in access.filters if isinstance(f, StripQueryString)]
    record = logging.LogRecord("uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5000", "GET", "/realtime/channels/x/events?token=eyJ", "1.1", 200), None)
    assert access.filter(record)
    assert record.getMessage() == '127.0.0.1:5000 - "GET /realtime/channels/x/events HTTP/1.1" 200'
