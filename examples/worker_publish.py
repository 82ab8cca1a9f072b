"""Publish from a worker process (Celery, RQ, a cron script) straight to Redis, no HTTP hop.

    REDIS_URL=redis://127.0.0.1:6379/0 .venv/bin/python examples/worker_publish.py room-1 "report ready"

Every replica's subscribers of `room-1` get it, with an id, resumable, exactly as if it had been POSTed.
"""

from __future__ import annotations

import os
import sys

from service.publisher import Publisher, PublishError


def main() -> int:
    channel, text = sys.argv[1], " ".join(sys.argv[2:]) or "hello"
    with Publisher(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")) as publisher:
        try:
            message_id = publisher.publish(channel, {"text": text}, event="notice")
        except PublishError as exc:
            print(f"not published: {exc}", file=sys.stderr)  # retry later: nothing was half-sent
            return 1
    print(message_id)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
