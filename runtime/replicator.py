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

While it beats it also looks, every LAG_POLL_S, at each safe's master: a client safe knows
its own log position but not its master's, so a thread (never the beating loop: a peer that
does not answer costs it up to LAG_POLL_TIMEOUT_S) asks `GET /_status` of the same cage on the
master's node and writes what it read to the cage's `replication.json` (status.py), from which
`/_status`, `/metrics` and `pmnc-runtime status` show each safe's master node and lag.

Its workers then open the same safes as subordinates. It beats from a thread while it opens:
a site with no copy yet waits for the group's master to send one (up to a minute), and the
supervisor must not take that wait for a hang. If it dies, its cage's workers go with it
(their repmgr state would otherwise believe in a role nobody keeps up to date: split brain,
docs/berkeleydb.md) and the cage restarts from a new replication process, which recovers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import os
import select
import signal
import socket
import threading
import time
from dataclasses import dataclass
from queue import SimpleQueue
from typing import Any

from pmnc.safe import Replication, Safe, SafeError, SafeNotMasterError, is_safe

from . import child, logs, status
from .calls import master_route
from .config import CageConfig, HttpAddress, NodeConfig
from .group import node_of_site, safe_replication
from .logs import logger

__all__ = ["ReplicatorSpec", "run"]

# How long it waits for a role (an election, a sync) once every safe has its data: past that it
# reports ready anyway, so the node serves reads while the group has no master.
READY_WAIT_S = 5.0
# How often it asks each master's node for the master's log position, and how long it waits
# for an answer (the figure is shown with its age; a late one is worth less than the next).
LAG_POLL_S = 2.0
LAG_POLL_TIMEOUT_S = 1.0
# How long the look at a peer before creating a group may take (_join_if_the_group_runs).
JOIN_PROBE_S = 1.0
# How long the refuser waits for a connection, or for a request's bytes (_Refuser).
REFUSE_TICK_S = 0.2
# Between two attempts to join a group that no site of answers yet (_open).
JOIN_RETRY_S = 1.0


@dataclass(frozen=True)
class ReplicatorSpec:
    """What the replication process needs, built by the supervisor before fork."""

    config: NodeConfig
    cage: CageConfig
    modules: tuple[str, ...]
    report_fd: int
    inherited_fds: tuple[int, ...]
    # The cage's listening socket: answered 503 while the group is waited for (`_Refuser`).
    listener: socket.socket | None = None


def run(spec: ReplicatorSpec) -> None:
    """The child's entry point (child.main: it never returns)."""
    child.main(_Replicator(spec).run, "replication process")


class _Replicator:
    def __init__(self, spec: ReplicatorSpec) -> None:
        self.spec = spec
        self.cfg = spec.config
        self.ppid = os.getppid()
        self.signals: SimpleQueue[int] = SimpleQueue()
        self.pipe = child.Pipe(spec.report_fd)
        self.safes: list[Safe] = []
        self._waiting = False  # "waiting for the group" was logged

    def run(self) -> int:
        child.reset_after_fork(self.spec.report_fd, self.spec.inherited_fds, self.signals)
        logs.configure(f"{self.cfg.node}/{self.spec.cage.name}/replication")
        opening = threading.Event()
        beats = threading.Thread(target=self._beat_while, args=(opening,), daemon=True)
        beats.start()
        refuser = _Refuser(self.spec.listener, opening) if self.spec.listener else None
        started = time.monotonic()
        mismatch = self._check_peers_run_the_same_modules()
        if mismatch is not None:
            opening.set()
            beats.join()
            logger.error("not joining the group: %s", mismatch)
            self.pipe.send(f"boot-error {mismatch}")
            return child.EXIT_BOOT_FAILED
        try:
            if not self._open():
                logger.info("stopping before the group was joined")
                return 0 if child.close_safes(self.safes) else child.EXIT_NEEDS_RECOVERY
            self._await_roles()
        except SafeError as e:
            logger.error("cannot open the cage's safes: %s", e)
            # Not 0: the supervisor handles it as a crash (its cage restarts, backing off).
            return 1 if child.close_safes(self.safes) else child.EXIT_NEEDS_RECOVERY
        finally:
            opening.set()
            beats.join()
            if refuser is not None:
                refuser.join()
        roles = ", ".join(
            f"{module} {(safe.replication() or {}).get('role')}"
            for module, safe in zip(self.spec.modules, self.safes, strict=True)
        )
        logger.info("replicating: %s (in %.3f s)", roles or "-", time.monotonic() - started)
        self.pipe.send("ready")
        stopped = threading.Event()
        poller = threading.Thread(target=self._poll_lag, args=(stopped,), daemon=True)
        poller.start()
        try:
            self._until_stopped()
        finally:
            stopped.set()
            poller.join(LAG_POLL_TIMEOUT_S * 3)  # at most one request in flight
        return 0 if child.close_safes(self.safes) else child.EXIT_NEEDS_RECOVERY

    def _open(self) -> bool:
        """Open every safe of the cage (False: asked to stop first). A safe whose group cannot
        be joined yet (no site of it answers, or no master sends this site its copy) is
        waited for, as long as it takes: the node serves this cage once its group is there
        (README, "Replicated safes")."""
        for module in self.spec.modules:
            while True:
                if not self.signals.empty():
                    return False
                try:
                    self._open_one(module)
                    break
                except SafeNotMasterError as e:
                    if not self._waiting:
                        logger.warning("waiting for the group: %s", e)
                        self._waiting = True
                    time.sleep(JOIN_RETRY_S)
        return True

    def _open_one(self, module: str) -> None:
        """Open one safe of the cage with its Replication (see _join_if_the_group_runs)."""
        path = self.cfg.safe_dir(self.spec.cage.name, module)
        replication = safe_replication(self.cfg, self.spec.cage.name, module)
        if replication is not None and replication.creator and not is_safe(path):
            replication = self._join_if_the_group_runs(module, replication)
        self.safes.append(
            Safe.open(
                path,
                durable=self.cfg.durable,
                checkpoint_interval=self.cfg.checkpoint_interval,
                cache_size=self.cfg.cache_size,
                recover=True,
                create=True,
                replication=replication,
            )
        )

    def _join_if_the_group_runs(self, module: str, replication: Replication) -> Replication:
        """This node would create the group of a safe it has no copy of. If a peer already
        serves that safe with a master, the group exists and this node lost its copy (a new
        disk): join it instead of creating a second group (README, "Replicated safes")."""
        for peer in self.cfg.replication.peers if self.cfg.replication else ():
            address = peer.http.get(self.spec.cage.name)
            document = None if address is None else _peer_status(address)
            try:
                info = document["safes"][module]["replication"] if document else None
            except (KeyError, TypeError):
                continue
            if isinstance(info, dict) and info.get("master"):
                logger.warning(
                    "%s: no copy here, and node %s serves it with a master: joining the "
                    "group rather than creating one",
                    module,
                    peer.node,
                )
                return dataclasses.replace(replication, create_group=False)
        return replication

    def _check_peers_run_the_same_modules(self) -> str | None:
        """Why this node must not join its group, or None. Each safe's replication port follows
        from the node's sorted (cage, module) list (config.safe_sites): a node with one module
        more or less than its peers would join safes of *other* modules, and an internal init
        would copy one module's data over another's (found by review). So every cage that a
        peer serves now is compared, module by module; a peer not answering is not checked."""
        ours = {cage.name: set(self.cfg.module_names(cage)) for cage in self.cfg.cages}
        for peer in self.cfg.replication.peers if self.cfg.replication else ():
            for cage, address in peer.http.items():
                document = _peer_status(address)
                if document is None or not isinstance(document.get("safes"), dict):
                    continue
                theirs = set(document["safes"])
                if theirs and theirs != ours.get(cage):
                    return (
                        f"node {peer.node} runs cage {cage} with modules "
                        f"{', '.join(sorted(theirs))}, this node with "
                        f"{', '.join(sorted(ours.get(cage, ()))) or 'none'}: the nodes of a group "
                        "must run the same cages and modules (each safe's replication port "
                        "follows from them)"
                    )
        return None

    def _await_roles(self) -> None:
        deadline = time.monotonic() + READY_WAIT_S
        while time.monotonic() < deadline and self.signals.empty():
            infos = [safe.replication() or {} for safe in self.safes]
            if all(i.get("role") == "master" or i.get("synced") for i in infos):
                return
            time.sleep(0.05)

    def _beat_while(self, done: threading.Event) -> None:
        interval = child.beat_interval(self.cfg.heartbeat_timeout)
        while not done.wait(interval):
            self.pipe.send("beat")

    def _until_stopped(self) -> None:
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        interval = child.beat_interval(self.cfg.heartbeat_timeout)
        while True:
            select.select([wake_r], [], [], interval)
            with contextlib.suppress(BlockingIOError):
                os.read(wake_r, 512)
            if not self.signals.empty():
                logger.info("stopping")
                return
            if os.getppid() != self.ppid or not self.pipe.send("beat"):
                logger.warning("the supervisor is gone: stopping")
                return

    def _poll_lag(self, stopped: threading.Event) -> None:
        """Every LAG_POLL_S until `stopped`: the masters' log positions into replication.json."""
        path = status.run_dir(self.cfg, self.spec.cage.name) / status.REPLICATION_FILE
        entries: dict[str, dict[str, Any]] = {}
        for module in self.spec.modules:
            sites = node_of_site(self.cfg, self.spec.cage.name, module)
            entries[module] = {
                "sites": {f"{host}:{port}": node for (host, port), node in sites.items()},
                "master_site": None,
                "master_node": None,
                "master_lsn": None,
                "checked": None,
            }
        while True:
            try:
                self._look_at_masters(entries)
                status.write_json(
                    path, {"written": time.time(), "node": self.cfg.node, "safes": entries}
                )
            except OSError as e:
                logger.debug("looking at the masters' log positions: %s", e)
            except Exception:  # noqa: BLE001 - a bug here costs the lag figures, not the group
                logger.exception("looking at the masters' log positions")
            if stopped.wait(LAG_POLL_S):
                return

    def _look_at_masters(self, entries: dict[str, dict[str, Any]]) -> None:
        """Update each module's entry with its master's lsn: this site's own on the master,
        else asked of the master's node. An entry that could not be updated keeps its last
        figure and time (shown with its age), or its master site if the master changed."""
        # Each safe's role and master come from the workers' reports (status.py, a second old
        # at most), not from this process's safes: this thread adds no libdb calls of its own
        # next to the repmgr threads and the safes' maintenance threads this process runs.
        try:
            own = status.cage_status(status.run_dir(self.cfg, self.spec.cage.name))
        except status.NotRunningError:
            return
        documents: dict[str, dict[str, Any] | None] = {}  # one /_status per node and round
        for module in self.spec.modules:
            entry = entries[module]
            info = own["safes"].get(module, {}).get("replication") or {}
            site = info.get("master")
            node = entry["sites"].get(site) if isinstance(site, str) else None
            if node is None:
                continue  # no master known: the last figure stays, with its age
            if node == self.cfg.node:
                if info.get("role") == "master":
                    entry.update(
                        master_site=site, master_node=node, master_lsn=info.get("lsn"),
                        checked=time.time(),
                    )  # fmt: skip
                continue
            if node not in documents:
                documents[node] = self._status_of(node)
            document = documents[node]
            theirs = (document or {}).get("safes", {}).get(module, {}).get("replication") or {}
            if theirs.get("role") == "master" and theirs.get("lsn") is not None:
                entry.update(
                    master_site=site, master_node=node, master_lsn=theirs["lsn"],
                    checked=time.time(),
                )  # fmt: skip

    def _status_of(self, node: str) -> dict[str, Any] | None:
        """`GET /_status` of this cage on `node`, or None if it has no address or no answer
        within LAG_POLL_TIMEOUT_S."""
        address = master_route(self.cfg, node, self.spec.cage.name)
        if address is None:
            return None
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(address.host, address.host)
        conn = http.client.HTTPConnection(host, address.port, timeout=LAG_POLL_TIMEOUT_S)
        try:
            conn.request("GET", status.STATUS_PATH)
            response = conn.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException) as e:
            logger.debug("asking node %s for its status: %s", node, e)
            return None
        finally:
            conn.close()
        try:
            document = json.loads(body)
        except ValueError:
            return None
        if response.status != 200 or not isinstance(document, dict):
            return None
        return document if document.get("node") == node else None


def _peer_status(address: HttpAddress) -> dict[str, Any] | None:
    """A peer cage's `/_status` document, or None if it does not answer (JOIN_PROBE_S)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(address.host, address.host)
    conn = http.client.HTTPConnection(host, address.port, timeout=JOIN_PROBE_S)
    try:
        conn.request("GET", status.STATUS_PATH)
        document = json.loads(conn.getresponse().read())
    except (OSError, http.client.HTTPException, ValueError):
        return None
    finally:
        conn.close()
    return document if isinstance(document, dict) else None


class _Refuser:
    """While the replication process waits for its group, nobody serves the cage's port: the
    workers start only once it is ready. Rather than leave callers hanging in the listen
    queue, a thread answers each of them 503 GroupNotFormed (and closes) until the process is
    ready; it stops before "ready" is sent, so it never takes a connection from a worker."""

    def __init__(self, listener: socket.socket, done: threading.Event) -> None:
        self._listener = listener
        self._done = done
        self._thread = threading.Thread(target=self._run, name="refuse until ready", daemon=True)
        self._thread.start()

    def join(self) -> None:
        self._thread.join(REFUSE_TICK_S * 4)

    def _run(self) -> None:
        while not self._done.is_set():
            readable, _, _ = select.select([self._listener], [], [], REFUSE_TICK_S)
            if not readable or self._done.is_set():
                continue
            try:
                conn, _ = self._listener.accept()
            except OSError:
                continue  # another process took it, or it went away
            with conn:
                _refuse(conn)


def _refuse(conn: socket.socket) -> None:
    """Answer one connection 503 and close it after reading what it sent (a close with unread
    bytes would reset the connection and lose the answer)."""
    body = json.dumps(
        {"error": "GroupNotFormed: this node is waiting for its group; no cage serves yet"}
    ).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
    )
    try:
        conn.setblocking(True)
        conn.settimeout(REFUSE_TICK_S)
        with contextlib.suppress(OSError):
            conn.recv(65536)  # the request, or what arrived of it
        conn.sendall(head.encode() + body)
        conn.shutdown(socket.SHUT_WR)
        with contextlib.suppress(OSError):
            while conn.recv(65536):
                pass
    except OSError:
        pass
