"""Read a channel from Python with resume, the way a browser's EventSource would.

    python examples/consume.py http://127.0.0.1:8000 chat            # follow forever
    python examples/consume.py http://127.0.0.1:8000 chat --count 5  # stop after 5 messages

(Run it with the virtualenv of `./scripts/run`: `.venv/bin/python examples/consume.py ...`.)

It keeps the last `id:` it saw, from any event: the stream's greeting (`relay.hello`) carries the stream's
position, so even a stream that drops before its first message resumes without missing anything. On every
reconnect it sends that id as `Last-Event-ID`, whichever replica answers. A `relay.reset` event means the id
could not be honoured (history expired or was recreated): drop what you built from earlier messages; the
retained history follows.

It reconnects with exponential backoff and jitter (so a restart of every replica does not bring every client
back in the same instant) and gives up, loudly, when the answer says retrying cannot help: 401/403 (a token is
missing or does not grant this channel) or 404 (wrong URL).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

import httpx
from httpx_sse import SSEError, connect_sse

FATAL = {401: "unauthorised: this channel needs a token (--token)", 403: "forbidden: the token does not grant it",
         404: "not found: check the base URL and the channel name"}


class GaveUp(RuntimeError):
    """The relay answered in a way that retrying cannot fix."""


def follow(base: str, channel: str, count: int | None = None, token: str | None = None,
           max_backoff: float = 30.0) -> list[dict]:
    last_id: str | None = None
    received: list[dict] = []
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    backoff = 0.5
    with httpx.Client(base_url=base, timeout=httpx.Timeout(10.0, read=60.0), headers=headers) as client:
        while count is None or len(received) < count:
            resume = {"Last-Event-ID": last_id} if last_id else {}
            try:
                with connect_sse(client, "GET", f"/channels/{channel}/events", headers=resume) as source:
                    status = source.response.status_code
                    if status in FATAL:
                        raise GaveUp(f"{status} {FATAL[status]}: {source.response.read().decode()[:300]}")
                    source.response.raise_for_status()
                    for sse in source.iter_sse():
                        backoff = 0.5  # a stream that delivers resets the delay
                        if sse.id:
                            last_id = sse.id  # from any event, the greeting included
                        if sse.event == "relay.reset":
                            print("history could not be resumed; starting over from what is retained",
                                  file=sys.stderr, flush=True)
                            received.clear()
                        if sse.event.startswith("relay.") or not sse.data:
                            continue  # the relay's own events, and `retry:`-only blocks
                        received.append({"id": sse.id, "event": sse.event, "data": json.loads(sse.data)})
                        print(sse.id, sse.event, sse.data, flush=True)
                        if count is not None and len(received) >= count:
                            return received
            except (httpx.TransportError, httpx.HTTPStatusError, SSEError) as exc:
                delay = backoff * random.uniform(0.5, 1.5)
                print(f"stream interrupted ({type(exc).__name__}: {exc}); reconnecting in {delay:.1f}s "
                      f"from {last_id or 'the start'}", file=sys.stderr, flush=True)
                time.sleep(delay)
                backoff = min(backoff * 2, max_backoff)
    return received


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base_url")
    parser.add_argument("channel")
    parser.add_argument("--count", type=int, default=None)
    parser.add_argument("--token", default=None, help="a JWT for private channels (python -m service.tokens)")
    args = parser.parse_args()
    try:
        follow(args.base_url, args.channel, args.count, args.token)
    except GaveUp as exc:
        print(f"giving up: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
