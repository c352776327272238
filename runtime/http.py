"""The JSON-over-HTTP interface of a cage, as served by each worker.

`POST /<module>/<function>` with a JSON object body calls the function with those keyword
arguments and answers `200 {"result": ...}`; every error is `{"error": "<Type>: <message>"}`
with 400 (bad body or arguments), 404 (no such public function), 405, 408, 413 (body over the
limit), 500 (the function raised, or its result is not JSON) or 503 (the module's safe needs
recovery: the worker then exits and the supervisor recovers).

`GET /_status` answers the cage's live figures (see `status.py`); any other method on it is a
405. No module can be named `_status`: names starting with `_` are private. Every other response
is counted by status class for those figures; `/_status` itself is not, so polling it does not
inflate the request counts.

HTTP/1.1 with keep-alive over raw sockets, on purpose small: a worker runs exactly `threads`
threads, each looping accept -> serve that connection until it closes. No thread per connection
(a burst of clients cannot multiply threads), no event loop. Every thread waits in `poll()` on
its socket *and* a wake-up pipe, so a graceful stop reaches idle threads at once: a thread
waiting for a connection leaves, a thread in the middle of a request finishes it and answers
with `Connection: close`, and an idle keep-alive connection gets STOP_GRACE to bring one last
request before it is closed.
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import json
import os
import re
import select
import socket
import threading
import time
from collections.abc import Callable, Mapping
from http import HTTPStatus
from typing import NamedTuple

from pmnc.safe import SafeNeedsRecoveryError

from .logs import logger
from .modules import AppModule

__all__ = ["STATUS_PATH", "Application", "RequestCounter", "Response", "Server"]

STATUS_PATH = "/_status"

KEEPALIVE_TIMEOUT = 5.0  # an idle keep-alive connection holds a thread: bound it
REQUEST_TIMEOUT = 30.0  # from a request's first byte to its last
SEND_TIMEOUT = 30.0  # a client that stops reading its answer
STOP_GRACE = 0.5  # once stopping, how long an idle connection may still bring a request
MAX_HEAD = 64 << 10
_DRAIN_LIMIT = 2.0  # seconds spent reading an unwanted body after a 413, so the client sees it


class Response(NamedTuple):
    status: int
    body: bytes
    fatal: bool = False  # the worker must exit (its safe needs recovery) once this is sent


def _error(status: int, exc_type: str, message: str, *, fatal: bool = False) -> Response:
    body = json.dumps({"error": f"{exc_type}: {message}"}, ensure_ascii=False).encode()
    return Response(status, body, fatal)


def _needs_recovery(e: BaseException) -> bool:
    """Whether `e` or an exception it was raised from says a safe needs recovery."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, SafeNeedsRecoveryError):
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False


def _reject_constant(name: str) -> object:
    """NaN and Infinity are not JSON (RFC 8259): a value stored from them could never be
    answered back, so the request is refused (400) instead."""
    raise ValueError(f"{name} is not valid JSON")


class Application:
    """Maps `/<module>/<function>` plus a JSON body to a call and its JSON answer."""

    def __init__(self, modules: Mapping[str, AppModule]) -> None:
        self._functions: dict[tuple[str, str], tuple[Callable[..., object], inspect.Signature]] = {
            (m.name, f): (fn, inspect.signature(fn))
            for m in modules.values()
            for f, fn in m.functions.items()
        }

    def call(self, module: str, function: str, body: bytes) -> Response:  # noqa: PLR0911
        """Run one call; never raises for anything the module or the client does."""
        target = self._functions.get((module, function))
        if target is None or module.startswith("_") or function.startswith("_"):
            return _error(404, "NotFound", f"no function {function!r} in module {module!r}")
        fn, signature = target
        try:
            args = json.loads(body, parse_constant=_reject_constant) if body.strip() else {}
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError both are ValueErrors
            return _error(400, type(e).__name__, str(e))
        except RecursionError:  # "[" * 100000 fits in max_body: nesting is the client's fault
            return _error(400, "RecursionError", "the JSON body is nested too deeply")
        if not isinstance(args, dict):
            return _error(400, "TypeError", f"expected a JSON object, got {type(args).__name__}")
        try:
            signature.bind(**args)
        except TypeError as e:
            return _error(400, "TypeError", f"{module}.{function}(): {e}")
        try:
            result = fn(**args)
        except BaseException as e:  # noqa: BLE001 - whatever a module raises is answered:
            # sys.exit(), KeyboardInterrupt or GeneratorExit from a module must not end the
            # serving thread (the worker would go on with one thread fewer).
            if _needs_recovery(e):
                logger.error("%s.%s: %s: %s", module, function, type(e).__name__, e)
                return _error(503, type(e).__name__, str(e), fatal=True)
            logger.warning("%s.%s raised %s: %s", module, function, type(e).__name__, e,
                           exc_info=True)  # fmt: skip
            return _error(500, type(e).__name__, str(e))
        try:
            answer = json.dumps({"result": result}, allow_nan=False, ensure_ascii=False)
        except (TypeError, ValueError, RecursionError) as e:
            return _error(500, type(e).__name__, f"result of {module}.{function}: {e}")
        return Response(200, answer.encode())


class RequestCounter:
    """Responses sent by one worker, by status class; shared by its serving threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_class: dict[str, int] = {}

    def count(self, status: int) -> None:
        key = f"{status // 100}xx"
        with self._lock:
            self._by_class[key] = self._by_class.get(key, 0) + 1

    def snapshot(self) -> dict[str, object]:
        """{"requests": total, "responses": {"2xx": n, ...}}"""
        with self._lock:
            by_class = dict(self._by_class)
        return {"requests": sum(by_class.values()), "responses": by_class}


class _HttpError(Exception):
    """A request the server refuses before any call; always closes the connection."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Request(NamedTuple):
    method: str
    path: str
    version: str
    headers: dict[str, str]
    body_length: int


class Server:
    """`threads` threads serving one listening socket until `stop()`.

    `on_fatal` is called (in the serving thread) after a 503 for a safe that needs recovery;
    the worker makes it `os._exit`, so it does not return. `status` builds the `/_status`
    document; `counter` counts every other response.
    """

    def __init__(
        self,
        listener: socket.socket,
        app: Application,
        *,
        threads: int,
        max_body: int,
        on_fatal: Callable[[], None],
        status: Callable[[], object] | None = None,
        counter: RequestCounter | None = None,
    ) -> None:
        self._listener = listener
        self._app = app
        self._status = status
        self._counter = counter or RequestCounter()
        self._max_body = max_body
        self._on_fatal = on_fatal
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        self._threads = [
            threading.Thread(target=self._accept_loop, name=f"http-{i}", daemon=True)
            for i in range(threads)
        ]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        """Stop accepting; idle connections close, requests in flight finish. Idempotent."""
        if not self._stop.is_set():
            self._stop.set()
            # Never drained: the pipe stays readable, so every poll() sees it from now on.
            os.write(self._wake_w, b"x")

    def join(self, deadline: float) -> int:
        """Wait for the threads until `deadline` (monotonic); return how many are still busy."""
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return sum(t.is_alive() for t in self._threads)

    # -- accepting ---------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        poller = select.poll()
        poller.register(self._listener, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while not self._stop.is_set():
            poller.poll()
            if self._stop.is_set():
                break
            try:
                # Non-blocking listener shared by every worker of the cage: another thread
                # or process may have taken the connection first.
                conn, _ = self._listener.accept()
            except BlockingIOError:
                continue
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    logger.warning("accept: %s: pausing 0.1 s", e)
                    time.sleep(0.1)
                continue
            try:
                self._serve(conn)
            except OSError:
                pass  # the client went away; nothing to answer
            except BaseException:  # noqa: BLE001 - one bad connection must not end the thread
                logger.exception("unexpected error serving a connection")
            finally:
                conn.close()

    # -- one connection ----------------------------------------------------------------------

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(SEND_TIMEOUT)  # bounds sendall; reads wait in poll() below
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        poller = select.poll()
        poller.register(conn, select.POLLIN)
        watching_stop = not self._stop.is_set()
        if watching_stop:
            poller.register(self._wake_r, select.POLLIN)
        buf = bytearray()

        def wait(deadline: float, idle: bool) -> bool:
            """Wait for data until `deadline`; False on timeout.

            Once stopping, an idle connection waits only STOP_GRACE more: a busy keep-alive
            client gets one last answer (with `Connection: close`) instead of a connection
            closed under the request it is sending, a race that no server can otherwise avoid.
            """
            nonlocal watching_stop
            if idle and self._stop.is_set():
                deadline = min(deadline, time.monotonic() + STOP_GRACE)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                events = poller.poll(remaining * 1000)
                if any(fd != self._wake_r for fd, _ in events):
                    return True
                if watching_stop and events:
                    poller.unregister(self._wake_r)
                    watching_stop = False
                    if idle:
                        deadline = min(deadline, time.monotonic() + STOP_GRACE)

        def read_more(deadline: float, idle: bool = False) -> bool:
            if not wait(deadline, idle):
                return False
            chunk = conn.recv(65536)
            if not chunk:
                return False
            buf.extend(chunk)
            return True

        while True:
            # Idle between requests: close after the keep-alive timeout (or STOP_GRACE).
            if not buf and not read_more(time.monotonic() + KEEPALIVE_TIMEOUT, idle=True):
                return
            try:
                request = self._read_request(conn, buf, read_more)
            except _HttpError as e:
                response = _error(e.status, HTTPStatus(e.status).phrase.replace(" ", ""), str(e))
                self._counter.count(response.status)
                self._send(conn, response, "HTTP/1.1", keep_alive=False)
                return
            if request is None:
                return
            if request.body_length > self._max_body:
                response = _error(
                    413,
                    "PayloadTooLarge",
                    f"body of {request.body_length} bytes over the limit of {self._max_body}",
                )
                self._counter.count(response.status)
                self._send(conn, response, request.version, keep_alive=False)
                self._drain(conn, request.body_length - len(buf))
                return
            if request.headers.get("expect", "").lower() == "100-continue" and (
                len(buf) < request.body_length
            ):
                conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            deadline = time.monotonic() + REQUEST_TIMEOUT
            while len(buf) < request.body_length:
                if not read_more(deadline):
                    if time.monotonic() >= deadline:  # a body that never came in full
                        response = _error(
                            408,
                            "RequestTimeout",
                            f"body not complete within {REQUEST_TIMEOUT} s",
                        )
                        self._counter.count(response.status)
                        self._send(conn, response, request.version, keep_alive=False)
                    return
            body = bytes(buf[: request.body_length])
            del buf[: request.body_length]
            response = self._dispatch(request, body)
            if request.path.partition("?")[0] != STATUS_PATH:
                self._counter.count(response.status)
            keep_alive = _wants_keep_alive(request) and not self._stop.is_set()
            self._send(conn, response, request.version, keep_alive=keep_alive)
            if response.fatal:
                self._on_fatal()
            if not keep_alive:
                return

    def _read_request(
        self, conn: socket.socket, buf: bytearray, read_more: Callable[[float], bool]
    ) -> _Request | None:
        deadline = time.monotonic() + REQUEST_TIMEOUT
        while True:
            while buf.startswith(b"\r\n"):  # RFC 9112 2.2: ignore empty lines before a request
                del buf[:2]
            end = buf.find(b"\r\n\r\n")
            # The head, its blank line included, may be MAX_HEAD bytes: whether its end came in
            # the same read as the rest or not (buf may hold the body too once it has).
            if (end + 4 if end >= 0 else len(buf)) > MAX_HEAD:
                raise _HttpError(431, f"request head over {MAX_HEAD} bytes")
            if end >= 0:
                break
            if not read_more(deadline):
                if buf and time.monotonic() >= deadline:
                    raise _HttpError(408, f"request not complete within {REQUEST_TIMEOUT} s")
                return None
        head = bytes(buf[:end]).decode("latin-1")
        del buf[: end + 4]
        lines = head.split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3:
            raise _HttpError(400, f"malformed request line {lines[0][:100]!r}")
        method, target, version = parts
        if version not in ("HTTP/1.1", "HTTP/1.0"):
            raise _HttpError(505, f"unsupported version {version[:20]!r}")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon or not name or name != name.strip():
                raise _HttpError(400, f"malformed header line {line[:100]!r}")
            key, value = name.lower(), value.strip()
            if key in headers and headers[key] != value and key in ("content-length", "host"):
                # Two different lengths: which body is it? (request smuggling otherwise)
                raise _HttpError(400, f"conflicting {name} headers")
            headers[key] = value
        if "transfer-encoding" in headers:
            raise _HttpError(411, "chunked bodies are not supported: send Content-Length")
        length_text = headers.get("content-length", "0")
        if not re.fullmatch(r"[0-9]{1,18}", length_text):  # isdigit() accepts "²"
            raise _HttpError(400, f"malformed Content-Length {length_text[:30]!r}")
        return _Request(method, target, version, headers, int(length_text))

    def _dispatch(self, request: _Request, body: bytes) -> Response:
        path = request.path.partition("?")[0]
        if path == STATUS_PATH:
            if request.method != "GET":
                return _error(405, "MethodNotAllowed", f"{request.method} not allowed: use GET")
            return self._answer_status()
        if request.method != "POST":
            return _error(405, "MethodNotAllowed", f"{request.method} not allowed: use POST")
        parts = path.split("/")
        if len(parts) != 3 or parts[0] or not parts[1] or not parts[2]:
            return _error(404, "NotFound", f"no function at {path[:200]!r}: use /MODULE/FUNCTION")
        return self._app.call(parts[1], parts[2], body)

    def _answer_status(self) -> Response:
        if self._status is None:
            return _error(404, "NotFound", "no status here")
        try:
            document = self._status()
            return Response(200, json.dumps(document, allow_nan=False).encode())
        except BaseException as e:  # noqa: BLE001 - answered, and the worker serves on
            if _needs_recovery(e):
                logger.error("%s: %s: %s", STATUS_PATH, type(e).__name__, e)
                return _error(503, type(e).__name__, str(e), fatal=True)
            logger.warning("%s failed: %s: %s", STATUS_PATH, type(e).__name__, e, exc_info=True)
            return _error(500, type(e).__name__, str(e))

    @staticmethod
    def _send(conn: socket.socket, response: Response, version: str, *, keep_alive: bool) -> None:
        status = HTTPStatus(response.status)
        connection = ""
        if not keep_alive:
            connection = "Connection: close\r\n"
        elif version == "HTTP/1.0":
            connection = "Connection: keep-alive\r\n"
        head = (
            f"HTTP/1.1 {status.value} {status.phrase}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(response.body)}\r\n"
            f"{connection}\r\n"
        )
        conn.sendall(head.encode("latin-1") + response.body)

    @staticmethod
    def _drain(conn: socket.socket, remaining: int) -> None:
        """Read and drop an unwanted body for a moment, so the client gets to read our 413.

        Closing with unread input makes the kernel send a reset, which can destroy the answer
        before the client reads it.
        """
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + _DRAIN_LIMIT
            conn.settimeout(0.2)
            while remaining > 0 and time.monotonic() < deadline:
                try:
                    chunk = conn.recv(min(remaining, 1 << 16))
                except TimeoutError:
                    continue
                if not chunk:
                    break
                remaining -= len(chunk)


def _wants_keep_alive(request: _Request) -> bool:
    connection = request.headers.get("connection", "").lower()
    if request.version == "HTTP/1.0":
        return connection == "keep-alive"
    return connection != "close"
