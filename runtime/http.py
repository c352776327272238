"""HTTP/1.1 as a cage speaks it: parsing a request head and writing a response (pure functions).

The server (`server.py`) owns sockets and time; this module only turns bytes into a `Request`
or an `HttpError`, and a `Response` into bytes, so every rule here is unit-tested without a
socket. What is refused, and why (RFC 9112 and RFC 9110 allow or require each):

- A request line that is not `METHOD SP TARGET SP HTTP/1.x`: 400; another version: 505.
- A header line without a colon, with white space before the colon (smuggling), or folded
  over several lines: 400. A header name that is not a token: 400.
- A control character in a header value (bare CR, bare LF, NUL, ...): 400. Such bytes split
  headers differently in different parsers on the way (request smuggling), and no legitimate
  client sends them.
- HTTP/1.1 without exactly one `Host`: 400 (RFC 9112 3.2 requires it).
- `Transfer-Encoding` (chunked bodies): 411, asking for a Content-Length instead.
- A malformed Content-Length, or several that differ: 400.
- A head over MAX_HEAD bytes: 431.
"""

from __future__ import annotations

import re
from http import HTTPStatus
from typing import NamedTuple

from .app import Response, error_response

__all__ = [
    "CONTINUE",
    "MAX_HEAD",
    "HttpError",
    "Request",
    "find_head_end",
    "parse_head",
    "serialize",
]

MAX_HEAD = 64 << 10  # bytes of request line and headers, the blank line included

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # controls but HTAB
_TARGET = re.compile(rb"[\x21-\x7e\x80-\xff]+")
_LENGTH = re.compile(rb"[0-9]{1,18}")  # not isdigit(): that accepts "²"


class HttpError(Exception):
    """A request refused before any call; the connection is closed after the answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status

    def response(self) -> Response:
        return error_response(
            self.status, HTTPStatus(self.status).phrase.replace(" ", ""), str(self)
        )


class Request(NamedTuple):
    method: str
    target: str
    version: str  # "HTTP/1.1" or "HTTP/1.0"
    body_length: int
    keep_alive: bool  # what the client asked for
    expect_continue: bool  # an HTTP/1.1 client waits for `100 Continue` before its body
    chain: str | None = None  # X-Pmnc-Chain: the calls across cages this one is part of
    forwarded: bool = False  # X-Pmnc-Forwarded: sent on by a node of the group (group.py)

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]


def find_head_end(buf: bytearray) -> int:
    """The length of the complete head at the start of `buf` (blank line included), or -1.

    HttpError if what is there can never become a valid head: over MAX_HEAD, or lines ended
    by a bare LF (a client that would otherwise wait for our timeout to learn it).
    """
    end = buf.find(b"\r\n\r\n", 0, MAX_HEAD + 4)
    if end >= 0:
        return end + 4
    if len(buf) >= MAX_HEAD:
        raise HttpError(431, f"request head over {MAX_HEAD} bytes")
    if buf.find(b"\n\n") >= 0 or buf.find(b"\n\r\n") >= 0:
        raise HttpError(400, "request lines must end with CRLF, not a bare LF")
    return -1


def parse_head(head: bytes) -> Request:
    """Parse one head (as `find_head_end` delimits it, blank line included); HttpError if bad."""
    lines = head[:-4].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not _TARGET.fullmatch(parts[1]):
        raise HttpError(400, f"malformed request line {_show(lines[0])}")
    method, target, version = (p.decode("latin-1") for p in parts)
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        if re.fullmatch(r"HTTP/[0-9]\.[0-9]", version):
            raise HttpError(505, f"unsupported version {version!r}")
        raise HttpError(400, f"malformed request line {_show(lines[0])}")
    hosts = 0
    lengths: set[bytes] = set()
    connection: list[bytes] = []
    expect = b""
    chain: list[bytes] = []
    forwarded = False
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            raise HttpError(400, f"malformed header line {_show(line)}")
        if _BAD_VALUE.search(value):
            raise HttpError(400, f"control character in header {_show(name)}")
        key, value = name.lower(), value.strip(b" \t")
        if key == b"host":
            hosts += 1
        elif key == b"content-length":
            lengths.add(value)
        elif key == b"transfer-encoding":
            raise HttpError(411, "chunked bodies are not supported: send Content-Length")
        elif key == b"connection":
            connection += [t.strip().lower() for t in value.split(b",")]
        elif key == b"expect":
            expect = value.lower()
        elif key == b"x-pmnc-chain":
            chain.append(value)
        elif key == b"x-pmnc-forwarded":
            forwarded = True
    if version == "HTTP/1.1" and hosts != 1:
        raise HttpError(
            400,
            "an HTTP/1.1 request needs one Host header"
            if hosts == 0
            else "more than one Host header",
        )
    if len(lengths) > 1:  # two different lengths: which body is it? (smuggling otherwise)
        raise HttpError(400, "conflicting Content-Length headers")
    length_text = lengths.pop() if lengths else b"0"
    if not _LENGTH.fullmatch(length_text):
        raise HttpError(400, f"malformed Content-Length {_show(length_text)}")
    if version == "HTTP/1.0":
        keep_alive = b"keep-alive" in connection
    else:
        keep_alive = b"close" not in connection
    return Request(
        method=method,
        target=target,
        version=version,
        body_length=int(length_text),
        keep_alive=keep_alive,
        expect_continue=version == "HTTP/1.1" and expect == b"100-continue",
        chain=b",".join(chain).decode("latin-1") if chain else None,
        forwarded=forwarded,
    )


def serialize(response: Response, version: str, *, keep_alive: bool, head_only: bool) -> bytes:
    """The response's bytes: status line, headers, and the body unless `head_only` (HEAD)."""
    status_line = _STATUS_LINES.get(response.status)
    if status_line is None:
        status = HTTPStatus(response.status)
        status_line = _STATUS_LINES[response.status] = (
            f"HTTP/1.1 {status.value} {status.phrase}\r\n"
        )
    extra = ""
    if response.allow is not None:
        extra += f"Allow: {response.allow}\r\n"
    if not keep_alive:
        extra += "Connection: close\r\n"
    elif version == "HTTP/1.0":
        extra += "Connection: keep-alive\r\n"
    head = (
        f"{status_line}"
        f"Content-Type: {response.content_type}\r\n"
        f"Content-Length: {len(response.body)}\r\n"
        f"{extra}\r\n"
    ).encode("latin-1")
    return head if head_only else head + response.body


CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_STATUS_LINES: dict[int, str] = {}  # "HTTP/1.1 200 OK\r\n" by code: HTTPStatus() costs a lookup


def _show(raw: bytes) -> str:
    return repr(raw[:100].decode("latin-1"))
