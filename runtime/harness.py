"""A real node as a child process, and a JSON client for it: for `torture` and the examples.

Not a stable API. Everything here drives `pmnc-runtime start` from the outside, as a user would:
the node runs in its own session (so its whole process tree can be signalled or killed as one
group), its stderr goes to a file (never an undrained pipe), and every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["Client", "NodeProcess", "free_port", "percentile", "pmnc_runtime"]

# What a request against a node that is being killed can raise: a reset or refused connection,
# a half-sent response, or a body cut short.
TRANSPORT_ERRORS = (OSError, http.client.HTTPException, ValueError)


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the kernel's pick for port 0)."""
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def group_alive(pgid: int) -> bool:
    """Whether a live (not zombie) process of process group `pgid` is left.

    From /proc rather than killpg(pgid, 0): orphaned zombies that no init reaps would count.
    """
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rpartition(")")[2].split()
            if fields[0] != "Z" and int(fields[2]) == pgid:
                return True
    return False


def wait_group_gone(pgid: int, timeout: float) -> bool:
    """Wait (bounded) until no live process of group `pgid` is left; whether it happened."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not group_alive(pgid):
            return True
        time.sleep(0.02)
    return False


def pmnc_runtime() -> list[str]:
    """The command line of `pmnc-runtime` for this interpreter (the script, or the module)."""
    script = Path(sys.executable).parent / "pmnc-runtime"
    return [str(script)] if script.exists() else [sys.executable, "-m", "pmnc.runtime.cli"]


def percentile(values: Sequence[float], p: float) -> float:
    """The nearest-rank percentile `p` (0..100) of `values`; 0.0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))
    return ordered[rank]


class NodeProcess:
    """`pmnc-runtime start CONFIG` in its own session, logging to `log`.

    A context manager: leaving it SIGKILLs whatever is left of the process group.
    """

    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.mark = 0

    def __enter__(self) -> NodeProcess:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.kill_group()

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("the node was not started")
        return self.proc.pid

    def start(self, *, timeout: float = 30.0) -> float:
        """Start the node and wait for its "ready" line; the seconds that took."""
        started = time.monotonic()
        self.mark = self.log_size()
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(
                [*pmnc_runtime(), "start", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                start_new_session=True,
            )
        self.wait_log(" ready: ", timeout)
        return time.monotonic() - started

    def log_size(self) -> int:
        try:
            return self.log.stat().st_size
        except FileNotFoundError:
            return 0

    def text(self, since: int | None = None) -> str:
        """The log from `since` (default: this start)."""
        start = self.mark if since is None else since
        try:
            with open(self.log, "rb") as f:
                f.seek(start)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, needle: str, timeout: float, since: int | None = None) -> str:
        """The log from `since` once it contains `needle`; RuntimeError at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.text(since)
            if needle in text:
                return text
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"the node exited ({self.proc.returncode}) before {needle!r}; "
                    f"its log: {self.log}\n{text[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {needle!r} in the node's log within {timeout:g} s")
            time.sleep(0.01)

    def workers(self) -> list[int]:
        """The supervisor's direct children (its workers), from /proc."""
        children = Path(f"/proc/{self.pid}/task/{self.pid}/children")
        with contextlib.suppress(OSError, ValueError):
            return [int(p) for p in children.read_text().split()]
        return []

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (a graceful stop) and the exit status; the group is SIGKILLed past `timeout`."""
        if self.proc is None:
            return 0
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_group()
            raise RuntimeError(f"the node did not stop within {timeout:g} s") from None

    def kill_group(self, timeout: float = 10.0) -> None:
        """SIGKILL the whole process tree and wait (bounded) until none of it is left."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout)
        self.wait_group_gone(timeout)

    def group_alive(self) -> bool:
        """Whether a live (not zombie) process of the node's process group is left."""
        return group_alive(self.pid)

    def wait_group_gone(self, timeout: float) -> bool:
        return wait_group_gone(self.pid, timeout)


class Client:
    """A JSON client for `POST /module/function`; reconnects after any failure.

    `keep_alive=False` sends every request on a new connection, so that successive requests
    land on whichever worker accepts first rather than on the one holding the connection.
    """

    def __init__(
        self, host: str, port: int, *, timeout: float = 10.0, keep_alive: bool = True
    ) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.keep_alive = keep_alive
        self.conn: http.client.HTTPConnection | None = None

    def call(self, module: str, function: str, **kwargs: Any) -> tuple[int, Any]:
        """(status, decoded JSON body); transport errors (see TRANSPORT_ERRORS) propagate."""
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            self.conn.request(
                "POST",
                f"/{module}/{function}",
                body=json.dumps(kwargs).encode(),
                headers={
                    "Content-Type": "application/json",
                    "Connection": "keep-alive" if self.keep_alive else "close",
                },
            )
            response = self.conn.getresponse()
            body = json.loads(response.read())
        except BaseException:
            self.close()
            raise
        if response.will_close:
            self.close()
        return response.status, body

    def result(self, module: str, function: str, **kwargs: Any) -> Any:
        """The result of a call that must answer 200 (RuntimeError otherwise)."""
        status, body = self.call(module, function, **kwargs)
        if status != 200:
            raise RuntimeError(f"{module}.{function}: HTTP {status}: {body}")
        return body["result"]

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
