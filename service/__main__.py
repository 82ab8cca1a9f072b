"""`python -m service` / `sse-relay`: run one instance under uvicorn (uvloop, httptools).

We own the exit signals instead of uvicorn: the first SIGTERM/SIGINT drains (readiness turns 503 at once, open
streams are closed spread over DRAIN_GRACE with a jittered `retry:`), then the server stops and the process
exits 0. uvicorn would otherwise wait for streams that never end on their own, and re-raise the signal at
exit. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import os
import signal
import socket
import sys
from types import FrameType

import uvicorn

from .app import create_app
from .config import ConfigError, Settings
from .logs import configure_logging
from .ratelimit import TrustedProxies
from .relay import Relay
from .uvicorn_glue import guarded_protocol

log = logging.getLogger("service")


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, relay: Relay) -> None:
        super().__init__(config)
        self.relay = relay
        self._drain_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[object] | None = None) -> None:  # type: ignore[override]
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)  # type: ignore[arg-type]

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.relay.settings.gc_threshold_values() is not None:
            # Everything alive now lives as long as the process: never walk it again (see GC_THRESHOLDS).
            gc.collect()
            gc.freeze()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_task is not None or self._loop is None:
            self.force_exit = True
            self.should_exit = True
            return
        # Readiness turns 503 and new streams are turned away from this very moment, before the loop runs again.
        self.relay.draining = True
        log.info("signal received; draining", extra={"signal": signal.Signals(sig).name})
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        if self._drain_task is None:
            self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        try:
            await self.relay.drain()
        finally:
            self.should_exit = True


def _config(settings: Settings, app: object) -> uvicorn.Config:
    """Every uvicorn setting that matters, chosen here rather than inherited from uvicorn's defaults."""
    return uvicorn.Config(
        app,  # type: ignore[arg-type]
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http=guarded_protocol(settings.request_timeout, settings.max_connections_per_client,
                              TrustedProxies(settings.trusted_proxy_networks()), settings.send_buffer_bytes),
        lifespan="on",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=max(1, math.ceil(settings.drain_grace / 2)),
        timeout_keep_alive=max(1, math.ceil(settings.keepalive_timeout)),
        backlog=4096,
        limit_concurrency=None,  # never a 503 on a stream: MAX_STREAMS answers 200 + retry instead
        # The client address is the service's business (TRUST_PROXY_HEADERS, ratelimit.client_ip), not uvicorn's:
        # uvicorn would believe the leftmost X-Forwarded-For hop, which the client wrote, from FORWARDED_ALLOW_IPS.
        proxy_headers=False,
        server_header=False,
    )


def _raise_open_files_limit() -> None:
    """Every stream is a file descriptor: use the hard limit, not the (often 1024) soft one."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError) as exc:
        log.warning("could not raise the open files limit", extra={"error": str(exc)})


def serve(settings: Settings, sockets: list[socket.socket] | None = None) -> bool:
    """Run one server process until it has drained; False if it never started (e.g. the port was taken)."""
    thresholds = settings.gc_threshold_values()
    if thresholds is not None:
        # Under fan-out the collector walks every stream's objects again and again; measured in bench/: with
        # Python's defaults it took ~40% of the CPU and most of the p99 latency.
        gc.set_threshold(*thresholds)
    _raise_open_files_limit()
    relay = Relay(settings)
    server = _Server(_config(settings, create_app(settings, relay)), relay)
    server.run(sockets=sockets)
    return bool(server.started)


def main() -> None:
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"sse-relay: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(settings.log_level, settings.log_format, settings.instance)
    if os.environ.get("FORWARDED_ALLOW_IPS"):
        log.warning("FORWARDED_ALLOW_IPS is ignored: list your proxies in TRUST_PROXY_HEADERS instead",
                    extra={"trust_proxy_headers": ",".join(map(str, settings.trusted_proxy_networks())) or "nobody"})
    log.info("listening", extra={"url": f"http://{settings.host}:{settings.port}", "workers": settings.workers})
    if settings.workers > 1:
        from .workers import run_workers

        raise SystemExit(run_workers(settings))
    if not serve(settings):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
