"""Metrics move as messages flow; logs are structured JSON with request ids when asked for."""

from __future__ import annotations

import asyncio
import os
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



Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _counters(text: str) -> Samples:
    """Every sample of every counter and histogram in a scrape (their `_created` aside), by name and labels."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) if family.type in ("counter", "histogram")
            for s in family.samples if not s.name.endswith("_created")}


class _Scrapes:
    """Scrapes /metrics over a new connection each time (so the kernel hands them to either worker), failing the
    test as soon as any counter or histogram sample is lower than in an earlier scrape, or gone."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self.seen: Samples = {}
        self.by: list[str] = []

    async def __call__(self) -> str:
        resp = await self.client.get("/metrics")
        assert resp.status_code == 200
        self.by.append(resp.headers["x-relay-instance"])
        now = _counters(resp.text)
        went_back = [(k, v, now.get(k)) for k, v in self.seen.items() if now.get(k, -1.0) < v]
        assert not went_back, f"scrape {len(self.by)} by {self.by[-1]}: counters went backwards: {went_back[:5]}"
        self.seen.update(now)
        return resp.text


async def _streams_on_both(svc: ServiceProcess, workers: set[str], readers: list[SSEStream]) -> None:
    for _ in range(20):  # streams on both workers (the second may still be starting when the first is ready)
        readers += await open_streams([SSEStream(f"{svc.url}/channels/metered/events") for _ in range(6)], 10)
        if {r.instances[0] for r in readers} == workers:
            return
    raise AssertionError(f"streams only on {({r.instances[0] for r in readers})}")


async def _publish_spread(c: httpx.AsyncClient, scrape: _Scrapes, n: int, workers: set[str]) -> None:
    """`n` publishes, each on a new connection and followed by a scrape; both workers must have taken some."""
    published_by = []
    for i in range(n):
        resp = await c.post("/channels/metered/messages", json={"data": i})
        assert resp.status_code == 202
        published_by.append(resp.headers["x-relay-instance"])
        await scrape()
    assert set(published_by) == workers, published_by


def _one_connection_per_request(svc: ServiceProcess) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=svc.url, timeout=5, limits=httpx.Limits(max_keepalive_connections=0))


async def _stop(svc: ServiceProcess, readers: list[SSEStream]) -> None:
    import signal

    for r in readers:
        await r.close()
    svc.signal(signal.SIGTERM)
    assert await asyncio.to_thread(svc.wait, 20) == 0


async def test_one_scrape_answers_for_every_worker(redis_server: RedisServer, services: list[ServiceProcess],
                                                   tmp_path: Path) -> None:
    """WORKERS=2: each scrape, whichever worker answers it, gives the instance's totals, and no counter ever goes
    backwards (issue 24: it alternated between the workers' own numbers, `published_total` 1, 2, 1)."""
    scratch = tmp_path / "tmp"  # the service's TMPDIR: its per-instance metrics directory must be gone at exit
    scratch.mkdir()
    svc = ServiceProcess(tmp_path, {"REDIS_URL": redis_server.url, "WORKERS": "2", "DRAIN_GRACE": "1",
                                    "TMPDIR": str(scratch)}, name="mw").start()
    services.append(svc)
    workers = {"mw/w0", "mw/w1"}
    readers: list[SSEStream] = []
    n = 40
    try:
        await _streams_on_both(svc, workers, readers)
        async with _one_connection_per_request(svc) as c:
            scrape = _Scrapes(c)
            await _publish_spread(c, scrape, n, workers)
            for r in readers:
                await r.wait_count(n)

            async def settled() -> bool:
                text = await scrape()
                # Another worker's figures lag by up to its write interval (a second): every total is waited
                # for, then held to across scrapes.
                return (_metric(text, "sse_messages_published_total") == n
                        and _metric(text, "sse_streams_open") == len(readers)
                        and _metric(text, "sse_messages_received_total") == 2 * n)

            await eventually(settled, 10, lambda: f"the instance's totals in a scrape:\n{list(scrape.seen.items())[:40]}")
            for _ in range(20):
                text = await scrape()
                assert _metric(text, "sse_messages_published_total") == n
                assert _metric(text, "sse_streams_open") == len(readers)
                assert _metric(text, "sse_messages_received_total") == 2 * n  # each worker gets each message
                assert _metric(text, "sse_messages_delivered_total") == n * len(readers)
                assert _metric(text, "sse_publish_to_dispatch_seconds_count") == 2 * n
                assert _metric(text, "sse_broker_up") == 1
                assert 'sse_http_requests_total{method="POST",route="/channels/{channel}/messages",status="202"} '\
                    f"{float(n)}" in text
            assert set(scrape.by[-20:]) == workers, "both workers answered scrapes once settled"
    finally:
        await _stop(svc, readers)
    assert list(scratch.iterdir()) == [], "the per-instance metrics directory is removed at exit"


def _worker_pids(parent: int) -> list[int]:
    """The worker processes of a `WORKERS>1` parent (its multiprocessing children, the resource tracker aside)."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return [int(pid) for pid in children
            if b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes()]


async def test_a_worker_killed_and_restarted_takes_nothing_back(redis_server: RedisServer,
                                                                 services: list[ServiceProcess],
                                                                 tmp_path: Path) -> None:
    """A worker killed with SIGKILL and restarted by the parent: the instance's totals neither drop (the dead
    worker's last figures still count) nor reset (its replacement carries them on); its streams leave the gauge."""
    import signal

    svc = ServiceProcess(tmp_path, {"REDIS_URL": redis_server.url, "WORKERS": "2", "DRAIN_GRACE": "1"},
                         name="mk").start()
    services.append(svc)
    assert svc.proc is not None
    workers = {"mk/w0", "mk/w1"}
    readers: list[SSEStream] = []
    n = 20
    try:
        await _streams_on_both(svc, workers, readers)
        async with _one_connection_per_request(svc) as c:
            scrape = _Scrapes(c)
            await _publish_spread(c, scrape, n, workers)

            async def settled() -> bool:
                return _metric(await scrape(), "sse_messages_published_total") == n

            await eventually(settled, 10, "the publishes counted")
            pids = _worker_pids(svc.proc.pid)
            assert len(pids) == 2, pids
            os.kill(pids[1], signal.SIGKILL)
            killed_at = len(scrape.by)
            await eventually(lambda: any(r.ended.is_set() for r in readers), 10, "the killed worker's streams cut")
            killed = {r.instances[0] for r in readers if r.ended.is_set()}
            assert len(killed) == 1, killed
            await eventually(lambda: all(r.ended.is_set() for r in readers if r.instances[0] in killed), 10,
                             "every stream of the killed worker cut")
            survivors = [r for r in readers if not r.ended.is_set()]
            assert survivors and all(r.instances[0] not in killed for r in survivors)

            async def replaced_and_counted() -> bool:
                """Until the parent's replacement listens the survivor answers alone; every scrape still counts
                the dead worker's publishes, never its streams."""
                text = await scrape()
                assert _metric(text, "sse_messages_published_total") == n
                return (set(scrape.by[killed_at:]) == workers
                        and _metric(text, "sse_streams_open") == len(survivors))

            await eventually(replaced_and_counted, 20,
                             lambda: f"the replacement answering scrapes too: {scrape.by[killed_at:]}")
            await _publish_spread(c, scrape, n, workers)

            async def all_counted() -> bool:
                return _metric(await scrape(), "sse_messages_published_total") == 2 * n

            await eventually(all_counted, 10, "the publishes after the restart counted on top")
            for _ in range(10):
                text = await scrape()
                assert _metric(text, "sse_messages_published_total") == 2 * n
                assert _metric(text, "sse_streams_open") == len(survivors)
                assert 'sse_http_requests_total{method="POST",route="/channels/{channel}/messages",status="202"} '\
                    f"{float(2 * n)}" in text
    finally:
        await _stop(svc, readers)


def test_worker_files_merge_into_the_instance_figures(tmp_path: Path) -> None:
    """The merge rules (service/worker_metrics.py) without processes: counters and histograms summed, gauges
    summed but `sse_broker_up` the minimum, a dead process's gauges left out, its counters kept, and a replacement
    carrying its predecessor's counters on."""
    import subprocess

    from service.metrics import Metrics

    def figure(m: Metrics, name: str) -> float:
        return _metric(m.render().decode(), name)

    a, b = Metrics(), Metrics()
    a.published_count, b.published_count = 3, 4
    a.streams_open.set(2)
    b.streams_open.set(5)
    a.broker_up.set(1)
    b.broker_up.set(0)
    a.http_request("POST", "/x", 202, 0.002)
    b.http_request("POST", "/x", 202, 0.2)
    b.publish_rejected.labels("down").inc()
    a.share(tmp_path, 0)
    shared_b = b.share(tmp_path, 1)
    shared_b.write()
    text = a.render().decode()
    assert _metric(text, "sse_messages_published_total") == 7
    assert _metric(text, "sse_streams_open") == 7
    assert _metric(text, "sse_broker_up") == 0
    assert 'sse_http_requests_total{method="POST",route="/x",status="202"} 2.0' in text
    assert 'sse_http_request_duration_seconds_bucket{le="0.0025",method="POST",route="/x",status="202"} 1.0' in text
    assert 'sse_http_request_duration_seconds_bucket{le="0.25",method="POST",route="/x",status="202"} 2.0' in text
    assert 'sse_publish_rejected_total{reason="down"} 1.0' in text
    assert figure(b, "sse_messages_published_total") == 7, "either worker answers for both"

    gone = subprocess.Popen(["true"])  # b "died" after its last write: its file now names a pid no process has
    gone.wait()
    shared_b._pid, shared_b._written = gone.pid, b""
    shared_b.write()
    text = a.render().decode()
    assert _metric(text, "sse_messages_published_total") == 7, "a dead worker's counters still count"
    assert _metric(text, "sse_streams_open") == 2, "not its streams"
    assert _metric(text, "sse_broker_up") == 1

    c = Metrics()  # b's replacement: carries b's counters
    c.published_count = 1
    c.share(tmp_path, 1).write()
    text = a.render().decode()
    assert _metric(text, "sse_messages_published_total") == 8
    assert 'sse_publish_rejected_total{reason="down"} 1.0' in text
    assert 'sse_http_requests_total{method="POST",route="/x",status="202"} 2.0' in text
    assert _metric(text, "sse_streams_open") == 2
