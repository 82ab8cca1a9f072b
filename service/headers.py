"""One request header, read from the ASGI scope without building Starlette's `Headers`.

`request.headers.get(name)` builds a `Headers` object on first use and, for a header the request does not carry,
finds out by raising and catching a KeyError (`Mapping.get` over `__getitem__`): about a microsecond each, and a
publish asked for three absent ones (Idempotency-Key, Authorization, Cookie). The answer is the same: the first
value of that name, decoded as Latin-1, or None.
"""

from __future__ import annotations

from starlette.types import Scope

__all__ = ["header", "query_value", "raw_header"]


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of header `name` (lower-case, as ASGI servers give names), or None."""
    key: bytes
    value: bytes
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def raw_header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of header `name` as the server gave it (bytes), or None."""
    key: bytes
    value: bytes
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


def query_value(scope: Scope, name: bytes) -> bool:
    """Whether the query string may carry parameter `name` at all: most requests have no query string, and
    parsing one still builds a `QueryParams`. A cheap pre-check (a True must still be parsed); a query with any
    percent-escape may spell the name escaped, so it is always parsed."""
    query: bytes = scope.get("query_string", b"")
    return bool(query) and (name in query or b"%" in query)
