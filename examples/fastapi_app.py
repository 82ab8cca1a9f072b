"""The relay inside an existing FastAPI app, under /realtime, sharing the app's lifespan.

    .venv/bin/uvicorn examples.fastapi_app:app        # then open http://127.0.0.1:8000/realtime/

(`./scripts/run` makes that virtualenv, with the `examples` extra: FastAPI, httpx, httpx-sse.)
"""

from __future__ import annotations

from fastapi import FastAPI

from service import Relay, Settings, create_app

relay = Relay(Settings.from_env())  # REDIS_URL etc. from the environment, as for the standalone service
app = FastAPI(lifespan=relay.lifespan)
app.mount("/realtime", create_app(relay=relay))


@app.post("/orders/{order_id}/ship")
async def ship(order_id: str) -> dict[str, str]:
    # ... your own work ...
    message_id = await relay.publish("chat", {"text": f"order {order_id} shipped"}, event="notice")
    return {"status": "shipped", "event_id": message_id}
