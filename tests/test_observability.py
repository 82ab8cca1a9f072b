"""Metrics move as messages flow; logs are structured JSON with request ids when asked for."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import httpx
import orjson
import pytest

from .sse import SSEStream, open_streams
from .support import RedisServer, ServiceProcess, eventually

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


def _counters(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of every counter and histogram in a scrape (their `_created` aside), by name and labels."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) if family.type in ("counter", "histogram")
            for s in family.samples if not s.name.endswith("_created")}


async def test_one_scrape_answers_for_every_worker(redis_server: RedisServer, services: list[ServiceProcess],
                                                   tmp_path: Path) -> None:
    """WORKERS=2: each scrape, whichever worker answers it, gives the instance's totals, and no counter ever goes
    backwards (issue 24: it alternated between the workers' own numbers, `published_total` 1, 2, 1)."""
    import signal

    scratch = tmp_path / "tmp"  # the service's TMPDIR: its per-instance metrics directory must be gone at exit
    scratch.mkdir()
    svc = ServiceProcess(tmp_path, {"REDIS_URL": redis_server.url, "WORKERS": "2", "DRAIN_GRACE": "1",
                                    "TMPDIR": str(scratch)}, name="mw").start()
    services.append(svc)
    workers = {"mw/w0", "mw/w1"}
    readers: list[SSEStream] = []
    try:
        for _ in range(20):  # streams on both workers (the second may still be starting when the first is ready)
            readers += await open_streams([SSEStream(f"{svc.url}/channels/metered/events") for _ in range(6)], 10)
            if {r.instances[0] for r in readers} == workers:
                break
        assert {r.instances[0] for r in readers} == workers
        seen: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        scraped_by: list[str] = []

        async def scrape(c: httpx.AsyncClient) -> str:
            resp = await c.get("/metrics")
            assert resp.status_code == 200
            scraped_by.append(resp.headers["x-relay-instance"])
            now = _counters(resp.text)
            went_back = {k: (v, now.get(k)) for k, v in seen.items() if now.get(k, -1.0) < v}
            assert not went_back, f"scrape {len(scraped_by)} by {scraped_by[-1]}: counters went backwards {list(went_back.items())[:5]}"
            seen.update(now)
            return resp.text

        published_by: list[str] = []
        n = 40
        # A new connection per request: the kernel spreads them over both workers (SO_REUSEPORT).
        async with httpx.AsyncClient(base_url=svc.url, timeout=5,
                                     limits=httpx.Limits(max_keepalive_connections=0)) as c:
            for i in range(n):
                resp = await c.post("/channels/metered/messages", json={"data": i})
                assert resp.status_code == 202
                published_by.append(resp.headers["x-relay-instance"])
                await scrape(c)
            assert set(published_by) == workers, published_by
            for r in readers:
                await r.wait_count(n)

            async def settled() -> bool:
                text = await scrape(c)
                return (_metric(text, "sse_messages_published_total") == n
                        and _metric(text, "sse_streams_open") == len(readers))

            await eventually(settled, 10, lambda: f"the instance's totals in a scrape:\n{list(seen.items())[:40]}")
            for _ in range(20):
                text = await scrape(c)
                assert _metric(text, "sse_messages_published_total") == n
                assert _metric(text, "sse_streams_open") == len(readers)
                assert _metric(text, "sse_messages_received_total") == 2 * n  # each worker gets each message
                assert _metric(text, "sse_messages_delivered_total") == n * len(readers)
                assert _metric(text, "sse_publish_to_dispatch_seconds_count") == 2 * n
                assert _metric(text, "sse_broker_up") == 1
                assert 'sse_http_requests_total{method="POST",route="/channels/{channel}/messages",status="202"} '\
                    f"{float(n)}" in text
            assert set(scraped_by[-20:]) == workers, "both workers answered scrapes once settled"
    finally:
        for r in readers:
            await r.close()
        svc.signal(signal.SIGTERM)
        assert await asyncio.to_thread(svc.wait, 20) == 0
    assert list(scratch.iterdir()) == [], "the per-instance metrics directory is removed at exit"
