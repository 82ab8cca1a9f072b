"""The whole benchmark, run with tiny numbers against our service and Nchan side by side (`bench.run --smoke`).

No timing is asserted here (that is what `python -m bench.run` is for): only that every scenario ran against
both targets (the publish path and the rooms over many connections and over one pipelined, the rooms with the
rate limiter on, the stream-opening storm, idle memory by both clients), that every delivery arrived once and in
order, that the publish and rooms scenarios published what they planned over their channels, and that the
comparison table comes out. Needs redis-server, nginx and
libnginx-mod-nchan (`bench/run.sh` installs them); run it with `.venv/bin/python -m pytest bench/tests`.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.run import APT_HINT, NCHAN_MODULE

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.timeout(300), pytest.mark.redis]


def _intact(step: dict, context: str) -> None:
    assert step["deliveries"] == step["expected"], context
    assert step["complete_subscribers"] == step["subscribers"], context
    assert (step["lost"], step["duplicates"], step["out_of_order"], step["disconnects"]) == (0, 0, 0, 0), context
    assert step["publish"]["accepted"] == step["published"] and not step["publish"]["errors"], context
    assert math.isfinite(step["latency_ms"]["p99"]), context


def test_benchmark_smoke_against_service_and_nchan(tmp_path: Path) -> None:
    missing = [name for name, ok in (("redis-server", shutil.which("redis-server")),
                                     ("nginx", shutil.which("nginx") or Path("/usr/sbin/nginx").exists()),
                                     ("libnginx-mod-nchan", NCHAN_MODULE.exists())) if not ok]
    if missing:
        pytest.fail(f"the benchmark smoke test needs {', '.join(missing)}: {APT_HINT} redis-server")
    report_path = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--smoke", "--targets", "ours,nchan", "--json", str(report_path),
         "--out", str(tmp_path)],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=280,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    report = json.loads(report_path.read_text())
    run = report["runs"][0]
    for target in ("ours", "nchan"):
        fixed = run[target]["fixed"]
        context = f"{target}: {json.dumps({k: v for k, v in fixed.items() if k != 'publish'})[:1500]}"
        assert fixed["subscribers"] == 20, context
        assert fixed["published"] == 40, context
        assert fixed["expected"] == 20 * 40, context
        _intact(fixed, context)
        memory = run[target]["memory"]
        assert memory["streams"] == 50 and math.isfinite(memory["per_stream_kib"]), memory

        assert math.isfinite(memory["raw"]["per_stream_kib"]) and memory["raw"]["open"]["open"] == 50, memory

        # One step of each ramp search (--smoke: max_steps 1, at 50 publishes/s for 1 s): the publish path over 10
        # connections, one request in flight each (1 channel: numbered per connection), and over one pipelined.
        for scen, shape in (("publish", "10 conns × 1 in flight, 10 source addresses"),
                            ("publish-pipelined", "1 connection × 16 pipelined")):
            publish = run[target][scen]["steps"][0]
            context = f"{target} {scen}: {json.dumps(publish)[:2000]}"
            assert (publish["subscribers"], publish["channels"], publish["published"]) == (5, 1, 50), context
            assert publish["expected"] == 5 * 50 and publish["publisher"] == shape, context
            _intact(publish, context)
            assert publish["cpu_s"]["server"] >= 0 and publish["cpu_s"]["redis"] >= 0, context

        # 60 streams in 20 rooms; 60 messages round the rooms: 3 per room, each to its 3 streams; rooms-limiter
        # against a server started with the rate limiter on (ours), refusing nothing.
        for scen in ("rooms", "rooms-limiter", "rooms-pipelined"):
            rooms = run[target][scen]["steps"][0]
            context = f"{target} {scen}: {json.dumps(rooms)[:2000]}"
            assert (rooms["subscribers"], rooms["channels"], rooms["published"]) == (60, 20, 60), context
            assert rooms["expected"] == 60 * 3, context
            _intact(rooms, context)

        opened = run[target]["open"]
        assert (opened["open"], opened["streams"], opened["rooms"]) == (100, 100, 20), opened
        assert 0 < opened["seconds"] < 60, opened
    table = proc.stdout
    assert "| fixed N=20 R=20/s p99 (ms)" in table, table
    assert "ours / nchan" in table and "memory per idle stream" in table and "independent plain-socket" in table, table
    assert ("| publish: sustained publishes/s, 1 channel, 5 subscribers, 10 conns × 1 in flight, 10 source addresses"
            in table), table
    assert "| publish-pipelined: sustained publishes/s, 1 channel, 5 subscribers, ONE connection, 16 pipelined" in table
    assert "| rooms: sustained deliveries/s, 60 streams in 20 rooms, 10 conns × 1 in flight" in table, table
    assert "| rooms-limiter: sustained deliveries/s, 60 streams in 20 rooms" in table, table
    assert "| rooms-pipelined: sustained deliveries/s, 60 streams in 20 rooms, ONE connection" in table, table
    assert "| open: 100 streams into 20 new rooms, 50 at once, until every one greeted (s)" in table, table
    assert table.count("server process CPU per publish (µs)") == 5, table
