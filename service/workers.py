"""WORKERS > 1: several server processes per instance on one port, so a multi-core box is used.

Each worker is an ordinary relay (its own Redis subscriber and hub) with its own listening socket on the same
port (SO_REUSEPORT): the kernel spreads new connections over the workers by hash. One socket shared by all
workers would not: an idle worker blocked in accept tends to win every connection, so one process would hold
almost all streams. The parent forwards SIGTERM and SIGINT so every worker drains, restarts a worker that dies
unexpectedly, and exits 0 only when all of them exited 0. A worker whose parent is gone (killed outright, with no
signal to forward) drains and exits by itself.

So that one `/metrics` scrape answers for the whole instance, the parent makes a private temp directory where
the workers share their figures (service/worker_metrics.py), hands it to each worker as an argument (not an
environment variable: nothing else should inherit or set it), and removes it when it exits.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from multiprocessing.connection import wait
from pathlib import Path
from types import FrameType

from .config import Settings
from .uvicorn_glue import listen_with_send_buffer

__all__ = ["run_workers"]

log = logging.getLogger("service.workers")


def _listen(host: str, port: int, send_buffer: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if send_buffer:  # before listen: every connection it accepts inherits it (uvicorn_glue.listen_with_send_buffer)
        listen_with_send_buffer(sock, send_buffer)
    sock.bind((host, port))
    sock.listen(4096)
    sock.set_inheritable(True)
    return sock


def _orphan_watch(parent: int, interval: float = 0.5) -> None:
    """Drain and exit once the parent is gone. A supervisor killed outright (SIGKILL, the OOM killer) forwards no
    signal: its workers would keep serving the port (SO_REUSEPORT) for ever, beside the instance started in its
    place. Polled from a daemon thread: the parent's pid is the one fact a worker has of it, and SIGTERM to itself
    takes the same way out as the supervisor's (drain, then exit)."""
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        log.warning("supervisor gone; this worker drains and exits", extra={"parent": parent})
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="sse-relay-orphan-watch", daemon=True).start()


def _worker(index: int, metrics_dir: str, parent: int) -> None:
    from .logs import configure_logging
    from .server import serve

    _orphan_watch(parent)
    settings = Settings.from_env()
    sock = _listen(settings.host, settings.port, settings.send_buffer_bytes)
    # Presence and logs need one name per process.
    settings = dataclasses.replace(settings, instance_id=f"{settings.instance_id or socket.gethostname()}/w{index}")
    configure_logging(settings.log_level, settings.log_format, settings.instance)
    raise SystemExit(0 if serve(settings, [sock], (Path(metrics_dir), index)) else 1)


def _metrics_parent() -> str | None:
    """Where the workers' metrics directory goes: TMPDIR when the operator set one, else /dev/shm (memory) when
    there is one. Each worker rewrites its file every second: on ext4 replacing a file took ~260 us (the rename
    flushes the old file's data), on tmpfs ~30 us."""
    if os.environ.get("TMPDIR"):
        return None  # tempfile uses it
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK | os.X_OK) else None


def run_workers(settings: Settings) -> int:
    # Fail fast, in the parent, when the port is taken by something that is not us.
    probe = socket.socket(socket.AF_INET6 if ":" in settings.host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        probe.bind((settings.host, settings.port))
    except OSError as exc:
        log.error("cannot listen", extra={"host": settings.host, "port": settings.port, "error": str(exc)})
        return 1
    finally:
        probe.close()
    metrics_dir = tempfile.mkdtemp(prefix="sse-relay-metrics-", dir=_metrics_parent())  # 0700, ours alone
    try:
        return _supervise(settings, metrics_dir)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _supervise(settings: Settings, metrics_dir: str) -> int:
    ctx = multiprocessing.get_context("spawn")
    procs: dict[int, multiprocessing.process.BaseProcess] = {}
    stopping = False

    def start(index: int) -> None:
        proc = ctx.Process(target=_worker, args=(index, metrics_dir, os.getpid()), name=f"sse-relay-w{index}")
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
    failed = {i: c for i, c in codes.items() if c != 0}
    if failed:
        log.error("workers exited with errors", extra={"exitcodes": failed})
        return 1
    return 0
