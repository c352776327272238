"""Hostile input and protocol corners, each answered with the right status by a real node.

What a user depends on (README, "HTTP interface"): input that could be stored but never read
back (numbers JSON cannot carry, integers over Python's int/str conversion limit, lone
surrogates) is refused with 400 before the function runs; no answer, however odd the result or
the exception message, drops the connection unanswered; and after every one of them the same
worker serves the next request on a new connection. One node serves the whole module (one
worker, so "the same worker" is checked by its pid).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from helpers import EXAMPLES, Node, free_port, write_config, write_modules
from test_serving import (
    Answer,
    connect,
    exchange,
    read_answers,
    request,
    take_answer,
    wait_closed,
)

ODD = r"""
    import os
    import time

    pmnc_safe = globals()["pmnc_safe"]

    def pid():
        return os.getpid()

    def echo(**kwargs):
        return kwargs

    def record(**kwargs):
        # Counts its runs: input refused with 400 must never reach a function.
        pmnc_safe.modify("calls", lambda n: n + 1, 0)
        return sorted(kwargs)

    def calls():
        return pmnc_safe.get("calls", 0)

    def slow(seconds, n):
        time.sleep(seconds)
        return n

    def real(n=1):
        return n

    helper = lambda: 1
    alias = real

    def surrogate_result():
        return "x\ud800"

    def surrogate_key_result():
        return {"\udc80": 1}

    def surrogate_nested_result():
        return [1, {"a": ["ok", "\udfff"]}]

    def surrogate_error():
        raise ValueError("bad \ud800 byte")

    def huge_int_result():
        return 10 ** 5000

    def inf_result():
        return float("inf")
"""


@dataclass
class Odd:
    """The module's node and the pid of its one worker."""

    node: Node
    pid: int = 0

    @property
    def port(self) -> int:
        return self.node.port


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Odd]:
    tmp = tmp_path_factory.mktemp("bad_input")
    modules = tmp / "modules"
    shutil.copytree(EXAMPLES, modules)
    write_modules(modules, {"odd": ODD})
    port = free_port()
    config = write_config(tmp / "node.yaml", modules, port, workers=1, threads=2)
    odd = Odd(Node(config, port, tmp / "node.log"))
    try:
        odd.node.start()
        pid = call(odd, "/odd/pid").json()
        assert isinstance(pid, dict) and isinstance(pid["result"], int), pid
        odd.pid = pid["result"]
        yield odd
        assert odd.node.stop() == 0
    finally:
        odd.node.kill_group()


def call(node: Odd, path: str, body: bytes = b"{}") -> Answer:
    """One POST on a new connection."""
    (answer,) = exchange(node.port, request(path, body))
    return answer


def still_serving(node: Odd) -> None:
    """The next request on a new connection answers 200, from the same worker as ever."""
    answer = call(node, "/odd/pid")
    assert answer.status == 200, f"the next request got {answer}"
    assert answer.json() == {"result": node.pid}, "the worker was replaced: it died"


def error_of(answer: Answer) -> str:
    document = answer.json()
    assert isinstance(document, dict) and set(document) == {"error"}, str(answer)
    assert isinstance(document["error"], str)
    return document["error"]


BIG = b"1" + b"0" * 4999  # 5000 digits: over sys.get_int_max_str_digits() (4300)

REFUSED = {
    "1e999999 (json reads inf)": b'{"key": "r", "value": 1e999999}',
    "-1e999999": b'{"key": "r", "value": -1e999999}',
    "1e999999 nested": b'{"key": "r", "value": {"a": [1, {"b": 1e999999}]}}',
    "NaN": b'{"key": "r", "value": NaN}',
    "Infinity": b'{"key": "r", "value": Infinity}',
    "-Infinity in a list": b'{"key": "r", "value": [1, -Infinity]}',
    "an int of 5000 digits": b'{"key": "r", "value": ' + BIG + b"}",
    "a negative int of 5000 digits": b'{"key": "r", "value": [-' + BIG + b"]}",
    "a lone high surrogate in a key": b'{"key": "s\\ud800", "value": 1}',
    "a lone low surrogate in a key": b'{"key": "\\udfffs", "value": 1}',
    "a reversed pair": b'{"key": "\\udc00\\ud800", "value": 1}',
    "a high surrogate then a letter": b'{"key": "\\ud800\\u0041", "value": 1}',
    "a lone surrogate in a nested value": b'{"key": "r", "value": {"a": ["x", "\\udc00"]}}',
    "a lone surrogate in a dict key": b'{"key": "r", "value": {"\\ud800": 1}}',
    "a lone surrogate in an argument name": b'{"\\ud800": 1}',
}


@pytest.mark.parametrize("body", REFUSED.values(), ids=REFUSED.keys())
def test_input_that_could_never_be_read_back_is_refused_with_400_before_the_call(
    node: Odd, body: bytes
) -> None:
    calls = call(node, "/odd/calls").json()
    assert isinstance(calls, dict), calls
    answer = call(node, "/odd/record", body)
    assert answer.status == 400, f"{body[:80]!r} answered {answer}"
    error_of(answer)
    assert call(node, "/odd/calls").json() == calls, "the function ran on refused input"
    # The same body to kv/put stores nothing: kv/keys still answers, and lists no such key.
    put = call(node, "/kv/put", body)
    assert put.status == 400, f"kv/put of {body[:80]!r} answered {put}"
    keys = call(node, "/kv/keys")
    assert keys.status == 200, f"kv/keys answered {keys}"
    listed = keys.json()["result"]  # type: ignore[index]
    assert all(key.startswith("ok-") for key in listed), listed
    still_serving(node)


ACCEPTED = {
    "an int of exactly 4300 digits": int("9" * sys.get_int_max_str_digits()),
    "a negative int of 4300 digits": -int("9" * sys.get_int_max_str_digits()),
    "the largest float": 1.7976931348623157e308,
    "the smallest float": 5e-324,
    "a surrogate pair (an emoji)": "\U0001f600",
    "NUL and other controls": "a\x00b\x1f",
    "a nested mix": {"é": [None, True, 1.5, {"\U0001f600": -0.0}]},
}


@pytest.mark.parametrize("value", ACCEPTED.values(), ids=ACCEPTED.keys())
def test_input_at_the_edges_is_stored_and_read_back(node: Odd, value: object) -> None:
    """What JSON can carry is not refused: each value comes back as it went in."""
    key = f"ok-{len(json.dumps(value))}-{time.monotonic_ns()}"
    body = json.dumps({"key": key, "value": value}).encode()  # ensure_ascii: \ud83d\ude00
    assert call(node, "/kv/put", body).status == 200
    answer = call(node, "/kv/get", json.dumps({"key": key}).encode())
    assert (answer.status, answer.json()) == (200, {"result": value}), str(answer)


UNANSWERABLE = ["surrogate_result", "surrogate_key_result", "surrogate_nested_result",
                "huge_int_result", "inf_result"]  # fmt: skip


@pytest.mark.parametrize("function", [*UNANSWERABLE, "surrogate_error"])
def test_a_result_or_error_that_cannot_be_encoded_is_still_answered_500(
    node: Odd, function: str
) -> None:
    """The answer must reach the client: a dropped connection is what a user saw before."""
    with connect(node.port) as sock:
        sock.sendall(request(f"/odd/{function}"))
        (answer,) = read_answers(sock, timeout=5)
        assert answer.status == 500, str(answer)
        error = error_of(answer)
        if function == "surrogate_error":
            assert error.startswith("ValueError: bad "), error
        if not answer.closes:  # the connection is kept: it serves the next request
            sock.sendall(request("/odd/real", b'{"n": 2}'))
            (next_answer,) = read_answers(sock, timeout=5)
            assert (next_answer.status, next_answer.json()) == (200, {"result": 2})
    still_serving(node)


@pytest.mark.parametrize(("char", "name"), [(b"\r", "CR"), (b"\n", "LF"), (b"\x00", "NUL")])
def test_a_bare_cr_lf_or_nul_in_a_header_value_is_400(node: Odd, char: bytes, name: str) -> None:
    data = request("/odd/real", headers=[("X-Note", "a#b")]).replace(b"a#b", b"a" + char + b"b")
    (answer,) = exchange(node.port, data)
    assert answer.status == 400, f"a bare {name} in a header value answered {answer}"
    still_serving(node)


def test_http_11_without_host_is_400_and_http_10_needs_none(node: Odd) -> None:
    data = request("/odd/real", version="HTTP/1.1").replace(b"Host: 127.0.0.1\r\n", b"")
    (answer,) = exchange(node.port, data)
    assert answer.status == 400, f"HTTP/1.1 without Host answered {answer}"
    (answer,) = exchange(node.port, request("/odd/real", b'{"n": 3}', version="HTTP/1.0"))
    assert (answer.status, answer.json()) == (200, {"result": 3}), str(answer)
    still_serving(node)


def head_exchange(node: Odd, path: str) -> tuple[Answer, bytes]:
    """A HEAD with `Connection: close`: its answer, and whatever came after it (no body)."""
    with connect(node.port) as sock:
        sock.sendall(request(path, None, method="HEAD", close=True))
        data = wait_closed(sock, 5)
    assert data is not None, f"HEAD {path}: the connection was not closed after its answer"
    buffer = bytearray(data)
    answer = take_answer(buffer, head_only=True)
    assert answer is not None, f"HEAD {path}: no complete answer in {data[:200]!r}"
    return answer, bytes(buffer)


@pytest.mark.parametrize("path", ["/_status", "/metrics"])
def test_head_answers_the_headers_without_a_body(node: Odd, path: str) -> None:
    answer, body = head_exchange(node, path)
    assert answer.status == 200, str(answer)
    assert body == b"", f"HEAD {path} answered {len(body)} bytes of body: {body[:100]!r}"
    still_serving(node)


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", "/odd/real", {"POST"}),
        ("DELETE", "/kv/get", {"POST"}),
        ("POST", "/_status", {"GET", "HEAD"}),
        ("PUT", "/_status", {"GET", "HEAD"}),
        ("POST", "/metrics", {"GET", "HEAD"}),
        ("HEAD", "/odd/real", {"POST"}),
    ],
)
def test_405_says_which_methods_are_allowed(
    node: Odd, method: str, path: str, allow: set[str]
) -> None:
    if method == "HEAD":
        answer, after = head_exchange(node, path)
        assert after == b"", f"the 405 to a HEAD carried a body: {after[:100]!r}"
    else:
        body = None if method in ("GET", "DELETE") else b"{}"
        (answer,) = exchange(node.port, request(path, body, method=method))
    assert answer.status == 405, str(answer)
    got = {m.strip() for m in answer.headers.get("allow", "").split(",") if m.strip()}
    assert got == allow, f"{method} {path}: Allow: {answer.headers.get('allow')!r}"
    still_serving(node)


def test_expect_100_continue_is_honoured_on_http_11_only(node: Odd) -> None:
    body = b'{"n": 11}'
    head_11 = request("/odd/real", body, headers=[("Expect", "100-continue")])[: -len(body)]
    with connect(node.port) as sock:
        sock.sendall(head_11)
        (interim,) = read_answers(sock, timeout=2)
        assert interim.status == 100, f"HTTP/1.1 with Expect: 100-continue: got {interim}"
        sock.sendall(body)
        (answer,) = read_answers(sock, timeout=5)
        assert (answer.status, answer.json()) == (200, {"result": 11}), str(answer)
    head_10 = request("/odd/real", body, version="HTTP/1.0", headers=[("Expect", "100-continue")])[
        : -len(body)
    ]
    with connect(node.port) as sock:
        sock.sendall(head_10)
        sock.settimeout(0.5)
        early = b""
        with contextlib.suppress(TimeoutError):
            early = sock.recv(65536)
        assert early == b"", f"HTTP/1.0 has no 100 Continue, yet the node sent {early[:100]!r}"
        sock.sendall(body)
        answers = read_answers(sock, timeout=5)
        assert [(a.status, a.json()) for a in answers] == [(200, {"result": 11})]
    still_serving(node)


@pytest.mark.parametrize("name", ["helper", "alias"])
def test_only_functions_defined_with_def_under_their_own_name_are_served(
    node: Odd, name: str
) -> None:
    """`helper = lambda: 1` and `alias = real` are module attributes, not the module's API."""
    answer = call(node, f"/odd/{name}")
    assert answer.status == 404, f"odd.{name} answered {answer}"
    assert error_of(answer).startswith("NotFound: ")
    assert call(node, "/odd/real").json() == {"result": 1}
    still_serving(node)


def test_pipelined_requests_are_answered_in_order(node: Odd) -> None:
    """A slow first request, then quick ones, all in one write: answers keep their order
    (the worker has 2 threads; answering whichever finished first would reorder them)."""
    data = request("/odd/slow", b'{"seconds": 0.3, "n": 0}')
    data += b"".join(request("/odd/real", json.dumps({"n": i}).encode()) for i in range(1, 5))
    data += request("/odd/echo", b'{"last": true}', close=True)
    with connect(node.port) as sock:
        sock.sendall(data)
        answers = read_answers(sock, 6, timeout=5)
        assert wait_closed(sock, 2) == b"", "the connection stayed open after Connection: close"
    results = [(a.status, a.json()) for a in answers]
    expected = [(200, {"result": i}) for i in range(5)] + [(200, {"result": {"last": True}})]
    assert results == expected
    still_serving(node)


def test_a_bad_request_pipelined_behind_a_slow_one_is_answered_after_it(node: Odd) -> None:
    """The 400 of the second request must not overtake (or cut off) the first one's 200."""
    data = request("/odd/slow", b'{"seconds": 0.3, "n": 1}')
    data += request("/odd/real", headers=[("X-Note", "a#b")]).replace(b"a#b", b"a\rb")
    with connect(node.port) as sock:
        sock.sendall(data)
        answers = read_answers(sock, 2, timeout=5)
    assert [a.status for a in answers] == [200, 400], [str(a) for a in answers]
    assert answers[0].json() == {"result": 1}
    still_serving(node)
