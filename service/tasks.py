"""Stopping background tasks: cancel, then wait until they have really ended, so nothing outlives its owner.

A task can swallow one cancellation (Python 3.11's `asyncio.wait_for` does when the awaited thing completes in
the same instant: gh-86296), and a supervisor that then waits on it for ever never restarts anything. So the
cancellation is repeated until the task has ended.
"""

from __future__ import annotations

import asyncio
import contextlib

__all__ = ["cancel_and_wait"]


async def cancel_and_wait(*tasks: asyncio.Future[None] | None) -> None:
    live = [t for t in tasks if t is not None]
    while pending := [t for t in live if not t.done()]:
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=1.0)
    for task in live:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            task.result()
