"""A worker's HTTP server: one epoll loop holds every connection, threads see complete requests.

Why this shape (after gunicorn's gthread worker and nginx, see the README's "Serving"):
a thread that owns a connection until it closes lets `workers x threads` keep-alive clients, or
as many slow ones, shut everyone else out. Here one loop thread per worker holds the listening
socket and up to `max_connections` connections. It reads each request's head and body itself,
buffering, and hands a request to the pool of `threads` threads only once it is complete; the
thread calls the module, writes the answer if the socket takes it at once (it nearly always
does), and gives the connection back. So an idle keep-alive connection, or one trickling its
request, costs a file descriptor and a buffer, never a thread. gthread hands a connection to a
thread at its first byte, so a client trickling its head holds a thread there; nginx reads the
whole head first, as we do.

Deadlines a slow client cannot stretch, checked by a sweep of all connections every SWEEP
seconds (O(connections), so no per-request timer entries pile up at tens of thousands of
requests a second):
- `keepalive_timeout` from the moment a connection is idle (accepted, or its answer sent) until
  the first byte of its next request; then closed without a word.
- `request_timeout` from a request's first byte to its last (head and body), never restarted by
  bytes trickling in; then answered 408 and closed.
- SEND_TIMEOUT for a client that stops reading its answer; then closed.

Connection states, and who owns the connection in each (only the owner touches its socket and
buffer): IDLE and READING (the loop, armed for input), ACTIVE (a pool thread), WRITING (the
loop, armed for output: an answer the socket did not take at once), LINGERING (the loop: an
error answer was sent and our side shut; the client's remaining input is read and dropped for
LINGER seconds so that closing does not send a reset that destroys the answer before the client
reads it). Every fd is registered EPOLLONESHOT: an event disarms it, so a connection handed to a
thread cannot also wake the loop.

A thread gives a connection back on its fast path by itself: it sets the idle deadline and
state, then re-arms the fd; the loop sees the next event for it. Any other hand-back (answer
not fully sent, connection to close, pipelined bytes already buffered) goes through a queue and
the wake-up pipe, which also carries `stop()`.

Over `max_connections`, the oldest idle (or lingering) connection is closed to make room, as
nginx reuses keep-alive connections; with none to close, the new connection is answered 503
with `Connection: close`. No connection is ever left without an answer or a close.

Over `max_connections` with nothing to close, a worker first leaves the new connection to its
siblings for up to MAX_DEFER (one of them may have room), then answers it 503 itself.

Graceful stop: the listener is dropped from the loop; idle connections get STOP_GRACE to bring
one last request (closing under a request the client is sending is a race no server can
otherwise avoid); requests still arriving get STOP_READ_GRACE to complete, then a 503 (so a
slow client cannot hold every stop and reload for `graceful_timeout`); requests in a thread
finish; every answer from then on says `Connection: close`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from queue import SimpleQueue
from typing import Protocol

from .app import Application, Response, describe, error_response, needs_recovery
from .balance import MAX_DEFER, Balance
from .http import CONTINUE, HttpError, Request, find_head_end, parse_head, serialize
from .logs import logger

__all__ = ["Limits", "Observer", "Server"]

SEND_TIMEOUT = 30.0  # a client that stops reading its answer
STOP_GRACE = 0.5  # once stopping, how long an idle connection may still bring a request
STOP_READ_GRACE = 2.0  # once stopping, how long a request still arriving may take (then 503)
LINGER = 2.0  # after an error answer, how long the client's remaining input is drained
SWEEP = 0.2  # seconds between deadline sweeps: the precision of every timeout
FATAL_SEND_TIMEOUT = 5.0  # the last answer of a worker that exits for recovery
READ_SIZE = 65536
FRESH = 1.0  # s after its accept during which a connection that sent nothing is not evicted
STICKY_MS = 5  # how long a thread waits for a keep-alive connection's next request
SMALL_BODY = 65536  # bodies up to this size are read without counting against BODY_BUDGET
BODY_BUDGET = 64 << 20  # bytes of large bodies a worker reads at once (at least 2 x max_body)

_IN = select.EPOLLIN | select.EPOLLONESHOT
_OUT = select.EPOLLOUT | select.EPOLLONESHOT

IDLE, READING, ACTIVE, WRITING, LINGERING = "idle", "reading", "active", "writing", "lingering"
QUEUED = "queued"  # complete, waiting for a thread (counted as active in the figures)
# Hand-backs through the queue: what the loop must do with a connection a thread gives back.
_SEND_REST, _CLOSE, _PARSE_MORE = "send-rest", "close", "parse-more"


class Observer(Protocol):
    """Where every answered request is counted (`metrics.RequestMetrics`)."""

    def observe(self, module: str, function: str, code: int, seconds: float) -> None: ...


@dataclass(frozen=True)
class Limits:
    threads: int
    max_body: int
    keepalive_timeout: float
    request_timeout: float
    max_connections: int


class _Conn:
    __slots__ = (
        "accepted",
        "buf",
        "closed",
        "deadline",
        "eof",
        "fd",
        "head_only",
        "keep_alive",
        "out",
        "request",
        "reserved",
        "served",
        "sock",
        "state",
    )

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.buf = bytearray()
        self.state = IDLE
        self.deadline = deadline
        self.request: Request | None = None  # a head parsed, its body still coming
        self.out: memoryview | None = None  # the part of an answer not yet sent
        self.keep_alive = True  # after `out` is sent
        self.head_only = False
        self.closed = False
        self.eof = False  # the client closed its side (seen by a thread)
        self.accepted = time.monotonic()
        self.served = False  # answered at least once: idle now means between requests
        self.reserved = 0  # bytes of BODY_BUDGET this connection's body holds


class Server:
    """Serve one listening socket with an epoll loop and `limits.threads` threads.

    `routes` are the GET/HEAD documents (`/_status`, `/metrics`), not counted as requests.
    `on_fatal` is called (in the serving thread) after a 503 for a safe that needs recovery;
    the worker makes it `os._exit`, so it does not return.
    """

    def __init__(
        self,
        listener: socket.socket,
        app: Application,
        limits: Limits,
        *,
        on_fatal: Callable[[], None],
        metrics: Observer,
        routes: Mapping[str, Callable[[], Response]] | None = None,
        balance: Balance | None = None,
        slot: int = 0,
    ) -> None:
        self._listener = listener
        self._app = app
        self._limits = limits
        self._on_fatal = on_fatal
        self._metrics = metrics
        self._routes = dict(routes or {})
        self._balance = balance
        self._slot = slot
        self._deferred_since = -1.0  # when this worker began leaving a connection to others
        self._conns: dict[int, _Conn] = {}
        self._body_budget = max(BODY_BUDGET, 2 * limits.max_body)
        self._reserved = 0  # bytes of large bodies being read (see _reserve)
        self._parked: deque[_Conn] = deque()  # waiting for BODY_BUDGET, oldest first
        self._epoll = select.epoll()
        self._jobs: SimpleQueue[tuple[_Conn, Request, bytes] | None] = SimpleQueue()
        self._returned: SimpleQueue[tuple[_Conn, str]] = SimpleQueue()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wake_pending = False
        self._stopping = False
        self._stop_at = float("inf")  # when stop() was called
        self._abort = False  # join's deadline passed: the loop leaves at once
        self._listening = False
        self._resume_listening = 0.0  # after EMFILE: when to try accepting again
        self._running = 0  # requests inside a module call (or writing their answer)
        self._running_lock = threading.Lock()
        self._closing = threading.Lock()
        self._loop_thread = threading.Thread(target=self._loop, name="http-loop", daemon=True)
        self._pool = [
            threading.Thread(target=self._work, name=f"http-{i}", daemon=True)
            for i in range(limits.threads)
        ]

    # -- the worker's side -------------------------------------------------------------------

    def start(self) -> None:
        self._count()
        self._epoll.register(self._wake_r, select.EPOLLIN)
        self._listen(True)
        for t in self._pool:
            t.start()
        self._loop_thread.start()

    def stop(self) -> None:
        """Stop accepting; idle connections close, requests in flight finish. Idempotent."""
        if not self._stopping:
            self._stop_at = time.monotonic()
        self._stopping = True
        self._wake(force=True)

    def join(self, deadline: float) -> int:
        """Wait until `deadline` (monotonic) for connections to finish and threads to leave;
        return how many requests are still inside a module call then."""
        self._loop_thread.join(max(0.0, deadline - time.monotonic()))
        if self._loop_thread.is_alive():
            self._abort = True
            self._wake(force=True)
            self._loop_thread.join(1.0)
        for _ in self._pool:
            self._jobs.put(None)
        for t in self._pool:
            t.join(max(0.0, deadline - time.monotonic()))
        with self._running_lock:
            return self._running

    def connections(self) -> dict[str, int]:
        """Open connections by state, for the worker's figures (any thread)."""
        counts = dict.fromkeys((IDLE, READING, ACTIVE, WRITING), 0)
        for conn in list(self._conns.values()):
            # A lingering connection is an error answer on its way out, as a user sees it.
            state = {LINGERING: WRITING, QUEUED: ACTIVE}.get(conn.state, conn.state)
            counts[state] += 1
        return counts

    # -- the loop ----------------------------------------------------------------------------

    def _loop(self) -> None:
        next_sweep = time.monotonic() + SWEEP
        try:
            while True:
                wake_at = next_sweep
                if not self._listening and not self._stopping:
                    wake_at = min(wake_at, self._resume_listening)
                timeout = max(0.0, wake_at - time.monotonic())
                try:
                    events = self._epoll.poll(timeout)
                except InterruptedError:
                    events = []
                for fd, mask in events:
                    if fd == self._wake_r:
                        self._take_returns()
                    elif fd == self._listener.fileno() and self._listening:
                        self._on_listener()
                    else:
                        conn = self._conns.get(fd)
                        if conn is not None and not conn.closed:
                            self._on_event(conn, mask)
                now = time.monotonic()
                if not self._listening and not self._stopping and now >= self._resume_listening:
                    self._listen(True)
                if now >= next_sweep:
                    self._sweep(now)
                    next_sweep = now + SWEEP
                if self._abort or (self._stopping and not self._conns):
                    return
        except BaseException:  # noqa: BLE001 - a bug: the worker must not live on deaf
            logger.exception("the HTTP loop failed: the worker exits to be replaced")
            self._on_fatal()
        finally:
            for conn in list(self._conns.values()):
                if conn.state != ACTIVE:
                    self._close(conn)

    def _wake(self, *, force: bool = False) -> None:
        if force or not self._wake_pending:
            self._wake_pending = True
            with contextlib.suppress(BlockingIOError):
                os.write(self._wake_w, b"x")

    def _listen(self, on: bool) -> None:
        if on and not self._listening:
            self._epoll.register(self._listener, select.EPOLLIN)
        elif not on and self._listening:
            self._epoll.unregister(self._listener)
        self._listening = on

    def _on_listener(self) -> None:
        """A connection is pending: take it, unless less loaded workers should (balance.py),
        or this worker is full with nothing to close: a sibling with room should take it
        rather than this worker answering 503 (it does after MAX_DEFER)."""
        full = len(self._conns) >= self._limits.max_connections and not self._evictable()
        if full or (self._balance is not None and not self._balance.fair(self._slot)):
            now = time.monotonic()
            if now - self._deferred_since > 5 * MAX_DEFER:  # a new wait, not the last one's
                self._deferred_since = now
            if now - self._deferred_since < MAX_DEFER:
                self._listen(False)
                self._resume_listening = now + MAX_DEFER / 10
                return
        self._accept()

    def _count(self) -> None:
        if self._balance is not None:
            self._balance.set(self._slot, len(self._conns))

    def _accept(self) -> None:
        """Accept one connection: with the listener shared by the cage's workers and every
        worker woken, taking one per wake-up spreads a burst of connections across them."""
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return  # another worker took it, or the client left first
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                # Level-triggered: retrying now would spin. Free a descriptor if one is idle.
                logger.warning("accept: %s: pausing 0.1 s", e)
                self._listen(False)
                self._resume_listening = time.monotonic() + 0.1
                self._make_room()
            return
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        now = time.monotonic()
        conn = _Conn(sock, now + self._limits.keepalive_timeout)
        while len(self._conns) >= self._limits.max_connections and self._make_room():
            pass  # a 503 answered still lingers: closing it is no room for one more
        full = len(self._conns) >= self._limits.max_connections
        self._conns[conn.fd] = conn
        self._count()
        self._epoll.register(conn.fd, _IN)
        if full:
            self._fail(
                conn,
                error_response(
                    503,
                    "ServiceUnavailable",
                    f"this worker holds its maximum of {self._limits.max_connections} connections",
                ),
            )

    def _evictable(self) -> list[_Conn]:
        """Connections that may be closed for room, in the order to close them: lingering
        ones (already answered), then idle ones that have been answered at least once or
        accepted more than FRESH seconds ago, longest idle first. A connection just accepted
        is idle too, but its request may be in the kernel unread: closing it would reset the
        client and lose the request, where a 503 answers it."""
        now = time.monotonic()
        lingering = [c for c in self._conns.values() if c.state == LINGERING]
        idle = [
            c
            for c in self._conns.values()
            if c.state == IDLE and (c.served or now - c.accepted > FRESH)
        ]
        idle.sort(key=lambda c: c.deadline)
        return lingering + idle

    def _make_room(self) -> bool:
        """Close the first connection `_evictable` names that has no bytes waiting (a
        request arriving makes it busy, not idle); False if there is none."""
        for conn in self._evictable():
            if conn.state == IDLE:
                try:
                    if conn.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT):
                        continue
                except (BlockingIOError, InterruptedError):
                    pass  # nothing waiting: idle indeed
                except OSError:
                    pass  # reset: closing it loses nothing
            self._close(conn)
            return True
        return False

    def _on_event(self, conn: _Conn, mask: int) -> None:
        if conn.state == WRITING:
            self._send_rest(conn)
        elif conn.state == LINGERING:
            self._drain(conn)
        elif conn.state in (IDLE, READING):
            self._read(conn)

    def _recv(self, conn: _Conn) -> bytes | None:
        """One read: the bytes; b"" at the end of the stream or on an error; None when there
        was nothing after all (the connection is armed again)."""
        try:
            return conn.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            self._arm(conn, _IN)
            return None
        except OSError:
            return b""

    def _read(self, conn: _Conn) -> None:
        chunk = self._recv(conn)
        if chunk is None:
            return
        if not chunk:  # the client closed (or reset): nothing to answer on this connection
            self._close(conn)
            return
        conn.buf += chunk
        self._advance(conn)

    def _advance(self, conn: _Conn) -> None:
        """Parse what `conn.buf` holds; hand a complete request to the pool, or wait for more."""
        buf = conn.buf
        if conn.request is None:
            while buf[:2] == b"\r\n":  # RFC 9112 2.2: ignore empty lines before a request
                del buf[:2]
            if not buf:
                self._arm(conn, _IN)
                return
            if conn.state != READING:  # the request's first byte: its deadline starts now
                conn.state = READING
                allowed = self._limits.request_timeout
                if self._stopping:  # one last request, in its stop grace (see the docstring)
                    allowed = min(allowed, STOP_READ_GRACE)
                conn.deadline = time.monotonic() + allowed
            try:
                end = find_head_end(buf)
                if end < 0:
                    self._arm(conn, _IN)
                    return
                request = parse_head(bytes(buf[:end]))
            except HttpError as e:
                self._fail(conn, e.response())
                return
            del buf[:end]
            if request.body_length > self._limits.max_body:
                self._fail(
                    conn,
                    error_response(
                        413,
                        "PayloadTooLarge",
                        f"body of {request.body_length} bytes over the limit of "
                        f"{self._limits.max_body}",
                    ),
                )
                return
            conn.request = request
            if len(buf) < request.body_length and not self._reserve(conn, request):
                return  # parked: reading resumes when bodies in memory shrink
            if len(buf) < request.body_length:
                self._send_continue(conn, request)
        request = conn.request
        if len(buf) < request.body_length:
            self._arm(conn, _IN)
            return
        body = bytes(buf[: request.body_length])
        del buf[: request.body_length]
        self._release(conn)
        conn.request = None
        conn.state = QUEUED
        conn.deadline = time.monotonic() + self._limits.request_timeout
        self._jobs.put((conn, request, body))

    def _reserve(self, conn: _Conn, request: Request) -> bool:
        """Count a large body against BODY_BUDGET before reading it; park the connection
        (not armed for input: the client's bytes wait in the kernel, TCP pushes back) when
        the bodies being read would pass it. Small bodies are never parked, and one body is
        always let through, so the budget bounds memory without refusing anything."""
        if request.body_length <= SMALL_BODY or self._take_budget(conn, request.body_length):
            return True
        self._parked.append(conn)
        return False

    def _take_budget(self, conn: _Conn, length: int) -> bool:
        """Count `length` bytes of body against BODY_BUDGET; False if they do not fit (the
        first body always fits, however large: a budget must never refuse a request)."""
        if self._reserved and self._reserved + length > self._body_budget:
            return False
        self._reserved += length
        conn.reserved = length
        return True

    def _release(self, conn: _Conn) -> None:
        """Give back a body's reservation and let parked connections read, oldest first."""
        if conn.reserved:
            self._reserved -= conn.reserved
            conn.reserved = 0
        while self._parked:
            waiting = self._parked[0]
            request = waiting.request
            if waiting.closed or waiting.state != READING or request is None:
                self._parked.popleft()  # cut by its deadline meanwhile
                continue
            if not self._take_budget(waiting, request.body_length):
                return
            self._parked.popleft()
            self._send_continue(waiting, request)
            self._arm(waiting, _IN)

    @staticmethod
    def _send_continue(conn: _Conn, request: Request) -> None:
        """`100 Continue` to a client that waits for it before sending its body."""
        if request.expect_continue:
            with contextlib.suppress(OSError):  # 25 bytes into an empty send buffer
                conn.sock.send(CONTINUE)

    def _arm(self, conn: _Conn, events: int) -> None:
        try:
            self._epoll.modify(conn.fd, events)
        except OSError:
            self._close(conn)

    def _fail(self, conn: _Conn, response: Response) -> None:
        """Answer an error the loop found itself, then close (lingering)."""
        self._metrics.observe("", "", response.status, 0.0)
        if conn.reserved:
            self._release(conn)  # its body will not be read: let a parked one read
        data = serialize(response, "HTTP/1.1", keep_alive=False, head_only=False)
        conn.state = WRITING
        conn.request = None
        conn.keep_alive = False
        conn.out = memoryview(data)
        conn.deadline = time.monotonic() + SEND_TIMEOUT
        self._send_rest(conn)

    def _send_rest(self, conn: _Conn) -> None:
        out = conn.out
        assert out is not None
        try:
            sent = conn.sock.send(out)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close(conn)
            return
        if sent < len(out):
            conn.out = out[sent:]
            self._arm(conn, _OUT)
            return
        conn.out = None
        if conn.keep_alive and not self._stopping:
            self._idle(conn)
            if conn.buf:
                self._advance(conn)
            else:
                self._arm(conn, _IN)
        else:
            self._linger(conn)

    def _idle(self, conn: _Conn) -> None:
        conn.state = IDLE
        conn.deadline = self._idle_deadline()

    def _idle_deadline(self) -> float:
        """When a connection that is idle from now on gets closed (either thread)."""
        grace = STOP_GRACE if self._stopping else self._limits.keepalive_timeout
        return time.monotonic() + grace

    def _linger(self, conn: _Conn) -> None:
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        conn.state = LINGERING
        conn.buf.clear()
        conn.deadline = time.monotonic() + LINGER
        self._arm(conn, _IN)

    def _drain(self, conn: _Conn) -> None:
        chunk = self._recv(conn)
        if chunk is None:
            return
        if chunk:
            self._arm(conn, _IN)
        else:
            self._close(conn)

    def _close(self, conn: _Conn) -> None:
        if conn.reserved:
            self._release(conn)
        with self._closing:  # against a thread re-arming this fd (see _serve's fast path)
            if conn.closed:
                return
            conn.closed = True
            if self._conns.get(conn.fd) is conn:
                del self._conns[conn.fd]
                self._count()
            with contextlib.suppress(OSError):
                self._epoll.unregister(conn.fd)
            with contextlib.suppress(OSError):
                conn.sock.close()

    def _take_returns(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_r, 4096)
        self._wake_pending = False
        while not self._returned.empty():
            conn, what = self._returned.get()
            if conn.closed:
                continue
            if what == _CLOSE:
                self._close(conn)
            elif what == _SEND_REST:
                conn.state = WRITING
                conn.deadline = time.monotonic() + SEND_TIMEOUT
                self._send_rest(conn)
            else:  # _PARSE_MORE: pipelined bytes already buffered
                self._idle(conn)
                self._advance(conn)
        if self._stopping:
            self._listen(False)
            self._clamp_for_stop()

    def _sweep(self, now: float) -> None:
        if self._stopping:
            self._clamp_for_stop()
        for conn in list(self._conns.values()):
            if conn.deadline > now or conn.closed:
                continue
            if conn.state == QUEUED:
                with self._closing:  # a thread may be claiming it this very moment (_work)
                    if conn.state != QUEUED:
                        continue
                    conn.state = WRITING
                self._fail(
                    conn,
                    error_response(
                        503,
                        "ServiceUnavailable",
                        f"no thread was free for {self._limits.request_timeout:g} s: all "
                        f"{self._limits.threads} are busy",
                    ),
                )
            elif conn.state == READING and self._stopping:
                self._fail(
                    conn,
                    error_response(
                        503, "ServiceUnavailable", "the server is stopping: send the request again"
                    ),
                )
            elif conn.state == READING:
                self._fail(
                    conn,
                    error_response(
                        408,
                        "RequestTimeout",
                        f"request not complete within {self._limits.request_timeout:g} s",
                    ),
                )
            elif conn.state != ACTIVE:
                self._close(conn)

    def _clamp_for_stop(self) -> None:
        """Once stopping: idle connections get STOP_GRACE from the stop, requests still
        arriving STOP_READ_GRACE. Applied at every sweep, not once: a thread may hand a
        connection back after the stop with the deadline it chose before."""
        idle_until = self._stop_at + STOP_GRACE
        reading_until = self._stop_at + STOP_READ_GRACE
        for conn in list(self._conns.values()):
            if conn.state == IDLE and conn.deadline > idle_until:
                conn.deadline = idle_until
            elif conn.state == READING and conn.deadline > reading_until:
                conn.deadline = reading_until

    # -- the pool ----------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            conn, request, body = job
            with self._closing:  # the loop may have answered it 503 after its wait (_sweep)
                if conn.state != QUEUED or conn.closed:
                    continue
                conn.state = ACTIVE
                conn.deadline = float("inf")
            with self._running_lock:
                self._running += 1
            try:
                self._serve(conn, request, body)
            except BaseException:  # noqa: BLE001 - one bad request must not end the thread
                logger.exception("unexpected error serving a request")
                self._give_back(conn, _CLOSE)
            finally:
                with self._running_lock:
                    self._running -= 1

    def _serve(self, conn: _Conn, request: Request, body: bytes) -> None:
        """Answer `request`, then the connection's next ones while they come at once."""
        while True:
            nxt = self._answer(conn, request, body)
            if nxt is None:
                return
            request, body = nxt

    def _answer(self, conn: _Conn, request: Request, body: bytes) -> tuple[Request, bytes] | None:
        response = self._respond(request, body)
        keep_alive = request.keep_alive and not self._stopping and not response.fatal
        data = serialize(
            response, request.version, keep_alive=keep_alive, head_only=request.method == "HEAD"
        )
        if response.fatal:
            with contextlib.suppress(OSError):
                conn.sock.settimeout(FATAL_SEND_TIMEOUT)
                conn.sock.sendall(data)
            self._on_fatal()
            return None
        try:
            sent = conn.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._give_back(conn, _CLOSE)
            return None
        conn.keep_alive = keep_alive
        conn.served = True
        if sent < len(data):
            conn.out = memoryview(data)[sent:]
            self._give_back(conn, _SEND_REST)
        elif not keep_alive:
            conn.out = memoryview(b"")
            self._give_back(conn, _SEND_REST)  # the loop shuts and lingers
        else:
            nxt = self._next_request(conn)
            if nxt is not None:
                return nxt
            if conn.eof:  # the client closed: _next_request saw the end of its stream
                self._give_back(conn, _CLOSE)
            elif conn.buf:
                self._give_back(conn, _PARSE_MORE)
            else:
                self._idle_now(conn)
        return None

    def _next_request(self, conn: _Conn) -> tuple[Request, bytes] | None:  # noqa: PLR0911
        """The connection's next request, if it is already here or comes within STICKY and
        no other request is waiting for a thread: a keep-alive client usually sends its next
        request as soon as it has the answer, and taking it here spares the hand-back to the
        loop and back to a thread (two thread switches, measured 10-20 % of durable-write
        throughput at 4 x 8 with 32 clients; with 2 cores shared by the clients, a wait of
        2 ms missed often enough to cost writes 5-10 % against 5 ms). Anything unusual (a
        large body, a partial or bad head, 100-continue) is left to the loop, which owns those
        rules. None with `conn.eof` set: the client closed the connection."""
        buf = conn.buf
        if self._stopping or not self._jobs.empty():
            return None  # another connection's request waits for a thread: it goes first
        if not buf:
            try:
                poller = select.poll()  # not select(): descriptors go past 1024 here
                poller.register(conn.fd, select.POLLIN)
                chunk = conn.sock.recv(READ_SIZE) if poller.poll(STICKY_MS) else None
            except (BlockingIOError, InterruptedError):
                return None
            except OSError:
                chunk = b""
            if chunk is None:
                return None
            if not chunk:
                conn.eof = True
                return None
            buf += chunk
        try:
            end = find_head_end(buf)
            if end < 0:
                return None
            request = parse_head(bytes(buf[:end]))
        except HttpError:
            return None  # the loop parses it again and answers the error
        total = end + request.body_length
        if (
            request.body_length > min(SMALL_BODY, self._limits.max_body)  # 413, budget: loop's
            or request.expect_continue
            or len(buf) < total
        ):
            return None
        body = bytes(buf[end:total])
        del buf[:total]
        return request, body

    def _idle_now(self, conn: _Conn) -> None:
        # The fast path: idle again, without waking the loop. Deadline before state (the
        # loop's sweep reads the state first), state before re-arming (the next event).
        # Once IDLE the loop may close it (to make room): the lock keeps that from
        # happening between here and the re-arming, which would otherwise act on a
        # descriptor number already reused by a new connection.
        with self._closing:
            if conn.closed:
                return
            conn.deadline = self._idle_deadline()
            conn.state = IDLE
            try:
                self._epoll.modify(conn.fd, _IN)
            except OSError:
                conn.state = ACTIVE
                self._give_back(conn, _CLOSE)

    def _give_back(self, conn: _Conn, what: str) -> None:
        self._returned.put((conn, what))
        self._wake()

    def _respond(self, request: Request, body: bytes) -> Response:
        path = request.path
        route = self._routes.get(path)
        if route is not None:
            if request.method not in ("GET", "HEAD"):
                return error_response(
                    405,
                    "MethodNotAllowed",
                    f"{request.method} not allowed: use GET",
                    allow="GET, HEAD",
                )
            return self._document(path, route)
        started = time.perf_counter()
        module = function = ""
        if request.method != "POST":
            response = error_response(
                405, "MethodNotAllowed", f"{request.method} not allowed: use POST", allow="POST"
            )
        else:
            parts = path.split("/")
            if len(parts) != 3 or parts[0] or not parts[1] or not parts[2]:
                response = error_response(
                    404, "NotFound", f"no function at {path[:200]!r}: use /MODULE/FUNCTION"
                )
            else:
                response = self._app.call(
                    parts[1], parts[2], body, request.chain, request.forwarded
                )
                if self._app.serves(parts[1], parts[2]):
                    module, function = parts[1], parts[2]
        self._metrics.observe(module, function, response.status, time.perf_counter() - started)
        return response

    @staticmethod
    def _document(path: str, route: Callable[[], Response]) -> Response:
        try:
            return route()
        except BaseException as e:  # noqa: BLE001 - answered, and the worker serves on
            if needs_recovery(e):
                logger.error("%s: %s: %s", path, type(e).__name__, e)
                return error_response(503, type(e).__name__, describe(e), fatal=True)
            logger.warning("%s failed: %s: %s", path, type(e).__name__, e, exc_info=True)
            return error_response(500, type(e).__name__, describe(e))
