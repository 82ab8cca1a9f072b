"""Run the service with the cyclic garbage collector tuned, to measure what that alone is worth.

`python -m bench.gc_wrapper` is `python -m service` plus:
- `gc.freeze()` after the imports and again once the relay has started, so everything that lives for the whole
  process (modules, app, routes, settings, the Redis clients) moves to the permanent generation and is never
  traversed again;
- thresholds from `BENCH_GC_THRESHOLDS` (default `50000,50,1000`): young collections every 50,000 net
  allocations instead of 700, and full collections rare. Per-stream objects (tasks, coroutines, frames) are
  what the collector walks under fan-out load; fewer, larger passes cut the latency tail they cause.

Bench-only: the service itself is unchanged; this just wraps `service.__main__.main`.
"""

from __future__ import annotations

import gc
import os

DEFAULT_THRESHOLDS = "50000,50,1000"


def thresholds() -> tuple[int, int, int]:
    raw = os.environ.get("BENCH_GC_THRESHOLDS", DEFAULT_THRESHOLDS)
    parts = [int(p) for p in raw.split(",")]
    if len(parts) != 3:
        raise SystemExit(f"BENCH_GC_THRESHOLDS must be three integers like {DEFAULT_THRESHOLDS}, not {raw!r}")
    return parts[0], parts[1], parts[2]


def main() -> None:
    limits = thresholds()
    from service import __main__ as service_main
    from service.relay import Relay

    original_start = Relay.start

    async def start_then_freeze(self: Relay) -> None:
        await original_start(self)
        gc.collect()
        gc.freeze()

    Relay.start = start_then_freeze  # type: ignore[method-assign]
    gc.collect()
    gc.freeze()
    gc.set_threshold(*limits)
    service_main.main()


if __name__ == "__main__":
    main()
