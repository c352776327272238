"""The supervisor: one foreground process that owns a node's workers.

The flow, one way only (nothing downstream reaches back up):

    CLI (`pmnc-runtime start CONFIG`) -> validated NodeConfig
    -> supervisor: for every cage and module, `pmnc.safe.prepare()` creates or recovers the
       module's environment *in this one process* (the region creator: cache size, deadlock
       detector), leaving no handle open; bind each cage's listening socket once
    -> fork `workers` children per cage (multiprocess's fork context, never the platform
       default), each a direct child accepting on its cage's socket
    -> worker: opens its own Safe handles after fork, loads the modules with `pmnc_safe` bound
       -> `threads` HTTP threads -> Safe -> Berkeley DB.

The main loop is single-threaded (it forks: never fork a threaded process). Signal handlers only
enqueue (SimpleQueue.put_nowait is reentrant) and `signal.set_wakeup_fd` wakes the loop's
poll(); the loop dispatches each signal through an explicit table. Children are reaped in a
`waitpid(-1, WNOHANG)` loop (gunicorn moved reaping out of its SIGCHLD handler: logging there
can deadlock).

Why a crash restarts the whole cage: a process that dies inside a Berkeley DB call leaves page
locks held, and the other workers of its environments block on them forever (a lock timeout
does not free them: docs/berkeleydb.md, "Why the supervisor kills the rest of the cage"). Every
worker opens every module safe of its cage, so on any unclean exit (a signal, kill -9, a
non-zero status, EXIT_NEEDS_RECOVERY) the supervisor SIGKILLs the rest of the cage at once,
reaps them, recovers each of the cage's safes with `prepare()` (0.02-0.1 s), and forks fresh
workers. Recovery must come *before* any new worker joins: with DB_REGISTER a joiner that meets
a dead registrant panics everyone (docs/berkeleydb.md, "Recovery after kill -9"). A clean exit
(status 0: every safe closed) needs none of this.

Restarts back off exponentially while a cage keeps dying; a worker that cannot boot (a module
fails to import) stops the node instead of crash-looping; a worker whose heartbeats stop for
`heartbeat_timeout` is SIGKILLed and handled as a crash. SIGTERM/SIGINT stop gracefully
(escalating to SIGKILL at the deadline), a second SIGINT at once; SIGHUP reloads the config and
the modules by starting a new generation of workers on the same sockets and retiring the old
one only when the new one serves.

Live status: each worker holds a slot (0..workers-1) of its cage; the supervisor counts the
restarts of each slot and, whenever its set of live workers changes, rewrites the cage's
`cage.json` under `<data_dir>/run/` (in the loop, one small atomic write: no thread). Workers
write their own figures next to it; `GET /_status` and `pmnc-runtime status` combine them
(`status.py` says why files).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from queue import SimpleQueue
from typing import Any

import multiprocess
import multiprocess.process
from pmnc.safe import SafeError, prepare

from . import child, logs, metrics, policy, replicator, status, worker
from .balance import ABSENT, Balance
from .config import CageConfig, ConfigError, HttpAddress, NodeConfig, load_config
from .logs import logger

__all__ = ["EXIT_FAILED", "Supervisor", "bind"]

EXIT_FAILED = 3  # an operational failure: a worker cannot boot, a safe cannot be prepared
EXIT_INTERRUPTED = 130  # a second SIGINT: stopped at once
CLOSE_GRACE = 5.0  # beyond graceful_timeout, for a worker to close its safes


def bind(address: HttpAddress) -> socket.socket:
    """The cage's listening socket, bound once; every worker of the cage accepts on it."""
    family, kind, proto, _, sockaddr = socket.getaddrinfo(
        address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(1024)
        # Shared by many processes: each waits in poll() and a lost race raises BlockingIOError
        # instead of blocking in accept() while another worker took the connection.
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass(eq=False)
class _Cage:
    """One cage of one generation of the config, and the state of its restarts."""

    config: CageConfig
    modules: tuple[str, ...]
    safe_dirs: tuple[Path, ...]
    listener: socket.socket | None
    run_dir: Path  # where its live status reports go
    balance: Balance  # connections per worker slot, shared with its workers (balance.py)
    health: policy.CageHealth = field(default_factory=policy.CageHealth)  # restarts, up/down

    @property
    def name(self) -> str:
        return self.config.name


@dataclass(eq=False)
class _Child:
    """The supervisor's record of one forked worker process (`worker.py` is what runs in it)."""

    pid: int
    cage: _Cage
    process: Any  # multiprocess.Process, kept for its descriptors' lifetime
    report_fd: int
    last_beat: float
    slot: int
    started: float  # wall-clock time of the fork, for the status's uptime
    ready: bool = False
    stop_deadline: float | None = None  # SIGTERM sent: must be gone by then
    kill_reason: str | None = None  # why the supervisor SIGKILLed it
    inbox: bytes = b""
    boot_error: str | None = None
    replicator: bool = False  # the cage's replication process (replicator.py), not a worker


@dataclass
class _Reload:
    config: NodeConfig
    cages: dict[str, _Cage]
    new_listeners: list[socket.socket] = field(default_factory=list)


def _clear_reports(directory: Path) -> None:
    """Remove status reports a previous run of the node left (it was killed: nobody cleaned)."""
    for path in [*directory.glob("*.json"), *directory.glob(".*.tmp")]:
        with contextlib.suppress(OSError):
            path.unlink()


class Supervisor:
    """Runs a node until it is stopped; `run()` returns the process's exit status."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self._ctx = multiprocess.get_context("fork")
        self._cages: dict[str, _Cage] = {}
        self._workers: dict[int, _Child] = {}
        # On a replicated node, each cage's replication process: started before its workers,
        # stopped after them, and a member of the cage for crashes (replicator.py says why).
        self._replicators: dict[int, _Child] = {}
        self._signals: SimpleQueue[int] = SimpleQueue()
        self._sig_r, self._sig_w = -1, -1
        self._stopping = False
        self._exit_code = 0
        self._announced = False
        self._reload: _Reload | None = None
        self._reload_retries = 0  # reloads restarted in a row because a cage crashed meanwhile
        self._restarts: dict[tuple[str, int], int] = {}  # (cage, slot) -> workers replaced
        self._status_dirty = False  # the set of live workers changed since the last cage.json
        self._status_files: set[Path] = set()  # cage.json files written, removed at exit
        self._status_failing = False
        # Per run directory (a reloaded cage keeps its own): what departed workers counted.
        self._totals: dict[Path, metrics.CageTotals] = {}
        self._totals_failing = False
        self._dispatch: dict[int, Callable[[], None]] = {
            signal.SIGTERM: self._on_sigterm,
            signal.SIGINT: self._on_sigint,
            signal.SIGHUP: self._on_sighup,
            signal.SIGCHLD: self._reap,
        }

    # -- start and main loop --------------------------------------------------------------------

    def run(self) -> int:
        logs.configure(self.config.node)
        logger.info("starting node %s from %s", self.config.node, self.config.file)
        try:
            self._cages = self._prepare_cages(self.config, {})
        except (SafeError, OSError) as e:
            logger.error("cannot start: %s", e)
            return EXIT_FAILED
        for cage in self._cages.values():
            _clear_reports(cage.run_dir)  # left by a node that was killed
        self._install_signals()
        try:
            for cage in self._cages.values():
                self._fill(cage)
            self._write_status()  # before any worker can answer /_status
            while self._workers or self._replicators or not self._stopping:
                self._tick()
        finally:
            self._kill_all("supervisor exiting")
            for cage in self._cages.values():
                if cage.listener is not None:
                    cage.listener.close()
            for path in self._status_files:
                with contextlib.suppress(OSError):
                    path.unlink()
            for totals in self._totals.values():
                totals.remove()
        logger.info("stopped (exit status %d)", self._exit_code)
        return self._exit_code

    def _prepare_cages(
        self,
        config: NodeConfig,
        current: dict[str, _Cage],
        in_use: frozenset[Path] = frozenset(),
    ) -> dict[str, _Cage]:
        """Prepare every safe not `in_use` and bind every new listening socket of `config`.

        `prepare()` opens with DB_RECOVER: it must never run on a safe a worker still has open
        (or a worker that died but is not reaped yet had open). Recovery under a live process
        leaves it running in the removed region (docs/berkeleydb.md, "Recovery after kill -9"),
        and prepare has no lock timeout, so this single-threaded loop could hang on a live
        worker's lock. A safe in use was prepared before its workers were forked, so there is
        nothing to do for it.

        Listening sockets of `current` cages with an unchanged address are reused, so a reload
        never closes a socket clients are connecting to. Raises SafeError or OSError, having
        closed whatever it bound.
        """
        cages: dict[str, _Cage] = {}
        bound: list[socket.socket] = []
        try:
            for cage_cfg in config.cages:
                modules = tuple(config.module_names(cage_cfg))
                dirs = tuple(config.safe_dir(cage_cfg.name, m) for m in modules)
                # A replicated safe is created or recovered by its cage's replication process
                # (only the group's master may create it; replicator.py).
                todo = [] if config.replication else [d for d in dirs if d not in in_use]
                spent = sum(prepare(d, cache_size=config.cache_size) for d in todo)
                old = current.get(cage_cfg.name)
                listener = None
                if old is not None and old.config.http == cage_cfg.http:
                    listener = old.listener
                elif cage_cfg.http is not None:
                    listener = bind(cage_cfg.http)
                    bound.append(listener)
                reports = status.run_dir(config, cage_cfg.name)
                reports.mkdir(parents=True, exist_ok=True)
                cages[cage_cfg.name] = _Cage(
                    cage_cfg, modules, dirs, listener, reports, Balance(cage_cfg.workers)
                )
                skipped = 0 if config.replication else len(dirs) - len(todo)
                logger.info(
                    "cage %s: %d module(s) %s, %s%s",
                    cage_cfg.name,
                    len(modules),
                    ", ".join(modules) or "-",
                    "safes replicated (opened by its replication process)"
                    if config.replication
                    else f"safes ready in {spent:.3f} s",
                    f" ({skipped} already open in running workers)" if skipped else "",
                )
        except BaseException:
            for sock in bound:
                sock.close()
            raise
        return cages

    def _install_signals(self) -> None:
        self._sig_r, self._sig_w = os.pipe()
        os.set_blocking(self._sig_r, False)
        os.set_blocking(self._sig_w, False)
        signal.set_wakeup_fd(self._sig_w)
        for signum in self._dispatch:
            signal.signal(signum, self._enqueue)

    def _enqueue(self, signum: int, _frame: object) -> None:
        """The only work done in a signal handler: everything else happens in the loop."""
        self._signals.put_nowait(signum)

    def _tick(self) -> None:
        poller = select.poll()
        poller.register(self._sig_r, select.POLLIN)
        by_fd = {w.report_fd: w for w in [*self._workers.values(), *self._replicators.values()]}
        for fd in by_fd:
            poller.register(fd, select.POLLIN)
        for fd, _ in poller.poll(self._timeout() * 1000):
            if fd == self._sig_r:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._sig_r, 4096)
            elif fd in by_fd:
                self._read_reports(by_fd[fd])
        while not self._signals.empty():
            self._dispatch[self._signals.get_nowait()]()
        self._reap()
        now = time.monotonic()
        self._check_liveness(now)
        self._start_due(now)
        self._check_ready(now)
        if self._status_dirty:
            self._write_status()

    def _timeout(self) -> float:
        """Sleep until the next deadline the loop must act on, TICK at most."""
        now = time.monotonic()
        due = [c.health.restart_at for c in self._cages.values()]
        due += [w.stop_deadline for w in [*self._workers.values(), *self._replicators.values()]]
        return policy.sleep_for(now, (d for d in due if d is not None))

    # -- messages from workers ----------------------------------------------------------------

    def _read_reports(self, w: _Child) -> None:
        try:
            data = os.read(w.report_fd, 65536)
        except BlockingIOError:
            return
        if not data:
            return  # the worker closed its end: it is exiting; reaping will tell why
        w.inbox += data
        *lines, w.inbox = w.inbox.split(b"\n")
        for line in lines:
            w.last_beat = time.monotonic()
            if line == b"ready":
                w.ready = True
                self._status_dirty = True
                if w.replicator:
                    self._on_replicator_ready(w)
            elif line == b"leaving" and w.stop_deadline is None:
                # It stops by itself (worker.py): its slot is refilled now, and its stop is
                # bounded like one the supervisor asked for.
                w.stop_deadline = time.monotonic() + self.config.graceful_timeout + CLOSE_GRACE
                self._status_dirty = True
                if not self._stopping:
                    self._schedule(w.cage, 0.0)
            elif line.startswith(b"boot-error "):
                w.boot_error = line[len(b"boot-error ") :].decode(errors="replace")

    # -- reaping and crashes ------------------------------------------------------------------

    def _reap(self) -> None:
        while True:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return  # ECHILD: no child left
            if pid == 0:
                return
            self._on_exit(pid, os.waitstatus_to_exitcode(wait_status))

    def _forget(self, w: _Child) -> None:
        self._workers.pop(w.pid, None)
        if not any(o.cage is w.cage and o.slot == w.slot for o in self._workers.values()):
            w.cage.balance.set(w.slot, ABSENT)  # no longer the least loaded: others accept
        self._status_dirty = True
        restarted = w.stop_deadline is None and not self._stopping
        if restarted:
            # Not asked to stop: its slot is refilled (at once, after a backoff or a recovery).
            key = (w.cage.name, w.slot)
            self._restarts[key] = self._restarts.get(key, 0) + 1
        # Its last report goes into the cage's totals before it is removed: `/metrics`
        # counters must not lose what this worker counted (metrics.py says why in this order).
        report = w.cage.run_dir / f"{w.pid}.json"
        self._count(w.cage.run_dir, lambda t: t.retire(report, restarted=restarted))
        with contextlib.suppress(OSError):
            while True:  # the last lines it wrote, e.g. its boot error
                data = os.read(w.report_fd, 65536)
                if not data:
                    break
                w.inbox += data
        for line in w.inbox.split(b"\n"):
            if line.startswith(b"boot-error "):
                w.boot_error = line[len(b"boot-error ") :].decode(errors="replace")
        os.close(w.report_fd)

    def _on_exit(self, pid: int, code: int) -> None:
        r = self._replicators.get(pid)
        if r is not None:
            self._on_replicator_exit(r, code)
            return
        w = self._workers.get(pid)
        if w is None:
            return  # not ours (already handled during a cage restart)
        self._forget(w)
        cage = w.cage
        what = policy.classify_exit(code, asked_to_stop=w.stop_deadline is not None)
        if what is policy.Exit.STOPPED:
            logger.info("cage %s: worker %d stopped", cage.name, pid)
        elif what is policy.Exit.REPLACE:
            logger.warning("cage %s: worker %d exited unasked: replacing it", cage.name, pid)
            self._schedule(cage, 0.0)
        elif what is policy.Exit.BOOT_FAILED:
            self._on_boot_failure(w)
        else:
            self._crash(cage, f"worker {pid} {policy.describe_exit(code, w.kill_reason)}")

    def _on_boot_failure(self, w: _Child) -> None:
        reason = w.boot_error or "see the worker's log above"
        action = policy.on_boot_failure(
            current=self._cages.get(w.cage.name) is w.cage,
            reloading=self._reload is not None and w.cage in self._reload.cages.values(),
        )
        if action is policy.BootFailure.IGNORE:
            return  # a generation already given up (a refused reload): nothing more to do
        if action is policy.BootFailure.REFUSE_RELOAD:
            logger.error(
                "reload refused: cage %s: worker %d could not boot: %s", w.cage.name, w.pid, reason
            )
            self._abort_reload()
            return
        logger.error(
            "cage %s: worker %d could not boot: %s: stopping the node (fix it and start again)",
            w.cage.name,
            w.pid,
            reason,
        )
        self._begin_stop(EXIT_FAILED)

    def _crash(self, cage: _Cage, what: str) -> None:
        """A worker of `cage` left locks behind: kill the rest of the cage, recover, restart."""
        started = time.monotonic()
        victims = [w for w in self._workers.values() if w.cage.name == cage.name]
        victims += [r for r in self._replicators.values() if r.cage.name == cage.name]
        for v in victims:
            v.kill_reason = f"restarting cage {cage.name}"
            with contextlib.suppress(ProcessLookupError):
                os.kill(v.pid, signal.SIGKILL)
        for v in victims:
            # A blocking wait, on purpose. SIGKILL cannot be caught, so it is short, except for
            # a worker in uninterruptible sleep (D state: a hung disk or NFS), which still holds
            # its mappings and its DB_REGISTER slot until it is really gone. Recovering before
            # that would recover under a live process (docs/berkeleydb.md, "Recovery after
            # kill -9"), and this cage cannot serve again until it is recovered anyway. A
            # bounded wait would only let the other cages go on meanwhile, at the price of a
            # "recovery pending" state that every path (reload, stop, a second crash) must
            # respect; not worth it so far.
            # Other children stay queued for the reap loop.
            with contextlib.suppress(ChildProcessError):
                os.waitpid(v.pid, 0)
            if v.replicator:
                self._replicators.pop(v.pid, None)
                os.close(v.report_fd)
            else:
                self._forget(v)
        dirs = set(cage.safe_dirs) | {
            d for c in self._generations() if c.name == cage.name for d in c.safe_dirs
        }
        # A replicated cage's safes are recovered by its next replication process (its open
        # is DB_REGISTER + DB_RECOVER, and only that process may open them first).
        todo = [] if self.config.replication else sorted(dirs)
        try:
            spent = sum(prepare(d, cache_size=self.config.cache_size) for d in todo)
        except SafeError as e:
            logger.error("cage %s: %s; recovery failed: %s: stopping the node", cage.name, what, e)
            self._begin_stop(EXIT_FAILED)
            return
        self._count(cage.run_dir, metrics.CageTotals.recovered)
        logger.warning(
            "cage %s: %s: killed %d other process(es), %s",
            cage.name,
            what,
            len(victims),
            f"recovered {len(todo)} safe(s) in {spent:.3f} s"
            if todo or not self.config.replication
            else f"its next replication process recovers its {len(dirs)} safe(s)",
        )
        if self._reload is not None and cage.name in self._reload.cages:
            self._abort_reload()
            if policy.retry_reload(self._reload_retries):
                # The crash was handled (killed, recovered); the reload the operator asked for
                # is started again rather than silently dropped.
                self._reload_retries += 1
                logger.error(
                    "reload abandoned: cage %s crashed meanwhile; reloading again", cage.name
                )
                self._signals.put_nowait(signal.SIGHUP)
            else:
                logger.error(
                    "reload abandoned: cage %s crashed meanwhile, %d times: send SIGHUP again",
                    cage.name,
                    policy.RELOAD_RETRIES + 1,
                )
        current = self._cages.get(cage.name)
        if self._stopping or current is None:
            return
        delay = current.health.crashed(time.monotonic(), started)
        if current.health.failures > 1:
            logger.warning(
                "cage %s keeps dying (%d crashes in a row): next start in %.1f s",
                cage.name,
                current.health.failures,
                delay,
            )
        self._schedule(current, delay)

    def _generations(self) -> Iterable[_Cage]:
        yield from self._cages.values()
        if self._reload is not None:
            yield from self._reload.cages.values()

    # -- starting workers ---------------------------------------------------------------------

    def _schedule(self, cage: _Cage, delay: float) -> None:
        cage.health.schedule(time.monotonic() + delay)

    def _start_due(self, now: float) -> None:
        if self._stopping:
            return
        for cage in self._cages.values():
            if cage.health.take_due(now):
                self._fill(cage)

    def _fill(self, cage: _Cage) -> None:
        """Fork workers until `cage` has as many running (not stopping) as configured; on a
        replicated node, only once the cage's replication process is ready (started first)."""
        if self.config.replication is not None:
            r = self._replicator_of(cage.name)
            if r is None:
                self._spawn_replicator(cage)
                return
            if not r.ready:
                return
        taken = {
            w.slot for w in self._workers.values() if w.cage is cage and w.stop_deadline is None
        }
        for slot in policy.free_slots(cage.config.workers, taken):
            self._spawn(cage, slot)

    def _spawn(self, cage: _Cage, slot: int) -> None:
        config = self._reload.config if self._reload and cage in self._reload.cages.values() else (
            self.config
        )  # fmt: skip

        def spec(report_w: int, inherited: tuple[int, ...]) -> worker.WorkerSpec:
            return worker.WorkerSpec(
                config=config,
                cage=cage.config,
                modules=cage.modules,
                listener=cage.listener,
                report_fd=report_w,
                inherited_fds=inherited,
                slot=slot,
                balance=cage.balance,
            )

        process, report_r = self._fork(worker.run, spec, f"pmnc-{cage.name}", keep=cage.listener)
        self._workers[process.pid] = _Child(
            process.pid, cage, process, report_r, time.monotonic(), slot, time.time()
        )
        self._status_dirty = True

    def _fork(
        self,
        target: Callable[[Any], None],
        spec: Callable[[int, tuple[int, ...]], Any],
        name: str,
        *,
        keep: socket.socket | None = None,
    ) -> tuple[Any, int]:
        """Fork a child running `target(spec(report_w, inherited))`: (its Process, the read end
        of its report pipe). It closes every descriptor of the supervisor's but its own pipe
        and `keep` (its cage's listening socket)."""
        # Never fork a threaded process: a lock held by another thread at fork time stays
        # locked forever in the child. An explicit check, not an assert (stripped under -O).
        threads = threading.active_count()
        if threads != 1:
            raise RuntimeError(
                f"the supervisor must stay single-threaded to fork workers: {threads} threads"
            )
        report_r, report_w = os.pipe()
        os.set_blocking(report_r, False)
        listeners = {c.listener for c in self._generations() if c.listener is not None}
        inherited = [self._sig_r, self._sig_w, report_r]
        inherited += [c.report_fd for c in [*self._workers.values(), *self._replicators.values()]]
        inherited += [s.fileno() for s in listeners if s is not keep]
        sys.stdout.flush()
        sys.stderr.flush()
        process = self._ctx.Process(
            target=target, args=(spec(report_w, tuple(inherited)),), name=name, daemon=False
        )
        try:
            process.start()
        finally:
            os.close(report_w)
        # The supervisor reaps with waitpid(-1): multiprocess must not poll (and so reap) this
        # child behind its back, which Process.start() does for every child in the private set
        # `_children` (its `_cleanup()`); a child it reaped would never reach _on_exit, so its
        # crash would go unhandled. Private on purpose: neither multiprocess nor multiprocessing
        # has a public "someone else reaps this child"; the crash tests fail if this stops
        # working (tests/integration/test_runtime_crash.py), and an AttributeError at the first
        # fork says so if the attribute is renamed.
        multiprocess.process._children.discard(process)
        return process, report_r

    # -- replication processes (a replicated node) ----------------------------------------------

    def _replicator_of(self, cage: str) -> _Child | None:
        return next((r for r in self._replicators.values() if r.cage.name == cage), None)

    def _spawn_replicator(self, cage: _Cage) -> None:
        def spec(report_w: int, inherited: tuple[int, ...]) -> replicator.ReplicatorSpec:
            return replicator.ReplicatorSpec(
                config=self.config,
                cage=cage.config,
                modules=cage.modules,
                report_fd=report_w,
                inherited_fds=inherited,
                listener=cage.listener,
            )

        process, report_r = self._fork(
            replicator.run, spec, f"pmnc-{cage.name}-rep", keep=cage.listener
        )
        self._replicators[process.pid] = _Child(
            process.pid, cage, process, report_r, time.monotonic(), -1, time.time(),
            replicator=True,
        )  # fmt: skip
        logger.info("cage %s: replication process %d started", cage.name, process.pid)

    def _on_replicator_ready(self, r: _Child) -> None:
        if self._stopping:
            return
        for cage in self._generations():
            if cage.name == r.cage.name:
                self._fill(cage)

    def _on_replicator_exit(self, r: _Child, code: int) -> None:
        self._replicators.pop(r.pid, None)
        os.close(r.report_fd)
        if code == child.EXIT_BOOT_FAILED and not self._stopping:
            # It refused to join (its group runs other modules): restarting cannot help.
            logger.error(
                "cage %s: replication process %d did not join its group: stopping the node "
                "(fix the config and start again)",
                r.cage.name,
                r.pid,
            )
            self._begin_stop(EXIT_FAILED)
            return
        if r.stop_deadline is not None and code == 0:
            logger.info("cage %s: replication process %d stopped", r.cage.name, r.pid)
            return
        what = f"replication process {r.pid} {policy.describe_exit(code, r.kill_reason)}"
        if r.stop_deadline is not None or self._stopping:
            logger.error("cage %s: %s while stopping", r.cage.name, what)
            return
        self._crash(r.cage, what)

    def _stop_idle_replicators(self) -> None:
        """While stopping: a cage's replication process goes once its workers are gone."""
        for r in list(self._replicators.values()):
            if r.stop_deadline is None and not any(
                w.cage.name == r.cage.name for w in self._workers.values()
            ):
                self._retire(r)

    # -- live status ----------------------------------------------------------------------------

    def _write_status(self) -> None:
        """Rewrite each cage's `cage.json`: which workers are live, since when, restarts."""
        self._status_dirty = False
        cages = {c.run_dir: c for c in self._generations()}  # a reloaded cage: the newer one
        live: dict[Path, list[dict[str, object]]] = {d: [] for d in cages}
        for w in sorted(self._workers.values(), key=lambda w: (w.slot, w.started)):
            if w.stop_deadline is None and w.kill_reason is None and w.cage.run_dir in live:
                live[w.cage.run_dir].append(
                    {
                        "pid": w.pid,
                        "slot": w.slot,
                        "started": w.started,
                        "restarts": self._restarts.get((w.cage.name, w.slot), 0),
                        "ready": w.ready,
                    }
                )
        try:
            for directory, cage in cages.items():
                path = directory / status.CAGE_FILE
                address = cage.config.http
                status.write_json(
                    path,
                    {
                        "node": self.config.node,
                        "cage": cage.name,
                        "address": None if address is None else str(address),
                        "supervisor_pid": os.getpid(),
                        "workers": live[directory],
                    },
                )
                self._status_files.add(path)
            gone = self._status_files - {d / status.CAGE_FILE for d in cages}
            for path in gone:
                with contextlib.suppress(OSError):
                    path.unlink()  # a cage a reload removed
            self._status_files -= gone
        except OSError as e:
            if not self._status_failing:
                logger.warning("cannot write the cages' status: %s", e)
            self._status_failing = True
            self._status_dirty = True  # try again next tick
        else:
            self._status_failing = False

    def _count(self, run_dir: Path, update: Callable[[metrics.CageTotals], None]) -> None:
        """Update a cage's `/metrics` totals; a failure to write them is logged once in a row
        (the reports not folded yet stay in place and are still counted)."""
        totals = self._totals.get(run_dir)
        if totals is None:
            totals = self._totals[run_dir] = metrics.CageTotals(run_dir)
        try:
            update(totals)
        except OSError as e:
            if not self._totals_failing:
                logger.warning("cannot write the cage's totals %s: %s", totals.path, e)
            self._totals_failing = True
        else:
            self._totals_failing = False

    # -- liveness and readiness ---------------------------------------------------------------

    def _check_liveness(self, now: float) -> None:
        if self._stopping:
            self._stop_idle_replicators()
        for w in [*self._workers.values(), *self._replicators.values()]:
            if w.kill_reason is not None:
                continue
            reason = policy.kill_reason(
                now,
                last_beat=w.last_beat,
                ready=w.ready,
                stop_deadline=w.stop_deadline,
                heartbeat_timeout=self.config.heartbeat_timeout,
            )
            if reason is not None:
                self._kill(w, reason)

    def _kill(self, w: _Child, reason: str) -> None:
        what = "replication process" if w.replicator else "worker"
        logger.error("cage %s: %s %d %s: killing it", w.cage.name, what, w.pid, reason)
        w.kill_reason = reason
        with contextlib.suppress(ProcessLookupError):
            os.kill(w.pid, signal.SIGKILL)

    def _check_ready(self, now: float) -> None:
        for cage in self._cages.values():
            ready = [
                w
                for w in self._workers.values()
                if w.cage is cage and w.ready and w.stop_deadline is None
            ]
            down = cage.health.observe(now, len(ready), cage.config.workers)
            if down is not None:
                logger.warning("cage %s: serving again, %.3f s after the crash", cage.name, down)
        if not self._announced and all(c.health.up for c in self._cages.values()):
            self._announced = True
            logger.info("ready: %s", self._describe_cages(self._cages.values()))
        reload = self._reload
        if reload is not None and all(
            sum(1 for w in self._workers.values() if w.cage is c and w.ready) >= c.config.workers
            for c in reload.cages.values()
        ):
            self._commit_reload(reload)

    @staticmethod
    def _describe_cages(cages: Iterable[_Cage]) -> str:
        parts = []
        for c in cages:
            where = f"http://{c.config.http}" if c.config.http else "no http"
            parts.append(
                f"cage {c.name} on {where} ({c.config.workers} worker(s) x "
                f"{c.config.threads} thread(s))"
            )
        return "; ".join(parts)

    # -- reload -------------------------------------------------------------------------------

    def _on_sighup(self) -> None:
        if self._stopping:
            return
        if self._reload is not None:
            logger.warning("SIGHUP: a reload is already in progress")
            return
        # A worker that died unasked is handled first, by the usual path (kill the rest of its
        # cage, reap, recover): the safes it had open must not be touched before that.
        self._reap()
        if self._stopping:
            return  # reaping found a worker that cannot boot: the node is stopping
        logger.info("SIGHUP: reloading %s", self.config.file)
        try:
            config = load_config(self.config.file)
        except ConfigError as e:
            for line in e.errors:
                logger.error("%s", line)
            logger.error("reload refused: the config does not validate; still running the old one")
            return
        replicated = config.replication is not None or self.config.replication is not None
        if replicated and (config.replication, config.safes()) != (
            self.config.replication,
            self.config.safes(),
        ):
            logger.error(
                "reload refused: a replicated node's replication section and set of cages "
                "and modules are fixed while it runs (each safe's replication port follows "
                "from them); stop the node to change them"
            )
            return
        # Every worker not reaped yet counts, live or not: one that dies after the _reap()
        # above is still here, and its safes wait for the crash path.
        in_use = frozenset(d for w in self._workers.values() for d in w.cage.safe_dirs)
        try:
            cages = self._prepare_cages(config, self._cages, in_use)
        except (SafeError, OSError) as e:
            logger.error("reload refused: %s; still running the old config", e)
            return
        current = {c.listener for c in self._cages.values()}
        new = [c.listener for c in cages.values() if c.listener and c.listener not in current]
        self._reload = _Reload(config, cages, new)
        for cage in cages.values():
            self._fill(cage)

    def _commit_reload(self, reload: _Reload) -> None:
        """The new generation serves: retire the old one (a graceful, clean stop)."""
        self._reload = None
        self._reload_retries = 0
        old = self._cages
        for w in list(self._workers.values()):
            if w.cage in old.values():
                self._retire(w)
        kept = {c.listener for c in reload.cages.values()}
        for cage in old.values():
            if cage.listener is not None and cage.listener not in kept:
                cage.listener.close()
        for cage in reload.cages.values():
            cage.health.up_since = time.monotonic()
        self.config = reload.config
        self._cages = reload.cages
        self._status_dirty = True
        logger.info("reloaded: %s", self._describe_cages(self._cages.values()))

    def _abort_reload(self) -> None:
        reload, self._reload = self._reload, None
        if reload is None:
            return
        for w in list(self._workers.values()):
            if w.cage in reload.cages.values():
                self._retire(w)
        for sock in reload.new_listeners:
            sock.close()

    # -- stopping -----------------------------------------------------------------------------

    def _retire(self, w: _Child) -> None:
        """Ask a worker to stop gracefully; it is killed if still there at the deadline."""
        if w.stop_deadline is not None or w.kill_reason is not None:
            return
        w.stop_deadline = time.monotonic() + self.config.graceful_timeout + CLOSE_GRACE
        with contextlib.suppress(ProcessLookupError):
            os.kill(w.pid, signal.SIGTERM)

    def _begin_stop(self, code: int) -> None:
        if not self._stopping:
            self._stopping = True
            self._exit_code = code
        self._abort_reload()
        for cage in self._cages.values():
            cage.health.cancel()
        for w in list(self._workers.values()):
            self._retire(w)

    def _on_sigterm(self) -> None:
        if not self._stopping:
            logger.info("SIGTERM: stopping gracefully (at most %g s)", self.config.graceful_timeout)
        self._begin_stop(self._exit_code)

    def _on_sigint(self) -> None:
        if not self._stopping:
            logger.info(
                "SIGINT: stopping gracefully (at most %g s; SIGINT again to stop at once)",
                self.config.graceful_timeout,
            )
            self._begin_stop(self._exit_code)
            return
        logger.warning("SIGINT again: stopping at once")
        self._exit_code = EXIT_INTERRUPTED
        self._kill_all("stopping at once")

    def _kill_all(self, reason: str) -> None:
        """SIGKILL every worker, reap them and recover their safes (they closed nothing)."""
        if not self._workers and not self._replicators:
            return
        victims = [*self._workers.values(), *self._replicators.values()]
        for v in victims:
            v.kill_reason = reason
            with contextlib.suppress(ProcessLookupError):
                os.kill(v.pid, signal.SIGKILL)
        dirs: set[Path] = set()
        for v in victims:
            # Blocking, as in _crash: the safes are recovered below, which must wait until
            # every process that had them open is gone (a D-state worker still has them).
            with contextlib.suppress(ChildProcessError):
                os.waitpid(v.pid, 0)
            if v.replicator:
                self._replicators.pop(v.pid, None)
                os.close(v.report_fd)
                continue
            self._forget(v)
            dirs.update(v.cage.safe_dirs)
        if self.config.replication is not None:
            dirs.clear()  # recovered by the next start's replication processes
        for d in sorted(dirs):
            try:
                prepare(d, cache_size=self.config.cache_size)
            except SafeError as e:
                logger.error("recovering %s: %s", d, e)
        logger.warning("killed %d worker(s), recovered %d safe(s)", len(victims), len(dirs))
