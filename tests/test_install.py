"""A clean install works: the wheel built from the sources (what the Dockerfile's build context holds), installed
into a fresh virtualenv, serves the chat page, its files and streams with `sse-relay`, from any directory and
with no FRONTEND_DIR: the page is package data."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest

from .sse import SSEStream, open_streams
from .support import ROOT, free_port, wait_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

PAGE = ["index.html", "app.js", "style.css", "favicon.svg"]


def _run(*args: str | Path, cwd: Path, timeout: float) -> None:
    result = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


def _launch(args: list[Path], cwd: Path, env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:
        return subprocess.Popen(args, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)


async def test_wheel_installed_in_a_fresh_venv_serves_the_page_and_streams(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("service", "frontend"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp_path / "dist", src, cwd=tmp_path,
         timeout=180)
    wheel = next((tmp_path / "dist").glob("sse_relay-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    assert {f"service/frontend/{f}" for f in PAGE} <= names, sorted(n for n in names if "frontend" in n)

    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv, cwd=tmp_path, timeout=120)
    _run(venv / "bin" / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check", wheel, cwd=tmp_path,
         timeout=300)

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("FRONTEND_DIR", "PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HOST="127.0.0.1", PORT=str(port), LOG_LEVEL="warning", DRAIN_GRACE="1")
    elsewhere = tmp_path / "elsewhere"  # not the checkout: nothing can come from the sources
    elsewhere.mkdir()
    proc = _launch([venv / "bin" / "sse-relay"], elsewhere, env, tmp_path / "sse-relay.log")
    try:
        wait_port(port, timeout=30)
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base, timeout=5) as c:
            page = await c.get("/")
            assert page.status_code == 200, page.text[:500]
            assert "<title>sse-relay chat</title>" in page.text and 'href="static/favicon.svg"' in page.text
            for name, kind in (("app.js", "javascript"), ("style.css", "text/css"), ("favicon.svg", "image/svg+xml")):
                r = await c.get(f"/static/{name}")
                assert r.status_code == 200 and kind in r.headers["content-type"], (name, r.status_code)
                assert r.content == (ROOT / "frontend" / name).read_bytes()
            (stream,) = await open_streams([SSEStream(f"{base}/channels/chat/events")], timeout=10)
            r = await c.post("/channels/chat/messages", json={"event": "chat", "data": {"name": "a", "text": "hi"}})
            assert r.status_code == 202
            await stream.wait(lambda s: len(s.events) == 1, 5)
            assert [(e.event, e.id, e.data) for e in stream.events] == [("chat", r.json()["id"], {"name": "a", "text": "hi"})]
            await stream.close()
        installed = subprocess.run([venv / "bin" / "python", "-c", "import service.config as c; print(c._FRONTEND)"],
                                   cwd=elsewhere, capture_output=True, text=True, timeout=30)
        assert Path(installed.stdout.strip()).is_relative_to(venv), installed
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        output = (tmp_path / "sse-relay.log").read_text(errors="replace")
    assert "Traceback" not in output, output[-3000:]
