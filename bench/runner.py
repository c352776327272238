"""Run one cell: a fresh store directory, a set-up process that creates and prefills it, then
P forked worker processes of T threads each, started together and stopped on a deadline.

Fork hygiene (docs/berkeleydb.md, "Handles across fork()"): the parent never opens a store
and never starts a thread, so it has nothing to leak into a fork; it flushes stdio before each
fork; each child opens its own handles and leaves through `os._exit` in a `finally`, never
returning into the parent's frames (an inherited Berkeley DB handle collected at exit panics
the environment). Children talk to the parent through pipes only:

    child -> parent   b"R" when its store is open and its threads wait, later one
                      length-prefixed pickle with its counts and latency histogram
    parent -> child   16 bytes: the start and end of the measured window (CLOCK_MONOTONIC ns,
                      which is system-wide on Linux, so every process shares one window)

Throughput counts the operations that completed inside the window; latencies are recorded for
every operation that started in it. A thread still inside an operation `STUCK_GRACE` seconds
after the window is reported, and its process exits without closing the store.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pickle
import random
import select
import shutil
import signal
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from bench import histogram
from bench.stores import Handle, Store

OPS = ("set_new", "overwrite", "get", "mixed")
OP_TITLES = {
    "set_new": "durable set of a new key",
    "overwrite": "durable overwrite of an existing key",
    "get": "get of an existing key",
    "mixed": "mixed: 90 % get, 10 % durable overwrite",
}
MIXED_SET_SHARE = 0.1
SETUP_TIMEOUT = 300.0  # creating and prefilling one store
READY_TIMEOUT = 60.0  # opening it in every worker
STUCK_GRACE = 10.0  # a thread still inside an operation this long after the window is stuck
_HDR = struct.Struct("!Q")
_WINDOW = struct.Struct("!QQ")


def make_value(i: int) -> dict[object, object]:
    """The benchmark's value: the contract's example plus a counter (72 B pickled)."""
    return {(None,): [1, "bar", Decimal("1.0")], "n": i}


def prefill_key(i: int) -> str:
    return f"key{i:07d}"


def needs_prefill(op: str) -> bool:
    return op != "set_new"


@dataclass
class CellResult(histogram.Percentiles):
    store: str
    op: str
    processes: int
    threads: int
    duration: float
    ops: int = 0  # completed inside the window
    errors: int = 0
    retries: int = 0
    stuck_threads: int = 0
    error_samples: list[str] = field(default_factory=list)
    hist: list[int] = field(default_factory=histogram.new)
    failed: str | None = None  # the cell could not run at all (set-up error, hang)
    setup_seconds: float = 0.0

    @property
    def config(self) -> str:
        return f"{self.processes}x{self.threads}"

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.duration if self.duration > 0 and not self.failed else 0.0

    def to_json(self) -> dict[str, object]:
        return {
            "store": self.store,
            "op": self.op,
            "config": self.config,
            "processes": self.processes,
            "threads": self.threads,
            "duration_s": self.duration,
            "ops": self.ops,
            "ops_per_s": self.ops_per_s,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "errors": self.errors,
            "error_samples": self.error_samples,
            "retries": self.retries,
            "stuck_threads": self.stuck_threads,
            "failed": self.failed,
            "setup_s": self.setup_seconds,
            "latency_histogram_ns": {
                str(histogram.lower_bound(i)): n for i, n in histogram.to_sparse(self.hist).items()
            },
        }


@dataclass
class _ThreadState:
    ops: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    hist: list[int] = field(default_factory=histogram.new)
    done: bool = False


# --------------------------------------------------------------------------- in the child


def _operation(
    op: str, handle: Handle, slot: int, slots: int, prefill: int, rnd: random.Random
) -> Callable[[int], None]:
    """The function one thread calls with its iteration number. `slot` is the thread's index
    over the whole cell: each thread writes only its own keys."""
    get, put = handle.get, handle.set
    if op == "set_new":

        def set_new(i: int) -> None:
            put(f"new{slot:03d}-{i:09d}", make_value(i))

        return set_new
    # The thread's own slice of the prefilled keys, for overwrites.
    per = max(prefill // slots, 1)
    own = [prefill_key((slot * per + j) % prefill) for j in range(per)]
    every = [prefill_key(j) for j in range(prefill)]
    choice = rnd.choice
    if op == "overwrite":

        def overwrite(i: int) -> None:
            put(choice(own), make_value(i))

        return overwrite
    if op == "get":

        def get_(i: int) -> None:
            get(choice(every))

        return get_
    if op == "mixed":
        draw = rnd.random

        def mixed(i: int) -> None:
            if draw() < MIXED_SET_SHARE:
                put(choice(own), make_value(i))
            else:
                get(choice(every))

        return mixed
    raise ValueError(f"unknown operation {op!r}")


def _thread_main(
    fn: Callable[[int], None], st: _ThreadState, go: threading.Event, window: list[int]
) -> None:
    go.wait()
    start, end = window
    clock = time.monotonic_ns
    idx = histogram.index
    hist = st.hist
    now = clock()
    if now < start:
        time.sleep((start - now) / 1e9)
        while (now := clock()) < start:
            pass
    i = 0
    while now < end:
        try:
            fn(i)
        except Exception as e:
            st.errors += 1
            if len(st.error_samples) < 3:
                st.error_samples.append(f"{type(e).__name__}: {e}"[:300])
            time.sleep(0.001)  # a persistent failure must not spin
            t1 = clock()
        else:
            t1 = clock()
            hist[idx(t1 - now)] += 1
            if t1 <= end:
                st.ops += 1
        i += 1
        now = t1
    st.done = True


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _read_exact(fd: int, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            raise EOFError("parent went away")
        buf += chunk
    return buf


def _send(fd: int, obj: object) -> None:
    data = pickle.dumps(obj)
    _write_all(fd, _HDR.pack(len(data)) + data)


def _worker(
    store: Store,
    path: Path,
    op: str,
    proc: int,
    threads: int,
    slots: int,
    prefill: int,
    out_fd: int,
    in_fd: int,
) -> int:
    try:
        handle = store.open(path, threads)
    except Exception as e:
        _write_all(out_fd, b"E")
        _send(out_fd, f"open: {type(e).__name__}: {e}")
        return 1
    go = threading.Event()
    window = [0, 0]
    states = [_ThreadState() for _ in range(threads)]
    workers = []
    for t in range(threads):
        slot = proc * threads + t
        rnd = random.Random(slot * 7919 + 1)
        fn = _operation(op, handle, slot, slots, prefill, rnd)
        th = threading.Thread(target=_thread_main, args=(fn, states[t], go, window), daemon=True)
        th.start()
        workers.append(th)
    _write_all(out_fd, b"R")
    window[:] = _WINDOW.unpack(_read_exact(in_fd, _WINDOW.size))
    go.set()
    deadline = window[1] / 1e9 + STUCK_GRACE
    for th in workers:
        th.join(max(deadline - time.monotonic(), 0.0))
    stuck = sum(1 for th in workers if th.is_alive())
    errors = sum(s.errors for s in states)
    samples = [m for s in states for m in s.error_samples][:5]
    if not stuck:
        # Close cleanly: a process that exits with an environment open counts as dead.
        try:
            handle.close()
        except Exception as e:
            errors += 1
            samples.append(f"close: {type(e).__name__}: {e}")
    hist = histogram.new()
    for s in states:
        histogram.merge(hist, s.hist)
    result = {
        "ops": sum(s.ops for s in states),
        "errors": errors,
        "error_samples": samples,
        "retries": handle.retries,
        "stuck": stuck,
        "hist": histogram.to_sparse(hist),
    }
    _write_all(out_fd, b"D")
    _send(out_fd, result)
    return 0


def _child_main(close_fds: list[int], *args: Any) -> int:
    """A worker process: drop the pipe ends that belong to the parent and the siblings."""
    for fd in close_fds:
        os.close(fd)
    return _worker(*args)


def _fork(body: Callable[[], int]) -> int:
    """Fork a child that runs `body` and leaves through os._exit, whatever happens."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 70
        try:
            code = body()
        except BaseException:
            with contextlib.suppress(BaseException):
                traceback.print_exc()
        finally:
            with contextlib.suppress(BaseException):
                sys.stderr.flush()
            os._exit(code)
    return pid


# --------------------------------------------------------------------------- in the parent


def _wait_pid(pid: int, timeout: float) -> int | None:
    """The exit code of `pid`, or None if it is still running after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.01)


def _kill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for pid in pids:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def prefill_items(n: int) -> Iterator[tuple[str, object]]:
    return ((prefill_key(i), make_value(i)) for i in range(n))


def setup_store(store: Store, path: Path, op: str, prefill: int) -> str | None:
    """Create and prefill the store in a process of its own; an error message or None."""
    items = prefill if needs_prefill(op) else 0

    def body() -> int:
        store.create(path, prefill_items(items))
        return 0

    pid = _fork(body)
    code = _wait_pid(pid, SETUP_TIMEOUT)
    if code is None:
        _kill([pid])
        return f"set-up hung for {SETUP_TIMEOUT:.0f} s"
    if code != 0:
        return f"set-up exited with {code} (see stderr)"
    return None


class _Child:
    def __init__(self, pid: int, out_fd: int, in_fd: int) -> None:
        self.pid = pid
        self.out_fd = out_fd  # we read
        self.in_fd = in_fd  # we write
        self.buf = b""
        self.eof = False

    def close(self) -> None:
        for fd in (self.out_fd, self.in_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


def _pump(children: list[_Child], until: Callable[[_Child], bool], deadline: float) -> bool:
    """Read from the children's pipes until `until` holds for each; False on the deadline."""
    while True:
        pending = [c for c in children if not until(c) and not c.eof]
        if not pending:
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        readable, _, _ = select.select([c.out_fd for c in pending], [], [], min(left, 1.0))
        for c in pending:
            if c.out_fd in readable:
                chunk = os.read(c.out_fd, 1 << 16)
                if chunk:
                    c.buf += chunk
                else:
                    c.eof = True


def _message(buf: bytes) -> object:
    (n,) = _HDR.unpack_from(buf)
    return pickle.loads(buf[_HDR.size : _HDR.size + n])


def _complete(after: bytes) -> Callable[[_Child], bool]:
    """A predicate: the child's buffer holds `after` (one marker byte) and a full message."""

    def done(c: _Child) -> bool:
        i = c.buf.find(after)
        if i < 0:
            return False
        rest = c.buf[i + 1 :]
        return len(rest) >= _HDR.size and len(rest) >= _HDR.size + _HDR.unpack_from(rest)[0]

    return done


def run_cell(
    store: Store,
    op: str,
    processes: int,
    threads: int,
    duration: float,
    prefill: int,
    path: Path,
    *,
    keep: bool = False,
) -> CellResult:
    result = CellResult(store.name, op, processes, threads, duration)
    path.mkdir(parents=True)
    try:
        t0 = time.monotonic()
        failed = setup_store(store, path, op, prefill)
        result.setup_seconds = time.monotonic() - t0
        if failed:
            result.failed = failed
            return result
        _measure(store, op, processes, threads, duration, prefill, path, result)
        return result
    finally:
        if not keep:
            shutil.rmtree(path, ignore_errors=True)


def _measure(
    store: Store,
    op: str,
    processes: int,
    threads: int,
    duration: float,
    prefill: int,
    path: Path,
    result: CellResult,
) -> None:
    children: list[_Child] = []
    try:
        for proc in range(processes):
            out_r, out_w = os.pipe()
            in_r, in_w = os.pipe()
            others = [fd for c in children for fd in (c.out_fd, c.in_fd)]

            pid = _fork(
                functools.partial(
                    _child_main,
                    [out_r, in_w, *others],
                    store,
                    path,
                    op,
                    proc,
                    threads,
                    processes * threads,
                    prefill,
                    out_w,
                    in_r,
                )
            )
            os.close(out_w)
            os.close(in_r)
            children.append(_Child(pid, out_r, in_w))

        ready = _pump(
            children, lambda c: c.buf[:1] in (b"R", b"E"), time.monotonic() + READY_TIMEOUT
        )
        errors = [c for c in children if c.buf[:1] == b"E"]
        if errors:
            _pump(errors, _complete(b"E"), time.monotonic() + 5)
            msgs = {str(_message(c.buf[1:])) for c in errors if _complete(b"E")(c)}
            result.failed = "; ".join(sorted(msgs)) or "a worker failed to open the store"
            return
        if not ready or any(c.eof and not c.buf for c in children):
            result.failed = "workers did not get ready (hung or died opening the store)"
            return

        start = time.monotonic_ns() + 50_000_000  # every thread is waiting: 50 ms is plenty
        end = start + int(duration * 1e9)
        for c in children:
            _write_all(c.in_fd, _WINDOW.pack(start, end))
        deadline = end / 1e9 + STUCK_GRACE + 15.0
        finished = _pump(children, _complete(b"D"), deadline)
        for c in children:
            if not _complete(b"D")(c):
                result.failed = "a worker died or hung (killed); see stderr"
                continue
            msg = _message(c.buf[c.buf.find(b"D") + 1 :])
            assert isinstance(msg, dict)
            result.ops += int(msg["ops"])
            result.errors += int(msg["errors"])
            result.retries += int(msg["retries"])
            result.stuck_threads += int(msg["stuck"])
            result.error_samples.extend(msg["error_samples"])
            histogram.merge(result.hist, histogram.from_sparse(msg["hist"]))
        if not finished and result.failed is None:
            result.failed = "a worker hung past the deadline (killed)"
    finally:
        alive = []
        for c in children:
            c.close()
            if _wait_pid(c.pid, 5.0) is None:
                alive.append(c.pid)
        _kill(alive)
        if alive and result.failed is None:
            result.stuck_threads = max(result.stuck_threads, 1)
