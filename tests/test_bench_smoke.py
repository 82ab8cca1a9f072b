"""The fan-out benchmark, run with tiny numbers against our service and Nchan side by side.

No timing is asserted here (that is what `python -m bench.run` is for): only that the load generator counts
right, and that both targets delivered every message to every subscriber, once and in order, and that the
comparison table comes out.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import loadgen
from bench.run import APT_HINT, NCHAN_MODULE

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.timeout(180), pytest.mark.redis]


def _frame(seq: int, rid: int = 7) -> bytes:
    return b"id: 1-%d\ndata: " % seq + loadgen.make_payload(time.time_ns(), seq, rid) + b"\n\n"


def test_generator_counts_gaps_duplicates_and_reordering() -> None:
    """The accounting the smoke run relies on: fed a stream with a gap, a late message and a repeat."""
    loop = asyncio.new_event_loop()
    try:
        w = loadgen._Worker(loop)
        sub = loadgen._Sub(w)
        w.subs = [sub]
        w.measure(rid=7, goal=6)
        headers = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n"
        stream = headers + b"retry: 3000\n\n" + _frame(0) + _frame(1) + _frame(3) + _frame(2) + _frame(2) + _frame(5)
        # Delivered in awkward pieces: a frame split across reads must still count once.
        for i in range(0, len(stream), 37):
            sub.data_received(stream[i:i + 37])
        report = loop.run_until_complete(w.finish(goal=6, settle=0.01))
    finally:
        loop.close()
    assert sub.status == 200
    assert report["deliveries"] == 6
    assert report["lost"] == 1  # seq 4 never came
    assert report["out_of_order"] == 1  # seq 2 after 3
    assert report["duplicates"] == 1  # seq 2 again
    assert report["complete"] == 0
    assert sum(report["hist"].values()) == 6


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
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=150,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    report = json.loads(report_path.read_text())
    run = report["runs"][0]
    for target in ("ours", "nchan"):
        fixed = run[target]["fixed"]
        context = f"{target}: {json.dumps({k: v for k, v in fixed.items() if k != 'publish'})[:1500]}"
        assert fixed["subscribers"] == 20, context
        assert fixed["published"] == 40 and fixed["publish"]["accepted"] == 40, context
        assert fixed["expected"] == 20 * 40, context
        assert fixed["deliveries"] == fixed["expected"], context
        assert fixed["complete_subscribers"] == 20, context
        assert (fixed["lost"], fixed["duplicates"], fixed["out_of_order"], fixed["disconnects"]) == (0, 0, 0, 0), context
        assert math.isfinite(fixed["latency_ms"]["p99"]), context
        memory = run[target]["memory"]
        assert memory["streams"] == 50 and math.isfinite(memory["per_stream_kib"]), memory
    table = proc.stdout
    assert "| fixed N=20 R=20/s p99 (ms)" in table, table
    assert "ours / nchan" in table and "memory per idle stream" in table, table
