"""What each HTTP request did, for operators: one structured log line and request metrics per request, and a
filter that keeps query strings (where `?token=` may ride) out of uvicorn's own access log.

Cheap on purpose, since every publish passes here: no task, frame or object per request beyond a closure the
request context already makes; the metrics are plain integers in a dict, exposed at scrape time
(metrics.Metrics.http_requests), and the line is one `Logger.info` call that returns at once below `info`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from starlette.types import Scope

from .metrics import Metrics

__all__ = ["StripQueryString", "install_access_log_filter", "record_request", "route_of"]

log = logging.getLogger("service.access")


def route_of(scope: Scope) -> str:
    """The route template (`/channels/{channel}/messages`), never the path: bounded label values, and nothing a
    client typed (a query string, a token) reaches a log or a metric."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) and path else "unmatched"


def record_request(scope: Scope, status: int, started: float, metrics: Metrics) -> None:
    """Count the request and log its line: method, route template, status, duration, client (the request id is
    added by the log formatter from the request's context)."""
    duration = time.perf_counter() - started
    method: str = scope["method"]
    route = route_of(scope)
    metrics.http_request(method, route, status, duration)
    if log.isEnabledFor(logging.INFO):
        client = scope.get("client")
        # makeRecord + handle is what `log.info` does, less `findCaller`'s walk up the stack (~4 us of ~22)
        log.handle(log.makeRecord(log.name, logging.INFO, __file__, 0, "request", (), None, extra={
            "method": method, "route": route, "status": status, "duration_ms": round(duration * 1000, 2),
            "client": client[0] if client else "-"}))


class StripQueryString(logging.Filter):
    """For uvicorn's access log (`uvicorn.access`): the request line without its query string. Installed by
    `create_app`, so it holds wherever the app runs (`uvicorn examples.fastapi_app:app`, a mounted relay), not only
    under `python -m service`, which turns that log off anyway."""

    def filter(self, record: logging.LogRecord) -> bool:
        args: Any = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and "?" in args[2]:
            record.args = (*args[:2], args[2].split("?", 1)[0], *args[3:])
        return True


def install_access_log_filter() -> None:
    """Add `StripQueryString` to uvicorn's access logger, once per process."""
    logger = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, StripQueryString) for f in logger.filters):
        logger.addFilter(StripQueryString())
