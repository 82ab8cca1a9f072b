"""The whole benchmark, run with tiny numbers against our service and Nchan side by side (`bench.run --smoke`).

No timing is asserted here (that is what `python -m bench.run` is for): only that every scenario ran against
both targets, that every delivery arrived once and in order, that the publish and rooms scenarios published
what they planned over their channels, and that the comparison table comes out. Needs redis-server, nginx and
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

        # One step of each ramp search (--smoke: max_steps 1, at 50 publishes/s for 1 s).
        publish = run[target]["publish"]["steps"][0]
        context = f"{target} publish: {json.dumps(publish)[:2000]}"
        assert (publish["subscribers"], publish["channels"], publish["published"]) == (5, 1, 50), context
        assert publish["expected"] == 5 * 50, context
        _intact(publish, context)
        assert publish["cpu_s"]["server"] >= 0 and publish["cpu_s"]["redis"] >= 0, context

        rooms = run[target]["rooms"]["steps"][0]
        context = f"{target} rooms: {json.dumps(rooms)[:2000]}"
        # 50 streams in 10 rooms; 50 messages round the rooms: 5 per room, each to its 5 streams.
        assert (rooms["subscribers"], rooms["channels"], rooms["published"]) == (50, 10, 50), context
        assert rooms["expected"] == 50 * 5, context
        _intact(rooms, context)
    table = proc.stdout
    assert "| fixed N=20 R=20/s p99 (ms)" in table, table
    assert "ours / nchan" in table and "memory per idle stream" in table, table
    assert "| publish path: sustained publishes/s, 1 channel, 5 subscribers" in table, table
    assert "| rooms: sustained deliveries/s, 50 streams in 10 rooms" in table, table
    assert table.count("server process CPU per publish (µs)") == 2, table
