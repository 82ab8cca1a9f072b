"""Keep-alive between the shipped nginx and the relays: which side closes an idle connection matters.

nginx keeps idle upstream connections for `keepalive_timeout` (60 s in deploy/nginx/nginx.conf), uvicorn for
KEEPALIVE_TIMEOUT (75 s). If the relay closed first, nginx could send a request on a connection the relay is
closing at that moment: the request is lost with the connection, and for a POST nginx answers 502 unless it
may retry it (`proxy_next_upstream ... non_idempotent`, shipped). On loopback that race is a few microseconds
wide, so the tests widen it the way a busy replica would: the replica is paused (SIGSTOP) across its keep-alive
deadline while nginx sends a burst of publishes on its idle connections, then resumed (SIGCONT).

The nginx config is the shipped one, templated for addresses only (tests/test_load_balancer.py); only the
relay's KEEPALIVE_TIMEOUT is set, by environment. Each topology is one replica behind its own nginx:

- inverted: KEEPALIVE_TIMEOUT=1, below nginx's 60 s. The paused replica closes connections nginx is using:
  the races happen (the replica's closes and nginx's retries are counted), yet 0 publishes fail, and each
  message is in the channel's history exactly once.
- shipped, same pauses: KEEPALIVE_TIMEOUT 75 s: no race, no retry, 0 failures.
- shipped, one idle gap of 61.5 s, longer than nginx's 60 s and shorter than uvicorn's 75 s: nginx closed
  every idle connection itself (its side of each is in TIME-WAIT, the relay's side of none), and the publishes
  after the gap all succeed. This is the slow part (the 60 s are nginx's and not templated); the three run at
  once.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from .sse import SSEStream
from .support import Nginx, ServiceProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

BURST = 20  # concurrent publishes: as many upstream connections kept idle by nginx
ROUNDS = 6
NGINX_KEEPALIVE = 60.0  # deploy/nginx/nginx.conf's upstream keepalive_timeout (checked in test_deploy_artifacts)


# -- who closed a connection: TCP states from /proc/net/tcp ------------------------------------------------------

_ESTABLISHED, _TIME_WAIT = "01", "06"


def tcp_sockets(state: str) -> list[tuple[int, int]]:
    """(local port, remote port) of this network namespace's IPv4 TCP sockets in `state`. The side that closes
    a connection first is the one left in TIME-WAIT."""
    found = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        if parts[3] == state:
            found.append((int(parts[1].split(":")[1], 16), int(parts[2].split(":")[1], 16)))
    return found


@dataclass
class Edge:
    """One replica behind its own nginx (the shipped config); publishes go through nginx."""

    replica: ServiceProcess
    nginx: Nginx
    ok: int = 0
    failed: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.replica.port

    async def burst(self, client: httpx.AsyncClient, tag: str) -> None:
        async def one(i: int) -> None:
            key = f"{tag}-{i}"
            self.keys.append(key)
            try:
                resp = await client.post("/channels/ka/messages", json={"data": key},
                                         headers={"Idempotency-Key": key})
            except httpx.HTTPError as exc:
                self.failed.append(f"{key}: {exc!r}")
                return
            if resp.status_code == 202 and not resp.json().get("duplicate"):
                self.ok += 1
            else:
                self.failed.append(f"{key}: {resp.status_code} {resp.text[:100]}")

        await asyncio.gather(*(one(i) for i in range(BURST)))

    async def paused_rounds(self, keepalive: float) -> None:
        """Each round: a burst (nginx keeps BURST idle connections), then the replica is paused from just
        before its keep-alive deadline to just after it, while nginx sends the next burst on those connections."""
        async with httpx.AsyncClient(base_url=self.nginx.url, timeout=20) as client:
            for n in range(ROUNDS):
                await self.burst(client, f"warm{n}")
                await asyncio.sleep(min(keepalive, 1.0) - 0.1)
                self.replica.signal(signal.SIGSTOP)
                try:
                    await asyncio.sleep(0.2)  # the deadline passes while the replica cannot act on it
                    sent = asyncio.create_task(self.burst(client, f"paused{n}"))
                    await asyncio.sleep(0.1)  # nginx has written the requests on its idle connections
                finally:
                    self.replica.signal(signal.SIGCONT)
                await sent
                await asyncio.sleep(0.2)

    def retried(self) -> int:
        """Requests nginx passed to a second upstream attempt (`$upstream_addr` lists two)."""
        log = (self.nginx.prefix / "access.log").read_text()
        return sum(1 for line in log.splitlines() if "upstream=" in line and "," in line.split("upstream=")[1])

    async def history(self) -> list[str]:
        expected = len(self.keys)
        async with SSEStream(f"{self.nginx.url}/channels/ka/events?last_event_id=0") as reader:
            await reader.wait_count(expected, timeout=10)
            return reader.data("message")


@pytest.fixture
def edges(tmp_path: Path) -> Iterator[dict[str, Edge]]:
    made: dict[str, Edge] = {}
    try:
        for name, keepalive in (("inverted", "1"), ("shipped", None), ("idle", None)):
            env = {"LOG_LEVEL": "warning", **({"KEEPALIVE_TIMEOUT": keepalive} if keepalive else {})}
            replica = ServiceProcess(tmp_path, env=env, name=name).start()
            nginx = Nginx([replica.port])
            made[name] = Edge(replica, nginx)
            nginx.start()
        yield made
    finally:
        for edge in made.values():
            if edge.replica.proc is not None and edge.replica.proc.poll() is None:
                edge.replica.signal(signal.SIGCONT)
            edge.nginx.stop()
            edge.replica.kill()


async def test_publishes_through_the_shipped_nginx_survive_idle_gaps_and_the_keepalive_ordering_matters(
    edges: dict[str, Edge],
) -> None:
    inverted, shipped, idle = edges["inverted"], edges["shipped"], edges["idle"]

    async def long_gap() -> tuple[set[tuple[int, int]], float]:
        async with httpx.AsyncClient(base_url=idle.nginx.url, timeout=20) as client:
            await idle.burst(client, "before")
            # nginx's side of its idle connections to the replica (our own clients are gone by now)
            upstream = {(local, remote) for local, remote in tcp_sockets(_ESTABLISHED) if remote == idle.port}
            assert upstream, "nginx kept no idle connection to the replica"
            started = time.monotonic()
            await asyncio.sleep(NGINX_KEEPALIVE + 1.5)  # the gap itself is what is tested
            closed_by_nginx = upstream & set(tcp_sockets(_TIME_WAIT))
            await idle.burst(client, "after")
            return closed_by_nginx, time.monotonic() - started

    gap = asyncio.create_task(long_gap())
    await asyncio.gather(inverted.paused_rounds(1.0), shipped.paused_rounds(75.0))
    closed_by_relay = {name: sum(1 for local, _ in tcp_sockets(_TIME_WAIT) if local == edge.port)
                       for name, edge in edges.items()}
    closed_by_nginx, idle_s = await gap

    report = {name: {"ok": e.ok, "failed": len(e.failed), "retried by nginx": e.retried(),
                     "closed by the relay": closed_by_relay[name]} for name, e in edges.items()}
    print(f"\nkeep-alive through the shipped nginx ({ROUNDS} paused rounds of {BURST}): {report}; "
          f"idle gap {idle_s:.1f} s: nginx closed {len(closed_by_nginx)} idle upstream connections itself")

    # 0 failed publishes everywhere, each message once.
    for name, edge in edges.items():
        assert edge.failed == [], f"{name}: {edge.failed[:5]}\n{edge.nginx.log()}"
        assert edge.ok == len(edge.keys)
        assert sorted(await edge.history()) == sorted(edge.keys), name
    # Inverted: the relay closed connections under nginx's requests, and nginx retried them on new ones.
    assert closed_by_relay["inverted"] > 0 and inverted.retried() > 0, report
    assert "while reading response header from upstream" in inverted.nginx.log()
    # Shipped: under the same pauses nothing to retry; the relay closed nothing, nginx closed its idle ones.
    assert shipped.retried() == 0 and closed_by_relay["shipped"] == 0, report
    assert idle.retried() == 0 and closed_by_relay["idle"] == 0, report
    assert closed_by_nginx, "after more than nginx's keepalive_timeout, nginx should have closed its idle connections"
