"""Hold N idle SSE streams open with plain blocking-free sockets: the memory scenario's independent client.

Why a second client: the idle-stream figure should not depend on the load generator's own code path (its request
headers, how many streams it opens at once, when it considers a stream open). This one shares nothing with
`bench/loadgen.py`: `socket` + `selectors`, one process, no asyncio, no uvloop. It sends the request a browser's
EventSource sends at minimum (`GET`, `Host`, `Accept: text/event-stream`, `Cache-Control: no-cache`), or more
with `--header`, opens at most `--concurrency` streams at a time, and counts a stream as open once its first
bytes match `--greet` (the relay's `relay.hello` with its `id:`) or, without it, once its 200 head arrived.
Then it stops reading (what the server sends later waits in the kernel), prints one JSON line and holds every
socket until a line or EOF on stdin, or `--hold` seconds, then closes them.

    python -m bench.rawidle --url http://127.0.0.1:8000/channels/mem/events -n 10000 --greet 'event: relay.hello'
"""

from __future__ import annotations

import argparse
import errno
import json
import re
import resource
import selectors
import socket
import sys
import time
from urllib.parse import urlsplit

RELAY_GREETING = r"id: ?\S+\r?\nevent: relay\.hello"


def hold_streams(host: str, port: int, path: str, n: int, greet: str | None, concurrency: int, timeout: float,
                 headers: list[str]) -> tuple[list[socket.socket], dict[str, object]]:
    """Open `n` streams, at most `concurrency` in progress; returns the open sockets and what happened."""
    extra = "".join(f"{h}\r\n" for h in headers)
    host_header = host if port == 80 else f"{host}:{port}"
    request = (f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\nAccept: text/event-stream\r\n"
               f"Cache-Control: no-cache\r\n{extra}\r\n").encode()
    greet_re = re.compile(greet.encode()) if greet else None
    sel = selectors.DefaultSelector()
    bufs: dict[socket.socket, bytes] = {}
    held: list[socket.socket] = []
    errors: dict[str, int] = {}
    started = failed = 0
    t0 = time.monotonic()
    deadline = t0 + timeout

    def fail(s: socket.socket, why: str) -> None:
        nonlocal failed
        failed += 1
        errors[why] = errors.get(why, 0) + 1
        sel.unregister(s)
        bufs.pop(s, None)
        s.close()

    while len(held) + failed < n and time.monotonic() < deadline:
        while started < n and len(bufs) < concurrency:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            rc = s.connect_ex((host, port))
            started += 1
            if rc not in (0, errno.EINPROGRESS):
                errors[f"connect {errno.errorcode.get(rc, rc)}"] = errors.get(f"connect {errno.errorcode.get(rc, rc)}", 0) + 1
                failed += 1
                s.close()
                continue
            bufs[s] = b""
            sel.register(s, selectors.EVENT_WRITE)
        for key, events in sel.select(0.1):
            s = key.fileobj
            assert isinstance(s, socket.socket)
            if events & selectors.EVENT_WRITE:
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    fail(s, f"connect {errno.errorcode.get(err, err)}")
                    continue
                s.send(request)  # a few hundred bytes into an empty send buffer
                sel.modify(s, selectors.EVENT_READ)
                continue
            try:
                data = s.recv(65536)
            except OSError as exc:
                fail(s, type(exc).__name__)
                continue
            if not data:
                fail(s, "closed")
                continue
            buf = bufs[s] + data
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                bufs[s] = buf
                continue
            if buf[9:12] != b"200":
                fail(s, f"HTTP {buf[9:12].decode(errors='replace')}")
                continue
            if greet_re is not None and not greet_re.search(buf, end):
                bufs[s] = buf
                continue
            sel.unregister(s)
            del bufs[s]
            held.append(s)
    for s in list(bufs):
        fail(s, "timeout")
    sel.close()
    return held, {"open": len(held), "wanted": n, "failed": failed, "errors": errors,
                  "seconds": round(time.monotonic() - t0, 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.rawidle", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="the stream URL, e.g. http://127.0.0.1:8000/channels/c/events")
    p.add_argument("-n", type=int, default=10000, help="streams to hold")
    p.add_argument("--greet", help="regex the stream's first bytes must match (default: the 200 head suffices)")
    p.add_argument("--relay", action="store_true", help="--greet the relay's relay.hello carrying its id")
    p.add_argument("--concurrency", type=int, default=256, help="streams being opened at once")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to open them all")
    p.add_argument("--hold", type=float, default=600.0, help="seconds at most to hold them")
    p.add_argument("--header", action="append", default=[], help="extra request header (repeatable)")
    a = p.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    u = urlsplit(a.url)
    if u.scheme != "http":
        raise SystemExit("only http:// URLs")
    path = (u.path or "/") + (f"?{u.query}" if u.query else "")
    greet = RELAY_GREETING if a.relay else a.greet
    held, report = hold_streams(u.hostname or "127.0.0.1", u.port or 80, path, a.n, greet, a.concurrency, a.timeout,
                                a.header)
    print(json.dumps(report), flush=True)
    sel = selectors.DefaultSelector()
    sel.register(sys.stdin, selectors.EVENT_READ)
    sel.select(min(a.hold, 3600))  # a line, EOF, or the time limit
    for s in held:
        s.close()
    return 0 if report["open"] == a.n else 1


if __name__ == "__main__":
    raise SystemExit(main())
