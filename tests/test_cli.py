"""The two commands as a user meets them: `sse-relay` and `sse-relay-token` answer --help and --version without
starting anything, take every setting as a flag that wins over its environment variable, name the flag or the
variable in their errors, exit with the documented statuses, and refuse what the relay would refuse."""

from __future__ import annotations

import importlib.metadata
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from service.cli import EXIT_CODES, apply_command_line
from service.config import Settings

from .support import ROOT, eventually_blocking, free_port

pytestmark = pytest.mark.timeout(60)

BIN = Path(sys.executable).parent


def _run(*args: str, env: dict[str, str] | None = None, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, **(env or {})})


def test_help_and_version_answer_without_starting_the_server() -> None:
    """`sse-relay --help` used to start the server (it bound the port). Now it prints and exits 0, even with a
    PORT that is taken, which a started server could not bind."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        env = {"PORT": str(busy.getsockname()[1])}
        shown = _run(str(BIN / "sse-relay"), "--help", env=env)
        version = _run(str(BIN / "sse-relay"), "--version", env=env)
    assert shown.returncode == 0, shown.stderr
    assert "listening" not in shown.stderr and "uvicorn" not in shown.stderr
    for name, _, _ in Settings.describe():  # every setting has its flag, generated from the settings
        if name not in ("JWT_SECRET", "ADMIN_API_KEY"):  # secrets: a command line is visible to every user
            assert f"--{name.lower().replace('_', '-')}" in shown.stdout and name in shown.stdout, name
    assert "--jwt-secret" not in shown.stdout and "--admin-api-key" not in shown.stdout
    for code in EXIT_CODES:
        assert f"{code}: " in shown.stdout
    assert version.returncode == 0 and version.stdout.strip() == f"sse-relay {importlib.metadata.version('sse-relay')}"
    token_help = _run(str(BIN / "sse-relay-token"), "--help")
    token_version = _run(str(BIN / "sse-relay-token"), "--version")
    assert token_help.returncode == 0 and "--private-key" in token_help.stdout and "exit status" in token_help.stdout
    assert token_version.stdout.strip() == f"sse-relay-token {importlib.metadata.version('sse-relay')}"


def test_a_flag_is_its_environment_variable_and_wins_over_it() -> None:
    env = {"PORT": "8000", "PUBLIC_CHANNELS": "chat", "ALLOW_QUERY_TOKEN": "true"}
    apply_command_line(["--port", "9001", "--public-channels", "chat,news", "--no-allow-query-token",
                        "--presence-events"], env)
    assert env == {"PORT": "9001", "PUBLIC_CHANNELS": "chat,news", "ALLOW_QUERY_TOKEN": "false",
                   "PRESENCE_EVENTS": "true"}
    settings = Settings.from_env(env)
    assert (settings.port, settings.public_channels, settings.allow_query_token, settings.presence_events) == (
        9001, ("chat", "news"), False, True)


@pytest.mark.parametrize(("args", "env", "says"), [
    (["--port", "abc"], {}, "--port (PORT)='abc' is not valid"),
    (["--workers", "0"], {}, "--workers (WORKERS)='0' is below its minimum"),
    (["--presence-events", "yes"], {}, "unrecognized arguments: yes"),
    (["--no-such-setting", "1"], {}, "unrecognized arguments: --no-such-setting"),
    ([], {"PORT": "x"}, "PORT='x' is not valid"),
    (["--log-format", "xml"], {}, "LOG_FORMAT must be 'text' or 'json'"),
    (["--workers", "2"], {}, "WORKERS=2 needs REDIS_URL"),
])
def test_errors_name_the_flag_or_the_variable_and_exit_2(args: list[str], env: dict[str, str], says: str) -> None:
    result = _run(str(BIN / "sse-relay"), *args, env={"PORT": str(free_port()), **env})
    assert result.returncode == 2, result
    assert says in result.stderr, result.stderr


def test_the_flags_run_a_real_server_on_the_port_they_name(tmp_path: Path) -> None:
    """PORT in the environment is taken; `--port` names a free one, and the server listens there."""
    port = free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        env = {**os.environ, "PORT": str(busy.getsockname()[1]), "HOST": "127.0.0.1"}
        with open(tmp_path / "svc.log", "wb") as log:
            proc = subprocess.Popen([str(BIN / "sse-relay"), "--port", str(port), "--instance-id", "flagged",
                                     "--log-level", "warning"], cwd=ROOT, env=env, stdout=log, stderr=log)
        try:
            def up() -> bool:
                assert proc.poll() is None, (tmp_path / "svc.log").read_text()
                try:
                    return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=0.5).json()["instance"] == "flagged"
                except httpx.HTTPError:
                    return False

            eventually_blocking(up, 15, "sse-relay listening on the --port")
            taken = _run(str(BIN / "sse-relay"), "--port", str(port), "--log-level", "warning")
            assert taken.returncode == 3 and "address already in use" in taken.stderr, taken  # EXIT_CODES[3]
        finally:
            proc.terminate()
            proc.wait(20)
    assert proc.returncode == 0  # drained and stopped cleanly: EXIT_CODES[0]


def test_the_token_command_refuses_what_the_relay_refuses(tmp_path: Path) -> None:
    """A 5-byte JWT_SECRET: PyJWT only warns, the relay refuses to start with it; so does the minting command."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    short = _run(str(BIN / "sse-relay-token"), "--sub", "a", "--subscribe", "x", env={"JWT_SECRET": "short"})
    assert short.returncode == 2 and "JWT_SECRET is 5 bytes" in short.stderr and not short.stdout
    weak = tmp_path / "weak.pem"
    weak.write_bytes(rsa.generate_private_key(65537, 1024).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    refused = _run(str(BIN / "sse-relay-token"), "--private-key", str(weak), "--subscribe", "x")
    assert refused.returncode == 2 and re.search(r"1024-bit RSA key.*2048", refused.stderr), refused.stderr
    good = _run(str(BIN / "sse-relay-token"), "--subscribe", "x", env={"JWT_SECRET": "s" * 32})
    assert good.returncode == 0 and good.stdout.count(".") == 2
