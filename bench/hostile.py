"""A helper process that holds hostile connections open against a server, for as long as it
runs (at most `--max-seconds`):

- `--idle N` idle keep-alive connections: each sends one complete request (kv/get), reads
  its answer, then sends nothing more. A server closes them after its keep-alive timeout; the
  helper then opens a new one after `REOPEN_DELAY`, so N are held all along, like a client
  pool or a load balancer that keeps its connections warm.
- `--slow N` slow-head connections: a request line and `Host`, then one byte of a header
  every `--slow-interval` seconds, never the blank line that ends the head. A server that
  times the head out closes them (with a 408 or not); the helper opens a new one.

One epoll loop (`selectors`), non-blocking sockets, no thread: the helper itself costs the
server's CPU little. Every `STATUS_EVERY` seconds, and once at exit, it writes its counts as
JSON to `--status` (written to a temporary name, then renamed: a reader never sees half).
It stops on SIGTERM or SIGINT, or when its parent is gone.

    python -m bench.hostile --port P --idle 1000 --slow 64 --status FILE
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import random
import resource
import selectors
import signal
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REOPEN_DELAY = 0.2  # s before a connection the server closed is replaced
STATUS_EVERY = 0.5
CONNECT_TIMEOUT = 10.0  # a connect not completed by then is given up and retried
OPEN_PER_TICK = 100  # new connections started per loop turn: a ramp, not a SYN flood

_IDLE_REQUEST = (
    b"POST /kv/get HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    b'Content-Length: 14\r\n\r\n{"key": "k0"}\n'
)
_SLOW_HEAD = b"POST /kv/get HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "


@dataclass
class Counts:
    idle_target: int = 0
    slow_target: int = 0
    idle_connected: int = 0  # TCP connection established now
    idle_answered: int = 0  # of those, answered and now idle
    slow_connected: int = 0
    idle_opened: int = 0  # connections opened in all
    slow_opened: int = 0
    idle_closed_by_server: int = 0
    slow_closed_by_server: int = 0
    slow_answered_408: int = 0
    slow_bytes_sent: int = 0
    connect_failures: int = 0
    seconds: float = 0.0


class _Conn:
    def __init__(self, kind: str, sock: socket.socket) -> None:
        self.kind = kind  # "idle" or "slow"
        self.sock = sock
        self.connected = False
        self.answered = False
        self.buf = b""
        self.started = time.monotonic()
        self.next_byte = 0.0


class Hostile:
    def __init__(self, port: int, idle: int, slow: int, interval: float) -> None:
        self.port = port
        self.interval = interval
        self.sel = selectors.DefaultSelector()
        self.counts = Counts(idle_target=idle, slow_target=slow)
        self.conns: set[_Conn] = set()
        self.pending: list[tuple[float, str]] = [(0.0, "idle")] * idle + [(0.0, "slow")] * slow
        self.rnd = random.Random(8)

    def _open(self, kind: str) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        err = sock.connect_ex(("127.0.0.1", self.port))
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self.counts.connect_failures += 1
            self.pending.append((time.monotonic() + REOPEN_DELAY, kind))
            return
        conn = _Conn(kind, sock)
        self.conns.add(conn)
        self.sel.register(sock, selectors.EVENT_WRITE, conn)
        if kind == "idle":
            self.counts.idle_opened += 1
        else:
            self.counts.slow_opened += 1

    def _drop(self, conn: _Conn, *, by_server: bool) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(conn.sock)
        conn.sock.close()
        self.conns.discard(conn)
        if conn.connected:
            if conn.kind == "idle":
                self.counts.idle_connected -= 1
                if conn.answered:
                    self.counts.idle_answered -= 1
            else:
                self.counts.slow_connected -= 1
        if by_server:
            if conn.kind == "idle":
                self.counts.idle_closed_by_server += 1
            else:
                self.counts.slow_closed_by_server += 1
        self.pending.append((time.monotonic() + REOPEN_DELAY, conn.kind))

    def _on_connected(self, conn: _Conn) -> None:
        if conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            self.counts.connect_failures += 1
            self._drop(conn, by_server=False)
            return
        conn.connected = True
        try:
            if conn.kind == "idle":
                self.counts.idle_connected += 1
                conn.sock.send(_IDLE_REQUEST)
            else:
                self.counts.slow_connected += 1
                conn.sock.send(_SLOW_HEAD)
                conn.next_byte = time.monotonic() + self.rnd.uniform(0, self.interval)
        except OSError:
            self._drop(conn, by_server=True)
            return
        self.sel.modify(conn.sock, selectors.EVENT_READ, conn)

    def _on_readable(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(conn, by_server=True)
            return
        conn.buf += data
        if conn.kind == "slow":
            if conn.buf.startswith(b"HTTP/1.1 408") or conn.buf.startswith(b"HTTP/1.0 408"):
                self.counts.slow_answered_408 += 1
                self._drop(conn, by_server=True)
            return
        if not conn.answered and b"\r\n\r\n" in conn.buf:
            conn.answered = True  # the body is small: the head and body come together
            self.counts.idle_answered += 1
            conn.buf = b""

    def _tick(self, now: float) -> None:
        due = [p for p in self.pending if p[0] <= now]
        if due:
            self.pending = [p for p in self.pending if p[0] > now]
            for _, kind in due[OPEN_PER_TICK:]:
                self.pending.append((now, kind))
            for _, kind in due[:OPEN_PER_TICK]:
                self._open(kind)
        for conn in list(self.conns):
            if not conn.connected:
                if now - conn.started > CONNECT_TIMEOUT:
                    self.counts.connect_failures += 1
                    self._drop(conn, by_server=False)
            elif conn.kind == "slow" and now >= conn.next_byte:
                conn.next_byte = now + self.interval
                try:
                    conn.sock.send(b"a")
                    self.counts.slow_bytes_sent += 1
                except OSError:
                    self._drop(conn, by_server=True)

    def run(self, status: Path, max_seconds: float, stop: list[bool]) -> None:
        t0 = time.monotonic()
        next_status = t0
        parent = os.getppid()
        while not stop[0] and time.monotonic() - t0 < max_seconds and os.getppid() == parent:
            for key, _ in self.sel.select(0.05):
                conn: _Conn = key.data
                if conn.connected:
                    self._on_readable(conn)
                else:
                    self._on_connected(conn)
            now = time.monotonic()
            self._tick(now)
            if now >= next_status:
                self.counts.seconds = now - t0
                _write_status(status, self.counts)
                next_status = now + STATUS_EVERY
        self.counts.seconds = time.monotonic() - t0
        _write_status(status, self.counts)
        for conn in list(self.conns):
            conn.sock.close()


def _write_status(path: Path, counts: Counts) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(asdict(counts)) + "\n", encoding="utf-8")
    tmp.replace(path)


def raise_nofile(wanted: int) -> None:
    """Raise the soft RLIMIT_NOFILE towards `wanted` (at most the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.hostile", description=__doc__)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--idle", type=int, default=1000)
    ap.add_argument("--slow", type=int, default=64)
    ap.add_argument("--slow-interval", type=float, default=1.0)
    ap.add_argument("--status", type=Path, required=True)
    ap.add_argument("--max-seconds", type=float, default=300.0)
    args = ap.parse_args()
    raise_nofile(args.idle + args.slow + 256)
    stop = [False]

    def on_signal(signum: int, frame: object) -> None:
        stop[0] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    Hostile(args.port, args.idle, args.slow, args.slow_interval).run(
        args.status, args.max_seconds, stop
    )


if __name__ == "__main__":
    main()
