"""Idempotency keys over HTTP, on both brokers: a repeat is marked on every publish route, and a key reused for
another message is refused with 422 `idempotency_key_reused` and publishes nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from service.publisher import IdempotencyKeyReused, Publisher

from .support import RedisServer, Served, serve

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=["memory", "redis"])
async def relay(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Served]:
    if request.param == "memory":
        async with serve(public_channels=("*",)) as served:
            yield served
        return
    server = RedisServer(tmp_path / "redis")
    server.dir.mkdir()
    server.start()
    try:
        async with serve(public_channels=("*",), redis_url=server.url) as served:
            yield served
    finally:
        server.stop()


async def test_a_key_reused_with_another_body_is_refused(relay: Served) -> None:
    async with httpx.AsyncClient(base_url=relay.url) as c:
        key = {"Idempotency-Key": "order-42"}
        first = await c.post("/channels/orders/messages", json={"data": {"n": 1}, "event": "e"}, headers=key)
        assert first.status_code == 202 and "idempotent-replayed" not in first.headers
        again = await c.post("/channels/orders/messages", json={"data": {"n": 1}, "event": "e"}, headers=key)
        assert again.status_code == 202 and again.json() == {**first.json(), "duplicate": True}
        assert again.headers["idempotent-replayed"] == "true"
        for body in ({"data": {"n": 2}, "event": "e"}, {"data": {"n": 1}, "event": "f"}, {"data": {"n": 1}}):
            refused = await c.post("/channels/orders/messages", json=body, headers=key)
            assert refused.status_code == 422, refused.text
            error = refused.json()["error"]
            assert error["code"] == "idempotency_key_reused" and error["first_id"] == first.json()["id"]
            assert "order-42" in error["message"] and "nothing was published" in error["message"]
        # a batch item: the same answer, per item
        batch = await c.post("/publish", json={"messages": [
            {"channel": "orders", "data": {"n": 1}, "event": "e", "idempotency_key": "order-42"},
            {"channel": "orders", "data": {"n": 3}, "event": "e", "idempotency_key": "order-42"}]})
        results = batch.json()["results"]
        assert results[0]["duplicate"] is True and results[0]["id"] == first.json()["id"]
        assert results[1]["error"]["code"] == "idempotency_key_reused" and results[1]["error"]["status"] == 422
    assert await relay.history("orders") == [{"n": 1}]


async def test_the_old_chat_send_marks_a_repeat_and_keeps_its_contract(relay: Served) -> None:
    """`POST /server/send` keeps `{"status": "Message received successfully"}`; a repeat adds `duplicate` and the
    `Idempotent-Replayed` header, as the other publish routes do; another body under the same key is a 422."""
    body = {"messages": [{"role": "user", "content": "hello"}]}
    async with httpx.AsyncClient(base_url=relay.url) as c:
        key = {"Idempotency-Key": "chat-1"}
        first = await c.post("/server/send", json=body, headers=key)
        assert first.status_code == 200 and first.json() == {"status": "Message received successfully"}
        assert "idempotent-replayed" not in first.headers
        again = await c.post("/server/send", json=body, headers=key)
        assert again.status_code == 200
        assert again.json() == {"status": "Message received successfully", "duplicate": True}
        assert again.headers["idempotent-replayed"] == "true"
        other = await c.post("/server/send", json={"messages": [{"role": "user", "content": "bye"}]}, headers=key)
        assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"
    assert await relay.history("chat") == [[{"role": "user", "content": "hello"}]]


@pytest.mark.redis
def test_the_worker_publisher_refuses_a_reused_key(redis_server: RedisServer) -> None:
    with Publisher(redis_server.url) as publisher:
        first = publisher.publish("jobs", {"n": 1}, idempotency_key="job-1")
        assert publisher.publish("jobs", {"n": 1}, idempotency_key="job-1") == first
        with pytest.raises(IdempotencyKeyReused) as refused:
            publisher.publish("jobs", {"n": 2}, idempotency_key="job-1")
        assert isinstance(refused.value, ValueError) and refused.value.first_id == first
