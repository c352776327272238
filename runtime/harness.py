"""The one harness that starts nodes and talks to them: for `torture`, the tests, the benchmark
and the examples.

Not a stable API. Everything here drives `pmnc-runtime start` from the outside, as a user would:
the node runs in its own session (so its whole process tree can be signalled or killed as one
group), its output goes to a file (never an undrained pipe), and every wait has a deadline.
What it has: `NodeProcess` (a node; `NodeProcess.one_cage` writes a one-cage config on a free
port), `write_group_configs` (a replicated group of nodes on this machine), `Client` (JSON
over HTTP), `write_config`, `free_port`, `worker_pids`, `percentile`.
`tests/helpers.py` only adapts these to assertions.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = [
    "TRANSPORT_ERRORS",
    "Client",
    "NodeProcess",
    "free_port",
    "free_port_range",
    "group_alive",
    "percentile",
    "pmnc_runtime",
    "wait_group_gone",
    "worker_pids",
    "write_config",
    "write_group_configs",
]

# What a request against a node that is being killed can raise: a reset or refused connection,
# a half-sent response, or a body cut short.
TRANSPORT_ERRORS = (OSError, http.client.HTTPException, ValueError)


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the kernel's pick for port 0)."""
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` different ports, free a moment ago: all held at once while they are drawn (one
    at a time, the kernel may hand the same port out twice: a full run saw two nodes of a group
    given one HTTP port)."""
    with contextlib.ExitStack() as held:
        ports = []
        for _ in range(count):
            s = held.enter_context(socket.socket())
            s.bind((host, 0))
            ports.append(int(s.getsockname()[1]))
        return ports


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


def worker_pids(supervisor: int) -> list[int]:
    """The direct children of process `supervisor` (a node's workers), from /proc; [] once it
    is gone. Every thread's list, so that a multithreaded parent (gunicorn's) counts too."""
    pids: list[int] = []
    with contextlib.suppress(OSError):
        for task in sorted(Path(f"/proc/{supervisor}/task").iterdir()):
            with contextlib.suppress(OSError, ValueError):
                pids += [int(p) for p in (task / "children").read_text().split()]
    return sorted(set(pids))


def write_config(
    path: Path,
    modules: Path,
    port: int | None,
    *,
    node: str = "test",
    cage: str = "demo",
    workers: int = 2,
    threads: int = 4,
    data_dir: Path | None = None,
    **options: object,
) -> Path:
    """A one-cage node config at `path` (data in `data_dir`, default `var` beside it) serving
    `modules` on 127.0.0.1:`port` (None: no http); `options` are node-level keys
    (graceful_timeout, max_body, ...). Only keys every pmnc-runtime knows unless `options` add
    some, so that the benchmark's baseline from an older commit reads it too."""
    lines = [f"node: {node}", f"data_dir: {data_dir or path.parent / 'var'}"]
    lines += [f"{key}: {json.dumps(value)}" for key, value in options.items()]
    lines += [
        "cages:",
        f"  - name: {cage}",
        f"    modules: {modules}",
        f"    workers: {workers}",
        f"    threads: {threads}",
    ]
    if port is not None:
        lines.append(f"    http: 127.0.0.1:{port}")
    path.write_text("\n".join(lines) + "\n")
    return path


def free_port_range(count: int, host: str = "127.0.0.1", step: int = 100) -> int:
    """A base port p with p .. p + count - 1 all free a moment ago (a node's replication
    ports: one per safe); bases are multiples of `step` so that nodes stay 100 apart. Drawn
    below Linux's ephemeral range (32768 and up by default), where client sockets and their
    TIME_WAIT leftovers would keep a run of ports from staying free."""
    chooser = random.Random()
    for _ in range(500):
        base = chooser.randrange(10_000 // step, 32_000 // step) * step
        try:
            for port in range(base, base + count):
                with socket.socket() as s:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as repmgr does
                    s.bind((host, port))
        except OSError:
            continue
        return base
    raise RuntimeError(f"no {count} free ports in a row")


def write_group_configs(
    directory: Path,
    modules: Path,
    nodes: int = 3,
    *,
    cage: str = "demo",
    ack: str = "quorum",
    safes: int = 8,
    **config: Any,
) -> list[NodeProcess]:
    """A group of `nodes` one-cage nodes on this machine (README, "Replicated safes"), each
    with its config `nodeN.yaml`, data `varN` and log `nodeN.log` in `directory`; `safes` is
    how many replication ports to keep free per node (one per module)."""
    names = [f"node{i + 1}" for i in range(nodes)]
    bases: list[int] = []
    while len(bases) < nodes:
        base = free_port_range(safes)
        if all(abs(base - b) >= 100 for b in bases):
            bases.append(base)
    ports = free_ports(len(names))
    group = []
    for i, name in enumerate(names):
        path = write_config(
            directory / f"{name}.yaml",
            modules,
            ports[i],
            node=name,
            cage=cage,
            data_dir=directory / f"var{i + 1}",
            **config,
        )
        lines = ["replication:", f"  address: 127.0.0.1:{bases[i]}", f"  ack: {ack}", "  peers:"]
        for j, peer in enumerate(names):
            if j != i:
                lines += [
                    f"    - node: {peer}",
                    f"      address: 127.0.0.1:{bases[j]}",
                    f"      http: {{{cage}: 127.0.0.1:{ports[j]}}}",
                ]
        with open(path, "a") as f:
            f.write("\n".join(lines) + "\n")
        group.append(NodeProcess(path, directory / f"{name}.log", ports[i]))
    return group


def pmnc_runtime() -> list[str]:
    """The command line of `pmnc-runtime` for this interpreter (the script, or the module)."""
    script = Path(sys.executable).parent / "pmnc-runtime"
    return [str(script)] if script.exists() else [sys.executable, "-m", "pmnc.runtime.cli"]


def percentile(values: Sequence[float], p: float) -> float:
    """The nearest-rank percentile `p` (0..100) of `values`; 0.0 for none.

    The one percentile of the tests, torture, the examples and the benchmark's own timings
    (wrk's and the histogram's are computed by them from their buckets), so that "p50" means
    the same everywhere: a value that was measured, never an interpolation.
    """
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))
    return ordered[rank]


class NodeProcess:
    """`pmnc-runtime start CONFIG` in its own session, logging to `log`; `port` is where its
    (first) cage serves, when the caller knows it.

    A context manager: leaving it SIGKILLs whatever is left of the process group.
    """

    def __init__(self, config: Path, log: Path, port: int = 0) -> None:
        self.config = config
        self.log = log
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None
        self.mark = 0
        self.took = 0.0  # seconds the last start took until "ready"

    @classmethod
    def one_cage(
        cls, directory: Path, modules: Path, *, name: str = "node", **config: Any
    ) -> NodeProcess:
        """A node of one cage serving `modules` on a free port, its config `<name>.yaml` and its
        log `<name>.log` in `directory` (see `write_config` for `config`)."""
        port = free_port()
        path = write_config(directory / f"{name}.yaml", modules, port, **config)
        return cls(path, directory / f"{name}.log", port)

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

    def start(
        self,
        *,
        timeout: float = 30.0,
        wait_ready: bool = True,
        command: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> NodeProcess:
        """Start the node and (unless `wait_ready` is false) wait for its "ready" line; `took`
        is then the seconds that took. `command` replaces `pmnc-runtime start CONFIG` (the
        benchmark runs gunicorn, an older pmnc-runtime, under the same management)."""
        started = time.monotonic()
        self.mark = self.log_size()
        sys.stdout.flush()
        sys.stderr.flush()
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(
                list(command) or [*pmnc_runtime(), "start", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                start_new_session=True,
                env=None if env is None else dict(env),
                cwd=cwd,
            )
        if wait_ready:
            self.wait_log(" ready: ", timeout)
        self.took = time.monotonic() - started
        return self

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
        return worker_pids(self.pid)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, signum: int) -> None:
        """Send `signum` to the supervisor alone."""
        os.kill(self.pid, signum)

    def wait(self, timeout: float) -> int:
        """The supervisor's exit status; RuntimeError (the log's tail in it) past `timeout`."""
        if self.proc is None:
            raise RuntimeError("the node was not started")
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(
                f"the node still runs after {timeout:g} s; its log: {self.log}\n"
                f"{self.text()[-3000:]}"
            ) from None

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (a graceful stop) and the exit status; the group is SIGKILLed past `timeout`
        (then RuntimeError)."""
        if self.proc is None:
            return 0
        with contextlib.suppress(ProcessLookupError):
            self.signal(signal.SIGTERM)
        try:
            return self.wait(timeout)
        except RuntimeError:
            self.kill_group()
            raise

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
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        timeout: float = 10.0,
        keep_alive: bool = True,
    ) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.keep_alive = keep_alive
        self.conn: http.client.HTTPConnection | None = None

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, bytes]:
        """(status, raw body) of one request; transport errors (TRANSPORT_ERRORS) propagate,
        and the connection is dropped after them or when the server closes it."""
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        sent = {"Connection": "keep-alive" if self.keep_alive else "close", **(headers or {})}
        try:
            self.conn.request(method, path, body=body, headers=sent)
            response = self.conn.getresponse()
            data = response.read()
        except BaseException:
            self.close()
            raise
        if response.will_close:
            self.close()
        return response.status, data

    def raw(
        self, path: str, body: bytes, headers: Mapping[str, str] | None = None
    ) -> tuple[int, Any]:
        """(status, decoded JSON answer) of a POST of `body` as it is (it may be malformed)."""
        status, data = self.request(
            "POST", path, body, {"Content-Type": "application/json", **(headers or {})}
        )
        return status, json.loads(data)

    def call(self, module: str, function: str, **kwargs: Any) -> tuple[int, Any]:
        """(status, decoded JSON body) of `POST /module/function` with `kwargs` as the body."""
        return self.raw(f"/{module}/{function}", json.dumps(kwargs).encode())

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
