"""The HTTP/1.1 rules of `runtime/http.py` and the input checks of `runtime/app.py`, without
sockets (the integration tests send the same bytes to a real node)."""

from __future__ import annotations

import json

import pytest
from pmnc.runtime.app import BadInput, Response, error_response, parse_arguments
from pmnc.runtime.http import MAX_HEAD, HttpError, find_head_end, parse_head, serialize


def head(*lines: str) -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def refused(raw: bytes) -> HttpError:
    with pytest.raises(HttpError) as info:
        parse_head(raw)
    return info.value


def test_a_plain_request() -> None:
    r = parse_head(head("POST /kv/get?x=1 HTTP/1.1", "Host: a", "Content-Length: 12"))
    assert (r.method, r.path, r.version, r.body_length) == ("POST", "/kv/get", "HTTP/1.1", 12)
    assert r.keep_alive and not r.expect_continue


@pytest.mark.parametrize(
    ("lines", "keep_alive"),
    [
        (("GET / HTTP/1.1", "Host: a"), True),
        (("GET / HTTP/1.1", "Host: a", "Connection: close"), False),
        (("GET / HTTP/1.1", "Host: a", "Connection: Upgrade, Close"), False),
        (("GET / HTTP/1.0",), False),
        (("GET / HTTP/1.0", "Connection: Keep-Alive"), True),
    ],
)
def test_keep_alive_follows_the_version_and_connection_tokens(
    lines: tuple[str, ...], keep_alive: bool
) -> None:
    assert parse_head(head(*lines)).keep_alive is keep_alive


def test_expect_continue_only_on_http_1_1() -> None:
    assert parse_head(head("POST /a/b HTTP/1.1", "Host: a", "Expect: 100-continue")).expect_continue
    assert not parse_head(head("POST /a/b HTTP/1.0", "Expect: 100-continue")).expect_continue


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (head("GET / HTTP/1.1"), 400),  # no Host
        (head("GET / HTTP/1.1", "Host: a", "Host: b"), 400),
        (head("GET / HTTP/2.0", "Host: a"), 505),
        (head("GET / SPDY/3", "Host: a"), 400),
        (head("GET  / HTTP/1.1", "Host: a"), 400),
        (head("GET / HTTP/1.1", "Host: a", "X-A: b\rc"), 400),  # bare CR in a value
        (head("GET / HTTP/1.1", "Host: a", "X-A: b\nc"), 400),  # bare LF in a value
        (head("GET / HTTP/1.1", "Host: a", "X-A: b\x00c"), 400),
        (head("GET / HTTP/1.1", "Host: a", "X-A : b"), 400),  # space before the colon
        (head("GET / HTTP/1.1", "Host: a", " folded"), 400),
        (head("GET / HTTP/1.1", "Host: a", "Content-Length: 1", "Content-Length: 2"), 400),
        (head("GET / HTTP/1.1", "Host: a", "Content-Length: ²"), 400),
        (head("GET / HTTP/1.1", "Host: a", "Content-Length: -1"), 400),
        (head("GET / HTTP/1.1", "Host: a", "Content-Length: 1" + "0" * 18), 400),
        (head("POST / HTTP/1.1", "Host: a", "Transfer-Encoding: chunked"), 411),
    ],
)
def test_refused_heads(raw: bytes, status: int) -> None:
    assert refused(raw).status == status


def test_same_content_length_twice_is_one_length() -> None:
    r = parse_head(head("POST / HTTP/1.1", "Host: a", "Content-Length: 3", "Content-Length: 3"))
    assert r.body_length == 3


def test_head_end_is_found_and_limited() -> None:
    assert find_head_end(bytearray(b"GET / HTTP/1.1\r\nHost: a\r\n")) == -1
    raw = bytearray(head("GET / HTTP/1.1", "Host: a") + b"{}")
    assert find_head_end(raw) == len(raw) - 2
    with pytest.raises(HttpError) as info:
        find_head_end(bytearray(b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_HEAD))
    assert info.value.status == 431
    exact = bytearray(b"GET / HTTP/1.1\r\nX: ")
    exact += b"a" * (MAX_HEAD - len(exact) - 4) + b"\r\n\r\n"
    assert find_head_end(exact) == MAX_HEAD  # the blank line included, MAX_HEAD is allowed


def test_bare_lf_lines_are_refused_at_once_not_after_a_timeout() -> None:
    with pytest.raises(HttpError) as info:
        find_head_end(bytearray(b"GET / HTTP/1.1\nHost: a\n\n"))
    assert info.value.status == 400


def test_serialize_head_only_keeps_the_length_and_drops_the_body() -> None:
    response = Response(200, b'{"a": 1}')
    full = serialize(response, "HTTP/1.1", keep_alive=True, head_only=False)
    only = serialize(response, "HTTP/1.1", keep_alive=True, head_only=True)
    assert full == only + b'{"a": 1}'
    assert b"Content-Length: 8\r\n" in only
    closing = serialize(response, "HTTP/1.0", keep_alive=False, head_only=False)
    assert b"Connection: close\r\n" in closing
    assert b"Connection: keep-alive\r\n" in serialize(
        response, "HTTP/1.0", keep_alive=True, head_only=False
    )
    allow = serialize(Response(405, b"{}", allow="POST"), "HTTP/1.1", keep_alive=True,
                      head_only=False)  # fmt: skip
    assert b"Allow: POST\r\n" in allow


@pytest.mark.parametrize(
    "body",
    [
        b'{"v": 1e999999}',
        b'{"v": -1e999999}',
        b'{"v": NaN}',
        b'{"v": Infinity}',
        b'{"v": -Infinity}',
        b'{"v": ' + b"7" * 4301 + b"}",
        b'{"v": "s\\ud800"}',
        b'{"v": [{"deep": ["\\udfff"]}]}',
        b'{"k\\ud800": 1}',
        b'{"v": "\xed\xa0\x80"}',  # a surrogate's UTF-8 bytes, no escape: json.loads lets it in
    ],
)
def test_input_no_answer_could_carry_is_refused(body: bytes) -> None:
    with pytest.raises(ValueError):
        parse_arguments(body)


def test_valid_input_passes() -> None:
    body = b'{"v": [1e308, -0.0, "\\ud83d\\ude00", "\\u00e9", ' + b"9" * 4300 + b"]}"
    args = parse_arguments(body)
    assert args["v"] == [1e308, -0.0, "\U0001f600", "\u00e9", int("9" * 4300)]
    assert parse_arguments(b"  ") == {}
    with pytest.raises(TypeError):
        parse_arguments(b"[1]")


def test_deep_nesting_is_bad_input_named_recursion_error() -> None:
    with pytest.raises(BadInput) as info:
        parse_arguments(b"[" * 100_000)
    assert info.value.kind == "RecursionError"


def test_an_error_message_with_a_lone_surrogate_is_still_answered() -> None:
    response = error_response(500, "ValueError", "bad \ud800 key")
    assert json.loads(response.body) == {"error": "ValueError: bad ? key"}
