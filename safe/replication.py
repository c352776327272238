"""Replicated safes: joining a safe's environment to a group with Berkeley DB's replication
manager (repmgr), the configuration it needs and the state the rest of the store reads.

A replicated safe is one repmgr *site*: its own listening address, the same safe's sites on
the other nodes as peers. One site of the group is master (elected); the others are clients
that apply its log. What this module relies on is in docs/berkeleydb.md ("Replication"), each
fact with the test that proves it (tests/integration/test_replication_safe.py):

- The first process to call `repmgr_start` on an environment is its replication process
  (listener, elections, applying the master's log); later ones are subordinates (repmgr answers
  DB_REP_IGNORE) that send their own commits to the clients over their own connections. The
  replication process must not fork. Whoever opens first is therefore the replication process:
  under pmnc-runtime a dedicated child per cage, before any worker.
- Everything that shapes the region (ack policy, timeouts, event callback) is set before
  `open`, identically in every process: changing the ack policy on a live environment silently
  broke QUORUM in libdb 5.3.28.
- A commit that did not get its acknowledgements within the ack timeout still returns success;
  the only sign is DB_EVENT_REP_PERM_FAILED, delivered in the committing thread. `Replicated`
  keeps a per-thread flag that the funnel clears before a call and checks after it.
- libdb 5.3's repmgr never sets TCP_NODELAY: every acknowledged commit then waits for the
  peer's delayed ACK (~40 ms). `nodelay_sweep` sets it on this process's sockets (after a
  connection event, and on a timer for subordinates, which see few events).
- A write on a client raises DBAccessError (BDB0111); `rep_stat()` says who is master.
- libdb's elections do not fence an old master out: an acknowledged quorum write could be rolled
  back with no site lost. Such writes are confirmed with the peers first (safe/fence.py).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from berkeleydb import db

from .fence import CLIENT, MASTER, Fence, Responder, SiteState, state_of
from .layout import LOG_FILE_SIZE, publish

log = logging.getLogger("pmnc.safe")

ACK_POLICIES = {
    "quorum": db.DB_REPMGR_ACKS_QUORUM,  # a majority of the electable sites, this one included
    "all": db.DB_REPMGR_ACKS_ALL,  # every site of the group
    "one": db.DB_REPMGR_ACKS_ONE_PEER,  # at least one electable peer
    "none": db.DB_REPMGR_ACKS_NONE,  # no wait: a failover may lose the latest writes
}
# Timeouts in seconds (repmgr takes microseconds). Default ELECTION_RETRY (10 s) made a restart
# take 10-12 s; heartbeats are off by default, and without them a hung (SIGSTOPped) master is
# never replaced (docs/berkeleydb.md, "Replication"). CHECKPOINT_DELAY (default 30 s) is a pause
# libdb makes on a master in every checkpoint, between flushing its cache and logging the
# checkpoint, holding the checkpoint mutex: a safe's close (which checkpoints) then took 30 s,
# and every other checkpoint of the environment waited behind it (libdb's txn/txn_chkpt.c).
TIMEOUTS = {
    db.DB_REP_CHECKPOINT_DELAY: 0.0,
    db.DB_REP_ACK_TIMEOUT: 1.0,
    db.DB_REP_ELECTION_RETRY: 1.0,
    db.DB_REP_ELECTION_TIMEOUT: 0.5,
    db.DB_REP_CONNECTION_RETRY: 0.5,
    db.DB_REP_HEARTBEAT_SEND: 0.2,
    db.DB_REP_HEARTBEAT_MONITOR: 1.0,
}
START_THREADS = 3  # repmgr's message threads in the replication process
# repmgr_start in two sites joining at the same instant: one gets DB_REP_UNAVAIL, then succeeds.
START_RETRY_S = 0.1
START_TIMEOUT_S = 10.0
# How long a subordinate's open waits for its own connections to the peers (see above).
SUBORDINATE_CONNECT_S = 3.0
# How long a site that won an election counts as about to declare itself master when it never
# says it became master (safe/fence.py). A takeover can come to nothing without a word (libdb
# returns from it silently when another thread holds the message lockout: rep_method.c), and no
# state that a process can read tells a takeover under way from one given up: it waits for
# messages, calls and transactions in flight to drain, sleeping a whole second per look (a
# transaction that begins without waiting proves nothing: the takeover's first lockout holds
# messages only). Every wait it makes is bounded by pmnc's own bounds on calls (`timeout`) and
# lock waits, far below this; a site whose takeover outlives it is logged.
TAKEOVER_S = 30.0
# Where a master's replication process publishes the peers' election generations it saw
# settled (safe/fence.py, `Fence.observe`), and how often it looks, on a thread of its own (a
# look at silent peers lasts up to a second, which maintenance must not wait out).
FENCE_FILE = "repmgr.fence"
FENCE_OBSERVE_S = 1.0
# Where the replication process publishes the sites it is connected to (check_connections).
PEERS_FILE = "repmgr.peers"


@dataclass(frozen=True)
class Replication:
    """How one safe joins its group: its own site address, the same safe's sites elsewhere.

    `ack` is one of ACK_POLICIES; `priority` 0 means never master. Exactly one site of a new
    group creates it: the one whose address sorts first among `local` and `peers`, so every
    node decides the same without talking (later starts join the existing group), unless
    `create_group` says otherwise (False: only join, for a site that lost its data while the
    group goes on; libdb ignores it for a site that is a member already).
    """

    local: tuple[str, int]
    peers: tuple[tuple[str, int], ...] = ()
    ack: str = "quorum"
    priority: int = 100
    create_group: bool | None = None

    def __post_init__(self) -> None:
        if self.ack not in ACK_POLICIES:
            raise ValueError(f"ack: expected one of {', '.join(ACK_POLICIES)}, got {self.ack!r}")
        if not 0 <= self.priority <= 1_000_000:
            raise ValueError(f"priority: expected 0..1000000, got {self.priority!r}")
        if self.local in self.peers:
            raise ValueError(f"peers: {self.local} is this site's own address")

    @property
    def creator(self) -> bool:
        if self.create_group is not None:
            return self.create_group
        return self.local == min((self.local, *self.peers))


# Per thread: writes committed on replicated safes (see `writes_committed`).
_committed = threading.local()


def writes_committed() -> int:
    """How many writes this thread has committed on replicated safes, ever.

    For whoever re-runs a call elsewhere when a write meets a client safe (SafeNotMasterError):
    if this count moved since the call began, the call already changed a safe and must not be
    run again (pmnc-runtime answers 500 PartiallyWritten instead: runtime/group.py)."""
    return int(getattr(_committed, "n", 0))


class Replicated:
    """The replication state of one environment in this process: role, events, per-thread
    "not acknowledged" flags. Created before the environment is opened."""

    def __init__(self, config: Replication, path: Path) -> None:
        self.config = config
        self.path = path
        self.name = path.name
        self.primary = False  # this process is the environment's replication process
        self._thread = threading.local()
        self._lock = threading.Lock()
        self.perm_failed = 0
        self.role_changes = 0
        self._swept: set[str] = set()
        self.sweep_due = True  # a connection was made since the last sweep
        # Set while this process has its own connection to every peer its replication process
        # is connected to (always, in the replication process): a subordinate's commit made
        # before gets no acknowledgement, so writes wait for it, boundedly (before_write).
        self.connected = threading.Event()
        self.connected.set()
        self._published: frozenset[int] | None = None
        self.unconnected_since: float | None = None  # monotonic time `connected` was cleared
        self.formed = False  # the group has the sites its ack policy needs (`missing_sites`)
        # Quorum writes are confirmed with the peers before they count as acknowledged
        # (safe/fence.py); the replication process answers the peers' questions.
        fenced = config.ack == "quorum" and len(config.peers) >= 2
        self.fence = Fence(config.peers, path / FENCE_FILE) if fenced else None
        self._responder: Responder | None = None
        self._observer: threading.Thread | None = None
        self._stop = threading.Event()
        # An election this site won and has not yet followed by becoming master: it may still
        # declare itself, whatever it follows now (safe/fence.py). Known from this process's
        # events (the replication process runs the elections), and from the count of elections
        # won as of the last DB_EVENT_REP_ELECTED seen (or of the start), which libdb raises a
        # moment before the event fires (`own_state`).
        self._won_base = 0
        self._elected = 0  # DB_EVENT_REP_ELECTED seen here
        self._elected_seen = 0  # ... as of the last `own_state`
        self._taking_over: float | None = None  # since when (monotonic), until DB_EVENT_REP_MASTER

    # -- before open ------------------------------------------------------------------------------

    def configure(self, env: Any) -> None:
        env.set_event_notify(self._on_event)
        env.repmgr_set_ack_policy(ACK_POLICIES[self.config.ack])
        env.rep_set_priority(self.config.priority)
        for which, seconds in TIMEOUTS.items():
            env.rep_set_timeout(which, int(seconds * 1_000_000))

    # -- after open ------------------------------------------------------------------------------

    def start(self, env: Any) -> None:
        """Configure the sites and start repmgr: the first process becomes the replication
        process, later ones subordinates. Raises the Berkeley DB error if it cannot start."""
        host, port = self.config.local
        site = env.repmgr_site(host, port)
        try:
            site.set_config(db.DB_LOCAL_SITE, 1)
            if self.config.creator:
                site.set_config(db.DB_GROUP_CREATOR, 1)
        finally:
            site.close()
        for host, port in self.config.peers:
            site = env.repmgr_site(host, port)
            try:
                site.set_config(db.DB_BOOTSTRAP_HELPER, 1)
            finally:
                site.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        self._won_base = int(env.rep_stat()["elections_won"])
        while True:
            try:
                env.repmgr_start(START_THREADS, db.DB_REP_ELECTION)
            except db.DBRepUnavailError:
                if time.monotonic() > deadline:
                    raise  # no site of the group to join through: env.py says so
                time.sleep(START_RETRY_S)
                continue
            except db.DBError as e:
                if e.args and e.args[0] == db.DB_REP_IGNORE:
                    self.primary = False  # another process runs replication: a subordinate
                    # Until it has its own connections to the sites the replication process
                    # reaches, and to as many as a write needs acknowledgements from: the
                    # replication process may not have published its own yet (a subordinate
                    # opened 0.01 s after it, with none, had its first commit come back not
                    # acknowledged at once, in a run of the suite twice at once).
                    deadline = time.monotonic() + SUBORDINATE_CONNECT_S
                    while time.monotonic() < deadline and (
                        not self.check_connections(env)
                        or len(_connected(env)) < self.peers_needed()
                    ):
                        time.sleep(0.02)
                    return
                raise
            self.primary = True
            self._answer_fences(env)
            return

    def _observe(self, env: Any, fence: Fence) -> None:
        """The replication process's look at the peers every FENCE_OBSERVE_S while this site is
        master: see them settled and note it for the site's processes (`Fence.observe`)."""
        while not self._stop.wait(FENCE_OBSERVE_S):
            try:
                own = self.state(env)
                if own.role == MASTER:
                    fence.observe(own.gen, lambda: self.state(env))
            except db.DBError as e:
                log.debug("%s: fence observation: %s", self.name, e)

    def _answer_fences(self, env: Any) -> None:
        if self.fence is not None:
            self._observer = threading.Thread(
                target=self._observe, args=(env, self.fence), name="pmnc-fence-observe", daemon=True
            )
            self._observer.start()
        try:
            self._responder = Responder(self.config.local, lambda: self.own_state(env))
        except OSError as e:
            # The peers then count this site as silent: their quorum writes are confirmed by
            # the others, or reported not acknowledged.
            log.warning(
                "%s: cannot answer the peers' fence questions on %s: %s",
                self.name,
                self.config.local,
                e,
            )

    def close(self) -> None:
        """Stop answering the peers and asking them (the environment is closing)."""
        self._stop.set()
        if self._observer is not None:
            self._observer.join(timeout=5.0)
            self._observer = None
        if self._responder is not None:
            self._responder.close()
            self._responder = None
        if self.fence is not None:
            self.fence.close()

    def check_connections(self, env: Any) -> bool:
        """Whether this process has its own connection to every site the environment's
        replication process is connected to; sets or clears `connected`.

        A process's commits go out over its own connections, and one made before they exist
        gets no acknowledgement; libdb 5.3 gives a subordinate no connection to a site that
        joined the group after the subordinate started (measured: a master's workers started
        before its peers joined stayed at 0 connections and every commit raised PERM_FAILED;
        tests/integration/test_group.py). `repmgr_site_list()` is each process's own view, so
        the replication process publishes its connected sites in PEERS_FILE (`_publish`)
        and subordinates compare."""
        own = _connected(env)
        if self.primary:
            self._publish(own)
            return True
        try:
            wanted = frozenset(int(p) for p in (self.path / PEERS_FILE).read_text().split())
        except (OSError, ValueError):
            wanted = frozenset()
        if wanted <= own:
            self.unconnected_since = None
            self.connected.set()
            return True
        if self.unconnected_since is None:
            self.unconnected_since = time.monotonic()
        self.connected.clear()
        return False

    def _publish(self, ports: frozenset[int]) -> None:
        if ports == self._published:
            return
        target = self.path / PEERS_FILE
        try:
            publish(target, sorted(ports))
        except OSError as e:
            log.warning("%s: cannot write %s: %s", self.name, target, e)
            return
        self._published = ports

    def peers_needed(self) -> int:
        """How many peers must acknowledge a write under the ack policy."""
        peers = len(self.config.peers)
        return {"quorum": (peers + 1) // 2, "one": min(1, peers), "all": peers, "none": 0}[
            self.config.ack
        ]

    def unreachable(self, env: Any) -> str | None:
        """Why a commit by this process now could not be acknowledged, or None: it has fewer
        connections of its own than the ack policy needs peers (its commits go out over its
        own connections only: `check_connections`). Such a commit would be certain to come back
        not acknowledged, its outcome unknown to the caller; refused before it, nothing is
        written (measured: a master's worker started before its peers joined, at 0
        connections, committed an increment that was not acknowledged; the runtime replaces
        such a worker within seconds, runtime/worker.py)."""
        needed = self.peers_needed()
        own = len(_connected(env))
        if own >= needed:
            return None
        return (
            f"this process has {own} connection(s) of its own to the group's sites, and ack "
            f'"{self.config.ack}" needs {needed}: its commit could not be acknowledged'
        )

    def missing_sites(self, env: Any) -> str | None:
        """Why a write on this master cannot meet the ack policy of the configured group yet,
        or None. repmgr counts a quorum among the sites that have *joined*: the first site
        of a new group, alone, is its own quorum and acknowledges every write by itself
        (measured: 200 under ack "quorum" with the other two nodes never started;
        tests/integration/test_group_faults.py). So a master refuses writes until the group
        has the sites the configured policy needs: a majority of the configured group for
        quorum, one peer for one, every peer for all. Sites never leave a group once joined,
        so `formed` is remembered."""
        if self.formed:
            return None
        peers = len(self.config.peers)
        needed = self.peers_needed()
        known = len(env.repmgr_site_list())
        if known >= needed:
            self.formed = True
            return None
        return (
            f"the group has not formed: {known} of its {peers} other site(s) have joined, and "
            f'ack "{self.config.ack}" needs {needed} before a write can be acknowledged'
        )

    # -- events (on a libdb thread, holding the GIL; an exception here is printed and lost) -----

    def _on_event(self, _env: Any, event: int, _info: Any) -> None:
        if event == db.DB_EVENT_REP_PERM_FAILED:
            self._thread.failed = True
            self.perm_failed += 1
        elif event == db.DB_EVENT_REP_CONNECT_ESTD:
            self.sweep_due = True
        elif event == db.DB_EVENT_REP_ELECTED:
            self._elected += 1
            self._taking_over = time.monotonic()
        elif event in (db.DB_EVENT_REP_MASTER, db.DB_EVENT_REP_CLIENT):
            if event == db.DB_EVENT_REP_MASTER:
                self._taking_over = None
            self.role_changes += 1
            if self.primary:
                role = "master" if event == db.DB_EVENT_REP_MASTER else "client"
                log.info("%s: this site is now %s", self.name, role)

    def clear(self) -> None:
        self._thread.failed = False

    def mark_write(self) -> None:
        """The call this thread is about to make writes (Environment.before_write)."""
        self._thread.writing = True

    def end_call(self) -> None:
        self._thread.writing = False

    def writing(self) -> bool:
        """Whether the call this thread is making writes (`mark_write`)."""
        return bool(getattr(self._thread, "writing", False))

    def committed(self) -> None:
        """The call this thread made succeeded: count it if it was a write."""
        if getattr(self._thread, "writing", False):
            self._thread.writing = False
            _committed.n = getattr(_committed, "n", 0) + 1

    def failed(self) -> bool:
        return bool(getattr(self._thread, "failed", False))

    # -- state -----------------------------------------------------------------------------------

    @staticmethod
    def state(env: Any) -> SiteState:
        return state_of(env.rep_stat())

    def own_state(self, env: Any) -> SiteState:
        """This site's state as the fence's peers need it: with `pending` (an election won, the
        site not yet master), which only the replication process knows.

        libdb counts a win (`elections_won`) a moment before DB_EVENT_REP_ELECTED fires, and
        the site already shows no election then (rep_elect.c): a count above the one at the
        last event seen is a win whose event is still to come. The state is read first and
        the event-side fields after, so an event that fires in between is seen either way."""
        st = env.rep_stat()
        won = int(st["elections_won"])
        elected, since = self._elected, self._taking_over
        if elected != self._elected_seen:
            self._elected_seen = elected
            self._won_base = won
        won_unseen = won > self._won_base
        if since is not None and time.monotonic() - since > TAKEOVER_S:
            log.warning(
                "%s: an election won %.0f s ago never made this site master; no longer counted "
                "as about to declare itself",
                self.name,
                time.monotonic() - since,
            )
            if self._taking_over == since:
                self._taking_over = None
            since = None
        return state_of(st, pending=since is not None or won_unseen)

    @staticmethod
    def is_master(env: Any) -> bool:
        return bool(env.rep_stat()["status"] == MASTER)

    def master(self, env: Any) -> tuple[str, int] | None:
        """The master site's address, or None while there is none (an election)."""
        st = env.rep_stat()
        if st["status"] == MASTER:
            return self.config.local
        if st["status"] != CLIENT or st["master"] < 0:
            return None
        entry = env.repmgr_site_list().get(st["master"])
        return (entry[0], int(entry[1])) if entry else None

    def info(self, env: Any) -> dict[str, Any]:
        """Role, master, log position and sync state, for status reports."""
        st = env.rep_stat()
        role = {MASTER: "master", CLIENT: "client"}.get(st["status"], "none")
        master = self.master(env)
        if role == "master":
            lsn = tuple(env.log_stat()[k] for k in ("cur_file", "cur_offset"))
        else:
            lsn = st["next_lsn"]
        sites = env.repmgr_site_list().values()
        connected = sum(1 for e in sites if e[2] == db.DB_REPMGR_CONNECTED)
        return {
            "role": role,
            "master": f"{master[0]}:{master[1]}" if master else None,
            "lsn": [int(lsn[0]), int(lsn[1])],
            "synced": role == "master" or bool(st["startup_complete"]),
            "queued": int(st["log_queued"]),
            "peers_connected": connected,
            # Seconds this process has lacked a connection of its own to a site the group's
            # replication process reaches (0: none lacking). libdb 5.3 gives a subordinate
            # process no connection to a site that joined the group after it started; the
            # runtime replaces a worker that stays so (runtime/worker.py).
            "unconnected_s": 0.0
            if self.unconnected_since is None
            else round(time.monotonic() - self.unconnected_since, 3),
            "peers": len(self.config.peers),
            "perm_failed": self.perm_failed,
            # Writes acknowledged by the group but not confirmed by the fence (safe/fence.py),
            # in this process.
            "fence_refused": 0 if self.fence is None else self.fence.refused,
            "elections": int(st["elections"]),
            # The group's generation this site follows, and its election generation: over
            # gen + 1 once it took part in an election since (safe/fence.py).
            "gen": int(st["gen"]),
            "election_gen": int(st["egen"]),
        }

    # -- TCP_NODELAY -----------------------------------------------------------------------------

    def nodelay_sweep(self) -> None:
        """Set TCP_NODELAY on this process's TCP sockets not seen before (repmgr's among them)."""
        self.sweep_due = False
        try:
            fds = os.listdir("/proc/self/fd")
        except OSError:
            return
        for fd in fds:
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if not target.startswith("socket:") or target in self._swept:
                continue
            self._swept.add(target)
            try:
                # A duplicate descriptor: the option is the socket's, the original stays repmgr's.
                sock = socket.socket(fileno=os.dup(int(fd)))
            except OSError:
                continue
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass  # not TCP (a pipe-like or UNIX socket)
            finally:
                sock.close()  # the duplicate only
        if len(self._swept) > 4096:
            self._swept.clear()


def _connected(env: Any) -> frozenset[int]:
    """Ports of the sites this process is connected to (its own view of the site list)."""
    return frozenset(
        int(entry[1])
        for entry in env.repmgr_site_list().values()
        if entry[2] == db.DB_REPMGR_CONNECTED
    )


def log_distance(ahead: tuple[int, int] | list[int], behind: tuple[int, int] | list[int]) -> int:
    """Bytes of log between two log positions (file number, offset) of the same safe: how far
    a client's `lsn` is behind its master's (README, "Replicated safes"). Whole files count as
    LOG_FILE_SIZE each (an estimate for a safe made with other log files); 0 if not behind."""
    (file_a, offset_a), (file_b, offset_b) = ahead, behind
    if (file_a, offset_a) <= (file_b, offset_b):
        return 0
    if file_a == file_b:
        return offset_a - offset_b
    return (file_a - file_b - 1) * LOG_FILE_SIZE + (LOG_FILE_SIZE - offset_b) + offset_a
