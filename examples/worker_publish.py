"""Publish from a worker process (Celery, RQ, a cron script) straight to Redis, no HTTP hop.

    REDIS_URL=redis://127.0.0.1:6379/0 .venv/bin/python examples/worker_publish.py chat "report ready"

REDIS_URL is the relay's own (the same variable the service reads; there is no default, so a worker never
publishes into some other Redis by accident). Every replica's subscribers of `chat`, the public demo room, get
it, with an id, resumable, exactly as if it had been POSTed; the chat page shows it. Another channel works the
same way, but its subscribers need a token that grants it (docs/security.md).
"""

from __future__ import annotations

import os
import sys

from service.publisher import Publisher, PublishError


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: worker_publish.py CHANNEL [TEXT...]  (with REDIS_URL set)", file=sys.stderr)
        return 2
    url = os.environ.get("REDIS_URL")
    if not url:
        print("set REDIS_URL to the relay's Redis, e.g. REDIS_URL=redis://127.0.0.1:6379/0", file=sys.stderr)
        return 2
    channel, text = argv[0], " ".join(argv[1:]) or "hello"
    with Publisher(url) as publisher:
        try:
            # a `chat` event with a name and a text: what the chat page shows
            message_id = publisher.publish(channel, {"name": "worker", "text": text}, event="chat")
        except PublishError as exc:
            print(f"not published: {exc}", file=sys.stderr)  # retry later: nothing was half-sent
            return 1
    print(message_id)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
