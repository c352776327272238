"""A worker process: what runs in each child the supervisor forks for a cage.

    reset signals -> open one Safe per module (recover=False: the supervisor recovers)
    -> load each module with `pmnc_safe` bound to its own safe and `pmnc` to the worker's
       call layer (calls.py) -> `threads` HTTP threads
    -> report "ready" -> heartbeat until SIGTERM or the supervisor is gone
    -> stop accepting, finish requests in flight within graceful_timeout, close every safe, exit 0

Exit codes (runtime/child.py) tell the supervisor what to do: 0 a clean exit (every safe
closed); child.EXIT_BOOT_FAILED a module or safe that cannot be loaded (the safes are closed;
restarting would only fail again); child.EXIT_NEEDS_RECOVERY a worker that left without closing its
safes (a safe panicked, or requests were still running at the deadline): like a crash, its cage
must be recovered.

The worker talks to the supervisor over one pipe, one line per message: `ready`, `beat`,
`leaving` before it stops by itself (cut off from its group: `_cut_off_from_group`), and
`boot-error <why>` before an child.EXIT_BOOT_FAILED exit. Its live figures (requests, safe stats) go
to a file its main thread rewrites about once a second next to the heartbeat (see `status.py`),
which every worker of the cage reads to answer `GET /_status`.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import select
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from queue import SimpleQueue

from pmnc.safe import Safe, SafeError, SafeNeedsRecoveryError

from . import child, group, logs, metrics, status
from .app import Application, Response
from .balance import Balance
from .calls import Calls
from .config import CageConfig, NodeConfig
from .logs import logger
from .modules import AppModule, ModuleLoadError, load_module
from .server import Limits, Server

__all__ = ["WorkerSpec", "run"]

RECONNECT_AFTER_S = 3.0  # see _Worker._cut_off_from_group
CONNECT_WAIT_S = 5.0  # see _Worker._await_group_connections


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs, built by the supervisor before fork (no handles in it)."""

    config: NodeConfig
    cage: CageConfig
    modules: tuple[str, ...]  # exactly the modules whose safes the supervisor prepared
    listener: socket.socket | None
    report_fd: int  # write end of this worker's pipe to the supervisor
    inherited_fds: tuple[int, ...]  # the supervisor's descriptors this worker must not keep
    slot: int = 0  # this worker's place among its cage's (0..workers-1)
    balance: Balance | None = None  # connections held per slot, shared by the cage's workers


def run(spec: WorkerSpec) -> None:
    """The child's entry point (child.main: it never returns)."""
    child.main(_Worker(spec).run, "worker")


class _Worker:
    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.cfg = spec.config
        self.ppid = os.getppid()
        self.signals: SimpleQueue[int] = SimpleQueue()
        self.pipe = child.Pipe(spec.report_fd)
        self.safes: list[Safe] = []
        self.reporter: status.Reporter | None = None
        self.report_failing = False

    def run(self) -> int:
        child.reset_after_fork(self.spec.report_fd, self.spec.inherited_fds, self.signals)
        logs.configure(f"{self.cfg.node}/{self.spec.cage.name}")
        booting = time.monotonic()
        try:
            modules = self._boot()
        except SafeNeedsRecoveryError as e:
            logger.error("cannot open a safe: %s", e)
            return child.EXIT_NEEDS_RECOVERY  # without closing anything: the supervisor recovers
        except (ModuleLoadError, SafeError, OSError) as e:
            logger.error("cannot boot: %s", e, exc_info=isinstance(e, ModuleLoadError))
            self.pipe.send(f"boot-error {e}".replace("\n", " "))
            return (
                child.EXIT_BOOT_FAILED
                if child.close_safes(self.safes)
                else child.EXIT_NEEDS_RECOVERY
            )
        requests = metrics.RequestMetrics()
        directory = status.run_dir(self.cfg, self.spec.cage.name)
        server = None
        if self.spec.listener is not None:
            _raise_descriptor_limit(self.cfg.max_connections)
            server = Server(
                self.spec.listener,
                Application(modules, forward=self._forwarder()),
                Limits(
                    threads=self.spec.cage.threads,
                    max_body=self.cfg.max_body,
                    keepalive_timeout=self.cfg.keepalive_timeout,
                    request_timeout=self.cfg.request_timeout,
                    max_connections=self.cfg.max_connections,
                ),
                on_fatal=lambda: os._exit(child.EXIT_NEEDS_RECOVERY),
                metrics=requests,
                routes={
                    status.STATUS_PATH: lambda: _json(
                        status.cage_status(directory, live=reporter.collect())
                    ),
                    metrics.METRICS_PATH: lambda: Response(
                        200,
                        metrics.cage_metrics(directory, live=reporter.collect()).encode(),
                        content_type=metrics.CONTENT_TYPE,
                    ),
                },
                balance=self.spec.balance,
                slot=self.spec.slot,
            )
        connections = server.connections if server is not None else dict
        self._await_group_connections()
        reporter = status.Reporter(
            directory,
            dict(zip(self.spec.modules, self.safes, strict=True)),
            lambda: {**requests.snapshot(), "connections": connections()},
        )
        self.reporter = reporter
        if server is not None:
            server.start()
        self._publish()
        self.pipe.send("ready")
        logger.info(
            "serving: %d module(s) ready in %.3f s", len(modules), time.monotonic() - booting
        )
        self._serve_until_stopped()
        if server is not None:
            server.stop()
            busy = server.join(time.monotonic() + self.cfg.graceful_timeout)
            reporter.leave()  # its last figures, requests finished while stopping included
            if busy:
                logger.error(
                    "%d request(s) still running after %g s: leaving without closing the safes",
                    busy,
                    self.cfg.graceful_timeout,
                )
                return child.EXIT_NEEDS_RECOVERY
        else:
            reporter.leave()  # for the supervisor to fold into the cage's totals (metrics.py)
        return 0 if child.close_safes(self.safes) else child.EXIT_NEEDS_RECOVERY

    def _boot(self) -> dict[str, AppModule]:
        modules: dict[str, AppModule] = {}
        for name in self.spec.modules:
            self.safes.append(
                Safe.open(
                    self.cfg.safe_dir(self.spec.cage.name, name),
                    durable=self.cfg.durable,
                    checkpoint_interval=self.cfg.checkpoint_interval,
                    cache_size=self.cfg.cache_size,
                    recover=False,
                    create=False,
                    replication=group.safe_replication(self.cfg, self.spec.cage.name, name),
                )
            )
        calls = Calls.for_node(self.cfg, self.spec.cage.name)
        for name, safe in zip(self.spec.modules, self.safes, strict=True):
            path = Path(self.spec.cage.modules) / f"{name}.py"
            modules[name] = load_module(self.spec.cage.name, name, path, safe, calls)
        calls.loaded()  # calls between modules may run from now on
        return modules

    def _forwarder(self) -> group.Forwarder | None:
        """On a replicated node: carries writes that reach a client safe to its master."""
        if self.cfg.replication is None:
            return None
        safes = dict(zip(self.spec.modules, self.safes, strict=True))
        return group.Forwarder(self.cfg, self.spec.cage.name, safes)

    def _serve_until_stopped(self) -> None:
        """Main thread: heartbeat, and watch for SIGTERM or the supervisor's disappearance."""
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)  # a signal wakes the select() below at once
        interval = child.beat_interval(self.cfg.heartbeat_timeout)
        while True:
            select.select([wake_r], [], [], interval)
            with contextlib.suppress(BlockingIOError):
                os.read(wake_r, 512)
            if not self.signals.empty():
                logger.info("stopping: finishing requests in flight")
                return
            if os.getppid() != self.ppid or not self.pipe.send("beat"):
                logger.warning("the supervisor is gone: stopping")
                return
            if self.reporter is not None and self.reporter.due():
                self._publish()
            if self._cut_off_from_group():
                # Told first, so that the supervisor starts the replacement at once and does
                # not take the silence of this worker's graceful stop for a hang.
                self.pipe.send("leaving")
                return

    def _await_group_connections(self) -> None:
        """On a replicated node, before serving: wait (at most CONNECT_WAIT_S) until this
        worker has its own connection to every site its cage's replication process reaches.
        A worker that served before would see its first writes on a master go unacknowledged
        (safe/replication.py, `check_connections`); meanwhile the previous generation (a
        reload) or the listen queue (a restart) holds the callers."""
        if self.cfg.replication is None:
            return
        deadline = time.monotonic() + CONNECT_WAIT_S
        while time.monotonic() < deadline:
            try:
                infos = [safe.replication() or {} for safe in self.safes]
            except SafeError:
                return
            if all(not info.get("unconnected_s") for info in infos):
                return
            time.sleep(0.05)

    def _cut_off_from_group(self) -> bool:
        """Whether this worker should make way for a fresh one: one of its replicated safes
        has lacked its own connection to a site of the group for RECONNECT_AFTER_S (plus a
        second per slot, so the cage's workers are not all replaced at once). libdb 5.3 gives
        a process no connection to a site that joined after it started, and its writes then
        get no acknowledgement; a new process connects to every site it finds."""
        if self.cfg.replication is None:
            return False
        limit = RECONNECT_AFTER_S + self.spec.slot
        for safe in self.safes:
            try:
                info = safe.replication() or {}
            except SafeError:
                return False
            if info.get("unconnected_s", 0.0) > limit:
                logger.warning(
                    "%s: no connection of this worker's own to a site of the group for %.1f s: "
                    "making way for a new worker, which connects to every site",
                    safe.path.name,
                    info["unconnected_s"],
                )
                return True
        return False

    def _publish(self) -> None:
        """Write this worker's figures for `/_status`; a failure only costs fresh figures."""
        if self.reporter is None:
            return
        try:
            self.reporter.publish()
        except SafeNeedsRecoveryError as e:
            logger.error("reading a safe's stats: %s", e)
            os._exit(
                child.EXIT_NEEDS_RECOVERY
            )  # the rule for a panicked safe: leave, touch nothing
        except (SafeError, OSError) as e:
            if not self.report_failing:  # once per run of failures, not once a second
                logger.warning("cannot write the status report %s: %s", self.reporter.path, e)
            self.report_failing = True
        else:
            self.report_failing = False


def _json(document: object) -> Response:
    return Response(200, json.dumps(document, allow_nan=False).encode())


def _raise_descriptor_limit(max_connections: int) -> None:
    """Let the process hold `max_connections` sockets plus its safes' files and some spare:
    the soft RLIMIT_NOFILE (often 1024) up to the hard one, which needs no privilege."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max_connections + 256
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < want:
            logger.warning(
                "max_connections %d needs %d file descriptors; the hard limit allows %d",
                max_connections,
                want,
                hard,
            )
