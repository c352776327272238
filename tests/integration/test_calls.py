"""`pmnc` in real nodes: calls between the modules of a cage and between cages over HTTP.

One node, three cages: `a` (the callers, 1 worker so that its connections can be counted), `b`
(the called, 2 workers) and `c` (no `http`). Every call is made by a module of `a` on behalf of
the test, which reads what the module saw (results, exception types and fields) from its answer.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import STARTED, Client, Node, free_port, wait_started, write_modules

FRONT = """
    import time

    from pmnc.runtime import CallDepthError, NotFoundError, RemoteError

    pmnc = globals()["pmnc"]

    def local_put(key, value):
        pmnc.back.put(key=key, value=value)
        return [pmnc.back.get(key=key), pmnc_safe.get(key, "not in front's safe")]

    def local_error():
        try:
            pmnc.back.boom(message="no luck")
        except ValueError as e:  # the exception itself, not a wrapper
            return [type(e).__name__, str(e), type(e).__module__]

    def local_raise():
        pmnc.back.boom(message="through")

    def local_missing(module, function):
        try:
            getattr(getattr(pmnc, module), function)()
        except (NotFoundError, AttributeError) as e:
            return [type(e).__name__, str(e)]
        return "called"

    def ping(n):
        return pmnc.back.pong(n=n + 1)

    def cycle():
        try:
            ping(n=0)
        except CallDepthError as e:
            return [list(e.chain), str(e)]

    def remote(target, function, timeout=None, **kwargs):
        cage = pmnc(target) if timeout is None else pmnc(target, timeout=timeout)
        started = time.monotonic()
        try:
            return ["ok", getattr(cage.remote, function)(**kwargs)]
        except RemoteError as e:
            return ["RemoteError", e.status, e.type, e.message, str(e)]
        except Exception as e:
            return [type(e).__name__, str(e), time.monotonic() - started]

    def remote_not_json():
        try:
            pmnc("b").remote.echo(x={1, 2})
        except TypeError as e:
            return [type(e).__name__, str(e)]

    def fan(n):
        return sorted({pmnc("b").remote.pid() for _ in range(n)})

    def around(timeout):
        return pmnc("b", timeout=timeout).remote.back_to_a(timeout=timeout)

    def cycle_across(timeout):
        started = time.monotonic()
        try:
            return ["ok", pmnc("b", timeout=timeout).remote.back_to_a(timeout=timeout)]
        except RemoteError as e:
            return ["RemoteError", e.status, e.type, e.message, time.monotonic() - started]
        except Exception as e:
            return [type(e).__name__, str(e), time.monotonic() - started]
"""

BACK = """
    pmnc = globals()["pmnc"]

    def put(key, value):
        pmnc_safe[key] = value

    def get(key):
        return pmnc_safe.get(key)

    def boom(message):
        raise ValueError(message)

    def pong(n):
        return pmnc.front.ping(n=n)

    def _secret():
        return "secret"

    alias = put
"""

REMOTE = """
    import os
    import time

    pmnc = globals()["pmnc"]

    def back_to_a(timeout):
        return pmnc("a", timeout=timeout).front.around(timeout=timeout)

    def echo(**kwargs):
        return kwargs

    def one(x):
        return x

    def boom():
        raise KeyError("missing")

    def pid():
        return os.getpid()

    def slow(seconds, started=None):
        _started(started)
        time.sleep(seconds)
        return "done"
"""

LOADING = """
    pmnc = globals()["pmnc"]
    pmnc.back.get(key="x")  # top-level code: runs while the cage's modules load
"""


class Cages:
    def __init__(self, node: Node, b_port: int) -> None:
        self.node = node
        self.a = Client(node.port, timeout=30)
        self.b_port = b_port

    def call(self, name: str, /, **kwargs: Any) -> Any:
        """The result of front.<name>(**kwargs), which must succeed."""
        status, answer = self.a.raw(f"/front/{name}", json.dumps(kwargs).encode())
        assert status == 200, (status, answer)
        return answer["result"]

    def remote(self, function: str, /, target: str = "b", **kwargs: Any) -> Any:
        return self.call("remote", target=target, function=function, **kwargs)


def write_node(tmp_path: Path, *, extra_a: dict[str, str] | None = None) -> Node:
    """A node of cages a (1 worker), b (2 workers) and c (no http), on fresh ports."""
    a_dir = write_modules(tmp_path / "a", {"front": FRONT, "back": BACK, **(extra_a or {})})
    b_dir = write_modules(tmp_path / "b", {"remote": REMOTE + STARTED})
    a_port, b_port = free_port(), free_port()
    lines = [
        "node: test",
        f"data_dir: {tmp_path / 'var'}",
        "graceful_timeout: 2",
        "cages:",
        "  - name: a",
        f"    modules: {a_dir}",
        "    workers: 1",
        "    threads: 4",
        f"    http: 127.0.0.1:{a_port}",
        "  - name: b",
        f"    modules: {b_dir}",
        "    workers: 2",
        "    threads: 4",
        f"    http: 127.0.0.1:{b_port}",
        "  - name: c",
        f"    modules: {b_dir}",
        "    workers: 1",
    ]
    config = tmp_path / "node.yaml"
    config.write_text("\n".join(lines) + "\n")
    node = Node(config, a_port, tmp_path / "node.log")
    node.b_port = b_port  # type: ignore[attr-defined]
    return node


@pytest.fixture
def cages(tmp_path: Path) -> Iterator[Cages]:
    node = write_node(tmp_path).start()
    cages = Cages(node, node.b_port)  # type: ignore[attr-defined]
    try:
        yield cages
    finally:
        cages.a.close()
        node.kill_group()


def test_in_process_calls(cages: Cages) -> None:
    # Each module writes its own safe: back's key is not in front's.
    assert cages.call("local_put", key="k", value=[1, {"a": None}]) == [
        [1, {"a": None}],
        "not in front's safe",
    ]
    direct = Client(cages.node.port)
    assert direct.result("back", "get", key="k") == [1, {"a": None}]
    direct.close()
    # An exception reaches the caller as it is; uncaught, it is the answer's error.
    assert cages.call("local_error")[:2] == ["ValueError", "no luck"]
    assert cages.a.call("front", "local_raise") == (500, {"error": "ValueError: through"})
    # What HTTP does not serve, pmnc does not reach.
    for module, function, kind, says in [
        ("back", "_secret", "AttributeError", "private names are not callable"),
        ("back", "alias", "NotFoundError", "no function 'alias' in module 'back'"),
        ("nope", "f", "NotFoundError", "no module 'nope' in cage 'a' (modules: back, front)"),
    ]:
        found = cages.call("local_missing", module=module, function=function)
        assert found[0] == kind, found
        assert says in found[1], found


def test_a_cycle_of_calls_ends_at_the_depth_limit(cages: Cages) -> None:
    chain, message = cages.call("cycle")
    assert chain[:4] == ["front", "back.pong", "front.ping", "back.pong"]
    assert len(chain) == 34
    assert "nested more than 32 deep (a cycle?): front -> back.pong -> front.ping" in message
    # Uncaught, it is a 500 like any exception, and the worker serves on.
    status, answer = cages.a.call("front", "ping", n=0)
    assert status == 500
    assert answer["error"].startswith("CallDepthError: calls between modules nested")
    assert cages.call("local_put", key="k", value=1)[0] == 1


def test_calls_to_another_cage(cages: Cages) -> None:
    assert cages.remote("echo", a=[1, "é", {"b": None}], t=1.5) == [
        "ok",
        {"a": [1, "é", {"b": None}], "t": 1.5},
    ]
    assert cages.remote("one", target="test.b", x=7) == ["ok", 7]  # this node by its name
    # Errors: the remote type, message and status.
    _, status, kind, message, text = cages.remote("one", y=1)
    assert (status, kind) == (400, "TypeError")
    assert message == "remote.one(): missing a required argument: 'x'"
    assert text.startswith("pmnc('b').remote.one: 400 TypeError: ")
    assert cages.remote("nothing")[1:4] == [
        404,
        "NotFound",
        "no function 'nothing' in module 'remote'",
    ]
    assert cages.remote("_started")[1:3] == [404, "NotFound"]  # private there too
    assert cages.remote("boom")[1:4] == [500, "KeyError", "'missing'"]
    # Arguments that are not JSON are refused before anything is sent.
    assert cages.call("remote_not_json") == [
        "TypeError",
        "pmnc('b').remote.echo: arguments go as JSON: Object of type set is not JSON serializable",
    ]
    # Where a call cannot go, at the call.
    for target, says in [
        ("zzz", "no cage 'zzz' in node 'test' (cages: a, b, c)"),
        ("c", "cage 'c' of node 'test' has no http address"),
        ("node2.b", "no node 'node2' known to node 'test'"),
    ]:
        found = cages.remote("echo", target=target)
        assert found[0] == "NotFoundError", found
        assert says in found[1], found


# Cycle detection across cages: the receiving side takes the chain from the request's
# X-Pmnc-Chain header (`calls.request_chain`, called by `Application.call`).


def test_a_cycle_through_http_is_refused_where_it_closes(cages: Cages) -> None:
    """a.front.cycle_across -> b.remote.back_to_a -> a.front.around -> b.remote.back_to_a: the
    second call to b's function is refused in a, before it is sent, naming the chain; every
    hop answers at once instead of holding a thread until a timeout."""
    kind, status, remote_type, message, took = cages.call("cycle_across", timeout=3)
    assert (kind, status, remote_type) == ("RemoteError", 500, "RemoteError")
    assert message.startswith("pmnc('a').front.around: 500 CallDepthError: a cycle of calls ")
    assert message.endswith(
        "test.b.remote.back_to_a is already in the chain: test.a.front.cycle_across -> "
        "test.b.remote.back_to_a -> test.a.front.around -> test.b.remote.back_to_a"
    )
    assert took < 2.0
    assert cages.remote("one", x=1) == ["ok", 1]  # every thread is free again


def post(port: int, path: str, body: dict[str, Any], chain: str) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", path, json.dumps(body), {"X-Pmnc-Chain": chain})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_a_chain_that_would_cycle_or_nest_too_deep_is_refused_before_the_call(
    cages: Cages,
) -> None:
    """What the receiving cage refuses, from any client: the call is already in the chain, the
    chain is over 32 calls deep, or the header is not a chain ending with this call."""
    port = cages.node.port
    cycle = "test.a.back.put,test.b.remote.back_to_a,test.a.back.put"
    deep = ",".join(f"test.b.remote.f{i}" for i in range(33)) + ",test.a.back.put"
    for chain, kind, says in [
        (cycle, "CallDepthError", "a cycle of calls between cages, test.a.back.put is already"),
        (deep, "CallDepthError", "nested more than 32 deep (a cycle?): test.b.remote.f0 ->"),
        ("test.a.back.get", "ValueError", "X-Pmnc-Chain: expected node.cage.module.function"),
        ("not a chain", "ValueError", "X-Pmnc-Chain: expected node.cage.module.function"),
    ]:
        status, answer = post(port, "/back/put", {"key": "refused", "value": 1}, chain)
        assert status == 500, answer
        assert answer["error"].startswith(f"{kind}: "), answer
        assert says in answer["error"], answer
    assert cages.a.call("back", "get", key="refused") == (200, {"result": None})  # never ran
    # A chain without this call in it runs as any call, and its chain goes on from there.
    ok = "test.b.remote.back_to_a,test.a.back.put"
    assert post(port, "/back/put", {"key": "k", "value": 2}, ok) == (200, {"result": None})


def test_a_remote_call_times_out_and_the_next_one_works(cages: Cages) -> None:
    kind, message, took = cages.remote("slow", timeout=0.5, seconds=5)
    assert kind == "TimeoutError", message
    assert "no answer from 127.0.0.1:" in message
    assert 0.4 < took < 3.0
    assert cages.remote("one", timeout=5, x=1) == ["ok", 1]


def established_to(port: int) -> dict[str, int]:
    """TCP sockets of this machine with `port` at either end, by state (from /proc)."""
    states = {"01": "established", "06": "time_wait", "08": "close_wait", "0A": "listen"}
    counts: dict[str, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            ends = (int(fields[1].rsplit(":", 1)[1], 16), int(fields[2].rsplit(":", 1)[1], 16))
            if port in ends:
                state = states.get(fields[3], fields[3])
                counts[state] = counts.get(state, 0) + 1
    return counts


def test_connections_to_another_cage_are_reused(cages: Cages) -> None:
    pids = cages.call("fan", n=30)
    assert len(pids) == 1  # one connection: one worker of b answered them all
    # Both ends of that one connection, and nothing closed (no TIME_WAIT) on either side.
    counts = established_to(cages.b_port)
    assert counts.get("established") == 2, counts
    assert "time_wait" not in counts, counts
    # Four callers at once (cage a has 4 threads): at most one connection each.
    errors: list[BaseException] = []

    def fan() -> None:
        client = Client(cages.node.port, timeout=30)
        try:
            for _ in range(3):
                client.result("front", "fan", n=10)
        except BaseException as e:
            errors.append(e)
        finally:
            client.close()

    threads = [threading.Thread(target=fan) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not [t for t in threads if t.is_alive()], "callers deadlocked"
    assert not errors, errors
    counts = established_to(cages.b_port)
    assert 2 <= counts.get("established", 0) <= 8, counts
    assert "time_wait" not in counts, counts


def test_a_remote_worker_killed_mid_call(cages: Cages, tmp_path: Path) -> None:
    started = tmp_path / "started"
    result: list[Any] = []
    caller = threading.Thread(
        target=lambda: result.append(
            cages.remote("slow", timeout=20, seconds=15, started=str(started))
        )
    )
    caller.start()
    victim = wait_started(started)
    killed = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    caller.join(15)
    assert not caller.is_alive(), "the caller hangs on a dead worker"
    kind, message, took = result[0]
    assert kind == "ConnectionError", result
    assert "lost before an answer" in message
    assert "may or may not have run" in message
    assert took < 15 and time.monotonic() - killed < 10
    # The supervisor replaces the worker; calls go through again (bounded wait).
    deadline = time.monotonic() + 20
    while True:
        answer = cages.remote("one", timeout=5, x=2)
        if answer == ["ok", 2] or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert answer == ["ok", 2]


def test_a_call_from_top_level_code_stops_the_boot(tmp_path: Path) -> None:
    node = write_node(tmp_path, extra_a={"zloader": LOADING})
    try:
        node.start(wait_ready=False)
        assert node.wait(20) != 0
        log = node.text()
    finally:
        node.kill_group()
    assert "module 'zloader' failed to load: RuntimeError: pmnc.back.get(): calls between" in log
    assert "make the call in a function" in log
