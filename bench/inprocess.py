"""What a publish and a stream's opening cost in Python alone: the service's HTTP connection (HTTP_PROTOCOL's)
fed request bytes from fake transports, in this process, against a real Redis (or the embedded broker), no
sockets and no other process on the clock.

    .venv/bin/python -m bench.inprocess publish --redis redis://127.0.0.1:6390/0    # µs of CPU per publish
    .venv/bin/python -m bench.inprocess rooms --redis redis://127.0.0.1:6390/0      # + its 5 deliveries
    .venv/bin/python -m bench.inprocess open --redis redis://127.0.0.1:6390/0       # µs per stream opened
    .venv/bin/python -m bench.inprocess open --objects                               # + what an idle stream holds

`publish`: 100 keep-alive connections, one request in flight each, publishes round 1,000 rooms nobody listens to
(the publish path up to its 202: uvicorn's parsing and request cycle, the routes, auth, the Redis round trip).
`rooms`: the same publishes to 1,000 rooms of 5 streams each (`--streams`, default 5,000), each publish's 5
deliveries written to the streams' transports before the round ends: the whole server side of the bench's `rooms`
scenario but the sockets.
`open`: 10,000 streams into 2,000 new rooms, 1,000 at once, each until its `relay.hello`. The loop is uvloop and
the garbage collector runs with the service's GC_THRESHOLDS, as under `python -m service`. Use it to compare two
versions of the code (the figures move with the machine); the side-by-side benchmark is `bench/run.py`. Point it
at a Redis of its own: the rooms it publishes to stay there.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import os
import random
import sys
import time
from typing import Any

__all__ = ["main"]


class _Transport:
    """What uvicorn's protocol and the service write to: `on_write(index, data)` sees every send."""

    def __init__(self, index: int, on_write: Any) -> None:
        self.index, self.on_write, self.closing = index, on_write, False
        self.extra = {"peername": (f"127.0.0.{2 + index % 200}", 20000 + index), "sockname": ("127.0.0.1", 8000)}

    def write(self, data: Any) -> None:
        self.on_write(self.index, bytes(data))

    def writelines(self, chunks: Any) -> None:
        self.write(b"".join(chunks))

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.extra.get(name, default)

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None: ...

    def get_write_buffer_size(self) -> int:
        return 0


async def _run(args: argparse.Namespace) -> None:
    os.environ.update({"PUBLIC_CHANNELS": "*", "PUBLISH_RATE_LIMIT": f"{args.limiter:g}", "LOG_LEVEL": "warning",
                       "MAX_CONNECTIONS_PER_CLIENT": "0", "MAX_STREAMS_PER_CLIENT": "0", "MAX_STREAMS": "100000"})
    if args.redis:
        os.environ["REDIS_URL"] = args.redis
    else:
        os.environ.pop("REDIS_URL", None)
    from uvicorn.server import ServerState

    from service.app import create_app, server_entry
    from service.config import Settings
    from service.relay import Relay
    from service.server import _config
    from service.uvicorn_glue import UvicornEdge

    settings = Settings.from_env()
    thresholds = settings.gc_threshold_values()
    if thresholds is not None:
        gc.set_threshold(*thresholds)
    relay = Relay(settings, edge=UvicornEdge())
    app = create_app(settings, relay)
    config = _config(settings, server_entry(app))
    config.load()
    state = ServerState()
    loop = asyncio.get_running_loop()
    waiting: dict[str, Any] = {"left": 0, "done": None}

    def one_done() -> None:
        waiting["left"] -= 1
        if waiting["left"] == 0:
            waiting["done"].set_result(None)

    def connect(index: int, on_write: Any) -> Any:
        protocol = config.http_protocol_class(config=config, server_state=state, app_state={}, _loop=loop)
        protocol.connection_made(_Transport(index, on_write))
        return protocol

    async with relay.lifespan(app):
        gc.collect()
        gc.freeze()
        if args.what in ("publish", "rooms"):
            body = b'{"data":{"t":1234567890123,"s":1,"r":2,"pad":"' + b"x" * 56 + b'"}}'
            rooms_tag = b"rooms%d_" % random.randrange(1 << 30) if args.what == "rooms" else b"inproc_"
            requests = [b"POST /channels/%s%d/messages HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n"
                        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                        % (rooms_tag, i, len(body), body) for i in range(1000)]
            answers: list[bytes] = []
            listeners: list[Any] = []
            per_publish = 0
            if args.what == "rooms":
                # 5 streams a room in the 1,000 rooms published to: each publish is 5 deliveries, counted as they
                # are written (a round ends when its 100 answers and 500 deliveries are all out)
                per_publish = max(1, (args.streams or 5000) // 1000)

                delivered = [0] * (1000 * per_publish)

                def greeted_or_delivered(index: int, data: bytes) -> None:
                    # every frame, the greeting (`relay.hello`) as each message, has one `data:` line
                    frames = data.count(b"\ndata: ")
                    delivered[index - 1000] += frames
                    for _ in range(frames):
                        one_done()

                waiting["left"], waiting["done"] = 1000 * per_publish, loop.create_future()
                for i in range(1000 * per_publish):
                    protocol = connect(1000 + i, greeted_or_delivered)
                    listeners.append(protocol)
                    protocol.data_received(b"GET /channels/%s%d/events HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n"
                                           b"Accept: text/event-stream\r\n\r\n" % (rooms_tag, i % 1000))
                await waiting["done"]

            def answered(index: int, data: bytes) -> None:
                answers.append(data)
                one_done()

            connections = [connect(i, answered) for i in range(100)]
            sent = 0

            async def rounds(n: int) -> None:
                nonlocal sent
                for _ in range(n):
                    waiting["left"] = len(connections) * (1 + per_publish)
                    waiting["done"] = loop.create_future()
                    for protocol in connections:
                        protocol.data_received(requests[sent % 1000])
                        sent += 1
                    await waiting["done"]

            await rounds(50)
            assert all(a.startswith(b"HTTP/1.1 202") for a in answers), [a[:200] for a in answers if a[:12] != b"HTTP/1.1 202"][:1]
            cpu, wall = time.process_time(), time.perf_counter()
            await rounds(args.rounds)
            n = args.rounds * len(connections)
            if listeners:  # each stream has its greeting and every message of its room, none twice
                total = sent
                due = [1 + total // 1000 + (i % 1000 < total % 1000) for i in range(len(listeners))]
                wrong = [i for i, (got, want) in enumerate(zip(delivered, due, strict=True)) if got != want]
                assert not wrong, f"{len(wrong)} streams off, e.g. #{wrong[0]}: {delivered[wrong[0]]} != {due[wrong[0]]}"
            print(f"{args.what}: {(time.process_time() - cpu) / n * 1e6:.1f} µs CPU per publish "
                  f"({(time.perf_counter() - wall) / n * 1e6:.1f} µs wall), {n} publishes"
                  + (f" to {len(listeners)} streams in 1,000 rooms ({per_publish} deliveries each)" if listeners
                     else "") + ", "
                  f"{'Redis ' + args.redis if args.redis else 'embedded broker'}"
                  + (f", PUBLISH_RATE_LIMIT={args.limiter:g}" if args.limiter else ""))
            for protocol in listeners:
                protocol.connection_lost(None)
            await asyncio.sleep(0.2)
            return
        streams = args.streams or 10000
        rooms, at_once = args.rooms or max(1, streams // 5), 1000
        tag = random.randrange(1 << 30)
        opened: list[Any] = []

        def greeted_by(index: int, data: bytes) -> None:
            if b"relay.hello" in data:
                one_done()

        async def open_batch(start: int, count: int, prefix: bytes) -> None:
            waiting["left"], waiting["done"] = count, loop.create_future()
            for i in range(start, start + count):
                protocol = connect(i, greeted_by)
                opened.append(protocol)
                protocol.data_received(b"GET /channels/%s_%d/events HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n"
                                       b"Accept: text/event-stream\r\n\r\n" % (prefix, i % rooms))
            await waiting["done"]

        await open_batch(0, 500, b"warm%d" % tag)
        before = collections.Counter(type(o).__name__ for o in gc.get_objects()) if args.objects else None
        cpu, wall = time.process_time(), time.perf_counter()
        for start in range(0, streams, at_once):
            await open_batch(start, min(at_once, streams - start), b"open%d" % tag)
        print(f"open: {(time.process_time() - cpu) / streams * 1e6:.1f} µs CPU per stream "
              f"({time.perf_counter() - wall:.2f} s wall for {streams} streams into {rooms} new rooms), "
              f"{'Redis ' + args.redis if args.redis else 'embedded broker'}")
        if before is not None:
            gc.collect()
            after = collections.Counter(type(o).__name__ for o in gc.get_objects())
            grown = after - before
            print(f"objects the collector tracks, per idle stream: {sum(grown.values()) / streams:.1f}")
            for name, count in grown.most_common(12):
                print(f"  {count / streams:5.2f} {name}")
        for protocol in opened:
            protocol.connection_lost(None)
        await asyncio.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.inprocess", description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("publish", "rooms", "open"))
    parser.add_argument("--redis", help="a Redis URL of its own (default: the embedded broker)")
    parser.add_argument("--rounds", type=int, default=600, help="publish, rooms: rounds of 100 publishes (default 600)")
    parser.add_argument("--streams", type=int, default=0, help="open: streams (default 10,000); rooms: 5,000 unless given")
    parser.add_argument("--rooms", type=int, default=0, help="open: rooms the streams go into (default: streams / 5)")
    parser.add_argument("--objects", action="store_true", help="open: count what the idle streams hold")
    parser.add_argument("--limiter", type=float, default=0.0,
                        help="publish: PUBLISH_RATE_LIMIT per client (default 0: off); the 100 connections are 100 "
                             "clients (127.0.0.2 ...), so a rate above ~1000/s refuses none")
    args = parser.parse_args(argv)
    import uvloop

    uvloop.run(_run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
