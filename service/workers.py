"""WORKERS > 1: several server processes per instance on one listening socket, so a multi-core box is used.

Each worker is an ordinary relay (its own Redis subscriber and hub); they share nothing but the socket, which the
parent binds once and hands to spawned children, as uvicorn's own supervisor does. The parent forwards SIGTERM
and SIGINT so every worker drains, restarts a worker that dies unexpectedly, and exits 0 only when all of them
exited 0.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import signal
import socket
import time
from multiprocessing.connection import wait
from types import FrameType

from .config import Settings

__all__ = ["run_workers"]

log = logging.getLogger("service.workers")


def _worker(sock: socket.socket, index: int) -> None:
    from .__main__ import serve
    from .logs import configure_logging

    settings = Settings.from_env()
    # Presence and logs need one name per process.
    settings = dataclasses.replace(settings, instance_id=f"{settings.instance_id or socket.gethostname()}/w{index}")
    configure_logging(settings.log_level, settings.log_format, settings.instance)
    raise SystemExit(0 if serve(settings, [sock]) else 1)


def run_workers(settings: Settings, sock: socket.socket) -> int:
    ctx = multiprocessing.get_context("spawn")
    procs: dict[int, multiprocessing.process.BaseProcess] = {}
    stopping = False

    def start(index: int) -> None:
        proc = ctx.Process(target=_worker, args=(sock, index), name=f"sse-relay-w{index}")
        proc.start()
        procs[index] = proc

    def on_signal(sig: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for proc in procs.values():
            if proc.pid is not None and proc.is_alive():
                os.kill(proc.pid, sig)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    for index in range(settings.workers):
        start(index)
    codes: dict[int, int | None] = {}
    while procs:
        wait([p.sentinel for p in procs.values()], timeout=1.0)
        for index, proc in list(procs.items()):
            if proc.is_alive():
                continue
            del procs[index]
            codes[index] = proc.exitcode
            if not stopping:
                log.error("worker died; restarting it", extra={"worker": index, "exitcode": proc.exitcode})
                time.sleep(0.5)
                start(index)
    sock.close()
    failed = {i: c for i, c in codes.items() if c != 0}
    if failed:
        log.error("workers exited with errors", extra={"exitcodes": failed})
        return 1
    return 0
