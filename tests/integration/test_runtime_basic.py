"""The node end to end: start, serve, stop; the HTTP contract; isolation; restart; boot errors."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from helpers import (
    EXAMPLES,
    STARTED,
    Client,
    Node,
    increment_concurrently,
    once,
    wait_serving,
    wait_started,
    worker_pids,
    write_modules,
)
from pmnc.runtime.http import MAX_HEAD
from pmnc.safe import Safe

PROBE = """
    import os
    import time
    from os.path import join  # imported: not callable over HTTP

    class Thing:  # a class: not callable over HTTP
        pass

    def pid():
        return os.getpid()

    def slow(seconds=1.0, started=None):
        _started(started)
        time.sleep(seconds)
        return "done"

    def boom():
        raise ValueError("no luck")

    def not_json():
        return {1, 2}

    def echo(**kwargs):
        return kwargs

    def _private():
        return "secret"

    async def coro():  # async: not served (no event loop in a worker), logged at load
        return "never"

    async def agen():
        yield "never"
"""


def modules_with_probe(tmp_path: Path) -> Path:
    directory = tmp_path / "modules"
    shutil.copytree(EXAMPLES, directory)
    return write_modules(directory, {"probe": PROBE + STARTED})


def test_start_serve_sigterm_exits_zero_and_leaves_nothing(
    tmp_path: Path, node_factory: Callable[..., Node]
) -> None:
    node = node_factory(modules_with_probe(tmp_path), workers=2, threads=2).start()
    assert f"http://127.0.0.1:{node.port}" in node.text()
    assert len(worker_pids(node.pid)) == 2
    client = Client(node.port)
    assert client.result("counter", "increment", name="a") == 1
    assert client.result("counter", "increment", name="a", by=5) == 6
    assert client.result("counter", "get", name="a") == 6
    client.close()
    assert node.stop() == 0
    assert node.wait_group_gone(5), "a worker outlived the supervisor"
    assert "stopped (exit status 0)" in node.text()


def test_modules_with_the_same_key_stay_isolated(
    tmp_path: Path, node_factory: Callable[..., Node]
) -> None:
    node = node_factory(modules_with_probe(tmp_path)).start()
    client = Client(node.port)
    client.result("kv", "put", key="hits", value="kv's own")
    assert client.result("counter", "increment", name="hits") == 1
    assert client.result("kv", "get", key="hits") == "kv's own"
    assert client.result("counter", "get", name="hits") == 1
    assert client.result("kv", "keys") == ["hits"]
    client.close()
    assert node.stop() == 0
    # Each module has its own safe directory, named <node>.<cage>.<module>.
    with Safe.open(tmp_path / "var" / "safe" / "test.demo.kv", create=False) as kv:
        assert dict(kv) == {"hits": "kv's own"}
    with Safe.open(tmp_path / "var" / "safe" / "test.demo.counter", create=False) as counter:
        assert dict(counter) == {"hits": 1}


def test_http_errors_answer_json_and_the_worker_lives_on(
    tmp_path: Path, node_factory: Callable[..., Node]
) -> None:
    node = node_factory(modules_with_probe(tmp_path), workers=1, threads=2, max_body=1000)
    node.start()
    client = Client(node.port)
    pid = client.result("probe", "pid")

    def check(status: int, path: str, body: bytes, error: str) -> None:
        got, answer = client.raw(path, body)
        assert got == status, (path, body, got, answer)
        assert set(answer) == {"error"} and answer["error"].startswith(error), answer

    check(400, "/kv/get", b"{not json", "JSONDecodeError: ")
    check(400, "/kv/get", b"\xc3\x28", "UnicodeDecodeError: ")
    check(400, "/kv/get", b"[1, 2]", "TypeError: expected a JSON object")
    check(400, "/kv/get", b'{"nokey": 1}', "TypeError: ")
    check(400, "/kv/put", b'{"key": "k"}', "TypeError: ")
    check(404, "/nomodule/get", b"{}", "NotFound: ")
    check(404, "/kv/nofunction", b"{}", "NotFound: ")
    check(404, "/probe/_private", b"{}", "NotFound: ")
    check(404, "/probe/join", b"{}", "NotFound: ")  # imported into the module
    check(404, "/probe/Thing", b"{}", "NotFound: ")  # a class
    check(404, "/probe/os", b"{}", "NotFound: ")
    check(404, "/probe/coro", b"{}", "NotFound: ")
    check(404, "/probe/agen", b"{}", "NotFound: ")
    check(404, "/kv", b"{}", "NotFound: ")
    check(500, "/probe/boom", b"{}", "ValueError: no luck")
    check(500, "/probe/not_json", b"", "TypeError: ")
    check(413, "/probe/echo", json.dumps({"x": "y" * 2000}).encode(), "PayloadTooLarge: ")
    # After all that (and a connection closed by the 413), the same worker still serves.
    assert client.result("probe", "echo", a=[1, None, "é"]) == {"a": [1, None, "é"]}
    assert client.raw("/probe/echo", b"")[1] == {"result": {}}  # an empty body is {}
    assert client.result("probe", "pid") == pid
    client.close()
    text = node.text()
    assert "Traceback" in text and "ValueError: no luck" in text
    assert text.count("async functions are not served over HTTP: coro, agen") == 1  # 1 worker
    assert "never awaited" not in text and "RuntimeWarning" not in text
    assert node.stop() == 0


QUITTER = """
    import os
    import sys

    def leave():
        sys.exit("bye")

    def interrupt():
        raise KeyboardInterrupt("ctrl-c")

    def generator_exit():
        raise GeneratorExit("closed")

    def pid():
        return os.getpid()
"""


def test_deep_json_and_base_exceptions_answer_and_the_only_thread_lives_on(
    tmp_path: Path, node_factory: Callable[..., Node]
) -> None:
    """One worker with one thread: if any of these ended the thread, the next call would hang."""
    modules = write_modules(tmp_path / "modules", {"quitter": QUITTER})
    node = node_factory(modules, workers=1, threads=1).start()
    client = Client(node.port, timeout=5.0)
    pid = client.result("quitter", "pid")
    for _ in range(3):  # more times than there are threads
        status, answer = client.raw("/quitter/pid", b"[" * 100_000)  # under max_body (1 MiB)
        assert status == 400, answer
        assert answer["error"].startswith("RecursionError: "), answer
        assert client.call("quitter", "leave") == (500, {"error": "SystemExit: bye"})
        assert client.call("quitter", "interrupt") == (500, {"error": "KeyboardInterrupt: ctrl-c"})
        assert client.call("quitter", "generator_exit") == (
            500,
            {"error": "GeneratorExit: closed"},
        )
    client.close()
    fresh = Client(node.port, timeout=5.0, keep_alive=False)  # a new connection: accept works
    assert fresh.result("quitter", "pid") == pid
    fresh.close()
    assert node.stop() == 0


def test_concurrent_increments_over_http_are_exact(
    tmp_path: Path, node_factory: Callable[..., Node]
) -> None:
    node = node_factory(modules_with_probe(tmp_path), workers=2, threads=4).start()
    threads, per_thread = 4, 150
    increment_concurrently(node.port, "shared", threads=threads, per_thread=per_thread, timeout=60)
    assert once(node.port, "counter", "get", name="shared") == threads * per_thread
    assert node.stop() == 0


def test_restart_keeps_the_data(tmp_path: Path, node_factory: Callable[..., Node]) -> None:
    node = node_factory(modules_with_probe(tmp_path)).start()
    client = Client(node.port)
    client.result("kv", "put", key="k", value={"nested": [1, 2.5, None]})
    client.close()
    assert node.stop() == 0
    node.start()
    assert once(node.port, "kv", "get", key="k") == {"nested": [1, 2.5, None]}
    assert node.stop() == 0


def test_a_request_in_flight_finishes_during_a_graceful_stop(
    tmp_path: Path, node_factory: Callable[..., Node]
) -> None:
    node = node_factory(modules_with_probe(tmp_path), workers=1, graceful_timeout=10).start()
    answers: list[object] = []
    errors: list[BaseException] = []
    started = tmp_path / "slow.started"

    def call_slow() -> None:
        client = Client(node.port)
        try:
            answers.append(client.call("probe", "slow", seconds=1.0, started=str(started)))
        except BaseException as e:
            errors.append(e)
        finally:
            client.close()

    slow = threading.Thread(target=call_slow)
    slow.start()
    wait_started(started)  # the request is in flight in the worker
    node.signal(signal.SIGTERM)
    slow.join(15)
    assert not slow.is_alive()
    assert not errors, errors
    assert answers == [(200, {"result": "done"})]
    assert node.wait(15) == 0


def test_a_module_that_cannot_load_stops_the_node_with_a_clear_message(
    tmp_path: Path, node_factory: Callable[..., Node]
) -> None:
    modules = write_modules(tmp_path / "modules", {"good": "def f():\n    return 1\n"})
    write_modules(modules, {"broken": "def f(:\n    pass\n"})
    node = node_factory(modules, workers=2).start(wait_ready=False)
    code = node.wait(30)
    assert code != 0
    text = node.text()
    assert "could not boot" in text and "broken.py" in text and "SyntaxError" in text
    assert "stopping the node" in text
    assert " ready: " not in text
    assert node.wait_group_gone(5)
    assert text.count("could not boot") <= 2, "crash-looping"


def test_an_invalid_config_exits_2_and_starts_nothing(
    tmp_path: Path, node_factory: Callable[..., Node]
) -> None:
    node = node_factory(modules_with_probe(tmp_path))
    node.config.write_text(node.config.read_text().replace("workers: 2", "workers: true"))
    node.start(wait_ready=False)
    assert node.wait(30) == 2
    assert "cages[0].workers" in node.text()
    assert not (tmp_path / "var").exists()


def test_sighup_with_an_invalid_config_is_refused_and_the_node_keeps_serving(
    tmp_path: Path, node_factory: Callable[..., Node]
) -> None:
    node = node_factory(modules_with_probe(tmp_path)).start()
    good = node.config.read_text()
    node.config.write_text(good.replace("threads: 4", "threads: 0"))
    mark = node.log_size()
    node.signal(signal.SIGHUP)
    node.wait_log("reload refused", 10, since=mark)
    assert "cages[0].threads" in node.text(mark)
    assert wait_serving(node.port, 5) < 5
    assert node.stop() == 0


def test_a_port_in_use_exits_2_naming_the_key_and_starts_nothing(
    tmp_path: Path, node_factory: Callable[..., Node]
) -> None:
    node = node_factory(modules_with_probe(tmp_path))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", node.port))
        taken.listen(1)
        node.start(wait_ready=False)
        assert node.wait(30) == 2
    assert "cages[0].http" in node.text()
    assert not (tmp_path / "var").exists()


def _raw_exchange(port: int, request: bytes) -> tuple[int, dict[str, str]]:
    """Send bytes as they are (http.client would fix them up) and read the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)


def test_invalid_json_numbers_and_bad_lengths_get_400_and_nothing_is_stored(
    tmp_path: Path, node_factory: Callable[..., Node]
) -> None:
    node = node_factory(EXAMPLES, workers=1, threads=2).start()
    client = Client(node.port, timeout=5.0)
    for constant in (b"NaN", b"Infinity", b"-Infinity"):
        status, answer = client.raw("/kv/put", b'{"key": "n", "value": ' + constant + b"}")
        assert status == 400, answer
        assert "not valid JSON" in answer["error"]
    assert client.result("kv", "get", key="n") is None
    body = b'{"key": "k", "value": 1}'
    for lengths in ([b"\xc2\xb2"], [str(len(body)).encode(), b"3"], [b"-1"], [b"1e3"]):
        head = b"POST /kv/put HTTP/1.1\r\nHost: x\r\n"
        head += b"".join(b"Content-Length: " + n + b"\r\n" for n in lengths)
        status, answer = _raw_exchange(node.port, head + b"\r\n" + body)
        assert status == 400, (lengths, answer)
        assert "Content-Length" in answer["error"], answer
    assert client.result("kv", "get", key="k") is None
    assert client.result("kv", "put", key="k", value=1) is None  # the worker serves on
    client.close()


def test_the_request_head_limit_is_exact_however_the_head_arrives(
    tmp_path: Path, node_factory: Callable[..., Node]
) -> None:
    node = node_factory(modules_with_probe(tmp_path), workers=1, threads=2).start()

    def head(size: int) -> bytes:
        """A POST /probe/echo head of exactly `size` bytes, its blank line included."""
        start = b"POST /probe/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nX-Pad: "
        pad = size - len(start) - len(b"\r\n\r\n")
        return start + b"a" * pad + b"\r\n\r\n"

    for size in (MAX_HEAD - 1, MAX_HEAD):
        status, answer = _raw_exchange(node.port, head(size))
        assert (status, answer) == (200, {"result": {}}), size
    # Over the limit, whether the end of the head is in the first read or comes after it.
    for size in (MAX_HEAD + 1, MAX_HEAD + 4, 70 << 10):
        status, answer = _raw_exchange(node.port, head(size))
        assert status == 431, (size, answer)
        assert answer["error"].startswith("RequestHeaderFieldsTooLarge: "), answer
    assert once(node.port, "probe", "echo", a=1) == {"a": 1}  # the worker serves on
    assert node.stop() == 0
