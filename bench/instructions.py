"""Instructions per stream opened and per publish, counted by valgrind (callgrind): a measure that does not move
with a noisy machine, for comparing two versions of the code where wall time and CPU time cannot.

    apt-get install -y valgrind
    redis-server --port 6390 --save '' --appendonly no --daemonize yes
    .venv/bin/python -m bench.instructions --redis redis://127.0.0.1:6390/0
    HTTP_PROTOCOL=uvicorn .venv/bin/python -m bench.instructions --redis redis://127.0.0.1:6390/0

Each figure is `bench.inprocess` run twice under callgrind, at two sizes, and the difference of the two counts
divided by the difference in work: start-up, imports and warm-up cancel out. It counts the service's Python (and
the in-process client's, the same in both versions), not the system calls of real sockets, and instructions are
not time (hiredis's `sprintf` is many instructions and few nanoseconds): read it next to `bench/run.py`. A run
takes ~3 minutes.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["main"]


def _count(what: str, size_flag: str, size: int, redis: str | None) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={Path(tmp) / 'out'}", sys.executable,
                   "-m", "bench.inprocess", what, size_flag, str(size)]
        if redis:
            command += ["--redis", redis]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
    found = re.search(r"Collected : (\d+)", done.stderr)
    if found is None:
        raise SystemExit(f"no instruction count in valgrind's output:\n{done.stderr[-2000:]}")
    return int(found.group(1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis", help="a Redis URL of its own (default: the embedded broker)")
    parser.add_argument("--what", choices=("open", "publish", "both"), default="both")
    args = parser.parse_args(argv)
    if args.what in ("open", "both"):
        small, large = _count("open", "--streams", 1000, args.redis), _count("open", "--streams", 3000, args.redis)
        print(f"open: {(large - small) / 2000 / 1000:.1f}k instructions per stream opened (into new rooms, 5 a room)")
    if args.what in ("publish", "both"):
        small, large = _count("publish", "--rounds", 100, args.redis), _count("publish", "--rounds", 300, args.redis)
        print(f"publish: {(large - small) / 20000 / 1000:.1f}k instructions per publish (100 connections)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
