"""Limits on a request's shape, checked before anything is done with it: header size and JSON depth."""

from __future__ import annotations

from collections.abc import Awaitable
from itertools import chain
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import error_response

__all__ = ["HeaderLimit", "within_json_depth"]


def within_json_depth(value: Any, limit: int) -> bool:
    """True when `value` nests containers no deeper than `limit` (a scalar has depth 0). Iterative: no recursion."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth + 1 > limit:
            return False
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return True


class HeaderLimit:
    """431 for requests whose headers (names + values) exceed MAX_HEADER_BYTES, before any endpoint runs.

    The HTTP parser has already read them; this keeps oversized cookies and tokens away from JWT decoding and
    logs, and gives a clear answer instead of an opaque connection reset.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        """Not a coroutine: it hands on the next layer's awaitable, so no frame of this layer stays suspended under
        a stream for its whole life (~300 bytes per idle stream)."""
        if scope["type"] == "http" and self.limit > 0:
            size = sum(map(len, chain.from_iterable(scope.get("headers", ()))))
            if size > self.limit:
                response = error_response(
                    431, f"request headers are {size} bytes; the limit is {self.limit} (MAX_HEADER_BYTES)",
                    "headers_too_large",
                )
                return response(scope, receive, send)
        return self.app(scope, receive, send)
