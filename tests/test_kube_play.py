"""The Kubernetes manifests, run: `podman kube play` runs the pod spec of deploy/k8s/deployment.yaml with the
ConfigMap of deploy/k8s/configmap.yaml, the image built from the Dockerfile, and a Secret pointing at a Redis.

What is checked: the probes the Deployment declares answer as it expects (readiness and liveness 200 once up;
during a drain readiness 503 while liveness stays 200), the security context holds inside the running container
(uid/gid 10001, read-only root filesystem with a writable /tmp emptyDir, no capabilities, no privilege
escalation, a seccomp filter), the ConfigMap, the Secret and the downward-API INSTANCE_ID reach the process (and
change what it does), and SIGTERM drains the open streams and exits 0 within terminationGracePeriodSeconds less
the preStop sleep.

What podman 4.3 (Debian bookworm) needs that a cluster would not, each done by the test and nothing else:

- replicas: 1. podman starts one pod per replica, and each would publish the same host port.
- Each containerPort gets `hostIP: 127.0.0.1` and a free `hostPort`: the test reaches the pod on loopback
  (podman 4.3 publishes every containerPort on the host anyway, on its own number; 8000 may be taken here).
- Networking: `slirp4netns` (no netavark bridge: its iptables chains would collide with tests/test_compose.py's
  engine, which removes every netavark chain when it stops), `allow_host_loopback` so the pod reaches the
  test's own redis-server on the host's loopback as 10.0.2.2.
- The Secret: podman reads `secretRef` from its own secret store, as a JSON map of base64 values; the test
  creates `sse-relay-redis` there with REDIS_URL pointing at that Redis (the shipped secret.yaml points at the
  dev Redis of redis.yaml, which podman cannot run: it does not apply `fsGroup` to the emptyDir, so the redis
  user cannot write /data).
- Its own podman store, /var/lib/sse-relay-kube (configured by scripts/compose_env.sh with
  SSE_RELAY_ENGINE_DIR), so nothing here touches the compose test's engine.

podman ignores `preStop`, `readinessProbe` and `resources`, and runs the liveness probe only from systemd
timers (absent here): the test performs the probes the manifest declares itself, and stops the container with
the time the grace period leaves after the preStop sleep.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from .sse import SSEStream, open_streams
from .support import ROOT, RedisServer, eventually_blocking, free_port

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(900)]

K8S = ROOT / "deploy" / "k8s"
SCRIPT = ROOT / "scripts" / "compose_env.sh"
ENGINE_DIR = "/var/lib/sse-relay-kube"
IMAGE = "localhost/sse-relay:latest"  # the Deployment's `sse-relay:latest`, as podman resolves a short name
SECRET = "sse-relay-redis"


def _docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


DEPLOYMENT = next(d for d in _docs("deployment.yaml") if d["kind"] == "Deployment")
POD = DEPLOYMENT["spec"]["template"]["spec"]
CONTAINER = POD["containers"][0]
CONFIG = next(d for d in _docs("configmap.yaml") if d["kind"] == "ConfigMap")["data"]
GRACE = POD["terminationGracePeriodSeconds"]
PRESTOP = float(CONTAINER["lifecycle"]["preStop"]["exec"]["command"][-1])  # ["sleep", "5"]


@dataclass
class Engine:
    env: dict[str, str]

    def podman(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(["podman", *args], env=self.env, capture_output=True, text=True, timeout=timeout,
                                check=False)
        if check:
            assert result.returncode == 0, f"podman {' '.join(args)}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        return result


@dataclass
class Pod:
    engine: Engine
    name: str  # the pod's name: what INSTANCE_ID gets from metadata.name
    container: str
    port: int
    redis: RedisServer
    manifest: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def inspect(self) -> dict[str, Any]:
        return dict(json.loads(self.engine.podman("inspect", self.container).stdout)[0])

    def exec(self, *command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.engine.podman("exec", self.container, *command, check=check, timeout=30)

    def logs(self) -> str:
        result = self.engine.podman("logs", self.container, check=False)  # the container's stderr on stderr
        return (result.stdout + result.stderr)[-3000:]


@pytest.fixture(scope="module")
def engine() -> Engine:
    if os.geteuid() != 0:
        pytest.skip("podman kube play here runs rootful podman: run as root")
    for tool in ("podman", "slirp4netns", "catatonit", "mmdebstrap"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed: scripts/test installs it")
    env = {**os.environ, "SSE_RELAY_ENGINE_DIR": ENGINE_DIR}
    for line in subprocess.run(["bash", str(SCRIPT), "env"], env=env, capture_output=True, text=True,
                               timeout=30, check=True).stdout.splitlines():
        name, _, value = line.removeprefix("export ").partition("=")
        if name.startswith("CONTAINERS_"):
            env[name] = value
    started = time.monotonic()
    # The stand-in python:3.11-slim (Debian's Python 3.11: the real one cannot be pulled here), once.
    images = subprocess.run(["bash", str(SCRIPT), "images", "python"], env=env, capture_output=True, text=True,
                            timeout=900, check=False)
    assert images.returncode == 0, images.stderr[-3000:]
    eng = Engine(env)
    # The Dockerfile, unedited. --network host: the RUN steps' network without a netavark bridge.
    eng.podman("build", "--network", "host", "-t", IMAGE, str(ROOT), timeout=900)
    print(f"\nimage {IMAGE} built from the Dockerfile in {time.monotonic() - started:.1f}s")
    return eng


def _pod_manifest(host_port: int) -> dict[str, Any]:
    """The shipped Deployment with only what podman 4.3 needs changed (see the module's docstring)."""
    deployment = json.loads(json.dumps(DEPLOYMENT))
    deployment["spec"]["replicas"] = 1
    for container in deployment["spec"]["template"]["spec"]["containers"]:
        for port in container.get("ports", []):
            port["hostIP"] = "127.0.0.1"
            port["hostPort"] = host_port
    return deployment


@pytest.fixture(scope="module")
def pod(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pod]:
    tmp = tmp_path_factory.mktemp("kube")
    redis = RedisServer(tmp / "redis")
    redis.dir.mkdir()
    redis.start()
    port = free_port()
    manifest = tmp / "deployment.yaml"
    manifest.write_text(yaml.safe_dump(_pod_manifest(port)))
    secret = tmp / "secret.json"  # podman's form of a Secret: {key: base64(value)}
    secret.write_text(json.dumps({"REDIS_URL": base64.b64encode(f"redis://10.0.2.2:{redis.port}/0".encode()).decode()}))
    engine.podman("secret", "rm", SECRET, check=False)
    engine.podman("secret", "create", SECRET, str(secret))
    name = f"{DEPLOYMENT['metadata']['name']}-pod-0"
    made = Pod(engine, name, f"{name}-{CONTAINER['name']}", port, redis, manifest)
    try:
        engine.podman("kube", "play", "--replace", "--network", "slirp4netns:allow_host_loopback=true",
                      "--configmap", str(K8S / "configmap.yaml"), str(manifest), timeout=180)
        yield made
    finally:
        engine.podman("kube", "down", str(manifest), check=False, timeout=120)
        engine.podman("pod", "rm", "--force", name, check=False)
        engine.podman("secret", "rm", SECRET, check=False)
        redis.stop()


def _get(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return None


def _probe_url(pod: Pod, probe: str) -> str:
    spec = CONTAINER[probe]["httpGet"]
    named = {p["name"]: p["containerPort"] for p in CONTAINER["ports"]}
    assert named.get(spec["port"], spec["port"]) == int(CONFIG["PORT"]), "the probe's port is the one the app binds"
    return pod.url + spec["path"]


def test_the_probes_answer_as_the_deployment_expects(pod: Pod) -> None:
    ready, live = _probe_url(pod, "readinessProbe"), _probe_url(pod, "livenessProbe")
    eventually_blocking(lambda: _get(ready) == 200, 30, lambda: f"readiness 200:\n{pod.logs()}", every=0.2)
    assert _get(live) == 200
    # the Secret's REDIS_URL reached the process: its Redis is reachable
    eventually_blocking(lambda: _get(pod.url + "/healthz/broker") == 200, 15, lambda: f"broker:\n{pod.logs()}")
    health = pod.inspect()["Config"].get("Healthcheck")
    print(f"\npod {pod.name}: readiness {CONTAINER['readinessProbe']['httpGet']['path']} and liveness "
          f"{CONTAINER['livenessProbe']['httpGet']['path']} answer 200; podman made the liveness probe "
          f"{health and health.get('Test')}")


def test_the_security_context_holds_in_the_running_container(pod: Pod) -> None:
    sc, psc = CONTAINER["securityContext"], POD["securityContext"]
    ids = pod.exec("python", "-c", "import os; print(os.getuid(), os.getgid())").stdout.split()
    assert ids == [str(psc["runAsUser"]), str(psc["runAsGroup"])], ids
    assert psc["runAsNonRoot"] and ids[0] != "0"
    status = dict(line.split(":\t", 1) for line in pod.exec("cat", "/proc/1/status").stdout.splitlines()
                  if ":\t" in line)
    assert sc["capabilities"]["drop"] == ["ALL"] and int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0
    assert sc["allowPrivilegeEscalation"] is False and status["NoNewPrivs"].strip() == "1"
    assert psc["seccompProfile"]["type"] == "RuntimeDefault" and status["Seccomp"].strip() == "2"  # a filter
    assert sc["readOnlyRootFilesystem"] is True and pod.inspect()["HostConfig"]["ReadonlyRootfs"] is True
    write = "import sys; open(sys.argv[1], 'w').write('x')"
    denied = pod.exec("python", "-c", write, "/app/written", check=False)
    assert denied.returncode != 0 and "Read-only file system" in denied.stderr, denied.stderr
    assert pod.exec("python", "-c", write, "/tmp/written").returncode == 0  # the emptyDir at /tmp


async def test_the_configmap_secret_and_downward_api_reach_the_process(pod: Pod) -> None:
    env = dict(line.split("=", 1) for line in pod.exec("env").stdout.splitlines() if "=" in line)
    for key, value in CONFIG.items():
        assert env.get(key) == value, key
    assert env["REDIS_URL"] == f"redis://10.0.2.2:{pod.redis.port}/0" and env["INSTANCE_ID"] == pod.name
    # ... and what they change: the instance's name (metadata.name), JSON logs (LOG_FORMAT), the retry hint
    # (RETRY_MS), and messages through the Secret's Redis.
    async with httpx.AsyncClient(base_url=pod.url, timeout=5) as http:
        assert (await http.get("/healthz")).headers["x-relay-instance"] == pod.name
        async with SSEStream(f"{pod.url}/channels/chat/events") as stream:
            assert stream.instance == pod.name and stream.retry == int(CONFIG["RETRY_MS"])
            resp = await http.post("/channels/chat/messages", json={"data": "via kube"})
            assert resp.status_code == 202, resp.text
            await stream.wait(lambda s: s.data() == ["via kube"], 10, "the message")
    log_lines = [line for line in pod.logs().splitlines() if line.startswith("{")]
    assert log_lines and all(json.loads(line)["instance"] == pod.name for line in log_lines[-5:])


async def test_sigterm_drains_the_streams_within_the_grace_period(pod: Pod) -> None:
    """Runs last: it stops the pod's container. SIGTERM (the image's STOPSIGNAL) with the time Kubernetes leaves
    after the preStop sleep: the streams end with a retry hint, readiness turns 503 while liveness stays 200,
    and the process exits 0 in time."""
    ready, live = _probe_url(pod, "readinessProbe"), _probe_url(pod, "livenessProbe")
    streams = [SSEStream(f"{pod.url}/channels/chat/events") for _ in range(20)]
    await open_streams(streams, 15)
    left = GRACE - PRESTOP
    started = time.monotonic()
    stop = asyncio.create_task(asyncio.to_thread(pod.engine.podman, "stop", "--time", str(int(left)),
                                                 pod.container, timeout=left + 30))
    try:
        seen: set[tuple[int | None, int | None]] = set()
        while not all(s.ended.is_set() for s in streams) and time.monotonic() - started < left:
            seen.add((_get(ready), _get(live)))
            await asyncio.sleep(0.2)  # sampling the probes as the kubelet would, while the drain runs
        await stop
        drained_s = time.monotonic() - started
        state = pod.inspect()["State"]
        print(f"\nSIGTERM with {left:g}s left of terminationGracePeriodSeconds {GRACE}: 20 streams ended, exit "
              f"{state['ExitCode']} after {drained_s:.1f}s (DRAIN_GRACE {CONFIG['DRAIN_GRACE']}); probes seen "
              f"(readiness, liveness): {sorted(seen, key=str)}")
        assert state["ExitCode"] == 0, pod.logs()
        assert drained_s < left
        assert all(s.ended.is_set() and s.retry is not None for s in streams)
        assert (503, 200) in seen, seen
    finally:
        with contextlib.suppress(Exception):
            await stop
        await asyncio.gather(*(s.close() for s in streams))
