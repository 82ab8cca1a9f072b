"""A publish's 202 written straight to uvicorn's connection (uvicorn_glue.answer_directly, app._Inline) is the
answer uvicorn's `send` writes, byte for byte, in every shape a client gives: keep-alive, `Connection: close`,
HTTP/1.0, pipelined, its own request id, a browser's `Origin` under CORS. Each request runs through the service's
own uvicorn protocol, fed bytes in this process, once with direct answers and once with them turned off."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest

pytestmark = pytest.mark.asyncio


class _Transport:
    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False
        self.sends: list[bytes] = []  # each write, as the socket would get it

    def write(self, data: Any) -> None:
        assert not self.closed, "a write after the close"
        self.written += data
        self.sends.append(bytes(data))

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.9", 40000), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None: ...

    def get_write_buffer_size(self) -> int:
        return 0


def _publish(channel: str, body: bytes, *extra: bytes, version: bytes = b"1.1") -> bytes:
    head = [b"POST /channels/%s/messages HTTP/%s" % (channel.encode(), version), b"Host: relay",
            b"Content-Type: application/json", b"Content-Length: %d" % len(body), *extra]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


SHAPES: dict[str, list[bytes]] = {
    "keep-alive": [_publish("room", b'{"data": 1}')],
    "connection close": [_publish("room", b'{"data": 2}', b"Connection: close")],
    "HTTP/1.0": [_publish("room", b'{"data": 3}', version=b"1.0")],
    "pipelined": [_publish("room", b'{"data": 4}') + _publish("room", b'{"data": 5}', b"X-Request-ID: abc.1")],
    "its own request id": [_publish("room", b'{"data": 6}', b"X-Request-ID: req-42")],
    "an origin under CORS": [_publish("room", b'{"data": 7}', b"Origin: https://chat.example")],
    "refused (422)": [_publish("room", b'{"nope": 1}')],
    "two requests, one after the other": [_publish("a", b'{"data": 8}'), _publish("b", b'{"data": 9}')],
    # the first read holds a request without its whole body: no answer yet (the empty marker below)
    "a body in two reads": [_publish("room", b'{"data": "split"}')[:-8] + b"\0", _publish("room", b'{"data": "split"}')[-8:]],
    "a body over the limit": [_publish("room", b'{"data": "' + b"x" * 70000 + b'"}')],
}


async def _answers(monkeypatch: pytest.MonkeyPatch, direct: bool, requests: list[bytes],
                   protocol: str = "sse-relay") -> tuple[bytes, bool, int]:
    """What the connection got, whether it was closed, and how many answers were written directly, through the
    connection code HTTP_PROTOCOL=`protocol`."""
    from uvicorn.server import ServerState

    import service.app as app_module
    import service.uvicorn_glue as glue
    from service.app import create_app, server_entry
    from service.config import Settings
    from service.relay import Relay
    from service.server import _config
    from service.uvicorn_glue import UvicornEdge

    settings = Settings.from_env({"PUBLIC_CHANNELS": "*", "PUBLISH_RATE_LIMIT": "0", "LOG_LEVEL": "warning",
                                  "CORS_ORIGINS": "https://chat.example", "INSTANCE_ID": "r1",
                                  "HTTP_PROTOCOL": protocol})
    direct_count = 0
    real = app_module.answer_directly

    def counting(*args: Any) -> bool:
        nonlocal direct_count
        written = direct and real(*args)
        direct_count += written
        return written

    monkeypatch.setattr(app_module, "answer_directly", counting)
    if not direct:
        monkeypatch.setattr(glue, "whole_body", lambda receive: None)
    relay = Relay(settings, edge=UvicornEdge())
    app = create_app(settings, relay)
    config = _config(settings, server_entry(app))
    config.load()
    loop = asyncio.get_running_loop()
    async with relay.lifespan(app):
        transport = _Transport()
        state = ServerState()
        state.default_headers = [(b"date", b"Wed, 02 Dec 2026 20:00:00 GMT"), *config.encoded_headers]  # as uvicorn's
        protocol = config.http_protocol_class(config=config, server_state=state, app_state={}, _loop=loop)
        protocol.connection_made(transport)
        wanted = 0
        for piece in requests:
            if piece.endswith(b"\0"):  # a request cut short: its answer comes after a later piece
                piece = piece[:-1]
            else:
                wanted = sum(p.count(b"HTTP/1.") for p in requests[:requests.index(piece) + 1])
            protocol.data_received(piece)
            async with asyncio.timeout(5):
                while transport.written.count(b"HTTP/1.") < wanted:
                    await asyncio.sleep(0.005)
        await asyncio.sleep(0.02)  # a corked answer goes out at the end of the loop's turn
        protocol.connection_lost(None)
    return bytes(transport.written), transport.closed, direct_count


def _normal(answers: bytes) -> bytes:
    """The same bytes with what differs from run to run blanked: the date, generated request ids, message ids."""
    answers = re.sub(rb"date: [^\r]*", b"date: -", answers)
    answers = re.sub(rb"x-request-id: [0-9a-f]{16}", b"x-request-id: -", answers)
    return re.sub(rb'"id":"[^"]*"', b'"id":"-"', answers)


@pytest.mark.parametrize("shape", list(SHAPES))
async def test_a_direct_answer_is_the_answer_uvicorn_writes(monkeypatch: pytest.MonkeyPatch, shape: str) -> None:
    requests = SHAPES[shape]
    direct, direct_closed, written_directly = await _answers(monkeypatch, True, requests)
    sent, sent_closed, none = await _answers(monkeypatch, False, requests)
    assert none == 0
    assert _normal(direct) == _normal(sent)
    assert direct_closed == sent_closed
    answers = direct.count(b"HTTP/1.1 ")
    assert answers == sum(r.count(b"HTTP/1.") for r in requests)
    if shape == "an origin under CORS":
        assert written_directly == 0, "CORS answers a request with an Origin: it goes through the middleware"
        assert b"access-control-allow-origin: https://chat.example" in direct
    elif shape == "refused (422)":
        assert written_directly == 0 and b"HTTP/1.1 422 " in direct
    elif shape == "a body over the limit":
        assert written_directly == 0 and b"HTTP/1.1 413 " in direct
    else:
        assert written_directly == answers, "every 202 was written directly"
        assert direct.count(b"HTTP/1.1 202 Accepted\r\n") == answers
        assert b"x-relay-instance: r1\r\n" in direct
    if shape in ("connection close", "HTTP/1.0"):
        assert direct_closed and b"connection: close\r\n" in direct
    if shape == "its own request id":
        assert b"x-request-id: req-42\r\n" in direct


STREAMS = {
    "a channel's stream": b"GET /channels/room/events HTTP/1.1\r\nHost: relay\r\nAccept: text/event-stream\r\n\r\n",
    "the old chat's stream": b"GET /server/events HTTP/1.1\r\nHost: relay\r\n\r\n",
    "a stream with Connection: close": b"GET /channels/room/events HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n",
    "a stream from an origin under CORS":
        b"GET /channels/room/events HTTP/1.1\r\nHost: relay\r\nOrigin: https://chat.example\r\n\r\n",
}


async def _stream_head(monkeypatch: pytest.MonkeyPatch, direct: bool, request: bytes,
                       protocol: str = "sse-relay") -> tuple[bytes, int]:
    """A stream's bytes up to and including its greeting, and how many heads were written directly."""
    from uvicorn.server import ServerState

    import service.app as app_module
    from service.app import create_app, server_entry
    from service.config import Settings
    from service.relay import Relay
    from service.server import _config
    from service.uvicorn_glue import UvicornEdge

    settings = Settings.from_env({"PUBLIC_CHANNELS": "*", "LOG_LEVEL": "warning", "INSTANCE_ID": "r1",
                                  "CORS_ORIGINS": "https://chat.example", "HEARTBEAT_INTERVAL": "30",
                                  "HTTP_PROTOCOL": protocol})
    heads = 0
    real = app_module.start_directly

    def counting(*args: Any) -> bool:
        nonlocal heads
        written = direct and real(*args)
        heads += written
        return written

    monkeypatch.setattr(app_module, "start_directly", counting)
    relay = Relay(settings, edge=UvicornEdge())
    app = create_app(settings, relay)
    config = _config(settings, server_entry(app))
    config.load()
    async with relay.lifespan(app):
        transport = _Transport()
        state = ServerState()
        state.default_headers = [(b"date", b"Wed, 02 Dec 2026 20:00:00 GMT"), *config.encoded_headers]
        protocol = config.http_protocol_class(config=config, server_state=state, app_state={},
                                              _loop=asyncio.get_running_loop())
        protocol.connection_made(transport)
        protocol.data_received(request)
        async with asyncio.timeout(5):
            while b"relay.hello" not in transport.written or not transport.written.endswith(b"\r\n"):
                await asyncio.sleep(0.005)
        written = bytes(transport.written)
        assert b"relay.hello" in transport.sends[0], "the head and the greeting leave in one send"
        protocol.connection_lost(None)
    return written, heads


@pytest.mark.parametrize("shape", list(STREAMS))
async def test_a_streams_head_written_directly_is_the_head_uvicorn_writes(monkeypatch: pytest.MonkeyPatch,
                                                                          shape: str) -> None:
    direct, heads = await _stream_head(monkeypatch, True, STREAMS[shape])
    sent, none = await _stream_head(monkeypatch, False, STREAMS[shape])
    assert none == 0
    assert _normal(direct) == _normal(sent)
    assert direct.startswith(b"HTTP/1.1 200 OK\r\ndate: ")
    assert b"transfer-encoding: chunked\r\n" in direct and b"x-relay-instance: r1\r\n" in direct
    assert heads == (0 if "CORS" in shape else 1)
    assert b"connection: close\r\n" in direct, "a stream's connection carries nothing after it"
    if "CORS" in shape:
        assert b"access-control-allow-origin: https://chat.example" in direct


@pytest.mark.parametrize("shape", list(SHAPES))
async def test_the_services_own_connection_answers_every_shape_as_uvicorns_does(monkeypatch: pytest.MonkeyPatch,
                                                                                shape: str) -> None:
    """HTTP_PROTOCOL=sse-relay (service/http11.py, direct answers on) writes what uvicorn's protocol writes through
    ASGI `send` (HTTP_PROTOCOL=uvicorn, direct answers off), byte for byte, and closes where it closes."""
    ours, ours_closed, _ = await _answers(monkeypatch, True, SHAPES[shape], "sse-relay")
    theirs, theirs_closed, none = await _answers(monkeypatch, False, SHAPES[shape], "uvicorn")
    assert none == 0
    assert _normal(ours) == _normal(theirs)
    assert ours_closed == theirs_closed


@pytest.mark.parametrize("shape", list(STREAMS))
async def test_the_services_own_connection_opens_every_stream_as_uvicorns_does(monkeypatch: pytest.MonkeyPatch,
                                                                               shape: str) -> None:
    ours, _ = await _stream_head(monkeypatch, True, STREAMS[shape], "sse-relay")
    theirs, none = await _stream_head(monkeypatch, False, STREAMS[shape], "uvicorn")
    assert none == 0
    assert _normal(ours) == _normal(theirs)


class _Socket:
    def __init__(self) -> None:
        self.options: list[tuple[int, int, int]] = []

    def setsockopt(self, level: int, name: int, value: int) -> None:
        self.options.append((level, name, value))


@pytest.mark.parametrize(("peer", "local", "client", "server", "set_here"), [
    (("127.0.0.9", 40000), ("127.0.0.1", 8000), ("127.0.0.9", 40000), ("127.0.0.1", 8000), False),
    (("::1", 40000, 0, 0), ("::1", 8000, 0, 0), ("::1", 40000), ("::1", 8000), False),
    ("", "/run/relay.sock", None, ("/run/relay.sock", None), True),
])
async def test_a_connection_reads_its_addresses_from_the_transport_and_its_send_buffer_from_the_listener(
    peer: Any, local: Any, client: Any, server: Any, set_here: bool
) -> None:
    """The request's `client` and `server` are the addresses the transport took at accept, in uvicorn's form (IPv6's
    extra fields dropped; a Unix socket: no client, the server its path). A TCP connection inherits
    SEND_BUFFER_BYTES from its listening socket (DrainingServer.startup; tests/test_edge.py checks every connection
    with `ss`), so nothing is set per connection; a Unix socket's connection does not inherit it and gets it here."""
    import socket

    from uvicorn.server import ServerState

    from service.app import create_app, server_entry
    from service.config import Settings
    from service.relay import Relay
    from service.server import _config
    from service.uvicorn_glue import UvicornEdge

    settings = Settings.from_env({"PUBLIC_CHANNELS": "*", "LOG_LEVEL": "warning", "SEND_BUFFER_BYTES": "65536"})
    config = _config(settings, server_entry(create_app(settings, Relay(settings, edge=UvicornEdge()))))
    config.load()
    sock = _Socket()
    transport = _Transport()
    extra = {"peername": peer, "sockname": local, "socket": sock}
    transport.get_extra_info = lambda name, default=None: extra.get(name, default)  # type: ignore[attr-defined]
    protocol = config.http_protocol_class(config=config, server_state=ServerState(), app_state={},
                                          _loop=asyncio.get_running_loop())
    protocol.connection_made(transport)
    assert (protocol.client, protocol.server) == (client, server)
    assert sock.options == ([(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)] if set_here else [])
    protocol.connection_lost(None)
