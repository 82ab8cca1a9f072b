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
