"""Redis Cluster availability while one shard fails over, with the shipped node config
(deploy/redis/cluster-node.conf: `cluster-require-full-coverage no`) and with Redis's default (`yes`).

A six-node cluster (3 primaries, 3 replicas; tests/test_cluster_failover.py's `Cluster`, its nodes started from the
shipped file), one relay, a publish to every one of 36 rooms (on all three shards) every 0.2 s. The primary of one
shard is killed (`kill -9`) once every replica has finished its first sync (one that has not cannot be promoted),
and the traffic runs until its replica has taken over. Every answer is counted by shard:

- `no` (shipped): the healthy shards' publishes keep succeeding, 0 refused; only the dead primary's rooms get 503.
- `yes`: from the moment the primary is marked failed until the promotion, every node refuses every slot, so
  publishes to the healthy shards are refused too (503, kind `cluster`).
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from .support import ROOT, ServiceProcess
from .test_cluster_failover import Cluster, Traffic, _cli, _slot

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(150)]

NODE_CONF = ROOT / "deploy" / "redis" / "cluster-node.conf"
ROOMS = 36


class ShippedCluster(Cluster):
    """`Cluster` whose nodes run the shipped config file; the command line sets only what a test must (port,
    files, a short node timeout for speed) and, for the comparison, `cluster-require-full-coverage`."""

    def __init__(self, tmp: Path, full_coverage: str) -> None:
        super().__init__(tmp)
        self.full_coverage = full_coverage

    def start_node(self, port: int) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is needed: run ./scripts/test"
        d = self.tmp / f"node-{port}"
        d.mkdir(exist_ok=True)
        self.procs[port] = subprocess.Popen(
            [binary, str(NODE_CONF), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(d),
             "--protected-mode", "no", "--save", "", "--appendonly", "no",  # no disk work on the shared test box
             "--cluster-node-timeout", "2000", "--cluster-replica-validity-factor", "0",
             "--repl-ping-replica-period", "1", "--logfile", str(d / "redis.log"),
             "--cluster-require-full-coverage", self.full_coverage],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture(params=["no", "yes"], ids=["full-coverage-no (shipped)", "full-coverage-yes (Redis default)"])
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ShippedCluster]:
    c = ShippedCluster(tmp_path, request.param)
    try:
        c.create()
        c.replicas_in_sync()  # a replica that has not finished its first sync cannot be promoted
        yield c
    finally:
        c.stop()


def test_the_shipped_node_config_keeps_healthy_shards_available() -> None:
    settings = {line.split()[0]: line.split()[1] for line in NODE_CONF.read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    assert settings["cluster-enabled"] == "yes"
    assert settings["cluster-require-full-coverage"] == "no"
    assert settings["cluster-allow-reads-when-down"] == "yes"


async def test_publishes_to_healthy_shards_while_one_primary_fails_over(
    cluster: ShippedCluster, services: list[ServiceProcess], tmp_path: Path
) -> None:
    setting = cluster.full_coverage
    running_with = {p: _cli(p, "config", "get", "cluster-require-full-coverage").split()[-1] for p in cluster.ports}
    assert set(running_with.values()) == {setting}, running_with
    seeds = ",".join(f"127.0.0.1:{p}" for p in cluster.ports[:3])
    relay = ServiceProcess(tmp_path, {"REDIS_URL": f"redis+cluster://{seeds}", "REDIS_PROBE_INTERVAL": "0.5",
                                      "REDIS_COMMAND_TIMEOUT": "1", "LOG_LEVEL": "warning"}, name="cov")
    services.append(relay)
    relay.start()
    rooms = [f"room_{i}" for i in range(ROOMS)]
    owners = {room: cluster.owner(_slot(room)) for room in rooms}
    assert len(set(owners.values())) == 3, "rooms on every shard"
    victim = owners[rooms[0]]
    traffic = Traffic([relay.port], rooms, interval=0.2)
    running = asyncio.create_task(traffic.run())
    try:
        await asyncio.sleep(1.0)  # traffic before the kill: every shard answers
        killed_at = time.monotonic()
        cluster.kill(victim)
        await asyncio.to_thread(cluster.wait_healthy, 60, victim)  # the replica promoted, every slot served
        healed_s = time.monotonic() - killed_at
        await asyncio.sleep(1.0)  # and after it
    finally:
        traffic.stop.set()
        await asyncio.wait_for(running, 30)

    during = [(room, status, code) for t, room, status, code in traffic.answers if t >= killed_at]
    healthy = Counter((status, code) for room, status, code in during if owners[room] != victim)
    failed_shard = Counter((status, code) for room, status, code in during if owners[room] == victim)
    healthy_refused = sum(n for (status, _), n in healthy.items() if status != 202)
    before = Counter(status for t, _, status, _ in traffic.answers if t < killed_at)
    print(f"\ncluster-require-full-coverage {setting}: primary {victim} killed, replica took over after "
          f"{healed_s:.1f}s; healthy shards: {healthy_refused} of {sum(healthy.values())} publishes refused "
          f"{dict(healthy)}; the failed shard's rooms {dict(failed_shard)}; before the kill {dict(before)}")
    assert before == {202: before[202]} and before[202] > 0
    assert all(status != 500 for _, status, _ in during)
    assert any(status != 202 for (status, _) in failed_shard), "the dead primary's rooms were refused for a while"
    if setting == "no":
        assert healthy_refused == 0, healthy
    else:
        assert healthy_refused > 0, f"with `yes`, Redis refuses every shard while one fails over: {healthy}"
        assert {code for (status, code) in healthy if status != 202} <= {"unavailable"}, healthy
    assert "Traceback" not in relay.log(), relay.log()
