"""Shared helpers for the integration tests: a real `pmnc-runtime start` and a small HTTP client.

The node runs in its own session (so a test can signal or kill its whole process group), with
stdout and stderr going to files (never an undrained pipe), and every wait is bounded.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

from pmnc.runtime.harness import free_port, group_alive, pmnc_runtime, wait_group_gone

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "modules"


__all__ = [
    "EXAMPLES",
    "STARTED",
    "Client",
    "Node",
    "cli",
    "free_port",
    "increment_concurrently",
    "once",
    "wait_gone",
    "wait_serving",
    "wait_started",
    "worker_pids",
    "write_config",
    "write_modules",
]

cli = pmnc_runtime  # the installed console script, or the CLI module from a bare checkout


def write_modules(directory: Path, modules: dict[str, str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, source in modules.items():
        (directory / f"{name}.py").write_text(textwrap.dedent(source))
    return directory


def write_config(
    path: Path, modules: Path, port: int, *, workers: int = 2, threads: int = 4, **options: Any
) -> Path:
    """A one-cage node config; `options` are top-level keys (graceful_timeout, max_body...)."""
    lines = ["node: test", f"data_dir: {path.parent / 'var'}"]
    lines += [f"{k}: {json.dumps(v)}" for k, v in options.items()]
    lines += [
        "cages:",
        "  - name: demo",
        f"    modules: {modules}",
        f"    workers: {workers}",
        f"    threads: {threads}",
        f"    http: 127.0.0.1:{port}",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


class Node:
    """A running `pmnc-runtime start CONFIG`, its log, and bounded ways to end it."""

    def __init__(self, config: Path, port: int, log: Path) -> None:
        self.config = config
        self.port = port
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, wait_ready: bool = True, timeout: float = 20.0) -> Node:
        self.mark = self.log_size()
        with open(self.log, "ab") as err, open(self.log.with_suffix(".out"), "ab") as out:
            self.proc = subprocess.Popen(
                [*cli(), "start", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        if wait_ready:
            self.wait_log(" ready: ", timeout)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_size(self) -> int:
        return self.log.stat().st_size if self.log.exists() else 0

    def text(self, since: int | None = None) -> str:
        start = self.mark if since is None else since
        data = self.log.read_bytes() if self.log.exists() else b""
        return data[start:].decode(errors="replace")

    def wait_log(self, needle: str, timeout: float, since: int | None = None) -> str:
        """Wait until the log (from `since`, default this start) contains `needle`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.text(since)
            if needle in text:
                return text
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"node exited ({self.proc.returncode}) before {needle!r}:\n{text}"
                )
            time.sleep(0.02)
        raise AssertionError(f"no {needle!r} in the log within {timeout} s:\n{self.text(since)}")

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"node still running after {timeout} s:\n{self.text()}") from None

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait for the exit status."""
        self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def group_alive(self) -> bool:
        return group_alive(self.pid)

    def wait_group_gone(self, timeout: float) -> bool:
        return wait_group_gone(self.pid, timeout)

    def kill_group(self) -> None:
        """Teardown: SIGKILL the whole group, bounded wait for the supervisor."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        self.wait_group_gone(5)


class Client:
    """A keep-alive JSON client for `POST /module/function`; reconnects when closed."""

    def __init__(self, port: int, *, timeout: float = 15.0, keep_alive: bool = True) -> None:
        self.port = port
        self.timeout = timeout
        self.keep_alive = keep_alive
        self.conn: http.client.HTTPConnection | None = None

    def raw(self, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        if not self.keep_alive:
            hdrs["Connection"] = "close"
        try:
            self.conn.request("POST", path, body=body, headers=hdrs)
            response = self.conn.getresponse()
            data = response.read()
        except BaseException:
            self.close()
            raise
        if response.will_close:
            self.close()
        return response.status, json.loads(data)

    def call(self, module: str, function: str, **kwargs: Any) -> tuple[int, Any]:
        return self.raw(f"/{module}/{function}", json.dumps(kwargs).encode())

    def result(self, module: str, function: str, **kwargs: Any) -> Any:
        """The result of a call that must succeed."""
        status, answer = self.call(module, function, **kwargs)
        assert status == 200, (status, answer)
        return answer["result"]

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def wait_serving(port: int, timeout: float) -> float:
    """Seconds until a fresh connection gets a 200 from counter.get, or AssertionError."""
    start = time.monotonic()
    deadline = start + timeout
    while time.monotonic() < deadline:
        client = Client(port, timeout=1.0, keep_alive=False)
        try:
            if client.call("counter", "get")[0] == 200:
                return time.monotonic() - start
        except (OSError, http.client.HTTPException, ValueError):
            pass
        finally:
            client.close()
        time.sleep(0.01)
    raise AssertionError(f"port {port} not serving within {timeout} s")


STARTED = """
    def _started(path):
        # Tell the test this call is running in a worker: write our pid to `path`, atomically.
        if path:
            import os
            with open(path + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.replace(path + ".tmp", path)
"""


def wait_started(path: Path, timeout: float = 10.0) -> int:
    """Wait (bounded) until a module call wrote `path` via `_started`; the worker's pid."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError):
            return int(path.read_text())
        time.sleep(0.01)
    raise AssertionError(f"the call never started in a worker: no {path} within {timeout} s")


def wait_gone(pids: list[int], supervisor: int, timeout: float) -> bool:
    """Wait (bounded) until none of `pids` is still a child of the supervisor (exited, reaped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not set(pids) & set(worker_pids(supervisor)):
            return True
        time.sleep(0.01)
    return False


def worker_pids(supervisor: int) -> list[int]:
    """The supervisor's direct children, from /proc."""
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children")
    with contextlib.suppress(OSError):
        return [int(p) for p in children.read_text().split()]
    return []


def once(port: int, module: str, function: str, **kwargs: Any) -> Any:
    """The result of one call on a fresh connection that must succeed."""
    client = Client(port)
    try:
        return client.result(module, function, **kwargs)
    finally:
        client.close()


def increment_concurrently(
    port: int, name: str, *, threads: int, per_thread: int, timeout: float
) -> None:
    """`threads` clients each call counter.increment(name) `per_thread` times over keep-alive
    connections; fails on any error, and on a thread still alive after `timeout` (deadlock)."""
    failures: list[BaseException] = []

    def hammer() -> None:
        client = Client(port)
        try:
            for _ in range(per_thread):
                client.result("counter", "increment", name=name)
        except BaseException as e:
            failures.append(e)
        finally:
            client.close()

    pool = [threading.Thread(target=hammer) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout)
    assert not [t for t in pool if t.is_alive()], "client threads deadlocked"
    assert not failures, failures
