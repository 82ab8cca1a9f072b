"""The relay inside an existing FastAPI app, under /realtime, sharing the app's lifespan.

    .venv/bin/uvicorn examples.fastapi_app:app        # then open http://127.0.0.1:8000/realtime/
    curl -X POST http://127.0.0.1:8000/orders/99/ship # "order 99 shipped" appears on the page

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
    # A `chat` event with a name and a text: what the chat page at /realtime/ shows (its room `chat` is public)
    message_id = await relay.publish("chat", {"name": "shop", "text": f"order {order_id} shipped"}, event="chat")
    return {"status": "shipped", "event_id": message_id}
