"""Test-side helpers over `pmnc.runtime.harness`, the one harness that starts nodes and talks to
them (torture, the benchmark and the examples use it too).

What is here only adapts it to the tests: `Node(config, port, log)` and `Client(port)` keep the
tests' short signatures and fail a test with an assertion; the rest are waits and loads that
several tests share. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import subprocess
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pmnc.runtime import harness
from pmnc.runtime.harness import free_port, pmnc_runtime, worker_pids, write_config

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "modules"


__all__ = [
    "DISK_FULL_NOT_RUN",
    "EXAMPLES",
    "STARTED",
    "Client",
    "Node",
    "cli",
    "free_port",
    "increment_concurrently",
    "once",
    "small_tmpfs",
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


# Said on skipping, and again at the end of the run by tests/conftest.py (so `./dev test` shows
# it): without root the disk-full tests do not run, and a run without them has not proven disk
# full (no SIGBUS, SafeNoSpaceError, reads going on).
DISK_FULL_NOT_RUN = "DISK-FULL TESTS NOT RUN (mounting a size-limited tmpfs needs root)"


@contextlib.contextmanager
def small_tmpfs(directory: Path, mib: int) -> Iterator[Path]:
    """A tmpfs of `mib` MiB mounted at `directory` (made here) for the block, or the test
    skipped saying DISK_FULL_NOT_RUN; unmounted lazily after, so that a straggling process
    cannot keep it busy."""
    directory.mkdir()
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(directory)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"{DISK_FULL_NOT_RUN}: cannot mount a tmpfs: {e}")
    if done.returncode != 0:
        pytest.skip(f"{DISK_FULL_NOT_RUN}: {done.stderr.strip() or done.returncode}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], timeout=30, check=False)


class Node(harness.NodeProcess):
    """A `pmnc-runtime start CONFIG` serving on `port`, logging to `log` (harness.NodeProcess)."""

    def __init__(self, config: Path, port: int, log: Path) -> None:
        super().__init__(config, log, port)

    def start(self, *, timeout: float = 20.0, **kwargs: Any) -> Node:
        super().start(timeout=timeout, **kwargs)
        return self

    def stop(self, timeout: float = 20.0) -> int:
        return super().stop(timeout)


class Client(harness.Client):
    """A keep-alive JSON client of 127.0.0.1:`port` whose `result` asserts a 200."""

    def __init__(self, port: int, *, timeout: float = 15.0, keep_alive: bool = True) -> None:
        super().__init__("127.0.0.1", port, timeout=timeout, keep_alive=keep_alive)

    def result(self, module: str, function: str, **kwargs: Any) -> Any:
        """The result of a call that must succeed."""
        status, answer = self.call(module, function, **kwargs)
        assert status == 200, (status, answer)
        return answer["result"]


def wait_serving(port: int, timeout: float) -> float:
    """Seconds until a fresh connection gets a 200 from counter.get, or AssertionError."""
    start = time.monotonic()
    deadline = start + timeout
    while time.monotonic() < deadline:
        client = Client(port, timeout=1.0, keep_alive=False)
        try:
            if client.call("counter", "get")[0] == 200:
                return time.monotonic() - start
        except harness.TRANSPORT_ERRORS:
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
