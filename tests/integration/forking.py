"""Forking helpers for the tests that share a safe between real processes: children end in
os._exit (a child returning into pytest's frames would run the parent's code twice), every wait
is bounded and a child alive past its bound counts as hung."""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest


def fork(fn: Callable[[], None], errors: Path) -> int:
    """Run `fn` in a forked child; an exception is written to `errors` and exits 1."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fn()
            code = 0
        except BaseException:
            with open(errors, "a") as f:
                f.write(f"[pid {os.getpid()}] {traceback.format_exc()}\n")
        finally:
            os._exit(code)
    return pid


def wait(pid: int, timeout: float) -> int:
    """The child's exit code; fails the test (after killing it) if it outlives `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail(f"child {pid} still alive after {timeout} s: hung")


def assert_children_ok(pids: list[int], errors: Path, timeout: float = 60) -> None:
    codes = [wait(pid, timeout) for pid in pids]
    report = errors.read_text() if errors.exists() else ""
    assert codes == [0] * len(pids), report


def wait_file(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            pytest.fail(f"{path} did not appear within {timeout} s")
        time.sleep(0.01)
