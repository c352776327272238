"""A cage's replication process, on a node with `replication:` (README, "Replicated safes").

Berkeley DB's replication manager runs in the first process that starts it on an environment
(listener, elections, applying the master's log), and that process must not fork
(safe/replication.py). The supervisor forks, so it cannot be that process; a worker could, but
workers come and go with reloads and crashes. So each replicated cage gets one more child, this
one, forked before its workers:

    reset signals -> open every safe of the cage with its `Replication` (recover=True: after a
    crash of the cage this open is its recovery, DB_REGISTER + DB_RECOVER) -> wait until each
    safe knows its role (or has waited READY_WAIT_S with a copy of its data) -> "ready"
    -> beat until SIGTERM (or the supervisor is gone) -> close every safe, exit 0

Its workers then open the same safes as subordinates. It beats from a thread while it opens:
a site with no copy yet waits for the group's master to send one (up to a minute), and the
supervisor must not take that wait for a hang. If it dies, its cage's workers go with it
(their repmgr state would otherwise believe in a role nobody keeps up to date: split brain,
docs/berkeleydb.md) and the cage restarts from a new replication process, which recovers.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import threading
import time
from dataclasses import dataclass
from queue import SimpleQueue

from pmnc.safe import Safe, SafeError

from . import logs
from .config import CageConfig, NodeConfig
from .group import safe_replication
from .logs import logger
from .worker import EXIT_NEEDS_RECOVERY, beat_interval

__all__ = ["ReplicatorSpec", "run"]

# How long it waits for a role (an election, a sync) once every safe has its data: past that it
# reports ready anyway, so the node serves reads while the group has no master.
READY_WAIT_S = 5.0


@dataclass(frozen=True)
class ReplicatorSpec:
    """What the replication process needs, built by the supervisor before fork."""

    config: NodeConfig
    cage: CageConfig
    modules: tuple[str, ...]
    report_fd: int
    inherited_fds: tuple[int, ...]


def run(spec: ReplicatorSpec) -> None:
    """The child's entry point: never returns into the parent's frames."""
    code = EXIT_NEEDS_RECOVERY
    try:
        code = _Replicator(spec).run()
    except BaseException:  # noqa: BLE001 - logged, then the unclean exit code below
        with contextlib.suppress(BaseException):
            logger.exception("replication process failed")
    finally:
        os._exit(code)


class _Replicator:
    def __init__(self, spec: ReplicatorSpec) -> None:
        self.spec = spec
        self.cfg = spec.config
        self.ppid = os.getppid()
        self.signals: SimpleQueue[int] = SimpleQueue()
        self.safes: list[Safe] = []
        self._report_lock = threading.Lock()

    def run(self) -> int:
        signal.set_wakeup_fd(-1)
        for fd in self.spec.inherited_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        os.set_blocking(self.spec.report_fd, False)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, lambda signum, _frame: self.signals.put_nowait(signum))
        logs.configure(f"{self.cfg.node}/{self.spec.cage.name}/replication")
        opening = threading.Event()
        beats = threading.Thread(target=self._beat_while, args=(opening,), daemon=True)
        beats.start()
        started = time.monotonic()
        try:
            self._open()
            self._await_roles()
        except SafeError as e:
            logger.error("cannot join the group: %s", e)
            return 0 if self._close() else EXIT_NEEDS_RECOVERY
        finally:
            opening.set()
            beats.join()
        roles = ", ".join(
            f"{module} {(safe.replication() or {}).get('role')}"
            for module, safe in zip(self.spec.modules, self.safes, strict=True)
        )
        logger.info("replicating: %s (in %.3f s)", roles or "-", time.monotonic() - started)
        self._report("ready")
        self._until_stopped()
        return 0 if self._close() else EXIT_NEEDS_RECOVERY

    def _open(self) -> None:
        for module in self.spec.modules:
            if not self.signals.empty():
                raise SafeError(self.cfg.data_dir, "start", "asked to stop")
            self.safes.append(
                Safe.open(
                    self.cfg.safe_dir(self.spec.cage.name, module),
                    durable=self.cfg.durable,
                    checkpoint_interval=self.cfg.checkpoint_interval,
                    recover=True,
                    create=True,
                    replication=safe_replication(self.cfg, self.spec.cage.name, module),
                )
            )

    def _await_roles(self) -> None:
        deadline = time.monotonic() + READY_WAIT_S
        while time.monotonic() < deadline and self.signals.empty():
            infos = [safe.replication() or {} for safe in self.safes]
            if all(i.get("role") == "master" or i.get("synced") for i in infos):
                return
            time.sleep(0.05)

    def _beat_while(self, done: threading.Event) -> None:
        interval = beat_interval(self.cfg.heartbeat_timeout)
        while not done.wait(interval):
            self._report("beat")

    def _until_stopped(self) -> None:
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        interval = beat_interval(self.cfg.heartbeat_timeout)
        while True:
            select.select([wake_r], [], [], interval)
            with contextlib.suppress(BlockingIOError):
                os.read(wake_r, 512)
            if not self.signals.empty():
                logger.info("stopping")
                return
            if os.getppid() != self.ppid or not self._report("beat"):
                logger.warning("the supervisor is gone: stopping")
                return

    def _report(self, message: str) -> bool:
        with self._report_lock:
            try:
                os.write(self.spec.report_fd, message.encode() + b"\n")
            except BlockingIOError:
                return True
            except OSError:
                return False
            return True

    def _close(self) -> bool:
        ok = True
        for safe in self.safes:
            try:
                safe.close()
            except SafeError as e:
                logger.error("closing %s: %s", safe.path, e)
                ok = False
        return ok
