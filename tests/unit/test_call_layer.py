"""The call layer (`runtime/calls.py`) on its own: addressing, argument encoding, error parsing,
in-process calls against a registry, and the connection pool against a real local HTTP server
on 127.0.0.1 (`tests/integration/test_calls.py` runs the same through real nodes)."""

from __future__ import annotations

import http.server
import json
import pickle
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pmnc.runtime import CallDepthError, NotFoundError, RemoteError
from pmnc.runtime import calls as calls_module
from pmnc.runtime.calls import (
    CHAIN_HEADER,
    MAX_DEPTH,
    Calls,
    encode_arguments,
    master_route,
    node_routes,
    parse_target,
    remote_error,
    request_chain,
)
from pmnc.runtime.config import (
    CageConfig,
    HttpAddress,
    NodeConfig,
    PeerConfig,
    ReplicationConfig,
    load_config,
)

REPO = Path(__file__).resolve().parents[2]

# -- pure parts ---------------------------------------------------------------------------------


def test_targets() -> None:
    assert parse_target("web") == (None, "web")
    assert parse_target("node-2.web_1") == ("node-2", "web_1")
    for bad in ("", ".web", "a.b.c", "node.", "we b", "x" * 65):
        with pytest.raises(ValueError, match=r"expected 'CAGE' or 'NODE\.CAGE'"):
            parse_target(bad)


def test_routes_from_config(tmp_path: Path) -> None:
    cfg = NodeConfig(
        file=tmp_path / "n.yaml",
        node="n1",
        data_dir=tmp_path,
        cages=(
            CageConfig("a", tmp_path, http=HttpAddress("127.0.0.1", 8080)),
            CageConfig("b", tmp_path),
        ),
    )
    assert node_routes(cfg) == {"n1": {"a": HttpAddress("127.0.0.1", 8080), "b": None}}


def test_routes_reach_the_peers_cages(tmp_path: Path) -> None:
    """A replicated node routes `pmnc("<peer>.<cage>")` to the peer's `http` map; a cage left
    out of it is not callable there (docs/calls.md, "Addressing")."""
    cfg = NodeConfig(
        file=tmp_path / "n.yaml",
        node="n1",
        data_dir=tmp_path,
        cages=(CageConfig("a", tmp_path, http=HttpAddress("127.0.0.1", 8080)),),
        replication=ReplicationConfig(
            HttpAddress("127.0.0.1", 7100),
            peers=(
                PeerConfig("n2", HttpAddress("10.0.0.2", 7100), {"a": HttpAddress("10.0.0.2", 80)}),
                PeerConfig("n3", HttpAddress("10.0.0.3", 7100)),
            ),
        ),
    )
    assert node_routes(cfg) == {
        "n1": {"a": HttpAddress("127.0.0.1", 8080)},
        "n2": {"a": HttpAddress("10.0.0.2", 80)},
        "n3": {},
    }
    assert master_route(cfg, "n2", "a") == HttpAddress("10.0.0.2", 80)
    assert master_route(cfg, "n1", "a") == HttpAddress("127.0.0.1", 8080)
    assert master_route(cfg, "n3", "a") is None
    assert master_route(cfg, "n9", "a") is None
    calls = Calls.for_node(cfg, "a")
    assert calls.address("c", "n2", "a") == ("10.0.0.2", 80)
    with pytest.raises(NotFoundError, match=r"no cage 'a' of node 'n3' in this node's repl"):
        calls.address("c", "n3", "a")
    with pytest.raises(
        NotFoundError, match=r"no node 'n9' known to node 'n1' \(known: n1, n2, n3\)"
    ):
        calls.address("c", "n9", "a")


def test_the_sample_group_routes_to_every_node() -> None:
    cfg = load_config(REPO / "config" / "group" / "node2.yaml")
    routes = node_routes(cfg)
    assert sorted(routes) == ["node1", "node2", "node3"]
    for n in (1, 2, 3):
        assert routes[f"node{n}"] == {
            "demo": HttpAddress("127.0.0.1", n * 100 + 8000),
            "web": HttpAddress("127.0.0.1", n * 100 + 8001),
        }


@pytest.mark.parametrize(
    ("kwargs", "kind", "says"),
    [
        ({"x": float("nan")}, ValueError, "Out of range float"),
        ({"x": 10**5000}, ValueError, "integer string conversion"),
        ({"x": "\ud800"}, ValueError, "lone surrogate"),
        ({"x": {1, 2}}, TypeError, "not JSON serializable"),
        ({"x": b"bytes"}, TypeError, "not JSON serializable"),
    ],
)
def test_arguments_that_are_not_json_are_refused_before_sending(
    kwargs: dict[str, object], kind: type[Exception], says: str
) -> None:
    with pytest.raises(kind, match=says) as info:
        encode_arguments("pmnc('b').m.f", kwargs)
    assert str(info.value).startswith("pmnc('b').m.f: arguments go as JSON")


def test_arguments_as_json_does_it() -> None:
    body = encode_arguments("c", {"t": (1, 2), "d": {1: "one"}, "s": "é"})
    assert json.loads(body) == {"t": [1, 2], "d": {"1": "one"}, "s": "é"}


@pytest.mark.parametrize(
    ("status", "body", "kind", "message"),
    [
        (404, b"{\"error\": \"NotFound: no function 'x' in module 'm'\"}", "NotFound", None),
        (400, b'{"error": "TypeError: m.f(): unexpected keyword"}', "TypeError", None),
        (500, b'{"error": "ValueError: a: b: c"}', "ValueError", "a: b: c"),
        (503, b"<html>busy</html>", "HTTP 503", "<html>busy</html>"),
        (500, b'{"error": 42}', "HTTP 500", "42"),
        (502, b'{"error": "no colon here"}', "HTTP 502", "no colon here"),
    ],
)
def test_remote_errors_are_parsed(status: int, body: bytes, kind: str, message: str | None) -> None:
    e = remote_error("pmnc('b').m.f", status, body)
    assert (e.status, e.type) == (status, kind)
    if message is not None:
        assert e.message == message
    assert str(e) == f"pmnc('b').m.f: {status} {kind}: {e.message}"
    again = pickle.loads(pickle.dumps(e))
    assert (type(again), str(again), again.status, again.type) == (
        RemoteError,
        str(e),
        status,
        kind,
    )


# -- in-process calls ---------------------------------------------------------------------------


def registry(**modules: dict[str, Callable[..., object]]) -> Calls:
    calls = Calls("n1", "demo", {"n1": {}})
    for name, functions in modules.items():
        calls.add_module(name, functions)
    calls.loaded()
    return calls


def test_in_process_calls_pass_objects_and_exceptions_as_they_are() -> None:
    seen: list[object] = []

    class Oops(Exception):
        pass

    def keep(value: object) -> object:
        seen.append(value)
        return value

    def fail() -> None:
        raise Oops("as it is")

    calls = registry(back={"keep": keep, "fail": fail})
    pmnc = calls.bind("front")
    value = {1, 2}  # not JSON: in-process calls are function calls
    assert pmnc.back.keep(value=value) is value
    assert seen == [value]
    with pytest.raises(Oops, match="as it is"):
        pmnc.back.fail()
    with pytest.raises(TypeError):
        pmnc.back.keep(nothing=1)


def test_only_served_functions_are_reachable() -> None:
    calls = registry(back={"f": lambda: 1})
    pmnc = calls.bind("front")
    with pytest.raises(NotFoundError, match=r"no module 'nope' in cage 'demo' \(modules: back\)"):
        pmnc.nope.f()
    with pytest.raises(NotFoundError, match="no function 'g' in module 'back'"):
        pmnc.back.g()
    with pytest.raises(AttributeError, match="private"):
        pmnc.back._f()
    with pytest.raises(AttributeError, match="private"):
        pmnc._back.f()
    assert not hasattr(pmnc, "__wrapped__")  # protocols probing dunders get AttributeError


def test_a_cycle_stops_at_the_depth_limit_naming_the_chain() -> None:
    calls = Calls("n1", "demo", {"n1": {}})
    ping_pmnc, pong_pmnc = calls.bind("ping"), calls.bind("pong")
    depths: list[int] = []

    def ping(n: int) -> object:
        depths.append(n)
        return pong_pmnc.pong.pong(n=n + 1)

    def pong(n: int) -> object:
        depths.append(n)
        return ping_pmnc.ping.ping(n=n + 1)

    calls.add_module("ping", {"ping": ping})
    calls.add_module("pong", {"pong": pong})
    calls.loaded()
    with pytest.raises(CallDepthError) as info:
        ping_pmnc.pong.pong(n=1)
    assert len(depths) == MAX_DEPTH
    chain = info.value.chain
    assert chain[:3] == ("ping", "pong.pong", "ping.ping")
    assert len(chain) == MAX_DEPTH + 2  # the caller, MAX_DEPTH calls, the refused one
    assert "nested more than 32 deep (a cycle?): ping -> pong.pong -> ping.ping" in str(info.value)
    assert isinstance(info.value, RecursionError)
    # The chain is per call: the next one starts from nothing.
    calls.add_module("ping", {"ping": lambda n: n})
    assert pong_pmnc.ping.ping(n=5) == 5


# -- the chain across cages (X-Pmnc-Chain) -------------------------------------------------------


def test_a_request_s_chain_is_refused_when_it_cycles_or_is_too_deep() -> None:
    """What `request_chain` refuses before the function runs (the server calls it with the
    request's header; tests/integration/test_calls.py sends real ones)."""
    assert CHAIN_HEADER == "X-Pmnc-Chain"
    with pytest.raises(CallDepthError) as info, request_chain("n.a.m.f,n.b.x.y,n.a.m.f", "m", "f"):
        pass
    assert info.value.cycle
    assert info.value.chain == ("n.a.m.f", "n.b.x.y", "n.a.m.f")
    assert str(info.value) == (
        "a cycle of calls between cages, n.a.m.f is already in the chain: "
        "n.a.m.f -> n.b.x.y -> n.a.m.f"
    )
    again = pickle.loads(pickle.dumps(info.value))
    assert (again.chain, again.cycle, str(again)) == (info.value.chain, True, str(info.value))
    deep = ",".join(f"n.b.x.f{i}" for i in range(MAX_DEPTH)) + ",n.a.m.f"
    with request_chain(deep, "m", "f"):  # 32 calls before this one: the limit, not over it
        pass
    too_deep = request_chain("n.b.x.y," + deep, "m", "f")
    with pytest.raises(CallDepthError, match="nested more than 32 deep"), too_deep:
        pass
    for bad in ("", "n.a.m.g", "n.a.m.f,", "a.m.f", "n.a.m.f x", "n.a.m.f.g.h", "n a.b.m.f"):
        refused = pytest.raises(ValueError, match=r"X-Pmnc-Chain: expected node\.cage\.module")
        with refused, request_chain(bad, "m", "f"):
            pass


def test_remote_calls_send_the_chain_and_refuse_to_close_a_cycle(server: _Server) -> None:
    port = server.server_address[1]
    here = HttpAddress("127.0.0.1", port)
    routes = {"n1": {"a": here, "b": here}, "n2": {"w": here}}
    calls = Calls("n1", "a", routes)
    calls.add_module("front", {"go": calls.bind("front")("b").m.echo})
    calls.loaded()
    pmnc = calls.bind("front")
    try:
        # From outside any request (a background thread): the calling module starts it.
        assert pmnc("b").m.echo() == {}
        # Within a request from a client: the function it called starts it.
        with request_chain(None, "front", "go"):
            pmnc("b").m.echo()
            pmnc.front.go()  # and an in-process call is one more entry, named in this cage
        # Within a request that came with a chain: it goes on from there.
        with request_chain("n2.w.api.run,n1.a.front.go", "front", "go"):
            pmnc("n1.b").m.echo()
            with pytest.raises(CallDepthError) as info:
                pmnc("n2.w").api.run()  # n2's cage w serving api.run waits for this very call
        assert server.chains == [
            "n1.a.front,n1.b.m.echo",
            "n1.a.front.go,n1.b.m.echo",
            "n1.a.front.go,n1.a.front.go,n1.b.m.echo",
            "n2.w.api.run,n1.a.front.go,n1.b.m.echo",
        ]
        assert info.value.cycle
        assert info.value.chain == ("n2.w.api.run", "n1.a.front.go", "n2.w.api.run")
        assert server.requests == ["/m/echo"] * 4  # the cycle was refused before sending
        deep = request_chain(",".join(f"n.b.x.f{i}" for i in range(MAX_DEPTH + 1)), "x", "f32")
        with deep, pytest.raises(CallDepthError, match="nested more than 32 deep"):
            pmnc("b").m.echo()
    finally:
        calls.close()


def test_calls_wait_for_every_module_to_load() -> None:
    calls = Calls("n1", "demo", {"n1": {}})
    calls.add_module("a", {"f": lambda: "a.f"})
    pmnc = calls.bind("b")
    # From the loading thread (top-level code): at once, since waiting would wait for itself.
    with pytest.raises(RuntimeError, match="from its top-level code: make the call in a function"):
        pmnc.a.f()
    # From another thread (one a module started at load): it waits until loading is done.
    results: list[object] = []
    t = threading.Thread(target=lambda: results.append(pmnc.a.f()))
    t.start()
    time.sleep(0.1)
    assert results == []
    calls.loaded()
    t.join(5)
    assert not t.is_alive(), "the waiting call never went on"
    assert results == ["a.f"]


# -- remote calls against a real server ---------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.connections += 1

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with self.server.lock:
            self.server.requests.append(self.path)
            self.server.chains.append(self.headers.get("X-Pmnc-Chain"))
        name = self.path.rsplit("/", 1)[-1]
        if name == "hangup":  # read the request, then vanish: as a worker killed mid-call
            self.close_connection = True
            return
        if name == "sleep":
            time.sleep(json.loads(body)["seconds"])
        answer = json.dumps({"result": json.loads(body)}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)
        if name == "then_close":  # keep-alive as far as the client knows, then closed
            self.close_connection = True
        if name == "then_reset":  # closed with a reset: a later send fails
            self.close_connection = True
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def finish(self) -> None:
        super().finish()
        self.server.finished.set()

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.connections = 0
        self.requests: list[str] = []
        self.chains: list[str | None] = []
        self.finished = threading.Event()


@pytest.fixture
def server() -> Iterator[_Server]:
    srv = _Server()
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    t.join(5)


@pytest.fixture
def calls(server: _Server) -> Iterator[Calls]:
    """A worker's call layer whose cage `b` is `server`; its connections closed after."""
    port = server.server_address[1]
    layer = Calls("n1", "a", {"n1": {"b": HttpAddress("127.0.0.1", port), "quiet": None}})
    yield layer
    layer.close()


def test_keep_alive_connections_are_reused(server: _Server, calls: Calls) -> None:
    pmnc = calls.bind("front")
    for i in range(10):
        assert pmnc("b").m.echo(i=i) == {"i": i}
    assert server.connections == 1
    assert calls.pool.idle() == 1
    # Concurrent callers each take a connection and give it back: no more than there are.
    errors: list[BaseException] = []

    def hammer() -> None:
        try:
            for _ in range(20):
                pmnc("b").m.echo()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not [t for t in threads if t.is_alive()]
    assert not errors, errors
    assert server.connections <= 5
    assert len(server.requests) == 90


def test_a_connection_the_server_closed_is_not_used_again(server: _Server, calls: Calls) -> None:
    pmnc = calls.bind("front")
    assert pmnc("b").m.then_close(x=1) == {"x": 1}
    assert server.finished.wait(5)
    time.sleep(0.05)  # the FIN on its way to the pooled socket
    assert pmnc("b").m.echo(x=2) == {"x": 2}
    assert server.connections == 2
    assert server.requests == ["/m/then_close", "/m/echo"]  # each sent once


def test_a_send_that_fails_on_a_reused_connection_is_sent_again(
    server: _Server, calls: Calls, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The race the pool's check cannot close (the server closes while we send): skip the check
    # so that the send meets the reset, which must not lose or double the call.
    monkeypatch.setattr(calls_module, "_usable", lambda conn: True)
    pmnc = calls.bind("front")
    assert pmnc("b").m.then_reset(x=1) == {"x": 1}
    assert server.finished.wait(5)
    time.sleep(0.05)
    assert pmnc("b").m.echo(x=2) == {"x": 2}
    assert server.requests == ["/m/then_reset", "/m/echo"]
    assert server.connections == 2


def test_a_connection_lost_after_sending_is_not_retried(server: _Server, calls: Calls) -> None:
    pmnc = calls.bind("front")
    pmnc("b").m.echo()  # a pooled connection: losing it after sending must still not retry
    with pytest.raises(ConnectionError, match=r"lost before an answer .*may or may not have run"):
        pmnc("b").m.hangup()
    assert server.requests == ["/m/echo", "/m/hangup"]
    assert pmnc("b").m.echo(x=3) == {"x": 3}


def test_timeouts(server: _Server, calls: Calls) -> None:
    pmnc = calls.bind("front")
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"no answer from 127\.0\.0\.1:\d+ within 0\.3 s"):
        pmnc("b", timeout=0.3).m.sleep(seconds=2)
    assert 0.25 < time.monotonic() - start < 1.5
    assert calls.pool.idle() == 0  # the late answer must not reach the next call
    assert pmnc("b", timeout=5).m.sleep(seconds=0) == {"seconds": 0}
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="timeout: expected seconds > 0"):
            pmnc("b", timeout=bad)
    with pytest.raises(TypeError, match="timeout"):
        pmnc("b", timeout=True)


def test_a_call_to_a_peer_node_goes_to_its_listed_address(server: _Server, tmp_path: Path) -> None:
    """`pmnc("n2.b")` from a node whose config lists peer n2's cage b: a real POST to it."""
    port = server.server_address[1]
    cfg = NodeConfig(
        file=tmp_path / "n.yaml",
        node="n1",
        data_dir=tmp_path,
        cages=(CageConfig("a", tmp_path),),
        replication=ReplicationConfig(
            HttpAddress("127.0.0.1", 7100),
            peers=(
                PeerConfig(
                    "n2", HttpAddress("127.0.0.1", 7200), {"b": HttpAddress("127.0.0.1", port)}
                ),
            ),
        ),
    )
    layer = Calls.for_node(cfg, "a")
    try:
        assert layer.bind("front")("n2.b").m.echo(via="peer") == {"via": "peer"}
        assert server.requests == ["/m/echo"]
        with pytest.raises(NotFoundError, match="no cage 'b' in node 'n1'"):
            layer.bind("front")("b").m.echo()
    finally:
        layer.close()


def test_where_a_call_cannot_go(server: _Server, calls: Calls) -> None:
    pmnc = calls.bind("front")
    with pytest.raises(NotFoundError, match=r"no cage 'zzz' in node 'n1' \(cages: b, quiet\)"):
        pmnc("zzz").m.f()
    with pytest.raises(NotFoundError, match="cage 'quiet' of node 'n1' has no http address"):
        pmnc("quiet").m.f()
    with pytest.raises(NotFoundError, match="no node 'n2' known to node 'n1'"):
        pmnc("n2.b").m.f()
    assert pmnc("n1.b").m.echo(via="own node") == {"via": "own node"}
    with pytest.raises(AttributeError):
        pmnc("b").__wrapped__  # noqa: B018
    # Nobody listening: said at once, and the call did not run.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gone = Calls("n1", "a", {"n1": {"b": HttpAddress("127.0.0.1", port)}}).bind("front")
    with pytest.raises(ConnectionError, match=r"cannot reach .*it did not run"):
        gone("b").m.f()
