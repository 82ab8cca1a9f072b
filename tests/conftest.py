from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from service import Settings, create_app

from .support import RedisServer, ServiceProcess, running_app


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.dir.mkdir()
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def memory_url(tmp_path: Path) -> AsyncIterator[str]:
    """The embedded default (in-process broker) behind a real uvicorn server."""
    settings = Settings.from_env({}, heartbeat_interval=0.2, instance_id="mem",
                                 public_channels=("*",), publish_rate_limit=0, max_streams_per_client=0)
    async with running_app(create_app(settings)) as url:
        yield url


@pytest.fixture
def services(tmp_path: Path) -> Iterator[list[ServiceProcess]]:
    """A list the test fills with `ServiceProcess`es; all are stopped afterwards, their logs shown on failure."""
    procs: list[ServiceProcess] = []
    yield procs
    for p in procs:
        p.kill()
