"""Read a channel from Python with resume, the way a browser's EventSource would.

    python examples/consume.py http://127.0.0.1:8000 room-1            # follow forever
    python examples/consume.py http://127.0.0.1:8000 room-1 --count 5  # stop after 5 messages

On every reconnect it sends the last id it saw as `Last-Event-ID`, so nothing is missed or repeated, whichever
replica answers. A `relay.reset` event means the id was older than the retained history: drop what you built
from earlier messages; the retained history follows.
"""

from __future__ import annotations

import argparse
import json
import time

import httpx
from httpx_sse import connect_sse


def follow(base: str, channel: str, count: int | None = None, token: str | None = None) -> list[dict]:
    last_id: str | None = None
    received: list[dict] = []
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with httpx.Client(base_url=base, timeout=httpx.Timeout(10.0, read=60.0), headers=headers) as client:
        while count is None or len(received) < count:
            resume = {"Last-Event-ID": last_id} if last_id else {}
            try:
                with connect_sse(client, "GET", f"/channels/{channel}/events", headers=resume) as source:
                    for sse in source.iter_sse():
                        if sse.event == "relay.reset":
                            received.clear()
                        if sse.event.startswith("relay.") or not sse.data:
                            continue  # the relay's own events, and `retry:`-only blocks
                        last_id = sse.id or last_id
                        received.append({"id": sse.id, "event": sse.event, "data": json.loads(sse.data)})
                        print(sse.id, sse.event, sse.data, flush=True)
                        if count is not None and len(received) >= count:
                            return received
            except httpx.TransportError:
                time.sleep(1.0)  # the server went away: reconnect (to any replica) and resume
    return received


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base_url")
    parser.add_argument("channel")
    parser.add_argument("--count", type=int, default=None)
    parser.add_argument("--token", default=None, help="a JWT for private channels (python -m service.tokens)")
    args = parser.parse_args()
    follow(args.base_url, args.channel, args.count, args.token)
