"""End to end: `pmnc-runtime start` on a generated node, driven over HTTP, and the time a cage
takes to serve again after one of its workers is killed with SIGKILL.

The node is written into the run directory: one cage (`workers` x `threads`), HTTP on
127.0.0.1 at a free port, and one module, `benchmod`, whose `put` is a durable write and whose
`get` a read of its own `pmnc_safe`. Load comes from separate processes forked by the runner
(the same harness as the direct cells), each thread with its own keep-alive
`http.client.HTTPConnection`, so the figures compare one-to-one with the Safe used directly.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import runner
from bench.stores import BATCH, Handle, Store

MODULE = "benchmod"
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
REQUEST_TIMEOUT = 30.0

_MODULE_SOURCE = '''"""The benchmark's handlers: a durable write and a read on this module's safe"""

from decimal import Decimal

pmnc_safe = globals()["pmnc_safe"]


def _value(i):
    return {(None,): [1, "bar", Decimal("1.0")], "n": i}


def put(key: str, i: int) -> None:
    """Durable when it returns, like the Safe's own set."""
    pmnc_safe[key] = _value(i)


def get(key: str) -> int:
    """The value's counter (the whole value is read and unpickled)."""
    return pmnc_safe[key]["n"]


def fill(pairs: list) -> int:
    """Prefill: one update per call."""
    pmnc_safe.update({key: _value(i) for key, i in pairs})
    return len(pairs)
'''


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def runtime_command() -> list[str]:
    exe = Path(sys.executable).with_name("pmnc-runtime")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("pmnc-runtime")
    if found:
        return [found]
    return [sys.executable, "-m", "pmnc.runtime.cli"]


class Node:
    """A `pmnc-runtime start` process in its own session, logging to a file."""

    def __init__(self, directory: Path, workers: int, threads: int) -> None:
        self.directory = directory
        self.workers = workers
        self.threads = threads
        self.port = free_port()
        self.log_path = directory / "runtime.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        modules = self.directory / "modules"
        modules.mkdir(parents=True)
        (modules / f"{MODULE}.py").write_text(_MODULE_SOURCE, encoding="utf-8")
        config = self.directory / "node.yaml"
        config.write_text(
            "node: bench\n"
            "data_dir: var\n"
            "cages:\n"
            "  - name: bench\n"
            "    modules: modules\n"
            f"    workers: {self.workers}\n"
            f"    threads: {self.threads}\n"
            f"    http: 127.0.0.1:{self.port}\n",
            encoding="utf-8",
        )
        sys.stdout.flush()
        sys.stderr.flush()
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [*runtime_command(), "start", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if " ready: " in self.log():
                return
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"pmnc-runtime exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            time.sleep(0.05)
        raise RuntimeError(f"pmnc-runtime not ready in {READY_TIMEOUT:.0f} s:\n{self.log_tail()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 15) -> str:
        return "\n".join(self.log().splitlines()[-n:])

    def stop(self) -> int | None:
        """SIGTERM the session, then SIGKILL it if it is still there; the exit status."""
        if self.proc is None:
            return None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            return None
        finally:
            # Workers left behind by a crashed supervisor share its process group.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    def worker_pids(self) -> set[int]:
        """The supervisor's child processes (its workers), from /proc."""
        assert self.proc is not None
        pids: set[int] = set()
        task_dir = Path(f"/proc/{self.proc.pid}/task")
        with contextlib.suppress(OSError):
            for task in task_dir.iterdir():
                with contextlib.suppress(OSError):
                    pids.update(int(p) for p in (task / "children").read_text().split())
        return pids


def call(conn: http.client.HTTPConnection, function: str, args: dict[str, Any]) -> object:
    conn.request(
        "POST",
        f"/{MODULE}/{function}",
        json.dumps(args).encode(),
        {"Content-Type": "application/json"},
    )
    resp = conn.getresponse()
    payload = resp.read()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {payload[:200].decode(errors='replace')}")
    return json.loads(payload)["result"]


class HttpStore(Store):
    """The node's `benchmod` safe, reached over HTTP: a Store for the runner."""

    name = "pmnc-http"
    durability = "the module's put: pmnc_safe[key] = value, durable before the 200 is sent"

    def __init__(self, port: int) -> None:
        self.port = port

    def version(self) -> str:
        return "pmnc-runtime over HTTP/1.1 keep-alive"

    def create(self, path: Path, items: Iterable[tuple[str, object]]) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=REQUEST_TIMEOUT)
        try:
            batch: list[list[object]] = []
            for key, value in items:
                assert isinstance(value, dict)
                batch.append([key, value["n"]])
                if len(batch) >= BATCH:
                    call(conn, "fill", {"pairs": batch})
                    batch = []
            if batch:
                call(conn, "fill", {"pairs": batch})
        finally:
            conn.close()

    def open(self, path: Path, threads: int) -> Handle:
        return _HttpHandle(self.port)


class _HttpHandle(Handle):
    """One keep-alive connection per thread, reopened after a failure."""

    def __init__(self, port: int) -> None:
        self._port = port
        self._local = threading.local()
        self._conns: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def _call(self, function: str, args: dict[str, Any]) -> object:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = http.client.HTTPConnection("127.0.0.1", self._port, timeout=REQUEST_TIMEOUT)
            self._local.conn = conn
            with self._lock:
                self._conns.append(conn)
        try:
            return call(conn, function, args)
        except (OSError, http.client.HTTPException):
            conn.close()
            self._local.conn = None
            raise

    def get(self, key: str) -> object:
        return self._call("get", {"key": key})

    def set(self, key: str, value: object) -> None:
        assert isinstance(value, dict)
        self._call("put", {"key": key, "i": value["n"]})

    def close(self) -> None:
        with self._lock:
            for conn in self._conns:
                conn.close()


@dataclass
class KillResult:
    kills: int = 0
    external: list[float] = field(default_factory=list)  # kill -> full worker set + a write
    supervisor: list[float] = field(default_factory=list)  # its "serving again" log lines
    failures: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {
            "kills": self.kills,
            "external_s": self.external,
            "supervisor_s": self.supervisor,
            "failures": self.failures,
        }


_SERVING_AGAIN = re.compile(r"serving again, ([0-9.]+) s after the crash")


def kill_recovery(node: Node, kills: int, progress: Any) -> KillResult:
    """Kill one worker at a time with SIGKILL; time until the cage has its full complement of
    workers again (the victim gone) and a durable write over a fresh connection succeeds."""
    result = KillResult()
    rnd = random.Random(4242)
    for n in range(kills):
        old = node.worker_pids()
        if not old:
            result.failures.append(f"kill {n + 1}: the supervisor has no workers")
            break
        victim = rnd.choice(sorted(old))
        lines_before = len(_SERVING_AGAIN.findall(node.log()))
        t0 = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        deadline = t0 + 30.0
        took: float | None = None
        while time.monotonic() < deadline:
            now = node.worker_pids()
            if victim not in now and len(now) >= len(old):
                conn = http.client.HTTPConnection("127.0.0.1", node.port, timeout=5.0)
                try:
                    call(conn, "put", {"key": f"recovery-{n}", "i": n})
                except (OSError, http.client.HTTPException, RuntimeError):
                    time.sleep(0.002)
                    continue
                finally:
                    conn.close()
                took = time.monotonic() - t0
                break
            time.sleep(0.002)
        result.kills += 1
        if took is None:
            result.failures.append(f"kill {n + 1}: not serving 30 s after killing {victim}")
            break
        result.external.append(took)
        # Let the supervisor log its own view and settle before the next kill.
        settle = time.monotonic() + 10.0
        while time.monotonic() < settle:
            if len(_SERVING_AGAIN.findall(node.log())) > lines_before:
                break
            time.sleep(0.05)
        time.sleep(1.0)
        progress(f"kill {n + 1}/{kills}: worker {victim}: serving again after {took:.3f} s")
    result.supervisor = [float(x) for x in _SERVING_AGAIN.findall(node.log())]
    return result


def summarize(values: list[float]) -> str:
    if not values:
        return "-"
    return (
        f"p50 {statistics.median(values):.3f} s, max {max(values):.3f} s "
        f"(min {min(values):.3f} s, n={len(values)})"
    )


def run(
    run_dir: Path,
    *,
    workers: int,
    threads: int,
    load: tuple[int, int],
    duration: float,
    prefill: int,
    kills: int,
    do_load: bool,
    progress: Any,
) -> tuple[list[runner.CellResult], KillResult | None, str]:
    """Start the node, run the HTTP cells (write, read) and the kills; stop the node.
    Returns the cells, the kill results and a line about how the node stopped."""
    node = Node(run_dir / "node", workers, threads)
    cells: list[runner.CellResult] = []
    killed: KillResult | None = None
    progress(f"http: starting pmnc-runtime ({workers}x{threads}) on 127.0.0.1:{node.port}")
    try:
        node.start()
        store = HttpStore(node.port)
        if do_load:
            for op in ("set_new", "get"):
                r = runner.run_cell(
                    store, op, load[0], load[1], duration, prefill, run_dir / f"http-{op}"
                )
                cells.append(r)
                progress(
                    f"http {op} {r.config}: "
                    + (f"FAILED: {r.failed}" if r.failed else f"{r.ops_per_s:,.0f} req/s")
                )
        if kills:
            killed = kill_recovery(node, kills, progress)
    finally:
        code = node.stop()
    stopped = f"pmnc-runtime stopped with exit status {code} after SIGTERM"
    if code != 0:
        stopped += f"; log tail:\n{node.log_tail()}"
    return cells, killed, stopped
