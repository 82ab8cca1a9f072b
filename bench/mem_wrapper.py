"""Run the service with tracemalloc on, to see what an idle stream's memory is made of.

`python -m bench.mem_wrapper` is `python -m service` with `tracemalloc.start()`; each SIGUSR1 writes a
snapshot to `$BENCH_TRACEMALLOC_DIR/snapshot-<n>.bin`. Take one before and one after opening N streams, then

    python -m bench.mem_wrapper compare DIR/snapshot-1.bin DIR/snapshot-2.bin N

prints the allocation sites that grew, in bytes per stream. Bench-only: tracemalloc slows the process, so never
measure speed with it. Python objects only: the kernel's socket buffers are not in any of these numbers (nor in
RSS).
"""

from __future__ import annotations

import itertools
import os
import signal
import sys
import tracemalloc
from pathlib import Path
from types import FrameType

_counter = itertools.count(1)


def _dump(signum: int, frame: FrameType | None) -> None:
    out = Path(os.environ.get("BENCH_TRACEMALLOC_DIR", "."))
    out.mkdir(parents=True, exist_ok=True)
    tracemalloc.take_snapshot().dump(str(out / f"snapshot-{next(_counter)}.bin"))


def compare(before: str, after: str, streams: int, top: int = 30) -> str:
    old = tracemalloc.Snapshot.load(before)
    new = tracemalloc.Snapshot.load(after)
    stats = new.compare_to(old, "lineno")
    total = sum(s.size_diff for s in stats)
    lines = [f"{total / streams / 1024:.1f} KiB of Python allocations per stream ({streams} streams)"]
    for s in stats[:top]:
        frame = s.traceback[0]
        lines.append(f"  {s.size_diff / streams:8.0f} B  {s.count_diff / streams:6.1f} blocks  "
                     f"{frame.filename.split('site-packages/')[-1]}:{frame.lineno}")
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1:2] == ["compare"]:
        print(compare(sys.argv[2], sys.argv[3], int(sys.argv[4])))
        return
    tracemalloc.start(1)
    signal.signal(signal.SIGUSR1, _dump)
    from service import __main__ as service_main

    service_main.main()


if __name__ == "__main__":
    main()
