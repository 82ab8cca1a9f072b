"""Test support: waiting (`eventually`), real processes on free loopback ports (redis-server, the service, nginx),
an ASGI app served in the test's own loop (and a relay with a token key, `serve`, with the tokens the tests use),
publishers, and a proxy that stalls.

The SSE client every test reads streams with is in tests/sse.py.

Nothing here touches the shared Redis on 6379: every test Redis is our own process in a temp dir, which the
tests may kill and restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, overload

import httpx
import orjson
import uvicorn

from service import Settings, create_app
from service.relay import Relay
from service.tokens import mint

if TYPE_CHECKING:
    from .sse import SSEStream

ROOT = Path(__file__).resolve().parent.parent


# -- waiting ------------------------------------------------------------------------------------------------------


class Changes:
    """What `eventually()` waits on: whoever changes some state calls `notify()`, and every waiter re-checks.

    Unlike an `asyncio.Event` nothing is ever cleared, so any number of waiters can share one without one of
    them swallowing a change another was waiting for.
    """

    def __init__(self) -> None:
        self._waiters: list[asyncio.Future[None]] = []

    def notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def next(self) -> asyncio.Future[None]:
        """A future that completes at the next `notify()`."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        return waiter


T = TypeVar("T")


def _describe(what: str | Callable[[], str]) -> str:
    return what() if callable(what) else what


@overload
async def eventually(condition: Callable[[], Awaitable[T | None]], timeout: float = ...,
                     what: str | Callable[[], str] = ..., *, on: Changes | None = ..., every: float = ...) -> T: ...


@overload
async def eventually(condition: Callable[[], T | None], timeout: float = ...,
                     what: str | Callable[[], str] = ..., *, on: Changes | None = ..., every: float = ...) -> T: ...


async def eventually(condition: Callable[[], Any], timeout: float = 10.0,
                     what: str | Callable[[], str] = "the condition", *, on: Changes | None = None,
                     every: float = 0.05) -> Any:
    """Await `condition()` until it is truthy, and return its value; after `timeout` seconds fail, naming `what`.

    With `on` (the `Changes` of what the condition reads: a stream, a publisher) it is re-checked each time that
    changes, never on a timer. Without it, it is polled every `every` seconds: for state outside this event loop
    (another process, Redis, /metrics) or with no change to wait on (the relay's registry of open streams),
    always with this deadline. The condition may be a coroutine function (an
    HTTP probe), and may raise AssertionError to fail at once (a stream that ended). `what` may be a function,
    called only on failure, to say what was seen instead.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        changed = on.next() if on is not None else None  # before the check: a change during it is not missed
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            if changed is not None:
                changed.cancel()
            return value
        left = deadline - loop.time()
        if left <= 0:
            if changed is not None:
                changed.cancel()
            raise AssertionError(f"{_describe(what)}: not within {timeout:g}s")
        if changed is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed, left)
        else:
            await asyncio.sleep(min(every, left))


def eventually_blocking(condition: Callable[[], T | None], timeout: float = 10.0,
                        what: str | Callable[[], str] = "the condition", every: float = 0.05) -> T:
    """`eventually()` for code that has no event loop to give back (sync fixtures, helpers run in a thread):
    polls `condition` every `every` seconds until it is truthy, for at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{_describe(what)}: not within {timeout:g}s")
        time.sleep(every)


# -- ports and processes ------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def wait_port(port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
    eventually_blocking(lambda: _listening(host, port), timeout, f"something listening on {host}:{port}", every=0.02)


class RedisServer:
    """A redis-server of the test's own; `kill()` is `kill -9`, `start()` brings it back on the same port/data."""

    def __init__(self, tmp: Path, port: int | None = None, appendonly: bool = True, extra: list[str] | None = None):
        self.port = port or free_port()
        self.dir = tmp
        self.appendonly = appendonly
        self.extra = extra or []
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: run `bash .ci/run` or `apt-get install redis-server`")
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir), "--save", "",
                "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "always",
                "--daemonize", "no", "--protected-mode", "no", "--loglevel", "warning",
                "--enable-debug-command", "local", *self.extra]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        eventually_blocking(self._pong, 10, f"redis-server answering PING on {self.port}", every=0.02)

    def _pong(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc = None


class ProcessSet:
    """Redis processes of a test (a Cluster's nodes, Sentinel and its servers), by port: `kill(port)` is
    `kill -9` of one, `stop()` of all."""

    procs: dict[int, subprocess.Popen[bytes]]

    def kill(self, port: int) -> None:
        self.procs[port].kill()
        self.procs[port].wait(5)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)


class ServiceProcess:
    """`python -m service` as a real process; stderr goes to a log file the test can show on failure."""

    def __init__(self, tmp: Path, env: dict[str, str] | None = None, name: str = "svc") -> None:
        self.port = free_port()
        self.name = name
        self.log_path = tmp / f"{name}-{self.port}.log"
        self.env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(self.port), "INSTANCE_ID": name,
                    "LOG_LEVEL": "info",
                    # permissive unless a test says otherwise: tests use many channels from one address
                    "PUBLIC_CHANNELS": "*", "PUBLISH_RATE_LIMIT": "0", "MAX_STREAMS_PER_CLIENT": "0",
                    "MAX_CONNECTIONS_PER_CLIENT": "0",
                    **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait_ready: bool = True) -> ServiceProcess:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=self.env,
                                     stdout=log, stderr=subprocess.STDOUT)
        log.close()
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 15.0) -> None:
        eventually_blocking(self._ready, timeout, lambda: f"{self.name} ready:\n{self.log()}")

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
        try:
            # ready, and its Redis connections up (readiness alone does not wait for the broker)
            return (httpx.get(self.url + "/readyz", timeout=0.5).status_code == 200
                    and httpx.get(self.url + "/healthz/broker", timeout=0.5).status_code == 200)
        except httpx.HTTPError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


NGINX_CONF = ROOT / "deploy" / "nginx" / "nginx.conf"


@contextlib.contextmanager
def replicas(tmp: Path, env: dict[str, str], *names: str) -> Iterator[list[ServiceProcess]]:
    """Replicas of the service, started side by side (each waits for the others' start-up, not in turn), stopped
    at the end whatever happened."""
    started = [ServiceProcess(tmp, env, name=name) for name in names]
    try:
        for r in started:
            r.start(wait_ready=False)
        for r in started:
            r.wait_ready()
        yield started
    finally:
        for r in started:
            r.stop()


def render_nginx_conf(source: str, listen_port: int, upstream_ports: list[int], runtime_dir: Path) -> str:
    """The shipped config with exactly the substitutions its header comment documents, and nothing else.

    Only directive lines are touched (the header comment quotes the same strings); each substitution must
    apply, so a change to the shipped file that breaks the templating fails here instead of testing
    something else.
    """
    rules: list[tuple[str, str, Callable[[int], bool]]] = [
        ("listen 80;", f"listen 127.0.0.1:{listen_port};", lambda n: n == 1),
        (
            "server relay:8000 resolve;",
            " ".join(f"server 127.0.0.1:{p};" for p in upstream_ports),
            lambda n: n == 1,
        ),
        ("/var/cache/nginx/", f"{runtime_dir}/", lambda n: n >= 1),
        ("${NGINX_RESOLVER}", "127.0.0.1", lambda n: n == 1),  # the compose image fills it in; unused here
    ]
    lines = source.splitlines(keepends=True)
    for old, new, expected in rules:
        hits = 0
        for i, line in enumerate(lines):
            if not line.lstrip().startswith("#") and old in line:
                lines[i] = line.replace(old, new)
                hits += 1
        assert expected(hits), (
            f"{NGINX_CONF}: {old!r} found on {hits} directive lines; the test templating needs it"
        )
    return "".join(lines)


def nginx_binary() -> str:
    binary = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)
    if binary is None:
        raise RuntimeError(
            "nginx is not installed: run `scripts/test` or `apt-get install nginx` (Debian's package)"
        )
    return binary


class Nginx:
    """Debian's nginx in the foreground with the shipped deploy/nginx/nginx.conf, templated for addresses only
    (`render_nginx_conf`), in a temp prefix; logs in that prefix."""

    def __init__(self, upstream_ports: list[int]) -> None:
        self.port = free_port()
        # Not under pytest's 0700 tmp dirs: as root, nginx's workers run as `nobody` and must reach their temp dirs.
        self.prefix = Path(tempfile.mkdtemp(prefix="sse-relay-nginx-"))
        self.prefix.chmod(0o755)
        self.conf = self.prefix / "nginx.conf"
        self.conf.write_text(
            render_nginx_conf(NGINX_CONF.read_text(), self.port, upstream_ports, self.prefix)
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self, *extra: str) -> list[str]:
        return [
            nginx_binary(),
            "-p",
            f"{self.prefix}/",
            "-c",
            str(self.conf),
            "-e",
            "stderr",
            "-g",
            f"pid {self.prefix}/nginx.pid;{' daemon off;' if not extra else ''}",
            *extra,
        ]

    def start(self) -> None:
        check = subprocess.run(self.command("-t"), check=False, capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, f"nginx -t rejected the shipped config:\n{check.stderr}"
        with open(self.prefix / "access.log", "ab") as out, open(self.prefix / "error.log", "ab") as err:
            self.proc = subprocess.Popen(self.command(), stdout=out, stderr=err)
        eventually_blocking(lambda: _listening("127.0.0.1", self.port), 10,
                            lambda: f"nginx listening:\n{self.log()}", every=0.02)

    def log(self) -> str:
        path = self.prefix / "error.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # fast shutdown: open streams are cut, as they are at the end of a test
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.prefix, ignore_errors=True)


@contextlib.asynccontextmanager
async def running_app(app: Any) -> AsyncIterator[str]:
    """Serve an ASGI app with a real uvicorn server in this event loop; yields its base URL."""
    port = free_port()
    # proxy_headers off as in `python -m service`: uvicorn would otherwise rewrite the client address from
    # X-Forwarded-For for loopback peers, and the relay's own TRUST_PROXY_HEADERS would not be what is tested.
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on",
                            timeout_graceful_shutdown=2, proxy_headers=False)
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve())

    def started() -> bool:
        if task.done():
            task.result()  # it failed to start: say why
        return bool(server.started)

    await eventually(started, 10, "uvicorn started", every=0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(task, 10)


# -- a relay in this event loop, with a token key ------------------------------------------------------------------


SECRET = "test-" + secrets.token_urlsafe(40)


def token(**claims: Any) -> str:
    claims.setdefault("ttl", 86400)  # minted at collection time; the suite may run long before these tests
    return mint(SECRET, **claims)


def expired_token() -> str:
    return mint(SECRET, publish=["*"], subscribe=["*"], ttl=60, now=time.time() - 120)


def bearer(tok: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}"}


ADMIN = bearer(token(sub="admin", publish=["*"], subscribe=["*"]))


@dataclass
class Served:
    url: str
    relay: Relay

    async def history(self, channel: str) -> list[Any]:
        """Data of every message the channel retains: what a `?last_event_id=0` reader would replay."""
        return [orjson.loads(bytes(m.data)) for m in (await self.relay.broker.history(channel, None, 10_000)).messages]

    async def replay(self, channel: str, headers: dict[str, str] | None = None) -> list[Any]:
        """The same through HTTP: a `last_event_id=0` stream read until a marker published after it arrives."""
        from .sse import SSEStream  # here: tests/sse.py reads with this module's eventually()

        marker = {"marker": secrets.token_hex(4)}
        async with httpx.AsyncClient(base_url=self.url) as c:
            assert (await c.post(f"/channels/{channel}/messages", json={"data": marker}, headers=ADMIN)).status_code == 202
        async with SSEStream(f"{self.url}/channels/{channel}/events?last_event_id=0", headers=headers or ADMIN) as r:
            await r.wait(lambda r: marker in r.data("message"), 10, "the marker")
            data = r.data("message")
        return data[: data.index(marker)]


@contextlib.asynccontextmanager
async def serve(**overrides: Any) -> AsyncIterator[Served]:
    """A relay with a token key, the demo room `chat` public, limits off unless the test sets them."""
    options: dict[str, Any] = {"heartbeat_interval": 0.2, "instance_id": "sec", "jwt_secret": SECRET,
                               "publish_rate_limit": 0, "max_streams_per_client": 0}
    options.update(overrides)
    settings = Settings.from_env(options.pop("environ", {}), **options)
    relay = Relay(settings)
    async with running_app(create_app(settings, relay)) as url:
        yield Served(url, relay)


# -- publishing ---------------------------------------------------------------------------------------------------


@dataclass
class Publisher:
    """Publishes numbered messages through `urls` in turn, retrying 503s and refused connections like a real
    producer would. `accepted` holds (seq, id) of every 202; `uncertain` the seqs whose answer was lost."""

    urls: list[str]
    channel: str = "room"
    accepted: list[tuple[int, str]] = field(default_factory=list)
    uncertain: set[int] = field(default_factory=set)
    rejected_503: int = 0
    refused: int = 0
    changed: Changes = field(default_factory=Changes)
    _seq: int = 0

    async def wait_accepted(self, n: int, timeout: float = 20.0) -> None:
        await eventually(lambda: len(self.accepted) >= n, timeout,
                         lambda: f"{n} publishes accepted (have {len(self.accepted)})", on=self.changed)

    async def publish_one(self, client: httpx.AsyncClient, deadline: float = 20.0) -> str:
        seq = self._seq
        self._seq += 1
        end = time.monotonic() + deadline
        attempt = seq
        while time.monotonic() < end:
            url = self.urls[attempt % len(self.urls)]
            attempt += 1
            try:
                resp = await client.post(f"{url}/channels/{self.channel}/messages",
                                         json={"data": {"seq": seq, "t": time.time()}, "event": "n"})
            except httpx.ConnectError:
                self.refused += 1
                await asyncio.sleep(0.05)
                continue
            except httpx.TransportError:
                self.uncertain.add(seq)  # the request may have been published before the answer was lost
                await asyncio.sleep(0.05)
                continue
            if resp.status_code == 202:
                self.accepted.append((seq, resp.json()["id"]))
                self.changed.notify()
                return str(resp.json()["id"])
            assert resp.status_code == 503, resp.text
            assert resp.headers.get("retry-after"), "503 must carry Retry-After"
            self.rejected_503 += 1
            await asyncio.sleep(0.05)
        raise AssertionError(f"message {seq} not accepted within {deadline}s")

    async def run(self, count: int, interval: float, stop: asyncio.Event | None = None) -> None:
        """Publish up to `count` messages, one per `interval`, until `stop` is set."""
        async with httpx.AsyncClient(timeout=5.0) as client:
            for _ in range(count):
                if stop is not None and stop.is_set():
                    return
                await self.publish_one(client)
                await asyncio.sleep(interval)


def delivery_report(stream: SSEStream, publisher: Publisher, event: str = "n") -> dict[str, int]:
    """Exact counts for one subscriber against what the publisher got accepted."""
    got = [(e.data["seq"], e.id) for e in stream.named(event)]
    got = [g for g in got if g[0] not in publisher.uncertain]
    expected = [a for a in publisher.accepted if a[0] not in publisher.uncertain]
    seen: set[tuple[int, str | None]] = set()
    duplicates = 0
    for g in got:
        if g in seen:
            duplicates += 1
        seen.add(g)
    received_expected = [g for g in got if g in set(expected)]
    out_of_order = sum(1 for a, b in zip(received_expected, received_expected[1:]) if a[0] > b[0])
    lost = len(set(expected) - seen)
    unexpected = len([g for g in got if g not in set(expected)])
    return {"accepted": len(expected), "delivered": len(got), "lost": lost, "duplicates": duplicates,
            "out_of_order": out_of_order, "unexpected": unexpected}


class RawHTTP:
    """One keep-alive HTTP/1.1 connection for publishing at a rate httpx cannot reach on a busy test box:
    requests are written raw and answers read by Content-Length. Reconnects by itself when the server closes."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: Any, headers: dict[str, str] | None = None,
                   timeout: float = 15.0) -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body); raises OSError (TimeoutError included) / IncompleteReadError when the
        connection fails mid-way or no answer comes within `timeout`."""
        try:
            return await asyncio.wait_for(self._post(path, body, headers), timeout)
        except TimeoutError:
            self.close()
            raise

    async def _post(self, path: str, body: Any, headers: dict[str, str] | None) -> tuple[int, dict[str, str], bytes]:
        if self._writer is None or self._writer.is_closing():
            self._reader, self._writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self._reader is not None
        payload = orjson.dumps(body)
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self._writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                           f"Content-Length: {len(payload)}\r\n{extra}\r\n".encode() + payload)
        try:
            head = await self._reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            fields = {}
            for line in head.decode("latin-1").split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name:
                    fields[name.strip().lower()] = value.strip()
            data = await self._reader.readexactly(int(fields.get("content-length", "0")))
        except BaseException:
            self.close()
            raise
        if fields.get("connection", "").lower() == "close":
            self.close()
        return status, fields, data

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


# -- faults -------------------------------------------------------------------------------------------------------


class StallingProxy:
    """A TCP proxy whose `stall()` turns every open connection into a silent black hole (a half-open path):
    nothing is forwarded in either direction and nothing is closed. New connections work normally."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = free_port()
        self._server: asyncio.AbstractServer | None = None
        self._generation = 0
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    def stall(self) -> None:
        self._generation += 1

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in self._writers:
            w.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        generation = self._generation
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self._writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(65536):
                if self._generation != generation:
                    continue  # swallowed: the path is dead but nobody is told
                dst.write(data)
                await dst.drain()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)
