"""The side-by-side benchmark: our service and Nchan, same machine, same run, same load generator.

One command, on Debian (installs redis-server, nginx, libnginx-mod-nchan and the `.[bench]` extra when missing):

    bench/run.sh --scenarios publish,rooms      # or any options below; bench/README.md has the details

or, with those installed (`.venv/bin/pip install -e ".[bench]"`):

    .venv/bin/python -m bench.run              # every scenario, 3 targets, 1 run (~10 min on 2 cores)
    .venv/bin/python -m bench.run --targets ours,nchan --scenarios publish,rooms,rooms-limiter,open   # ~6 min
    .venv/bin/python -m bench.run --runs 3     # medians of 3 runs
    .venv/bin/python -m bench.run --quick      # small numbers, ~3 min
    .venv/bin/python -m bench.run --smoke      # one tiny step of each scenario, bench/tests/test_smoke.py's run
    .venv/bin/python -m bench.run --table bench/results/run-<stamp>.json     # a saved run's table again

It starts its own redis-server on a free port, our service (`python -m service`, REDIS_URL set), the same
service under `bench.gc_wrapper` (gc.freeze + high thresholds), and Nchan (Debian `nginx` +
`libnginx-mod-nchan`, 1 worker, Redis storage, config from `bench/nchan.conf`). Servers and Redis are pinned to
one core (`taskset -c 0`), the load generator to another (`-c 1`); the open-files limit is raised to the hard
limit for every process. Scenarios, per target:

- memory: RSS per idle stream with 10,000 streams open, each greeted, read 16 s later (past the first
  heartbeat tick); measured by the load generator and again by `bench/rawidle.py`, an independent plain-socket
  client, each on a freshly started server (delta of the server process / N; Nchan: worker private RSS + shared
  memory in use, from `nchan_stub_status`);
- sustained N=1000 and N=5000: the highest deliveries/s at which every delivery arrived, in order, once, and
  p99 < 100 ms (ramp search: double while passing, halve while failing, then bisect; bounded steps);
- light: N=1000, R=10/s, p50/p99 latency;
- publish: the publish path as real clients load it. 1 channel, 10 subscribers, a ramp of publishes/s over 100
  keep-alive connections with one request in flight each, each connection from its own loopback address
  (127.0.0.2 ... 127.0.0.101), message i over connection i % 100 and numbered per connection. A rate is
  sustained when every delivery arrived once and in order, p99 < 100 ms, every publish was answered 2xx and the
  publisher kept >= 95 % of the rate (a message waits for its connection's previous answer: that lag counts).
  Reported: the highest sustained publishes/s and, at that rate, the CPU of the server process (and of Redis)
  per publish: /proc CPU time over the step (first publish until every delivery arrived) / messages published;
- rooms: the chat workload. 5,000 streams in 1,000 rooms (`room_<i>_<run>`, 5 streams each), messages
  published round the rooms over the same 100 connections (room c always over connection c % 100, so each
  room's order is exact); the same "sustained" rule, checked per stream on its room's sequence. Reported: the
  highest sustained deliveries/s, the publishes/s behind it, CPU per publish;
- rooms-limiter: the rooms on a server started with its rate limiter on (`PUBLISH_RATE_LIMIT=1000` per client,
  high enough never to refuse; the 100 source addresses are 100 clients); Nchan, which has none, gets the same
  load;
- open: 10,000 streams into 2,000 new rooms, 1,000 being opened at once; the time until every stream is greeted
  (ours: `relay.hello` with its position; Nchan: its 200 head);
- publish-pipelined, rooms-pipelined: the old shape, secondary: the same over ONE connection with 16 requests
  HTTP/1.1-pipelined, which no real client produces.

Every ramp step first waits until every subscriber received a marker message (its subscription is live), and a
step that failed only on timing is run once more before it counts. Each step reports the generator's own CPU
(busiest worker, and the coordinator, which is the publisher), so a saturated generator is visible: a result
is marked `≥` when the generator was the limit or no step failed. Under the table, one line per ramp search says
what ended it. The table has medians over runs and, for ours / nchan, the median of the ratios taken within each
run (printed run by run under it). `--ours-url`/`--nchan-url` measure
running deployments instead of starting processes (no memory or CPU figure then). Every loop is bounded in
count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

if __package__ in (None, ""):  # `python bench/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.loadgen import LoadGen, Target, raise_nofile, ramp_limit, run_async
from bench.rawidle import RELAY_GREETING

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
NCHAN_MODULE = Path("/usr/lib/nginx/modules/ngx_nchan_module.so")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") / 1024

APT_HINT = "apt-get install -y nginx libnginx-mod-nchan"


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered:\n{tail}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=0.5) as r:
            if r.status == 200:
                return
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer 200 within {timeout}s")


# -- /proc readings -------------------------------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssFile, RssShmem in KiB."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0])
    return out


def proc_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def children(pid: int) -> list[int]:
    with contextlib.suppress(OSError):
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return []


# -- processes ------------------------------------------------------------------------------------------------


@dataclass
class Pinning:
    server: list[str]
    generator: list[str]

    @classmethod
    def choose(cls, server: str | None, generator: str | None) -> Pinning:
        cores = sorted(os.sched_getaffinity(0))
        if server is None and generator is None and len(cores) < 2:
            say("only one core available: no pinning")
            return cls([], [])
        server = server if server is not None else str(cores[0])
        generator = generator if generator is not None else ",".join(str(c) for c in cores[1:])
        if shutil.which("taskset") is None:
            raise SystemExit("taskset (util-linux) is needed for pinning: apt-get install util-linux")
        return cls(["taskset", "-c", server] if server else [], ["taskset", "-c", generator] if generator else [])

    @staticmethod
    def _cores(prefix: list[str]) -> set[int] | None:
        if not prefix:
            return None
        cores: set[int] = set()
        for part in prefix[-1].split(","):
            a, _, b = part.partition("-")
            cores.update(range(int(a), int(b or a) + 1))
        return cores

    @property
    def everywhere(self) -> list[str]:
        """A prefix for a server that may use every core (its processes then share the generator's)."""
        if not self.server:
            return []
        return ["taskset", "-c", ",".join(str(c) for c in sorted(os.sched_getaffinity(0) | (self.server_cores or set())
                                                                  | (self.generator_cores or set())))]

    @property
    def generator_cores(self) -> set[int] | None:
        return self._cores(self.generator)

    @property
    def server_cores(self) -> set[int] | None:
        return self._cores(self.server)


class Proc:
    def __init__(self, name: str, args: list[str], log: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.name = name
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                         start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class Redis:
    def __init__(self, workdir: Path, pin: list[str]) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not installed: apt-get install -y redis-server")
        self.port = free_port()
        self.dir = workdir / "redis"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = Proc("redis", [*pin, binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
                                   str(self.dir), "--save", "", "--appendonly", "no", "--protected-mode", "no",
                                   "--maxclients", "10000", "--loglevel", "warning"], workdir / "redis.log")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.proc.stop()


class Server:
    """A target: start/stop, its URL layout, the pid to measure, its memory reading."""

    name = ""
    kind = "relay"

    def __init__(self) -> None:
        self.url = ""
        self.proc: Proc | None = None

    def target(self) -> Target:
        return Target.relay(self.url, self.name) if self.kind == "relay" else Target.nchan(self.url, self.name)

    def start(self) -> None: ...

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def cpu_seconds(self) -> float:
        pid = self.pid
        return proc_cpu_seconds(pid) if pid else 0.0

    def memory(self) -> dict[str, float]:
        pid = self.pid
        if not pid:
            return {}
        st = proc_status(pid)
        return {"rss_kib": st["VmRSS"], "anon_kib": st["RssAnon"], "shmem_kib": st["RssShmem"],
                "total_kib": st["VmRSS"]}


class Ours(Server):
    kind = "relay"

    # The load comes from one address and the channels are not the public demo room: open every channel and
    # lift the per-client limits (settings of the auth/rate-limit layer; ignored by versions without it).
    # DRAIN_GRACE: draining is not measured; stopped right after a scenario, the service would otherwise spend
    # most of the default 10 s "draining" streams the generator has just closed.
    BENCH_ENV: ClassVar[dict[str, str]] = {"WORKERS": "1", "PUBLIC_CHANNELS": "*", "PUBLISH_RATE_LIMIT": "0", "MAX_STREAMS_PER_CLIENT": "0",
                 "MAX_CONNECTIONS_PER_CLIENT": "0", "MAX_STREAMS": "100000", "DRAIN_GRACE": "1"}

    def __init__(self, name: str, module: str, workdir: Path, redis: Redis, pin: list[str],
                 src: Path = ROOT, extra_env: dict[str, str] | None = None) -> None:
        super().__init__()
        self.name, self.module, self.workdir, self.redis, self.pin = name, module, workdir, redis, pin
        self.src = src
        self.extra_env = extra_env or {}

    def start(self) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        # `src` first (a `--service-ref` export, or the working tree), then the repo for `bench.gc_wrapper`.
        env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(port), "REDIS_URL": self.redis.url,
               "INSTANCE_ID": self.name, "LOG_LEVEL": "warning", "REDIS_KEY_PREFIX": f"bench-{self.name}",
               "PYTHONPATH": os.pathsep.join(dict.fromkeys([str(self.src), str(ROOT)])), **self.BENCH_ENV,
               **self.extra_env}
        log = self.workdir / f"{self.name}.log"
        self.proc = Proc(self.name, [*self.pin, sys.executable, "-m", self.module], log, env=env, cwd=self.src)
        wait_http(self.url + "/readyz", 30, self.proc.proc, log)


class OursWorkers(Ours):
    """`WORKERS=2`: the instance's two server processes (spawned by the first, which only supervises) on every
    core the machine has, since one core cannot show what a second worker adds. On a 2-core box they share the
    generator's core: read its figures as "what a second process buys here", not as a clean scaling curve."""

    BENCH_ENV: ClassVar[dict[str, str]] = {**Ours.BENCH_ENV, "WORKERS": "2"}

    def processes(self) -> list[int]:
        pid = self.pid
        return [pid, *children(pid)] if pid else []

    def cpu_seconds(self) -> float:
        return sum(proc_cpu_seconds(p) for p in self.processes())

    def memory(self) -> dict[str, float]:
        totals = {"rss_kib": 0.0, "anon_kib": 0.0, "shmem_kib": 0.0, "total_kib": 0.0}
        for p in self.processes():
            st = proc_status(p)
            for key, status_field in (("rss_kib", "VmRSS"), ("anon_kib", "RssAnon"), ("shmem_kib", "RssShmem"),
                               ("total_kib", "VmRSS")):
                totals[key] += st[status_field]
        return totals


class Nchan(Server):
    kind = "nchan"
    name = "nchan"

    def __init__(self, workdir: Path, redis: Redis, pin: list[str]) -> None:
        super().__init__()
        self.workdir, self.redis, self.pin = workdir / "nchan", redis, pin

    @staticmethod
    def check_installed() -> None:
        if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
            raise SystemExit(f"nginx is not installed; Nchan needs: {APT_HINT}")
        if not NCHAN_MODULE.exists():
            raise SystemExit(f"the Nchan module is missing ({NCHAN_MODULE}); install it: {APT_HINT}")

    def start(self) -> None:
        self.check_installed()
        self.workdir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        nofile = raise_nofile()
        conf = (BENCH / "nchan.conf").read_text()
        for key, value in {"@MODULE@": str(NCHAN_MODULE), "@DIR@": str(self.workdir), "@PORT@": str(port),
                           "@REDIS_URL@": self.redis.url, "@NOFILE@": str(nofile),
                           "@CONNECTIONS@": str(max(1024, nofile - 100))}.items():
            conf = conf.replace(key, value)
        path = self.workdir / "nginx.conf"
        path.write_text(conf)
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        log = self.workdir / "stderr.log"
        self.proc = Proc("nchan", [*self.pin, nginx, "-c", str(path), "-p", str(self.workdir), "-e",
                                   str(self.workdir / "nginx-error.log")], log)
        wait_http(self.url + "/nchan_status", 15, self.proc.proc, self.workdir / "nginx-error.log")
        deadline = time.monotonic() + 10
        while self.worker_pid() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.worker_pid() is None:
            raise RuntimeError("nginx started no worker process")

    def worker_pid(self) -> int | None:
        if self.proc is None:
            return None
        kids = children(self.proc.pid)
        return kids[0] if kids else None

    @property
    def pid(self) -> int | None:
        return self.worker_pid()

    def status(self) -> dict[str, str]:
        with urllib.request.urlopen(self.url + "/nchan_status", timeout=5) as r:
            text = r.read().decode()
        return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in text.splitlines()) if v}

    def memory(self) -> dict[str, float]:
        pid = self.worker_pid()
        if not pid:
            return {}
        st = proc_status(pid)
        shm = float(self.status().get("shared memory used", "0K").rstrip("K"))
        # Private memory of the worker plus what Nchan keeps in its shared-memory zone.
        return {"rss_kib": st["VmRSS"], "anon_kib": st["RssAnon"], "shmem_kib": st["RssShmem"],
                "shm_used_kib": shm, "total_kib": st["RssAnon"] + shm}


class Remote(Server):
    """A deployment the user runs: only the URL is known, nothing to start or measure."""

    def __init__(self, name: str, kind: str, url: str) -> None:
        super().__init__()
        self.name, self.kind, self.url = name, kind, url.rstrip("/")

    @property
    def pid(self) -> int | None:
        return None

    def memory(self) -> dict[str, float]:
        return {}


# -- scenarios ------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    sustained_n: list[int] = field(default_factory=lambda: [1000, 5000])
    step_duration: float = 4.0
    # Rates tried per search, and how close the best passing and the lowest failing rate must come before it
    # stops: 9 and 1.07 resolve a ramp that passes at 8,000/s to ~500/s (6 and 1.15 stopped at 8,000 vs a failed
    # 12,000, so two servers 10 % apart could both read 8,000 and a ratio moved in steps of 1/8).
    max_steps: int = 9
    precision: float = 1.07
    start_deliveries: float = 8000.0
    settle: float = 3.0
    light_n: int = 1000
    light_rate: float = 10.0
    light_duration: float = 8.0
    memory_streams: int = 10000
    fixed: tuple[int, float, float] | None = None  # (N, R, D)
    publish_subscribers: int = 10
    publish_start_rate: float = 1000.0  # publishes/s the ramp starts at
    rooms_streams: int = 5000
    rooms: int = 1000
    rooms_start_rate: float = 1000.0  # publishes/s (one round = one message to every room)
    pub_conns: int = 100  # publish and rooms: keep-alive connections, each from its own loopback address
    pub_inflight: int = 1  # requests in flight per connection: 1 = no pipelining, as real clients publish
    pub_sources: int = 100  # loopback source addresses (127.0.0.2 ...) the connections are spread over
    pipeline: int = 16  # publish-pipelined, rooms-pipelined: requests in flight on their ONE connection
    limiter_rate: float = 1000.0  # rooms-limiter: PUBLISH_RATE_LIMIT per client, high enough never to refuse
    open_streams: int = 10000
    open_rooms: int = 2000
    open_concurrency: int = 1000  # streams being opened at once (a reconnect storm)
    # After the last stream is greeted: past one HEARTBEAT_INTERVAL (15 s), so every stream has had its first
    # heartbeat tick, which adds ~0.6 KiB of RSS per stream that stays (docs/performance.md).
    memory_settle: float = 16.0
    scenarios: tuple[str, ...] = ("memory", "sustained", "light", "publish", "rooms", "rooms-limiter", "open",
                                  "publish-pipelined", "rooms-pipelined")
    p99_limit_ms: float = 100.0


SCENARIOS = ("memory", "sustained", "light", "fixed", "publish", "rooms", "rooms-limiter", "open",
             "publish-pipelined", "rooms-pipelined")
# The publish-path scenarios: (publisher connections, in flight each) from the plan, and rooms or one channel.
PUBLISH_SCENARIOS = ("publish", "publish-pipelined", "rooms", "rooms-limiter", "rooms-pipelined")


def core_busy_seconds(cores: set[int]) -> Callable[[], float]:
    """Busy (non-idle) seconds of these cores from /proc/stat: shows load from other processes on the core."""
    names = {f"cpu{c}" for c in cores}

    def read() -> float:
        busy = 0
        with open("/proc/stat") as f:
            for line in f:
                parts = line.split()
                if parts and parts[0] in names:
                    v = [int(x) for x in parts[1:9]]
                    busy += sum(v) - v[3] - v[4]
        return busy / CLK_TCK

    return read


def _probes(server: Server, pin: Pinning) -> dict[str, Callable[[], float]]:
    probes: dict[str, Callable[[], float]] = {}
    if server.pid:
        probes["server"] = server.cpu_seconds
    if REDIS_PID:
        probes["redis"] = lambda: proc_cpu_seconds(REDIS_PID[0])
    if pin.server_cores:
        probes["server_core_busy"] = core_busy_seconds(pin.server_cores)
    if pin.generator_cores:
        probes["generator_core_busy"] = core_busy_seconds(pin.generator_cores)
    return probes


REDIS_PID: list[int] = []


def _lg(server: Server, channel: str | list[str], pin: Pinning, procs: int | None, p99: float,
        shape: tuple[int, int, int] = (1, 1, 0)) -> LoadGen:
    """A load generator; `shape` is the publisher's (connections, requests in flight each, source addresses)."""
    conns, inflight, sources = shape
    return LoadGen(server.target(), channel, procs=procs, worker_prefix=pin.generator, log=say, p99_limit_ms=p99,
                   probes=_probes(server, pin), pub_conns=conns, pub_inflight=inflight, pub_sources=sources)


def pub_shape(plan: Plan, scenario: str) -> tuple[int, int, int]:
    """The publisher of a scenario: ONE connection, `pipeline` deep, for the `-pipelined` ones (the old shape,
    which no real client has); otherwise `pub_conns` connections with `pub_inflight` in flight each."""
    if scenario.endswith("-pipelined"):
        return 1, plan.pipeline, 0
    return plan.pub_conns, plan.pub_inflight, plan.pub_sources


def shape_label(shape: tuple[int, int, int]) -> str:
    conns, inflight, sources = shape
    if conns == 1 and inflight > 1:
        return f"ONE connection, {inflight} pipelined (a shape no real client has)"
    return f"{conns} conns × {inflight} in flight" + (f", {min(conns, sources)} source addresses" if sources else "")


def greeting(server: Server) -> str | None:
    """What a stream's first bytes must show before it counts as open: the relay's `relay.hello` carrying the
    stream's position; Nchan sends no greeting, its 200 head is all there is."""
    return RELAY_GREETING if server.kind == "relay" else None


async def scenario_memory(server: Server, n: int, settle: float, pin: Pinning, procs: int | None,
                          tag: str) -> dict[str, Any]:
    """RSS per idle stream, measured twice with the same protocol, each on a freshly started server: by the load
    generator's subscribers (the headline), and by `bench/rawidle.py`, an independent plain-socket client that
    shares none of its code. Each: 200 streams opened and closed (code paths warm), the baseline, N streams each
    greeted (the relay's `relay.hello` with its position; Nchan's 200 head), `settle` seconds (past the first
    heartbeat tick, which adds RSS per stream that stays), the reading. Nchan: worker private RSS + its shared
    memory in use."""
    if not server.pid:
        return {"skipped": "no local process to measure"}
    greet = greeting(server)
    async with _lg(server, f"mem{tag}", pin, procs, 100) as lg:
        await _warm_paths(server, lg, n)
        before = server.memory()
        conn = await lg.connect(n, timeout=120, greet=greet)
        if conn["open"] < n:
            say(f"  {server.name}: only {conn['open']}/{n} streams opened: {conn['errors']}")
            await lg.close()
            return {"error": f"only {conn['open']}/{n} streams opened", "connect": conn}
        early = server.memory()  # the old reading moment (before any heartbeat), for the record
        await asyncio.sleep(settle)
        after = server.memory()
        ok_live = await lg.warm(timeout=30)
        closed = await lg.close()
    per = {k: (after[k] - before[k]) / max(1, conn["open"]) for k in after}
    out: dict[str, Any] = {"streams": conn["open"], "wanted": n, "connect": conn, "before": before, "after": after,
                           "settle_s": settle, "per_stream_kib": per["total_kib"], "per_stream": per,
                           "per_stream_kib_at_greeting": (early["total_kib"] - before["total_kib"]) / max(1, conn["open"]),
                           "live_check": ok_live, "closed": closed}
    # The independent client on a fresh process: after the first 10,000 closed, their freed heap would be reused.
    server.stop()
    server.start()
    async with _lg(server, f"memw{tag}", pin, procs, 100) as lg:
        await _warm_paths(server, lg, n)
    out["raw"] = await _raw_idle(server, n, settle, pin, f"memraw{tag}")
    return out


async def _warm_paths(server: Server, lg: LoadGen, n: int) -> None:
    """Open and close a few streams and publish to them, so the delta that follows is what streams cost, not the
    first use of code paths."""
    await lg.connect(min(200, n), greet=greeting(server))
    await lg.warm()
    await lg.close()
    await asyncio.sleep(1.0)


async def _raw_idle(server: Server, n: int, settle: float, pin: Pinning, channel: str) -> dict[str, Any]:
    """The independent reading: `python -m bench.rawidle` holds n streams; RSS delta / n after `settle`."""
    url = server.target().sub_url.replace("{channel}", channel)
    greet = greeting(server)
    before = server.memory()
    proc = await asyncio.create_subprocess_exec(
        *pin.generator, sys.executable, "-m", "bench.rawidle", "--url", url, "-n", str(n), "--timeout", "120",
        "--hold", str(settle + 60), *(["--greet", greet] if greet else []),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=str(ROOT))
    assert proc.stdin is not None and proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 150)
        report = json.loads(line) if line else {"open": 0, "error": "no report"}
        if report.get("open") == n:
            await asyncio.sleep(settle)
        after = server.memory()
    finally:
        proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()
    if report.get("open") != n:
        return {"error": f"only {report.get('open')}/{n} streams opened", "report": report}
    return {"streams": n, "open": report, "before": before, "after": after, "settle_s": settle,
            "per_stream_kib": (after["total_kib"] - before["total_kib"]) / n}


def _cpu_text(r: dict[str, Any]) -> str:
    c = r["cpu_pct"]
    return (f"cpu: server {c.get('server', '-')}% redis {c.get('redis', '-')}% "
            f"server-core {c.get('server_core_busy', '-')}% generator {r['generator_cpu_pct']['max_worker']}% "
            f"generator-core {c.get('generator_core_busy', '-')}%")


async def scenario_sustained(server: Server, n: int, plan: Plan, pin: Pinning, procs: int | None,
                             tag: str) -> dict[str, Any]:
    async with _lg(server, f"s{n}{tag}", pin, procs, plan.p99_limit_ms) as lg:
        def step(r: dict[str, Any]) -> None:
            lat = r["latency_ms"]
            say(f"  {server.name} N={n} R={r['rate']:g}/s -> {r['deliveries_per_s']:.0f}/s p99 {lat['p99']:.1f} ms "
                f"{_cpu_text(r)} " + ("ok" if r["ok"] else f"FAIL {r['why']}"))
        res = await lg.find_sustained(n, plan.start_deliveries / n, plan.step_duration, max_steps=plan.max_steps,
                                      precision=plan.precision,
                                      settle=plan.settle, on_step=step)
        await lg.close()
    return res


async def scenario_fixed(server: Server, n: int, rate: float, duration: float, plan: Plan, pin: Pinning,
                         procs: int | None, tag: str) -> dict[str, Any]:
    async with _lg(server, f"f{n}{tag}", pin, procs, plan.p99_limit_ms) as lg:
        conn = await lg.connect(n)
        res = await lg.run(rate, duration, plan.settle)
        res["connect"] = conn
        await lg.close()
    lat = res["latency_ms"]
    say(f"  {server.name} N={n} R={rate:g}/s: {res['deliveries']}/{res['expected']} p50 {lat['p50']:.1f} ms "
        f"p99 {lat['p99']:.1f} ms {_cpu_text(res)}")
    return res


def per_publish_us(step: dict[str, Any]) -> dict[str, float]:
    """CPU seconds of each measured process over a step (from the publisher's first write until every delivery
    arrived or the settle time ran out), divided by the messages published in it, in µs."""
    n = max(1, step["published"])
    return {name: round(1e6 * v / n, 1) for name, v in step.get("cpu_s", {}).items() if name in ("server", "redis")}


def _ramp_step_logger(server: Server, what: str) -> Callable[[dict[str, Any]], None]:
    def step(r: dict[str, Any]) -> None:
        lat, pub = r["latency_ms"], r["publish"]
        us = per_publish_us(r)
        say(f"  {server.name} {what} R={r['rate']:g}/s -> {r['publishes_per_s']:.0f} publishes/s "
            f"{r['deliveries_per_s']:.0f} deliveries/s p99 {lat['p99']:.1f} ms ack p99 {pub['ack_p99_ms']:.1f} ms "
            f"server {us.get('server', '-')} µs/publish {_cpu_text(r)} publisher {r['generator_cpu_pct']['coordinator']}% "
            + ("ok" if r["ok"] else f"FAIL {r['why']}"))
    return step


async def scenario_publish(server: Server, plan: Plan, pin: Pinning, procs: int | None, tag: str,
                           scenario: str = "publish") -> dict[str, Any]:
    """1 channel, a few subscribers, a ramp of publishes/s; the publisher's shape is the scenario's."""
    n = plan.publish_subscribers
    shape = pub_shape(plan, scenario)
    async with _lg(server, f"pub{scenario[7:]}{tag}", pin, procs, plan.p99_limit_ms, shape) as lg:
        res = await lg.find_sustained(n, plan.publish_start_rate, plan.step_duration, max_steps=plan.max_steps,
                                      precision=plan.precision,
                                      settle=plan.settle, on_step=_ramp_step_logger(server, f"{scenario} N={n}"))
        await lg.close()
    res["publisher"] = shape_label(shape)
    return res


async def scenario_rooms(server: Server, plan: Plan, pin: Pinning, procs: int | None, tag: str,
                         scenario: str = "rooms") -> dict[str, Any]:
    """The chat workload: streams spread evenly over rooms, messages published round the rooms (room c always
    over connection c % C, so each room's order is exact)."""
    rooms = [f"room_{i}_{scenario[6:]}{tag}" for i in range(plan.rooms)]
    n = plan.rooms_streams
    shape = pub_shape(plan, scenario)
    async with _lg(server, rooms, pin, procs, plan.p99_limit_ms, shape) as lg:
        conn = await lg.connect(n, timeout=120)
        say(f"  {server.name}: {conn['open']}/{n} streams open in {plan.rooms} rooms in {conn['seconds']:.1f} s"
            + (f" errors {conn['errors']}" if conn["errors"] else ""))
        res = await lg.find_sustained(n, plan.rooms_start_rate, plan.step_duration, max_steps=plan.max_steps,
                                      precision=plan.precision,
                                      settle=plan.settle,
                                      on_step=_ramp_step_logger(server, f"{scenario} {n} streams/{plan.rooms} rooms"))
        res["connect"] = conn
        await lg.close()
    res["publisher"] = shape_label(shape)
    return res


async def scenario_open(server: Server, plan: Plan, pin: Pinning, procs: int | None, tag: str) -> dict[str, Any]:
    """A reconnect storm: `open_streams` streams into `open_rooms` rooms nobody used before, `open_concurrency`
    being opened at once; the time from the first connect until every stream is greeted (ours: `relay.hello`
    with its position; Nchan: its 200 head). What decides how fast survivors absorb a dead replica's clients."""
    rooms = [f"open_{i}_{tag}" for i in range(plan.open_rooms)]
    n = plan.open_streams
    async with _lg(server, rooms, pin, procs, plan.p99_limit_ms) as lg:
        cpu0 = server.cpu_seconds()
        conn = await lg.connect(n, timeout=120, concurrency=plan.open_concurrency, greet=greeting(server))
        cpu = server.cpu_seconds() - cpu0
        say(f"  {server.name}: {conn['open']}/{n} streams greeted in {plan.open_rooms} new rooms in "
            f"{conn['open_s']:.2f} s (server CPU {cpu:.2f} s)" + (f" errors {conn['errors']}" if conn["errors"] else ""))
        await lg.close()
    return {"streams": n, "rooms": plan.open_rooms, "concurrency": plan.open_concurrency, "open": conn["open"],
            "seconds": conn["open_s"], "server_cpu_s": cpu, "connect": conn}


async def run_target(server: Server, plan: Plan, pin: Pinning, procs: int | None, tag: str,
                     skip: tuple[str, ...] = ("rooms-limiter",)) -> dict[str, Any]:
    """Every scenario of the plan but `skip` against one started server (rooms-limiter needs a server started
    with the limiter on: `main_async` runs it on one of its own)."""
    out: dict[str, Any] = {"target": server.name}
    todo = [x for x in plan.scenarios if x not in skip]
    if "memory" in todo:
        say(f"{server.name}: memory with {plan.memory_streams} idle streams, {plan.memory_settle:g} s settling")
        out["memory"] = await scenario_memory(server, plan.memory_streams, plan.memory_settle, pin, procs, tag)
        m = out["memory"]
        if "per_stream_kib" in m:
            raw = m.get("raw", {})
            say(f"  {server.name}: {m['streams']} streams, {m['per_stream_kib']:.2f} KiB per stream (load generator), "
                f"{raw.get('per_stream_kib', float('nan')):.2f} KiB (independent client)")
    if "sustained" in todo:
        out["sustained"] = {}
        for n in plan.sustained_n:
            say(f"{server.name}: sustained N={n}")
            out["sustained"][str(n)] = await scenario_sustained(server, n, plan, pin, procs, tag)
    if "light" in todo:
        say(f"{server.name}: light N={plan.light_n} R={plan.light_rate:g}/s")
        out["light"] = await scenario_fixed(server, plan.light_n, plan.light_rate, plan.light_duration, plan, pin,
                                            procs, tag)
    if "fixed" in todo and plan.fixed:
        n, r, d = plan.fixed
        say(f"{server.name}: fixed N={n} R={r:g}/s D={d:g}s")
        out["fixed"] = await scenario_fixed(server, n, r, d, plan, pin, procs, tag)
    for scen in ("publish", "publish-pipelined"):
        if scen in todo:
            say(f"{server.name}: {scen}, 1 channel, {plan.publish_subscribers} subscribers, "
                f"{shape_label(pub_shape(plan, scen))}")
            out[scen] = await scenario_publish(server, plan, pin, procs, tag, scen)
    for scen in ("rooms", "rooms-limiter", "rooms-pipelined"):
        if scen in todo:
            say(f"{server.name}: {scen}, {plan.rooms_streams} streams in {plan.rooms} rooms, "
                f"{shape_label(pub_shape(plan, scen))}")
            out[scen] = await scenario_rooms(server, plan, pin, procs, tag, scen)
    if "open" in todo:
        say(f"{server.name}: open {plan.open_streams} streams into {plan.open_rooms} new rooms, "
            f"{plan.open_concurrency} at once")
        out["open"] = await scenario_open(server, plan, pin, procs, tag)
    return out


# -- profile --------------------------------------------------------------------------------------------------


def aggregate_raw_profile(path: Path, top: int = 25) -> str:
    """Self and inclusive time per function from py-spy's raw (collapsed stack) output."""
    self_t: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        parts = stack.split(";")
        if parts and parts[0].startswith(("process ", "thread ")):  # with --threads / --subprocesses
            parts = parts[1:]
        frames = [re.sub(r":\d+\)$", ")", f) for f in parts]  # one entry per function, not per line
        if frames:
            self_t[frames[-1]] = self_t.get(frames[-1], 0) + n
        for f in set(frames):
            incl[f] = incl.get(f, 0) + n
    if not total:
        return "(no samples)"
    header = (f"{total} samples (busy time only; idle waits in the event loop are excluded; stacks py-spy read "
              "while the loop was in C start at the coroutine, not at main)")
    lines = [header, "", "self time (where the CPU actually was; C calls count for the Python line calling them):"]
    for f, n in sorted(self_t.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {100 * n / total:5.1f}%  {f}")
    lines += ["", "inclusive time (function and what it called):"]
    for f, n in sorted(incl.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {100 * n / total:5.1f}%  {f}")
    return "\n".join(lines)


async def profile_target(server: Server, n: int, rate: float, duration: float, pin: Pinning, procs: int | None,
                         outdir: Path, tag: str) -> dict[str, Any]:
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(pyspy).exists():
        raise SystemExit("py-spy is needed for --profile: .venv/bin/pip install py-spy")
    assert server.pid
    raw = outdir / f"profile-{server.name}-N{n}.txt"
    async with _lg(server, f"p{n}{tag}", pin, procs, 100) as lg:
        await lg.connect(n)
        await lg.warm()
        spy = await asyncio.create_subprocess_exec(
            *pin.generator, pyspy, "record", "--pid", str(server.pid), "--rate", "200", "--duration",
            str(int(duration + 4)), "--format", "raw", "--output", str(raw), "--nonblocking",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        await asyncio.sleep(1.0)
        res = await lg.run(rate, duration, 3.0)
        await lg.close()
    _, err = await asyncio.wait_for(spy.communicate(), duration + 30)
    if spy.returncode != 0 or not raw.exists():
        raise RuntimeError(f"py-spy failed: {err.decode(errors='replace')[-2000:]}")
    summary = aggregate_raw_profile(raw)
    (outdir / f"profile-{server.name}-N{n}-summary.txt").write_text(summary + "\n")
    return {"run": res, "raw": str(raw), "summary": summary}


# -- table ----------------------------------------------------------------------------------------------------


def _median(values: list[float]) -> float:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(vals) if vals else float("nan")


def figures(result: dict[str, Any], plan: Plan) -> dict[str, float]:
    """The headline numbers of one target in one run."""
    f: dict[str, float] = {}
    if "memory" in result and "per_stream_kib" in result["memory"]:
        f["memory_kib"] = result["memory"]["per_stream_kib"]
        raw = result["memory"].get("raw", {})
        if "per_stream_kib" in raw:
            f["memory_raw_kib"] = raw["per_stream_kib"]
    if "open" in result:
        o = result["open"]
        f["open_s"] = o["seconds"] if o["open"] == o["streams"] else float("nan")
        f["open_failed"] = float(o["streams"] - o["open"])
        f["open_server_cpu_s"] = o["server_cpu_s"]
    for n, s in result.get("sustained", {}).items():
        f[f"sustained_{n}"] = s["deliveries_per_s"]
        best = s.get("best")
        f[f"sustained_{n}_gen_cpu"] = best["generator_cpu_pct"]["max_worker"] if best else float("nan")
        f[f"sustained_{n}_server_cpu"] = (best["cpu_pct"].get("server", float("nan")) if best else float("nan"))
        # A lower bound when the generator was the limit, or when the search ran out of steps still passing.
        if best and (ramp_limit(s["steps"]) in ("generator", None) or best["generator_cpu_pct"]["max_worker"] >= 90):
            f[f"sustained_{n}_generator_limited"] = 1.0
        if "lowest_failed" in s:
            f[f"sustained_{n}_lowest_p99"] = s["lowest_failed"]["p99_ms"]
            f[f"sustained_{n}_lowest_rate"] = s["lowest_failed"]["deliveries_per_s"]
    for key in ("light", "fixed"):
        if key in result:
            f[f"{key}_p50"] = result[key]["latency_ms"]["p50"]
            f[f"{key}_p99"] = result[key]["latency_ms"]["p99"]
            f[f"{key}_other_cpu"] = other_load(result[key])
    for scen in PUBLISH_SCENARIOS:
        s = result.get(scen)
        if not s:
            continue
        pre = scen.replace("-", "_")
        rate_keys = ({f"{pre}_rate": "publishes_per_s"} if scen.startswith("publish")
                     else {f"{pre}_deliveries": "deliveries_per_s", f"{pre}_publishes": "publishes_per_s"})
        scen = pre
        best = s.get("best")
        for rk, field_ in rate_keys.items():
            f[rk] = best[field_] if best else 0.0
            if best and (ramp_limit(s["steps"]) in ("generator", None)
                         or best["generator_cpu_pct"]["max_worker"] >= 90 or best["generator_cpu_pct"]["coordinator"] >= 90):
                f[rk + "_generator_limited"] = 1.0
            if "lowest_failed" in s:
                low = s["lowest_failed"]
                f[rk + "_lowest_p99"] = low["p99_ms"]
                f[rk + "_lowest_rate"] = low["deliveries_per_s"] if field_ == "deliveries_per_s" else low["rate"]
        if best:
            us = per_publish_us(best)
            f[f"{scen}_server_us"] = us.get("server", float("nan"))
            f[f"{scen}_redis_us"] = us.get("redis", float("nan"))
            f[f"{scen}_server_cpu"] = best["cpu_pct"].get("server", float("nan"))
            f[f"{scen}_p99"] = best["latency_ms"]["p99"]
            f[f"{scen}_ack_p99"] = best["publish"]["ack_p99_ms"]
            f[f"{scen}_gen_cpu"] = best["generator_cpu_pct"]["max_worker"]
            f[f"{scen}_pub_cpu"] = best["generator_cpu_pct"]["coordinator"]
    return f


RATE_KEYS = tuple(k for scen in PUBLISH_SCENARIOS for k in (
    (f"{scen.replace('-', '_')}_rate",) if scen.startswith("publish")
    else (f"{scen.replace('-', '_')}_deliveries", f"{scen.replace('-', '_')}_publishes")))


def _is_rate(key: str) -> bool:
    """A ramp-search result: `≥` when the generator was the limit, `never` when no step passed."""
    return key in RATE_KEYS or (key.startswith("sustained_") and key.removeprefix("sustained_").isdigit())


def ramp_notes(runs: list[dict[str, dict[str, Any]]], names: list[str]) -> list[str]:
    """Per ramp search: what ended it (the lowest failing rate and why), so a figure can be read."""
    out: list[str] = []
    for i, run in enumerate(runs):
        for name in names:
            r = run.get(name, {})
            searches = [(f"sustained N={n}", v) for n, v in r.get("sustained", {}).items()]
            searches += [(scen, r[scen]) for scen in PUBLISH_SCENARIOS if scen in r]
            for what, s in searches:
                steps = [st for st in s.get("steps", []) if "latency_ms" in st]
                last = {st["rate"]: st for st in steps}  # a retried rate counts by its retry
                failed = sorted((st for st in last.values() if not st["ok"]), key=lambda st: st["rate"])
                best = s.get("best")
                limit = ramp_limit(steps)
                head = f"  run {i + 1} {name} {what}: " if len(runs) > 1 else f"  {name} {what}: "
                text = (f"best {best['rate']:g} publishes/s" if best else "no rate passed") + (
                    f"; limited by {limit}" if limit else "; every rate tried passed")
                if failed:
                    low = failed[0]
                    us = per_publish_us(low)
                    c = low["cpu_pct"]
                    text += (f"; at {low['rate']:g}/s: {low['why']} (CPU: server {c.get('server', '-')}%, "
                             f"{us.get('server', '-')} µs/publish, Redis {c.get('redis', '-')}%, server core "
                             f"{c.get('server_core_busy', '-')}%, generator worker "
                             f"{low['generator_cpu_pct']['max_worker']}% + publisher "
                             f"{low['generator_cpu_pct']['coordinator']}%, generator core "
                             f"{c.get('generator_core_busy', '-')}%)")
                elif not steps and s.get("steps"):
                    text += f"; {s['steps'][0].get('why', '')}"
                out.append(head + text)
    return out


def other_load(step: dict[str, Any]) -> float:
    """% of the server core used by processes other than the server and Redis during a step (shared machine)."""
    c = step.get("cpu_pct", {})
    if "server_core_busy" not in c or "server" not in c:
        return float("nan")
    return max(0.0, float(c["server_core_busy"] - c["server"] - c.get("redis", 0.0)))



def _fmt(key: str, v: float, extra: dict[str, float] | None = None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if _is_rate(key):
        extra = extra or {}
        if v == 0:
            p99, at = extra.get(key + "_lowest_p99"), extra.get(key + "_lowest_rate")
            return f"never (p99 {p99:.0f} ms at {at:,.0f}/s)" if p99 is not None and at is not None else "never"
        return ("≥ " if extra.get(key + "_generator_limited") else "") + f"{v:,.0f}"
    if key.startswith(("open_s", "open_server", "memory")):
        return f"{v:.2f}"
    return f"{v:.1f}"


def _median_extra(per_run: list[dict[str, dict[str, float]]], name: str, key: str) -> dict[str, float]:
    """Context for a median cell: generator-limited if most runs were; the lowest failing step if never."""
    extra: dict[str, float] = {}
    runs = [pr.get(name, {}) for pr in per_run]
    if sum(1 for r in runs if r.get(key + "_generator_limited")) * 2 > len(runs):
        extra[key + "_generator_limited"] = 1.0
    for k in (key + "_lowest_p99", key + "_lowest_rate"):
        vals = [r[k] for r in runs if k in r]
        if vals:
            extra[k] = statistics.median(vals)
    return extra


def table(runs: list[dict[str, dict[str, Any]]], plan: Plan, names: list[str]) -> str:
    per_run = [{name: figures(r[name], plan) for name in names if name in r} for r in runs]
    rows: list[tuple[str, str]] = []
    if "memory" in plan.scenarios:
        rows.append(("memory_kib", f"memory per idle stream, {plan.memory_streams} streams, greeted + "
                                   f"{plan.memory_settle:g} s (KiB, RSS delta)"))
        rows.append(("memory_raw_kib", "  the same, independent plain-socket client (bench/rawidle.py) (KiB)"))
    if "sustained" in plan.scenarios:
        for n in plan.sustained_n:
            rows.append((f"sustained_{n}", f"sustained deliveries/s, N={n}"))
            rows.append((f"sustained_{n}_server_cpu", "  server process CPU at that rate (%)"))
            rows.append((f"sustained_{n}_gen_cpu", "  load generator CPU at that rate (%, busiest worker)"))
    if "light" in plan.scenarios:
        rows.append(("light_p50", f"light N={plan.light_n} R={plan.light_rate:g}/s p50 (ms)"))
        rows.append(("light_p99", f"light N={plan.light_n} R={plan.light_rate:g}/s p99 (ms)"))
        rows.append(("light_other_cpu", "  other processes on the server core meanwhile (%)"))
    if "fixed" in plan.scenarios and plan.fixed:
        fixed_n, fixed_r, _ = plan.fixed
        rows.append(("fixed_p50", f"fixed N={fixed_n} R={fixed_r:g}/s p50 (ms)"))
        rows.append(("fixed_p99", f"fixed N={fixed_n} R={fixed_r:g}/s p99 (ms)"))
    for scen in PUBLISH_SCENARIOS:
        if scen not in plan.scenarios:
            continue
        pre = scen.replace("-", "_")
        shape = shape_label(pub_shape(plan, scen))
        if scen.startswith("publish"):
            rows.append((f"{pre}_rate", f"{scen}: sustained publishes/s, 1 channel, {plan.publish_subscribers} "
                                        f"subscribers, {shape}"))
        else:
            limiter = (f", PUBLISH_RATE_LIMIT={plan.limiter_rate:g}/s per client on (ours; Nchan has none)"
                       if scen == "rooms-limiter" else "")
            rows += [(f"{pre}_deliveries", f"{scen}: sustained deliveries/s, {plan.rooms_streams} streams in "
                                           f"{plan.rooms} rooms, {shape}{limiter}"),
                     (f"{pre}_publishes", "  publishes/s at that rate")]
        rows += [(f"{pre}_server_us", "  server process CPU per publish (µs)"),
                 (f"{pre}_redis_us", "  Redis CPU per publish (µs)"),
                 (f"{pre}_server_cpu", "  server process CPU at that rate (%)"),
                 (f"{pre}_p99", "  delivery p99 at that rate (ms)"),
                 (f"{pre}_ack_p99", "  publish answer p99 at that rate (ms)"),
                 (f"{pre}_gen_cpu", "  load generator CPU at that rate (%, busiest worker)"),
                 (f"{pre}_pub_cpu", "  publisher CPU at that rate (%, generator's coordinator)")]
    if "open" in plan.scenarios:
        rows += [("open_s", f"open: {plan.open_streams} streams into {plan.open_rooms} new rooms, "
                            f"{plan.open_concurrency} at once, until every one greeted (s)"),
                 ("open_server_cpu_s", "  server process CPU meanwhile (s)"),
                 ("open_failed", "  streams not opened")]
    ref = "nchan" if "nchan" in names else None
    ours = [t for t in names if t != ref]
    head = ["scenario" + (f" (median of {len(runs)} runs)" if len(runs) > 1 else ""), *names]
    if ref:  # the median of the ratios taken within each run (`_run_ratios`), not a ratio of the medians
        head += [f"{t} / {ref}" for t in ours]
    lines = [head]
    for key, label in rows:
        med = {name: _median([pr.get(name, {}).get(key, float("nan")) for pr in per_run]) for name in names}
        row = [label, *(_fmt(key, med[t], _median_extra(per_run, t, key)) for t in names)]
        if ref:
            for t in ours:
                ratio = _median(_run_ratios(per_run, t, ref, key))
                row.append(f"{ratio:.2f}x" if not math.isnan(ratio) and not key.endswith("cpu") else "-")
        lines.append(row)
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = []
    for i, line in enumerate(lines):
        cells = (c.ljust(widths[j]) if j == 0 else c.rjust(widths[j]) for j, c in enumerate(line))
        out.append("| " + " | ".join(cells) + " |")
        if i == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    notes = ramp_notes(runs, names)
    if notes:
        out += ["", "what ended each ramp search:", *notes]
    if len(runs) > 1:
        out.append("")
        out.append("raw values per run:")
        for key, label in rows:
            vals = "; ".join(f"{n}: " + ", ".join(_fmt(key, pr.get(n, {}).get(key, float("nan")), pr.get(n, {}))
                                                  for pr in per_run) for n in names)
            out.append(f"  {label.strip()}: {vals}")
            if ref and not key.endswith("cpu"):
                for t in ours:
                    ratios = _run_ratios(per_run, t, ref, key)
                    if any(not math.isnan(r) for r in ratios):
                        out.append(f"    {t} / {ref}, run by run: " + ", ".join(f"{r:.2f}x" for r in ratios))
    return "\n".join(out)


def _run_ratios(per_run: list[dict[str, Any]], target: str, ref: str, key: str) -> list[float]:
    """`target` / `ref` within each run (same machine state, same pinning): the ratios the table's medians are
    taken over, since the machine drifts between runs far more than two servers measured back to back differ."""
    ratios = []
    for pr in per_run:
        a, b = pr.get(target, {}).get(key, float("nan")), pr.get(ref, {}).get(key, float("nan"))
        ok = isinstance(a, (int, float)) and isinstance(b, (int, float)) and not (math.isnan(a) or math.isnan(b))
        ratios.append(a / b if ok and b != 0 else float("nan"))
    return ratios


# -- main -----------------------------------------------------------------------------------------------------


def environment(pin: Pinning) -> dict[str, Any]:
    env: dict[str, Any] = {"cores": os.cpu_count(), "python": sys.version.split()[0],
                           "pinning": {"server": pin.server[-1:] or "none", "generator": pin.generator[-1:] or "none"},
                           "loadavg_start": os.getloadavg()}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                env["cpu"] = line.split(":", 1)[1].strip()
                break
    for cmd, key in ((["redis-server", "--version"], "redis"), (["nginx", "-v"], "nginx")):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            p = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=5)
            env[key] = (p.stdout + p.stderr).strip()
    with contextlib.suppress(Exception):
        from importlib.metadata import version
        env["packages"] = {p: version(p) for p in ("uvicorn", "starlette", "redis", "uvloop")}
    return env


def _git(*args: str) -> str:
    p = subprocess.run(["git", "-C", str(ROOT), *args], check=False, capture_output=True, text=True, timeout=30)
    if p.returncode != 0:
        raise SystemExit(f"git {' '.join(args)} failed: {p.stderr.strip()}")
    return p.stdout


def export_service(ref: str, workdir: Path) -> Path:
    """The service (and the page it serves) as of a git revision, in a directory of its own."""
    dest = workdir / "src"
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "service", "frontend"], check=False,
                             capture_output=True,
                             timeout=60)
    if archive.returncode != 0:
        raise SystemExit(f"git archive {ref} failed: {archive.stderr.decode(errors='replace').strip()}")
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True, timeout=60)
    return dest


def service_version(ref: str | None) -> str:
    with contextlib.suppress(Exception):
        if ref:
            return f"git {ref} = {_git('rev-parse', '--short', ref).strip()}"
        head = _git("rev-parse", "--short", "HEAD").strip()
        dirty = _git("status", "--porcelain", "--", "service").strip()
        return f"working tree at {head}" + (" with uncommitted changes in service/" if dirty else "")
    return "unknown"


def build_plan(a: argparse.Namespace) -> Plan:
    plan = Plan()
    if a.quick:
        plan = Plan(sustained_n=[200, 1000], step_duration=2.0, max_steps=3, start_deliveries=4000, settle=2.0,
                    light_n=200, light_rate=10, light_duration=3.0, memory_streams=1000, publish_start_rate=500,
                    rooms_streams=500, rooms=100, rooms_start_rate=500, open_streams=2000, open_rooms=400)
    if a.smoke:
        # One step of each search (max_steps=1), at rates anything passes: it checks the counting, not speed.
        # 10 publishing connections: fewer than the 1 channel of `publish` (sequences per connection) and than the
        # 20 rooms (a room per connection).
        plan = Plan(scenarios=("fixed", "memory", "publish", "rooms", "rooms-limiter", "open", "publish-pipelined",
                               "rooms-pipelined"),
                    fixed=(20, 20.0, 2.0), memory_streams=50, memory_settle=1.0,
                    settle=5.0, max_steps=1, step_duration=1.0, publish_subscribers=5, publish_start_rate=50,
                    rooms_streams=60, rooms=20, rooms_start_rate=60, pub_conns=10, open_streams=100, open_rooms=20,
                    open_concurrency=50)
    if a.scenarios:
        plan.scenarios = tuple(a.scenarios.split(","))
        unknown = [x for x in plan.scenarios if x not in SCENARIOS]
        if unknown:
            raise SystemExit(f"unknown scenario {', '.join(unknown)}: choose from {', '.join(SCENARIOS)}")
    if a.sustained_n:
        plan.sustained_n = [int(x) for x in a.sustained_n.split(",")]
    for attr in ("step_duration", "max_steps", "start_deliveries", "light_n", "light_rate", "light_duration",
                 "memory_streams", "settle", "p99_limit_ms", "publish_subscribers", "publish_start_rate",
                 "rooms_streams", "rooms", "rooms_start_rate", "pipeline", "pub_conns", "pub_inflight",
                 "pub_sources", "limiter_rate", "open_streams", "open_rooms", "open_concurrency", "memory_settle"):
        v = getattr(a, attr)
        if v is not None:
            setattr(plan, attr, v)
    if a.fixed:
        n, r, d = a.fixed.split(",")
        plan.fixed = (int(n), float(r), float(d))
        if "fixed" not in plan.scenarios:
            plan.scenarios = (*plan.scenarios, "fixed")
    return plan


async def main_async(a: argparse.Namespace) -> int:
    plan = build_plan(a)
    pin = Pinning.choose(a.server_cpu, a.generator_cpu)
    names = a.targets.split(",")
    for n in names:
        if n not in ("ours", "ours-gc", "ours-2w", "nchan"):
            raise SystemExit(f"unknown target {n!r}: choose from ours, ours-gc, ours-2w, nchan")
    remote = {"ours": a.ours_url, "nchan": a.nchan_url}
    if "nchan" in names and not a.nchan_url:
        Nchan.check_installed()
    nofile = raise_nofile()
    if nofile < plan.memory_streams + 200 and "memory" in plan.scenarios:
        say(f"open-files limit is {nofile}: the memory scenario's {plan.memory_streams} streams may not fit")
    gen_cores = pin.generator_cores
    if gen_cores:
        os.sched_setaffinity(0, gen_cores)  # the coordinator/publisher runs here, next to the workers
    workdir = Path(tempfile.mkdtemp(prefix="sse-bench-"))
    outdir = Path(a.out) if a.out else BENCH / "results"
    outdir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    report: dict[str, Any] = {"plan": plan.__dict__, "environment": environment(pin), "runs": [],
                              "features": {"history": "on (Redis Stream per channel, always on with Redis)",
                                           "metrics": "on (Prometheus counters/histogram on every message)",
                                           "auth": "not exercised: every channel public, per-client limits off "
                                                   "(" + ", ".join(f"{k}={v}" for k, v in Ours.BENCH_ENV.items()) + ")"},
                              "gc_thresholds": os.environ.get("BENCH_GC_THRESHOLDS", "50000,50,1000")}
    src = export_service(a.service_ref, workdir) if a.service_ref else ROOT
    report["environment"]["service"] = service_version(a.service_ref)
    say(f"service under test: {report['environment']['service']}")
    say(f"work dir {workdir}; pinning server={pin.server[-1:] or 'none'} generator={pin.generator[-1:] or 'none'}; "
        f"open-files limit {nofile}")
    redis: Redis | None = None
    try:
        if any(not remote.get(n) for n in names):
            redis = Redis(workdir, pin.server)
            REDIS_PID[:] = [redis.proc.pid]
        for run in range(a.runs):
            order = names if run % 2 == 0 else list(reversed(names))
            results: dict[str, dict[str, Any]] = {}
            say(f"=== run {run + 1}/{a.runs}: {', '.join(order)}")
            for name in order:
                def make(name: str = name, run: int = run, limiter: bool = False) -> Server:
                    """The target, started anew; with `limiter`, ours with PUBLISH_RATE_LIMIT on (Nchan has
                    none: the same Nchan)."""
                    if remote.get(name):
                        return Remote(name, "nchan" if name == "nchan" else "relay", str(remote[name]))
                    assert redis
                    if name == "nchan":
                        return Nchan(workdir / f"run{run}{'-limiter' if limiter else ''}", redis, pin.server)
                    module = "bench.gc_wrapper" if name == "ours-gc" else "service"
                    env = {"PUBLISH_RATE_LIMIT": f"{plan.limiter_rate:g}"} if limiter else {}
                    if name == "ours-2w":
                        return OursWorkers(name, module, workdir, redis, pin.everywhere, src, env)
                    return Ours(name, module, workdir, redis, pin.server, src, env)

                results[name] = {"target": name}
                passes = [(False, [x for x in plan.scenarios if x != "rooms-limiter"])]
                if "rooms-limiter" in plan.scenarios:
                    passes.append((True, ["rooms-limiter"]))
                for limiter, scenarios in passes:
                    if not scenarios:
                        continue
                    server = make(limiter=limiter)
                    server.start()
                    if limiter:
                        say(f"{name}: started with " + ("no rate limiter (Nchan has none)" if server.kind == "nchan"
                                                        else f"PUBLISH_RATE_LIMIT={plan.limiter_rate:g}"))
                    try:
                        skip = tuple(x for x in SCENARIOS if x not in scenarios)
                        results[name] |= await run_target(server, plan, pin, a.procs, f"r{run}", skip)
                    finally:
                        t_stop = time.monotonic()
                        server.stop()
                        say(f"{name} stopped in {time.monotonic() - t_stop:.1f} s")
            report["runs"].append(results)
            (outdir / f"run-{stamp}.json").write_text(json.dumps(report, indent=1, default=str))
        report["environment"]["loadavg_end"] = os.getloadavg()
        text = table(report["runs"], plan, names)
        report["table"] = text
        if a.profile:
            report["profiles"] = {}
            for name in (n for n in names if n in ("ours", "ours-gc") and not remote.get(n)):
                assert redis
                rates = [r[name]["sustained"]["5000"]["rate"] for r in report["runs"]
                         if "sustained" in r.get(name, {}) and "5000" in r[name]["sustained"]]
                rate = a.profile_rate or max(1.0, _median(rates) if rates else 2.0)
                server = Ours(name, "bench.gc_wrapper" if name == "ours-gc" else "service", workdir, redis, pin.server,
                              src)
                server.start()
                try:
                    say(f"profiling {name} under N={a.profile_n} R={rate:g}/s for {a.profile_duration:g}s")
                    report["profiles"][name] = await profile_target(server, a.profile_n, rate, a.profile_duration,
                                                                    pin, a.procs, outdir, stamp)
                finally:
                    server.stop()
        (outdir / f"run-{stamp}.json").write_text(json.dumps(report, indent=1, default=str))
        if a.json:
            Path(a.json).write_text(json.dumps(report, indent=1, default=str))
    finally:
        if redis is not None:
            redis.stop()
        if not a.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print_report(report, text)
    for name, prof in report.get("profiles", {}).items():
        print(f"\nprofile of {name} (N={a.profile_n}, {prof['run']['rate']:g}/s), raw stacks in {prof['raw']}:")
        print(prof["summary"])
    print(f"\nraw results: {outdir / f'run-{stamp}.json'}")
    return 0


def print_report(report: dict[str, Any], text: str) -> None:
    env = report["environment"]
    pinning = env.get("pinning", {})
    server_core = (pinning.get("server") or ["-"])[-1] if isinstance(pinning.get("server"), list) else "-"
    gen_core = (pinning.get("generator") or ["-"])[-1] if isinstance(pinning.get("generator"), list) else "-"
    print()
    print(f"Fan-out benchmark, {env.get('cpu', '?')}, {env['cores']} cores; server+Redis on core {server_core}, "
          f"load generator on core {gen_core}; load average {env['loadavg_start'][0]:.2f} -> "
          f"{env.get('loadavg_end', [float('nan')])[0]:.2f}")
    print(f"ours ({env['service']}): history on (Redis Streams), metrics on, auth not exercised "
          f"(all channels public); ours-gc: same + gc.freeze() and thresholds {report['gc_thresholds']}; "
          "nchan: 1 worker, Redis storage")
    print(text)


def print_saved(path: str) -> int:
    """The table of a saved run (`bench/results/run-*.json`), rendered with the current rules."""
    report = json.loads(Path(path).read_text())
    fields = Plan.__dataclass_fields__
    saved: dict[str, Any] = {k: (tuple(v) if k in ("scenarios", "fixed") and v is not None else v)
                             for k, v in report["plan"].items() if k in fields}
    plan = Plan(**saved)
    names = list(report["runs"][0]) if report["runs"] else []
    print_report(report, table(report["runs"], plan, names))
    print(f"\nraw results: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--runs", type=int, default=1, help="repeat everything; the table shows medians")
    p.add_argument("--quick", action="store_true", help="small numbers (N=200/1000, 1000 idle streams, short steps)")
    p.add_argument("--smoke", action="store_true", help="tiny fixed-rate run (N=20, R=20/s, 2 s) and 50 idle streams")
    p.add_argument("--targets", default="ours,ours-gc,nchan",
                   help="comma list of ours, ours-gc, ours-2w (WORKERS=2 on every core), nchan")
    p.add_argument("--scenarios", help="comma list of " + ", ".join(SCENARIOS) +
                   " (default: all but fixed)")
    p.add_argument("--sustained-n", help="subscriber counts of the sustained scenario, e.g. 1000,5000")
    p.add_argument("--step-duration", type=float, help="seconds of publishing per ramp step")
    p.add_argument("--max-steps", type=int, help="rates tried per sustained search (failed steps are confirmed once)")
    p.add_argument("--start-deliveries", type=float, help="deliveries/s the ramp search starts at")
    p.add_argument("--settle", type=float, help="max seconds to wait for late deliveries after a step")
    p.add_argument("--p99-limit-ms", type=float, help="p99 bound of a sustained step (default 100)")
    p.add_argument("--light-n", type=int)
    p.add_argument("--light-rate", type=float)
    p.add_argument("--light-duration", type=float)
    p.add_argument("--memory-streams", type=int)
    p.add_argument("--fixed", help="N,R,D: one fixed-rate step (added to the scenarios)")
    p.add_argument("--publish-subscribers", type=int, help="subscribers of the publish scenario's channel (10)")
    p.add_argument("--publish-start-rate", type=float, help="publishes/s the publish scenario's ramp starts at")
    p.add_argument("--rooms-streams", type=int, help="streams of the rooms scenario (5000)")
    p.add_argument("--rooms", type=int, help="rooms of the rooms scenario (1000)")
    p.add_argument("--rooms-start-rate", type=float, help="publishes/s the rooms scenario's ramp starts at")
    p.add_argument("--pub-conns", type=int, help="publish, rooms, rooms-limiter: publishing keep-alive connections, "
                   "each from its own loopback address (100)")
    p.add_argument("--pub-inflight", type=int, help="publish, rooms, rooms-limiter: requests in flight per "
                   "connection (1: no pipelining, as real clients)")
    p.add_argument("--pub-sources", type=int, help="loopback source addresses 127.0.0.2 ... (100; 0: the kernel's)")
    p.add_argument("--pipeline", type=int, help="publish-pipelined, rooms-pipelined: requests in flight on their "
                   "ONE connection (16)")
    p.add_argument("--limiter-rate", type=float, help="rooms-limiter: PUBLISH_RATE_LIMIT per client (1000)")
    p.add_argument("--open-streams", type=int, help="open: streams opened at once (10000)")
    p.add_argument("--open-rooms", type=int, help="open: new rooms they go into (2000)")
    p.add_argument("--open-concurrency", type=int, help="open: streams being opened at once (1000)")
    p.add_argument("--memory-settle", type=float, help="memory: seconds after the last greeting before RSS is read "
                   "(16: past the first heartbeat tick)")
    p.add_argument("--server-cpu", help="cores for servers and Redis (taskset -c), default the first core")
    p.add_argument("--generator-cpu", help="cores for the load generator, default the other cores")
    p.add_argument("--procs", type=int, help="load generator worker processes (default: its cores)")
    p.add_argument("--service-ref", help="benchmark the service as of this git revision (e.g. HEAD) instead of "
                   "the working tree")
    p.add_argument("--ours-url", help="measure this running deployment of the service instead of starting one")
    p.add_argument("--nchan-url", help="measure this running Nchan (pub at /pub/{ch}, sub at /sub/{ch})")
    p.add_argument("--profile", action="store_true", help="also py-spy the service under sustained load")
    p.add_argument("--profile-n", type=int, default=5000)
    p.add_argument("--profile-rate", type=float, help="publish rate while profiling (default: its sustained rate)")
    p.add_argument("--profile-duration", type=float, default=10.0)
    p.add_argument("--json", help="also write the full report here")
    p.add_argument("--out", help="directory for results and profiles (default bench/results)")
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs, nginx.conf)")
    p.add_argument("--table", metavar="RESULTS_JSON", help="only print the table of a saved run (bench/results/...)")
    a = p.parse_args(argv)
    if a.table:
        return print_saved(a.table)
    return int(run_async(main_async(a)))


if __name__ == "__main__":
    raise SystemExit(main())
