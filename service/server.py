"""One server process: uvicorn (uvloop, the guarded httptools protocol) running the app, drained on a signal.

We own the exit signals instead of uvicorn: the first SIGTERM/SIGINT drains (readiness turns 503 at once, open
streams are closed spread over DRAIN_GRACE with a jittered `retry:`), then the server stops and the process
exits 0. uvicorn would otherwise wait for streams that never end on their own, and re-raise the signal at
exit. A second signal exits at once. Both the entry point (`__main__`) and the worker processes (`workers`) run
`serve`.
"""

from __future__ import annotations

import gc
import logging
import math
import socket
from pathlib import Path

import uvicorn

from .app import create_app, server_entry
from .clients import TrustedProxies
from .config import Settings
from .http11 import http11_protocol
from .relay import Relay
from .uvicorn_glue import DrainingServer, UvicornEdge
from .uvicorn_protocol import guarded_protocol

__all__ = ["serve"]

log = logging.getLogger("service")


def _protocol(settings: Settings) -> type:
    """The connection's code: the service's own (http11, the default) or uvicorn's with the guards composed on."""
    trusted = TrustedProxies(settings.trusted_proxy_networks())
    if settings.http_protocol == "uvicorn":
        return guarded_protocol(settings.request_timeout, settings.max_connections_per_client, trusted,
                                settings.send_buffer_bytes)
    return http11_protocol(settings.request_timeout, settings.keepalive_timeout, settings.max_connections_per_client,
                           trusted, settings.send_buffer_bytes)


def _config(settings: Settings, app: object) -> uvicorn.Config:
    """Every uvicorn setting that matters, chosen here rather than inherited from uvicorn's defaults."""
    return uvicorn.Config(
        app,  # type: ignore[arg-type]
        interface="asgi3",  # the entry (app.server_entry) is a plain callable returning an awaitable
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http=_protocol(settings),
        # No WebSocket: an upgrade request is answered as plain HTTP (http11, uvicorn_protocol.NoUpgrade), and
        # uvicorn never hands a connection to a protocol whose end would not give back its counts.
        ws="none",
        lifespan="on",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=max(1, math.ceil(settings.drain_grace / 2)),
        timeout_keep_alive=max(1, math.ceil(settings.keepalive_timeout)),
        backlog=4096,
        limit_concurrency=None,  # never a 503 on a stream: MAX_STREAMS answers 200 + retry instead
        # The client address is the service's business (TRUST_PROXY_HEADERS, clients.client_ip), not uvicorn's:
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


def serve(settings: Settings, sockets: list[socket.socket] | None = None,
          shared_metrics: tuple[Path, int] | None = None) -> bool:
    """Run one server process until it has drained; False if it never started (e.g. the port was taken).

    `shared_metrics`, for a worker (WORKERS > 1): the instance's metrics directory and this worker's index, so
    that its scrapes answer for every worker (service/worker_metrics.py)."""
    thresholds = settings.gc_threshold_values()
    if thresholds is not None:
        # Under fan-out the collector walks every stream's objects again and again; measured in bench/: with
        # Python's defaults it took ~40% of the CPU and most of the p99 latency.
        gc.set_threshold(*thresholds)
    _raise_open_files_limit()
    relay = Relay(settings, edge=UvicornEdge())
    if shared_metrics is not None:
        relay.metrics.share(*shared_metrics)
    server = DrainingServer(_config(settings, server_entry(create_app(settings, relay))), relay,
                            freeze_gc=settings.gc_threshold_values() is not None,
                            send_buffer=settings.send_buffer_bytes)
    server.run(sockets=sockets)
    return bool(server.started)
