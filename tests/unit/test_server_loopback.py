"""`runtime/server.py`'s `Server` without a node: a loopback listener, an `Application` of two
functions, the harness's client. What a worker adds (safes, status, the supervisor) is left
out, so a failure here is the server's own."""

from __future__ import annotations

import socket
import time
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
from pmnc.runtime.app import Application
from pmnc.runtime.harness import Client
from pmnc.runtime.metrics import RequestMetrics
from pmnc.runtime.modules import AppModule
from pmnc.runtime.server import Limits, Server


def _echo(**kwargs: object) -> object:
    return kwargs


@pytest.fixture
def server() -> Iterator[tuple[Server, int, list[str]]]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    listener.setblocking(False)  # as the supervisor binds it: shared, polled
    port = listener.getsockname()[1]
    module = AppModule("m", Path("m.py"), types.ModuleType("m"), {"echo": _echo})
    fatal: list[str] = []
    srv = Server(
        listener,
        Application({"m": module}),
        Limits(threads=2, max_body=1024, keepalive_timeout=5, request_timeout=5, max_connections=8),
        on_fatal=lambda: fatal.append("fatal"),
        metrics=RequestMetrics(),
    )
    srv.start()
    try:
        yield srv, port, fatal
    finally:
        srv.stop()
        still = srv.join(time.monotonic() + 5)
        listener.close()
        assert still == 0, "requests still inside a call after the stop"


def test_keep_alive_requests_on_one_connection(server: tuple[Server, int, list[str]]) -> None:
    _srv, port, fatal = server
    client = Client("127.0.0.1", port, timeout=5)
    try:
        for n in range(3):
            assert client.call("m", "echo", n=n) == (200, {"result": {"n": n}})
            assert client.conn is not None, "the connection was not kept alive"
        assert client.call("m", "nope")[0] == 404
        assert client.raw("/m/echo", b"{")[0] == 400
        status, body = client.raw("/m/echo", b"x" * 2048)
        assert status == 413, body
    finally:
        client.close()
    assert not fatal


def test_unknown_method_and_a_closed_connection(server: tuple[Server, int, list[str]]) -> None:
    _srv, port, _ = server
    client = Client("127.0.0.1", port, timeout=5, keep_alive=False)
    try:
        status, _body = client.request("GET", "/m/echo")
        assert status == 405
        assert client.call("m", "echo", a=1) == (200, {"result": {"a": 1}})
        assert client.conn is None, "Connection: close was not honoured"
    finally:
        client.close()


def test_stop_closes_the_listener_to_new_connections(
    server: tuple[Server, int, list[str]],
) -> None:
    srv, port, _ = server
    client = Client("127.0.0.1", port, timeout=5)
    assert client.call("m", "echo")[0] == 200
    client.close()
    srv.stop()
    assert srv.join(time.monotonic() + 5) == 0
    # Nothing accepts any more: a new request is refused or left unanswered, never served.
    with pytest.raises((OSError, ConnectionError)):
        late = Client("127.0.0.1", port, timeout=1)
        try:
            late.call("m", "echo")
        finally:
            late.close()
