"""`python -m service` / `sse-relay`: run one instance under uvicorn (uvloop, httptools).

The command line (`--help`, `--version`, a flag per setting) is service/cli.py; flags are written into the
environment before the settings are read. Exit status (cli.EXIT_CODES): 0 clean, 1 the server failed, 2 a bad
flag or setting, 3 it could not listen.

We own the exit signals instead of uvicorn: the first SIGTERM/SIGINT drains (readiness turns 503 at once, open
streams are closed spread over DRAIN_GRACE with a jittered `retry:`), then the server stops and the process
exits 0. uvicorn would otherwise wait for streams that never end on their own, and re-raise the signal at
exit. A second signal exits at once.
"""

from __future__ import annotations

import logging
import os
import sys

from .cli import apply_command_line
from .config import ConfigError, Settings
from .logs import configure_logging
from .server import serve

log = logging.getLogger("service")


def main(argv: list[str] | None = None) -> None:
    apply_command_line(argv)  # --help, --version and bad flags exit here, before anything starts
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
