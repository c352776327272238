"""Berkeley DB environments: this process's handles on a safe, and the funnel every call takes.

One safe is one directory holding one Berkeley DB environment and one B-tree database. This
module owns the handles a `Safe` uses: flags, opening, the retry funnel through which every
operation passes, error translation, the per-process maintenance thread, and the rules for
handles across fork(). It, safe/admin.py (prepare, recover, verify, backup, restore: whole
safes, for supervisors and tools) and safe/replication.py (joining a group) are the only
modules that import the untyped `berkeleydb` binding; the directory's files and modes are
safe/layout.py's, the region reservation safe/regions.py's, the register reader
safe/register.py's, the counters safe/stats.py's. What it relies on is written down, each fact
with the test that proves it, in docs/berkeleydb.md
(and, for disk and per-call costs, docs/footprint.md):

- DB_REGISTER allows one DBEnv per process per environment, so a process keeps one
  `Environment` per directory in `_registry`, shared by every `Safe` opened on that path.
- A handle inherited across fork() must never be used, closed or garbage-collected by the child:
  doing so panics the parent's environment. The child therefore pins inherited handles forever
  (an extra reference that is never released) and forgets them.
- Lock timeouts are only evaluated when the deadlock detector runs, and a waiter blocked on a lock
  whose holder died is never woken otherwise: the maintenance thread runs the detector for expired
  lock requests every tick so that every lock wait is bounded. (A wait on a region mutex that a
  killed process held is not: libdb 5.3's mutexes are not robust; only killing the waiter ends it,
  which is what the runtime's supervisor does.)
- A file-backed region that grows on a full disk kills the process with SIGBUS. Region files
  therefore get their disk blocks reserved before libdb can touch them (safe/regions.py),
  lazily: the cache region only ever holds pages of the data file, so its reservation follows
  the data file's size (plus headroom), not the cache size; an idle safe stays small and a
  node's footprint follows its data, not its number of modules (docs/footprint.md,
  tests/integration/test_footprint.py).
  Writes are also refused with SafeNoSpaceError while free space is under a reserve.
- New databases get 16 KiB pages: values up to 4,078 bytes stay on their B-tree page, and
  longer ones go to LARGE_FILE, cut where its 4 KiB pages end (docs/footprint.md has the
  tables); an existing file keeps the page size it was created with.
- Checkpoints with DB_LOG_AUTO_REMOVE keep the logs, and recovery time, bounded.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import ctypes
import errno
import functools
import itertools
import logging
import os
import random
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from berkeleydb import db

from . import expiry as _expiry
from .errors import (
    SafeClosedError,
    SafeCorruptError,
    SafeError,
    SafeForkError,
    SafeGroupNotFormedError,
    SafeNeedsRecoveryError,
    SafeNoSpaceError,
    SafeNotAcknowledgedError,
    SafeNotMasterError,
    SafePermissionError,
    SafeTimeoutError,
)
from .fence import MASTER
from .layout import (
    AUX_FILE,
    DB_FILE,
    FILE_MODE,
    LARGE_FILE,
    LOG_FILE_SIZE,
    REGISTER_FILE,
    _check_directory,
    _lock_directory,
    _make_private,
    _private,
    log_bytes,
    region_bytes,
)
from .regions import _reserve_regions
from .register import _alive, _registrants
from .replication import Replicated, Replication
from .stats import _Stats
from .wake import Wake

log = logging.getLogger("pmnc.safe")

T = TypeVar("T")

# The expiry index and queues' B-trees in AUX_FILE (docs/queues.md). Small pages: its records
# are short (index entries, queue items of some hundred bytes).
AUX_PAGE_SIZE = 8 << 10
AUX_DATABASES = ("expiry", "queues")
# Every this many ticks the maintenance thread purges expired keys, for at most PURGE_BUDGET_S.
PURGE_TICKS = 5
PURGE_BUDGET_S = 0.05

ENV_FLAGS = (
    db.DB_CREATE
    | db.DB_INIT_LOCK
    | db.DB_INIT_LOG
    | db.DB_INIT_MPOOL
    | db.DB_INIT_TXN
    | db.DB_THREAD
    | db.DB_REGISTER
)
DB_OPEN_FLAGS = db.DB_THREAD | db.DB_AUTO_COMMIT

# A lock request waiting longer than this is expired by the maintenance thread's detector run and
# retried by the funnel; the caller's own deadline bounds the whole call.
LOCK_TIMEOUT_S = 0.5
# The same for a replicated safe: repmgr's own transactions share the lock table, and with
# 0.5 s a site joining a group waited 29 s instead of 0.06 s for its membership update
# (measured; tests/integration/test_replication_safe.py times a join).
REPLICATED_LOCK_TIMEOUT_S = 2.0
# The maintenance thread's period: it bounds how late an expired lock wait is noticed.
TICK_S = 0.1
# Checkpoint as soon as this much log was written since the last one, whatever the interval.
CHECKPOINT_KBYTES = 2 * 1024
# Backoff between retries of a deadlocked or expired operation (docs/berkeleydb.md, "Deadlocks,
# retries and DB_RMW").
BACKOFF_MAX_S = 0.05
# Every this many ticks, look for registered processes that died (see _check_registrants).
REGISTRANT_CHECK_TICKS = 3
# How long close() waits for calls still running in other threads before leaving the env open.
CLOSE_WAIT_S = 5.0
# Bytes a write path may add (counted twice: log and page) before it asks statvfs and extends
# the regions' reservation itself rather than waiting for the maintenance thread's next tick.
WRITTEN_REFRESH = 256 << 10
# One plain read in this many is timed (and counted by `call`); the others are only counted.
READ_SAMPLE_EVERY = 64
READ_SAMPLE_MASK = READ_SAMPLE_EVERY - 1  # a power of two: `n & mask` picks the sampled reads
# Page size of a database file this code creates (an existing file keeps its own). With long
# values cut into LARGE_FILE's pages, 16 KiB keeps the data file within 1.5x the payload from
# 100 B (keys in order) to 64 KiB. Smaller pages cannot: a value just over their on-page limit
# would leave most of a LARGE_FILE page empty. Larger ones hold readers behind a durable
# write's fsync on eight times the keys: the 90/10 mix at 4x8 was 0.69x raw with 32 KiB
# pages, 0.85-0.98x with 16 KiB (docs/footprint.md, "Page size").
PAGE_SIZE = 16 << 10
DBError = db.DBError  # for pmnc.safe.store's hot read path, which does not import the binding
# A value longer than a data-file page keeps on the page (`on_page_limit`) would take overflow
# pages of the data file's size, the last one mostly empty: a 4.1 KB value a whole 16 KiB page.
# Such values go to LARGE_FILE, a B-tree of LARGE_PAGE_SIZE pages, under the same key, and the
# data file's record begins with LARGE (docs/footprint.md, "Large values": about 1.04x the
# payload above the limit, against up to 4x). No pickle (0x80) or expiring record (0xFF)
# begins with 0xFE.
LARGE_PAGE_SIZE = 4 << 10
LARGE = b"\xfe"
# A long value is cut where LARGE_FILE's overflow pages end: the head fills whole pages there,
# the rest (under one page) stays in the data file's record after LARGE and a tag, on the page.
# So no page is left mostly empty (8.2 KB values: 1.52x the payload in three 4 KiB pages, 1.0x
# in two plus the tail). The tag, random and the same at the head of the LARGE_FILE record,
# says that a plain read's two lookups (no transaction spans them) found parts of one write.
# LARGE_PAGE_PAYLOAD is what a checksummed 4 KiB overflow page holds (measured: 8,128 bytes
# take two pages, 8,129 three; tests/unit/test_safe_large_values.py). A record that is LARGE
# alone, from a safe written before the cut, points to the whole value.
LARGE_PAGE_PAYLOAD = 4064
LARGE_TAG = 8
GONE = _expiry.wrap(b"", 0.0)
# Every this many ticks the maintenance thread looks at up to SWEEP_BATCH records of LARGE_FILE
# for ones whose key no longer points there (see Environment.sweep_large).
SWEEP_TICKS = 10
SWEEP_BATCH = 200
# After a whole pass that deleted nothing, the sweep rests this many of its rounds (60 s).
SWEEP_REST = 60

# What to do about an environment that needs recovery, in every message that says so.
RECOVERY_TODO = (
    "under pmnc-runtime the supervisor recovers it; standalone, exit every process using it: "
    "the next one to open it recovers it"
)

_RETRYABLE = (db.DBLockDeadlockError, db.DBLockNotGrantedError)
# A replicated environment's transient states, retried like a deadlock: internal init or a sync
# with a new master holds operations off (LOCKOUT), repmgr not ready yet (UNAVAIL).
_REP_RETRYABLE = (db.DBRepLockoutError, db.DBRepUnavailError)
# How long a replication process's open waits for its data file to arrive from the master
# (a new site joining an existing group) before giving up with a SafeError.
JOIN_TIMEOUT_S = 60.0
# How long it waits for a client's start-up sync when it has a copy already (then it serves it).
STARTUP_WAIT_S = 10.0
# Once the first ticks are past, TCP_NODELAY is looked for on new sockets this often (and at
# once after a connection event): subordinates see few events (safe/replication.py).
NODELAY_TICKS = 10
# How long a call waits for this process's own connections to the group's sites (see `call`).
PEER_CONNECT_WAIT_S = 2.0


@dataclass(frozen=True)
class Options:
    """How one `Safe` uses its environment; several Safes on one path may differ."""

    durable: bool
    timeout: float
    min_free_space: int


# The code of the Safe methods that use an environment outside its funnel's count (`call`):
# the hot reads (`[]`, `get`), and the writes' free-space check and group checks before their
# call. Counting a read's end cost it a tenth of its time (docs/footprint.md, "Per-call
# overhead"), so close() finds these in flight by looking at the threads' frames instead
# (`_threads_inside`). Each of them binds its environment to a local named `environment`
# before it checks `usable`, and touches the handles only in that frame (or in calls from it).
IN_FLIGHT: set[types.CodeType] = set()
# A transaction that only reads: its commit writes no log, so durability does not apply.
_READ_ONLY = Options(durable=False, timeout=0.0, min_free_space=0)


def _threads_inside(env: Environment) -> int:
    """Threads inside a Safe method that uses `env` uncounted: a frame of IN_FLIGHT whose
    `environment` is it.

    Sound for close(): such a method touches the handles only after it saw `usable` True,
    inside that frame; close() clears `usable` before it looks, so one that has not looked yet
    never will touch them, and one that has is found here until it returns."""
    n = 0
    me = threading.get_ident()
    for ident, frame in sys._current_frames().items():
        if ident == me:
            # close() itself may run inside a read of this thread (a signal handler, a
            # finalizer): that read's C call has returned, and the closed handles raise.
            continue
        f: types.FrameType | None = frame
        while f is not None:
            if f.f_code in IN_FLIGHT and f.f_locals.get("environment") is env:
                n += 1
                break
            f = f.f_back
    return n


def _peek(counter: itertools.count[int]) -> int:
    """The next value of an itertools.count, without consuming it."""
    return next(copy.copy(counter))


def _pin(obj: object) -> None:
    """Keep `obj` alive forever: its deallocation would close a Berkeley DB handle."""
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(obj))


def _open_env(
    path: Path,
    *,
    cache_size: int,
    recover: int,
    min_free_space: int,
    register: bool = True,
    replicated: Replicated | None = None,
) -> Any:
    """Open (creating if needed) the environment at `path` with our flags, or raise SafeError."""
    if min_free_space > 0:
        # Creating or recovering the regions writes mmapped files: on a full disk that is a
        # SIGBUS, so an open that might have to do it needs room for them first (what a new
        # environment reserves: docs/footprint.md).
        st = os.statvfs(path)
        needed = cache_size // 8 + (4 << 20)
        if st.f_bavail * st.f_frsize < needed:
            raise SafeNoSpaceError(
                path,
                "open",
                f"only {st.f_bavail * st.f_frsize >> 20} MiB free on the filesystem; opening may "
                f"need {needed >> 20} MiB for the environment's regions",
                "free disk space, then open it again",
            )
    env = db.DBEnv()
    try:
        # Region settings only take effect when the region is created; every opener sets the same
        # ones so that whoever creates it (supervisor or a standalone process) configures it.
        env.set_cachesize(cache_size >> 30, cache_size & ((1 << 30) - 1), 1)
        env.set_lk_detect(db.DB_LOCK_DEFAULT)
        lock_timeout = LOCK_TIMEOUT_S if replicated is None else REPLICATED_LOCK_TIMEOUT_S
        env.set_timeout(int(lock_timeout * 1_000_000), db.DB_SET_LOCK_TIMEOUT)
        # Applies to the next log file, also in an existing environment (docs/footprint.md).
        env.set_lg_max(LOG_FILE_SIZE)
        flags = ENV_FLAGS if register else ENV_FLAGS & ~db.DB_REGISTER
        if replicated is not None:
            # Before the open, identically in every process (safe/replication.py).
            replicated.configure(env)
            flags |= db.DB_INIT_REP
        # Log files get FILE_MODE exactly (libdb fchmods them), not 0600 cut by the umask: set
        # before the open for the logs recovery writes, and after it into the shared region,
        # which a region created by an older pmnc holds without it.
        env.set_lg_filemode(FILE_MODE)
        env.open(str(path), flags | recover, FILE_MODE)
        env.set_lg_filemode(FILE_MODE)
        env.log_set_config(db.DB_LOG_AUTO_REMOVE, 1)
        _reserve_regions(path, env, {})
        # The regions hold cached pages of the data; __db.register is created 0660.
        _make_private(path)
        if replicated is not None:
            replicated.start(env)
    except (db.DBError, OSError) as e:
        _close_env(env, e)
        if isinstance(e, db.DBRepUnavailError):
            raise SafeNotMasterError(
                path,
                "open",
                "no site of its group answered: there is no group to join yet",
                "start the group's other nodes (the first one creates it); then open again",
            ) from e
        raise translate(path, "open the environment", e) from e
    return env


def _close_env(env: Any, failure: BaseException | None) -> None:
    """Close a DBEnv on the way out of a failed or finished operation, unless it panicked:
    closing a panicked environment was seen to spin forever, so it is pinned instead."""
    if isinstance(failure, db.DBRunRecoveryError | SafeNeedsRecoveryError):
        _pin(env)
        return
    with contextlib.suppress(db.DBError):
        env.close()


def _checkpoint_fully(env: Any) -> None:
    """Checkpoint twice: log removal keeps the log from where the last checkpoint began, so
    the second one also lets go of what was written while the first one ran (docs/berkeleydb.md,
    "Checkpoints and log removal")."""
    env.txn_checkpoint(0, 0, db.DB_FORCE)
    env.txn_checkpoint(0, 0, db.DB_FORCE)


def _open_db(path: Path, env: Any, *, create: bool) -> Any:
    handle = db.DB(env)
    try:
        handle.set_flags(db.DB_CHKSUM)
        if create and not (path / DB_FILE).exists():
            # Only a new file takes it; an existing one keeps the page size it was made with
            # (Berkeley DB reads it from the file's meta page: tests/integration/test_footprint.py).
            handle.set_pagesize(PAGE_SIZE)
        handle.open(
            DB_FILE, None, db.DB_BTREE, DB_OPEN_FLAGS | (db.DB_CREATE if create else 0), 0o600
        )
    except db.DBError as e:
        with contextlib.suppress(db.DBError):
            handle.close()
        if isinstance(e, db.DBNoSuchFileError) and not create:
            raise SafeError(
                path, "open", "no such safe", "check the path, or open with create=True"
            ) from e
        if isinstance(e, db.DBInvalidArgError) and (path / DB_FILE).exists():
            # Berkeley DB says only "Invalid argument" for a file of another format.
            raise SafeCorruptError(
                path,
                f"open {DB_FILE}",
                f"a file is damaged or not a pmnc safe: {e}",
                "restore it from a backup, or move it away",
            ) from e
        raise translate(path, f"open {DB_FILE}", e) from e
    if create:
        _private(path / DB_FILE, FILE_MODE)  # created 0600 cut by the umask: make it exact
    return handle


def _open_replicated_db(path: Path, env: Any, replicated: Replicated, *, create: bool) -> Any:
    """Open the data file of a replicated safe, which only its master may create.

    The replication process of a site that has none yet (a new site) waits for it to come from
    the master (Berkeley DB's internal init), or for this site to be elected and create it. A
    client also waits until its start-up sync is done (STARTUP_WAIT_S at most when it has a
    copy): a DB->open during the sync's lockout sleeps 5 s in libdb before it looks again
    (measured: the third site of a group took 5.1 s instead of 0.1 s to open). The first opens
    after a sync can meet repmgr's own locks: retried (docs/berkeleydb.md).
    """
    started = time.monotonic()
    deadline = started + JOIN_TIMEOUT_S
    waited = False
    while True:
        exists = (path / DB_FILE).exists()
        try:
            st = env.rep_stat()
            master = st["status"] == db.DB_REP_MASTER
            synced = master or bool(st["startup_complete"])
            patient = time.monotonic() - started < STARTUP_WAIT_S
            ready = exists and (synced or not patient)
            if not replicated.primary or (create and master) or ready:
                return _open_db(path, env, create=create and master and not exists)
        except SafeError as e:
            if not isinstance(e.__cause__, _RETRYABLE + _REP_RETRYABLE) and not (
                isinstance(e.__cause__, db.DBAccessError | db.DBRepHandleDeadError)
            ):
                raise
        except db.DBError as e:
            if not isinstance(e, _RETRYABLE + _REP_RETRYABLE):
                raise translate(path, "open", e) from e
        if time.monotonic() > deadline:
            raise SafeNotMasterError(
                path,
                "open",
                f"no data from the group within {JOIN_TIMEOUT_S:g} s: this site has no copy yet "
                "and no master sent one",
                "start enough nodes of the group to elect a master; this one then catches up",
            )
        if not waited and not exists:
            log.info("%s: waiting for the group's master to send this safe", path)
            waited = True
        time.sleep(0.05)


def on_page_limit(page_size: int) -> int:
    """The longest value a B-tree page of `page_size` bytes (checksummed) keeps on the page:
    (page size - 26) / 4 - 11, measured (4,078 bytes at 16 KiB; one more takes an overflow
    page: `test_the_on_page_limit_is_the_longest_item_kept_on_the_page`)."""
    return (page_size - 26) // 4 - 11


def split_long(value: bytes) -> tuple[bytes, bytes]:
    """A long value's data-file record (LARGE, the tag, the tail) and its LARGE_FILE record
    (the tag, the head): the head and its tag fill LARGE_FILE's overflow pages exactly."""
    tag = os.urandom(LARGE_TAG)
    head = (len(value) + LARGE_TAG) // LARGE_PAGE_PAYLOAD * LARGE_PAGE_PAYLOAD - LARGE_TAG
    return LARGE + tag + value[head:], tag + value[:head]


def join_long(pointer: bytes, record: bytes | None) -> bytes | None:
    """The value a data-file record beginning with LARGE and its LARGE_FILE record make, or
    None when they are not parts of one write (the record is missing, or its tag differs)."""
    if len(pointer) == 1:  # LARGE alone: a whole value, written before the cut
        return record
    if record is None or record[:LARGE_TAG] != pointer[1 : 1 + LARGE_TAG]:
        return None
    return record[LARGE_TAG:] + pointer[1 + LARGE_TAG :]


def _purge_body(e: Environment, txn: Any, *, now: float) -> int:
    return _expiry.purge_step(e, txn, now)


def _open_created(path: Path, env: Any, file: str, name: str | None, page_size: int) -> Any:
    """Open database `name` of `file` (None: the file's one database), creating the file with
    `page_size` pages on first use.

    Creation is transactional (DB_AUTO_COMMIT), so processes creating it at once agree on one
    file; a creation that lost a race to another process is retried once it is there.
    """
    for attempt in range(50):
        handle = db.DB(env)
        try:
            handle.set_flags(db.DB_CHKSUM)
            if not (path / file).exists():
                handle.set_pagesize(page_size)
            handle.open(file, name, db.DB_BTREE, DB_OPEN_FLAGS | db.DB_CREATE, 0o600)
        except (db.DBFileExistsError, *_RETRYABLE):
            with contextlib.suppress(db.DBError):
                handle.close()
            if attempt == 49:
                raise
            time.sleep(0.01)
            continue
        except BaseException:
            with contextlib.suppress(db.DBError):
                handle.close()
            raise
        _private(path / file, FILE_MODE)
        return handle
    raise AssertionError("unreachable")


def _open_aux(path: Path, env: Any) -> dict[str, Any]:
    """Open (creating on first use) the expiry index and queues' B-trees in AUX_FILE."""
    handles: dict[str, Any] = {}
    try:
        for name in AUX_DATABASES:
            handles[name] = _open_created(path, env, AUX_FILE, name, AUX_PAGE_SIZE)
    except db.DBError as e:
        for handle in handles.values():
            with contextlib.suppress(db.DBError):
                handle.close()
        raise translate(path, f"open {AUX_FILE}", e) from e
    return handles


def _open_large(path: Path, env: Any) -> Any:
    """Open (creating on first use) LARGE_FILE's B-tree."""
    try:
        return _open_created(path, env, LARGE_FILE, None, LARGE_PAGE_SIZE)
    except db.DBError as e:
        raise translate(path, f"open {LARGE_FILE}", e) from e


def translate(path: Path, what: str, e: BaseException) -> SafeError:
    """Map a Berkeley DB or OS error to the SafeError subclass a caller can act on."""
    code = e.args[0] if e.args and isinstance(e.args[0], int) else None
    why = str(e.args[1]) if len(e.args) > 1 else str(e)
    if isinstance(e, db.DBRunRecoveryError):
        return SafeNeedsRecoveryError(
            path,
            what,
            f"the environment needs recovery: {why}",
            RECOVERY_TODO,
        )
    if isinstance(e, db.DBNoSpaceError) or code == errno.ENOSPC or "BDB3017" in why:
        return SafeNoSpaceError(
            path, what, f"no space left on the device: {why}", "free disk space; nothing was lost"
        )
    if isinstance(e, db.DBPermissionsError | db.DBAccessError | PermissionError) or code in (
        errno.EACCES,
        errno.EPERM,
        errno.EROFS,
    ):
        return SafePermissionError(
            path, what, f"permission denied: {why}", "check the owner, mode and mount of the safe"
        )
    if isinstance(e, db.DBVerifyBadError | db.DBPageNotFoundError) or (
        isinstance(e, db.DBInvalidArgError | db.DBOldVersionError)
        and ("type or format" in why or "magic" in why or "checksum" in why or "version" in why)
    ):
        return SafeCorruptError(
            path,
            what,
            f"a file is damaged or not a pmnc safe: {why}",
            "restore it from a backup, or run `pmnc-runtime safe verify` on it",
        )
    if isinstance(e, _RETRYABLE):
        return SafeTimeoutError(path, what, f"lock contention: {why}")
    return SafeError(path, what, why)


class Environment:
    """This process's handles on one safe directory, shared by every `Safe` on that path."""

    def __init__(
        self,
        path: Path,
        *,
        cache_size: int,
        checkpoint_interval: float,
        recover: bool,
        create: bool,
        min_free_space: int,
        replication: Replication | None = None,
    ) -> None:
        self.path = path
        self.pid = os.getpid()
        # Set for a replicated safe (safe/replication.py): the funnel then checks acks and roles.
        self.replicated = None if replication is None else Replicated(replication, path)
        self._db_generation = 0  # bumped when a replication rollback made the handles dead
        self.generation = _fork_generation
        self.refs = 0
        # The one flag every call checks: False once closed, panicked or inherited across a
        # fork (the child's registry hook clears it); `raise_unusable` then says which.
        self.usable = True
        self._panicked = False
        self._closed = False
        self.stats = _Stats()
        # Atomic under the GIL: calls started and finished, so that close() can wait for those
        # in flight before it closes the handles under them; plain reads started (the hot
        # ones in flight are found by _threads_inside).
        self.read_count = itertools.count(1)
        self._calls = itertools.count(1)
        self._calls_done = itertools.count(1)
        self._checkpoint_interval = checkpoint_interval
        # Free bytes at the last statvfs, and bytes written since (an estimate: threads add
        # to it without a lock). Refreshed by the maintenance thread every tick.
        self._free_bytes = 0
        self._written = 0
        self._reserved: dict[str, int] = {}
        # The expiry index and queues' handles, opened on first use (`aux`).
        self._aux: dict[str, Any] | None = None
        # LARGE_FILE's handle, opened on first use (`large`); where the sweep resumes.
        self._large: Any = None
        self._sweep_from: bytes | None = None
        self._sweep_pass_deleted = 0  # in the sweep's current pass over LARGE_FILE
        self._sweep_rest = 0  # rounds to skip before the next pass
        self._aux_lock = threading.Lock()
        self._wake: Any = None
        # Per queue name, this process's deliveries and redeliveries (Safe.stats()["queues"]).
        self.queue_counts: dict[str, dict[str, int]] = {}
        _check_directory(path, create=create)
        if not create and not (path / DB_FILE).exists():
            raise SafeError(
                path, "open", "no such safe", "check the path, or open with create=True"
            )
        self._dir_fd = _lock_directory(path, "open", exclusive=False)
        try:
            self._open_handles(
                path,
                cache_size=cache_size,
                recover=recover,
                create=create,
                min_free_space=min_free_space,
            )
        except BaseException:
            os.close(self._dir_fd)
            raise

    def _open_handles(
        self, path: Path, *, cache_size: int, recover: bool, create: bool, min_free_space: int
    ) -> None:
        self._env = _open_env(
            path,
            cache_size=cache_size,
            recover=db.DB_RECOVER if recover else 0,
            min_free_space=min_free_space,
            replicated=self.replicated,
        )
        try:
            if self.replicated is not None:
                self._db = _open_replicated_db(path, self._env, self.replicated, create=create)
            else:
                self._db = _open_db(path, self._env, create=create)
        except SafeError as e:
            _close_env(self._env, e)
            raise
        # A second descriptor on DB_REGISTER's file, to see which registered processes died. It
        # is closed only after the environment: closing any descriptor of that file drops this
        # process's own registration lock (fcntl semantics).
        try:
            self._register_fd = os.open(path / REGISTER_FILE, os.O_RDONLY)
        except OSError as e:
            with contextlib.suppress(db.DBError):
                self._db.close()
            _close_env(self._env, None)
            raise translate(path, "open", e) from e
        self._suspects: set[int] = set()
        self.panic_cause = ""
        # Bound once: the durable put and the plain read are the hot paths.
        self.db_get = self._db.get
        self.db_put = self._db.put
        # Longer values go to LARGE_FILE, their tails staying on the data file's page; not for
        # a data file whose pages cannot hold a tail (4 KiB: a safe created before LARGE_FILE
        # existed, whose overflow pages are no bigger than LARGE_FILE's).
        limit = on_page_limit(self._db.get_pagesize())
        self.large_min = limit if limit >= 1 + LARGE_TAG + LARGE_PAGE_PAYLOAD else sys.maxsize
        st = os.statvfs(path)
        self._free_bytes = st.f_bavail * st.f_frsize
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._maintain, name=f"pmnc.safe maintenance {path.name}", daemon=True
        )
        self._thread.start()

    @property
    def panicked(self) -> bool:
        return self._panicked

    @panicked.setter
    def panicked(self, value: bool) -> None:
        self._panicked = value
        if value:
            self.usable = False

    @property
    def closed(self) -> bool:
        return self._closed

    @closed.setter
    def closed(self, value: bool) -> None:
        self._closed = value
        if value:
            self.usable = False

    # -- the funnel ------------------------------------------------------------------------------

    def call(self, what: str, options: Options, body: Callable[..., T], *args: Any) -> T:
        """Run `body(*args)` (one whole transaction or one read) with retries, bounds and
        translation: the one funnel every Berkeley DB operation of a Safe goes through.

        Deadlocks and expired lock waits are retried with jittered exponential backoff until
        `options.timeout`; then SafeTimeoutError, raised from the last Berkeley DB error.
        Calls are counted before the check and after the end, so that close() can wait for
        those in flight.
        """
        next(self._calls)
        try:
            if not self.usable:
                self.raise_unusable(what)
            started = time.perf_counter_ns()
            attempt = 0
            replicated = self.replicated
            fence_gen: int | None = None  # None: not a write the fence confirms
            while True:
                if replicated is not None:
                    replicated.clear()
                    generation = self._db_generation
                    if replicated.fence is not None and replicated.writing():
                        fence_gen = self._generation_now()
                try:
                    result = body(*args)
                except _RETRYABLE as e:
                    attempt += 1
                    self._backoff(what, options, started, attempt, e)
                    continue
                except db.DBError as e:
                    if replicated is not None and self._replication_retry(e, generation):
                        attempt += 1
                        self._backoff(what, options, started, attempt, e)
                        continue
                    self.stats.error(what)
                    if isinstance(e, db.DBRunRecoveryError):
                        self.panicked = True
                    if replicated is not None and isinstance(e, db.DBAccessError):
                        raise self._not_master(what) from e
                    raise translate(self.path, what, e) from e
                if replicated is not None:
                    replicated.committed()  # even if not acknowledged: it is committed here
                    if replicated.failed():
                        self.stats.error(what)
                        raise self._not_acknowledged(what)
                    if fence_gen == -1:
                        # Begun on a client: it wrote nothing, unless this site became master
                        # while the body waited out the takeover's lockout.
                        fence_gen = self._generation_now()
                    if fence_gen is not None and fence_gen >= 0:
                        self._confirm(what, fence_gen)
                    elif fence_gen == -2:
                        self.stats.error(what)
                        raise self._not_acknowledged(what, "this site's state could not be read")
                self.stats.record(what, time.perf_counter_ns() - started, attempt)
                return result
        finally:
            if self.replicated is not None:
                self.replicated.end_call()  # a write that failed counts as nothing
            next(self._calls_done)

    def before_write(self, options: Options) -> None:
        """On a replicated safe whose process lacks its own connection to a site the group's
        replication process reaches: wait for it (boundedly), since a commit now would not be
        acknowledged (safe/replication.py, `check_connections`). Every write path calls this;
        reads do not wait."""
        replicated = self.replicated
        if replicated is None:
            return
        if not replicated.connected.is_set():
            replicated.connected.wait(min(options.timeout, PEER_CONNECT_WAIT_S))
            if not replicated.connected.is_set() and self.is_master():
                self._refuse_if(
                    replicated.unreachable,
                    "send it again; nothing was written (pmnc-runtime replaces such a worker "
                    "within seconds)",
                )
        if not replicated.formed and self.is_master():
            self._refuse_if(
                replicated.missing_sites, "start the group's other nodes; nothing was written"
            )
        replicated.mark_write()  # last: a write refused above counts as no write

    def _refuse_if(self, why_not: Callable[[Any], str | None], hint: str) -> None:
        """SafeGroupNotFormedError (nothing written) if `why_not(env)` names a reason."""
        try:
            why = why_not(self._env)
        except db.DBError as e:
            raise translate(self.path, "write", e) from e
        if why is not None:
            raise SafeGroupNotFormedError(self.path, "write", why, hint, master=None)

    def _generation_now(self) -> int:
        """This site's replication generation, read before a write that the fence confirms;
        -1 on a client, where a write that succeeds wrote nothing (a real one raises
        DBAccessError: e.g. `pop` of a missing key) and there is nothing to confirm."""
        assert self.replicated is not None
        try:
            state = self.replicated.state(self._env)
        except db.DBError:
            return -2  # unreadable: the write goes unconfirmed, as not acknowledged
        return state.gen if state.role == MASTER else -1

    def _confirm(self, what: str, gen: int) -> None:
        """Raise SafeNotAcknowledgedError unless the peers confirm a write the group
        acknowledged at generation `gen` (safe/fence.py says why and how)."""
        replicated = self.replicated
        assert replicated is not None and replicated.fence is not None
        env = self._env
        why = replicated.fence.confirm(gen, lambda: replicated.state(env))
        if why is not None:
            self.stats.error(what)
            raise self._not_acknowledged(what, why)

    def _replication_retry(self, e: BaseException, generation: int) -> bool:
        """Whether a failed attempt on a replicated safe is worth another: repmgr busy with
        a sync (its handles held off), or a rollback that made this process's handles dead
        (Berkeley DB's DB_REP_HANDLE_DEAD: they must be reopened)."""
        if isinstance(e, _REP_RETRYABLE):
            return True
        if isinstance(e, db.DBRepHandleDeadError):
            self._reopen_databases(generation)
            return True
        return False

    def _reopen_databases(self, generation: int) -> None:
        """New handles on the data and aux files after a replication rollback; the dead ones are
        pinned, not closed, since another thread may still be inside a call on them."""
        with self._aux_lock:
            if generation != self._db_generation:
                return  # another thread reopened them already
            handle = _open_db(self.path, self._env, create=False)
            _pin(self._db)
            self._db = handle
            self.db_get = handle.get
            self.db_put = handle.put
            if self._aux is not None:
                for old in self._aux.values():
                    _pin(old)
                self._aux = None  # reopened on next use
            if self._large is not None:
                _pin(self._large)
                self._large = None
            self._db_generation += 1
        log.warning("%s: reopened after a replication rollback", self.path)

    def _not_master(self, what: str) -> SafeNotMasterError:
        assert self.replicated is not None
        try:
            master = self.replicated.master(self._env)
        except db.DBError:
            master = None
        where = "the group has no master now"
        if master is not None:
            where = f"the master is {master[0]}:{master[1]}"
        return SafeNotMasterError(
            self.path,
            what,
            f"this replicated safe is a client: writes go to the master ({where})",
            "send the write to the master's node; pmnc-runtime does this by itself",
            master=master,
        )

    def _not_acknowledged(self, what: str, fenced: str | None = None) -> SafeNotAcknowledgedError:
        assert self.replicated is not None
        config = self.replicated.config
        why = (
            f"not acknowledged by the group (ack: {config.ack}) within the ack timeout: a "
            "failover before the others catch up may lose it"
            if fenced is None
            else f"acknowledged, but not confirmed by the peers: {fenced}"
        )
        return SafeNotAcknowledgedError(
            self.path,
            what,
            f"committed on this site, {why}",
            "check that enough nodes of the group are up; read the key back before retrying "
            "a write that is not idempotent",
        )

    def is_master(self) -> bool:
        """True unless this is a replicated safe whose site is not master now."""
        if self.replicated is None:
            return True
        try:
            return self.replicated.is_master(self._env)
        except db.DBError:
            return False

    def replication_info(self) -> dict[str, Any] | None:
        """Role, master, log position, sync state of a replicated safe (None if not one)."""
        if self.replicated is None or not self.usable:
            return None
        return self.replicated.info(self._env)

    def _backoff(
        self, what: str, options: Options, started: int, attempt: int, e: BaseException
    ) -> None:
        """Sleep before retrying a deadlocked or expired attempt; SafeTimeoutError past the
        deadline."""
        if time.perf_counter_ns() - started >= options.timeout * 1e9:
            self.stats.error(what)
            raise SafeTimeoutError(
                self.path,
                what,
                f"could not get the locks it needs within {options.timeout:g} s "
                f"({attempt} attempts); a process may have died holding them and the "
                "environment may need recovery",
                RECOVERY_TODO,
            ) from e
        time.sleep(random.uniform(0, min(BACKOFF_MAX_S, 0.001 * 2 ** min(attempt, 10))))
        if not self.usable:
            self.raise_unusable(what)

    def read(self, what: str, options: Options, key: bytes) -> bytes | None:
        """A plain read, counted (and one in READ_SAMPLE_EVERY timed) like Safe.get's inlined
        copy of this path."""
        n = next(self.read_count)
        next(self._calls)  # counted before the check: see close
        try:
            if not self.usable:
                self.raise_unusable(what)
            return self.read_counted(what, options, n, key)
        finally:
            next(self._calls_done)

    def read_counted(self, what: str, options: Options, n: int, key: bytes) -> bytes | None:
        """A plain read inside a count its caller took (`n`, from read_count) on a usable
        environment: one in READ_SAMPLE_EVERY through the funnel, to be timed; the others
        straight, and done again through the funnel (which retries, bounds and translates)
        when they fail. Also Safe's hot reads' slow path."""
        if n & READ_SAMPLE_MASK:
            try:
                return self.get(key)
            except db.DBError:
                return self.call(what, options, self.get, key)
        return self.call(what, options, self.get, key)

    def raise_unusable(self, what: str) -> None:
        if self.generation != _fork_generation or self.pid != os.getpid():
            raise SafeForkError(
                self.path,
                what,
                f"opened in pid {self.pid}, used in pid {os.getpid()}",
                "open the safe after fork",
            )
        if self.closed:
            raise SafeClosedError(self.path, what, "the safe is closed", "open it again")
        if self.panicked:
            raise SafeNeedsRecoveryError(
                self.path,
                what,
                f"the environment needs recovery ({self.panic_cause or 'it panicked earlier'})",
                RECOVERY_TODO,
            )
        raise SafeError(self.path, what, "the environment is not usable", RECOVERY_TODO)

    def transaction(self, options: Options, body: Callable[[Environment, Any], T]) -> T:
        """`body(self, txn)` in one transaction: aborted on any exception (BaseException
        included), committed otherwise; `txn` without a generator-based context manager, which
        costs a microsecond on every modify."""
        txn = self._env.txn_begin(None, 0 if options.durable else db.DB_TXN_WRITE_NOSYNC)
        try:
            result = body(self, txn)
        except BaseException:
            with contextlib.suppress(db.DBError):
                txn.abort()
            raise
        txn.commit()
        return result

    @contextlib.contextmanager
    def txn(self, options: Options) -> Iterator[Any]:
        """One transaction: abort on any exception (BaseException included), commit otherwise.

        Durable: the commit flushes the log to disk before returning (Berkeley DB's default).
        Not durable: DB_TXN_WRITE_NOSYNC writes the log to the OS without fsync, which survives a
        process crash but not an OS crash or power loss.
        """
        txn = self._env.txn_begin(flags=0 if options.durable else db.DB_TXN_WRITE_NOSYNC)
        try:
            yield txn
        except BaseException:
            with contextlib.suppress(db.DBError):
                txn.abort()
            raise
        txn.commit()

    def check_space(self, what: str, options: Options, size: int) -> None:
        """Refuse a write while free space is under the reserve (`options.min_free_space`).

        Amortized: free space is read by the maintenance thread every tick; a write only adds
        its size (counted twice: log and data page) to what was written since, and asks statvfs
        itself (`_refresh_space`) when that estimate comes near the reserve or passes
        WRITTEN_REFRESH bytes, which also extends the regions' reservation.
        """
        written = self._written + 2 * size
        self._written = written
        if self._free_bytes - written < options.min_free_space or written > WRITTEN_REFRESH:
            self._refresh_space(what, options, size)

    def _refresh_space(self, what: str, options: Options, size: int) -> None:
        try:
            self._refresh()
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise translate(self.path, what, e) from e
            self._free_bytes = 0  # the regions could not be given room: refuse writes
        except db.DBError as e:  # the reservation reads the regions' sizes from the handle
            if not self.usable:  # closed meanwhile (a signal handler of this very thread)
                self.raise_unusable(what)
            raise translate(self.path, what, e) from e
        if self._free_bytes - 2 * size < options.min_free_space:
            self.stats.error(what)
            raise SafeNoSpaceError(
                self.path,
                what,
                f"only {self._free_bytes >> 20} MiB free on the filesystem, under the reserve of "
                f"{options.min_free_space >> 20} MiB; nothing was written",
                "free disk space: writes resume by themselves; reads go on meanwhile",
            )

    def _refresh(self) -> None:
        """Read free space and extend the regions' reservation (OSError: ENOSPC or other)."""
        self._written = 0
        st = os.statvfs(self.path)
        self._free_bytes = st.f_bavail * st.f_frsize
        _reserve_regions(self.path, self._env, self._reserved)

    # -- operations (raw bytes; the store encodes) -----------------------------------------------
    #
    # A value longer than `large_min` is kept in LARGE_FILE and the data file holds LARGE under
    # its key (see LARGE). Every method here reads and writes through that: a caller sees the
    # value. Only the store's hot paths call the bound `db_get`/`db_put` themselves: they follow
    # LARGE with `get` and send long values to `put_one`.

    def get(self, key: bytes) -> bytes | None:
        value: bytes | None = self._db.get(key)
        if value is not None and value[:1] == LARGE:
            return self.get_large(key, value)
        return value

    def get_large(self, key: bytes, pointer: bytes) -> bytes | None:
        """A plain read of a long value whose data-file record (`pointer`) was just read.

        No transaction spans the two lookups, so the head found may be a later write's. Then
        the tags differ, and both records are read again under one transaction's read locks,
        in the writers' order (data file first: `put`, `delete`, `get_rmw`): no write can come
        between them. Retrying without locks could starve: while writers overwrite the key
        back to back, each retry found the next write's head (1,000 retries ran out with 6
        writers: `test_a_long_value_read_while_writers_overwrite_it_back_to_back`). A record
        that is LARGE alone (written before the cut) carries no tag, so it is read that way
        from the start."""
        if len(pointer) > 1:
            value = join_long(pointer, self.large().get(key))
            if value is not None:
                return value
        return self.transaction(_READ_ONLY, lambda e, txn: e._read_locked(txn, key, 0))

    def _missing_large(self, key: bytes) -> SafeCorruptError:
        return SafeCorruptError(
            self.path,
            "get",
            f"the data file points to {LARGE_FILE} for key {key[:64]!r}, which has no such record",
            "restore it from a backup, or run `pmnc-runtime safe verify` on it",
        )

    def get_rmw(self, txn: Any, key: bytes) -> bytes | None:
        """Read with a write lock, so that the write that follows cannot deadlock on an upgrade."""
        return self._read_locked(txn, key, db.DB_RMW)

    def _read_locked(self, txn: Any, key: bytes, flags: int) -> bytes | None:
        """A value read under `txn`'s locks (read locks, or write locks with DB_RMW): the data
        file first, then LARGE_FILE for a long value, the order every writer takes them in."""
        value: bytes | None = self._db.get(key, txn=txn, flags=flags)
        if value is not None and value[:1] == LARGE:
            return self._join_locked(txn, key, value, flags)
        return value

    def _join_locked(self, txn: Any, key: bytes, pointer: bytes, flags: int) -> bytes:
        """The long value whose data-file record `pointer` was read under `txn`'s locks: its
        LARGE_FILE part read under them too. Under locks the parts always match; when they do
        not, the file is damaged."""
        value = join_long(pointer, self.large().get(key, txn=txn, flags=flags))
        if value is None:
            raise self._missing_large(key)
        return value

    def put_one(self, options: Options, key: bytes, value: bytes) -> None:
        """One put as its own transaction: Berkeley DB's auto-commit when durable (one call,
        the GIL released once: Safe passes `db_put` itself to `call` then), an explicit
        DB_TXN_WRITE_NOSYNC transaction otherwise, and always for a long value (two files).

        It does not look at what it replaces: a long value replaced by a short one leaves its
        LARGE_FILE record to the sweep (`sweep_large`), which nothing reads meanwhile."""
        if len(value) > self.large_min:
            with self.txn(options) as txn:
                self.put(txn, key, value)
        elif options.durable:
            self._db.put(key, value)
        else:
            with self.txn(options) as txn:
                self._db.put(key, value, txn=txn)

    def put(self, txn: Any, key: bytes, value: bytes) -> None:
        if len(value) > self.large_min:
            # The data file first, then LARGE_FILE: every write and locked read takes them in
            # this order, so two of them never wait for each other (see get_large).
            pointer, record = split_long(value)
            large = self.large()  # opened (or created) before any lock is held
            self._db.put(key, pointer, txn=txn)
            large.put(key, record, txn=txn)
            return
        self._db.put(key, value, txn=txn)
        if self._large is not None:  # a long value it replaces goes now, not at the sweep
            with contextlib.suppress(db.DBNotFoundError):
                self._large.delete(key, txn=txn)

    def delete(self, txn: Any, key: bytes) -> bool:
        try:
            self._db.delete(key, txn=txn)
        except db.DBNotFoundError:
            return False
        if self.large_exists():
            with contextlib.suppress(db.DBNotFoundError):
                self.large().delete(key, txn=txn)
        return True

    def first(self, txn: Any) -> tuple[bytes, bytes] | None:
        cursor = self._db.cursor(txn)
        try:
            record: tuple[bytes, bytes] | None = cursor.first(flags=db.DB_RMW)
        finally:
            cursor.close()
        if record is not None and record[1][:1] == LARGE:
            record = record[0], self._join_locked(txn, record[0], record[1], db.DB_RMW)
        return record

    def scan(
        self, start: bytes | None, limit: int, *, inclusive: bool = False
    ) -> list[tuple[bytes, bytes]]:
        """Up to `limit` records with keys after `start` (or from it, if `inclusive`).

        The cursor is closed before the batch is returned, so an iterating caller holds no lock
        between batches and never blocks writers. Long values are looked up after it is closed.
        """
        out: list[tuple[bytes, bytes]] = []
        cursor = self._db.cursor()
        try:
            record = cursor.first() if start is None else cursor.set_range(start)
            if record is not None and not inclusive and record[0] == start:
                record = cursor.next()
            while record is not None and len(out) < limit:
                out.append(record)
                record = cursor.next() if len(out) < limit else None
        finally:
            cursor.close()
        if any(value[:1] == LARGE for _, value in out):
            # A key deleted meanwhile reads as a record expired long ago (GONE): absent for
            # every caller, while the batch keeps its length and last key to resume from.
            out = [(k, (self.get_large(k, v) or GONE) if v[:1] == LARGE else v) for k, v in out]
        return out

    def count(self) -> int:
        n: int = self._db.stat()["ndata"]
        return n

    def delete_some(self, txn: Any, limit: int) -> int:
        cursor = self._db.cursor(txn)
        n = 0
        try:
            record = cursor.first(flags=db.DB_RMW)
            while record is not None and n < limit:
                cursor.delete()
                if record[1][:1] == LARGE:
                    with contextlib.suppress(db.DBNotFoundError):
                        self.large().delete(record[0], txn=txn)
                n += 1
                record = cursor.next(flags=db.DB_RMW)
        finally:
            cursor.close()
        return n

    # -- long values (LARGE_FILE) ----------------------------------------------------------------

    def large_exists(self) -> bool:
        """Whether LARGE_FILE exists (some process has stored a long value)."""
        return self._large is not None or os.path.exists(self.path / LARGE_FILE)

    def large(self) -> Any:
        """LARGE_FILE's B-tree, opened (and created) on first use.

        Only a master creates files: where a replicated safe is a client and the file is not
        there yet (no long value was ever written), the open would fail (ENOENT) and a write
        that needs it must say "not master", so that the runtime forwards it."""
        handle = self._large
        if handle is not None:
            return handle
        if self.replicated is not None and not self.large_exists() and not self.is_master():
            raise self._not_master("write")
        with self._aux_lock:
            if self._large is None:
                self._large = _open_large(self.path, self._env)
            return self._large

    def sweep_large(self) -> int:
        """Delete up to SWEEP_BATCH records of LARGE_FILE whose key no longer points there, in
        one NOSYNC transaction, resuming where the last sweep of this process ended.

        They are left by a one-call put (`put_one`, `[]=`) of a short value over a long one,
        which does not read what it replaces so as to stay one Berkeley DB call; no read goes
        to them. A lock conflict ends the round (the next one, or another process, takes it up).
        Only keys are read (a partial read of no bytes of each value: reading the values made an
        idle process read 11 MB/s and cycle its cache). A whole pass that deleted nothing makes
        the sweep rest SWEEP_REST rounds. Returns the records deleted."""
        if self._sweep_rest > 0:
            self._sweep_rest -= 1
            return 0
        if not self.large_exists():
            return 0
        options = Options(durable=False, timeout=1.0, min_free_space=0)

        def body(e: Environment, txn: Any) -> tuple[int, bytes | None]:
            cursor = e.large().cursor(txn)
            deleted = seen = 0
            last: bytes | None = None
            try:
                start = e._sweep_from
                record = (
                    cursor.set_range(start, dlen=0, doff=0)
                    if start is not None
                    else cursor.first(dlen=0, doff=0)
                )
                while record is not None and seen < SWEEP_BATCH:
                    last = record[0]
                    # Its first byte only: a data-file record of a long value begins with LARGE.
                    if e._db.get(last, txn=txn, flags=db.DB_RMW, dlen=1, doff=0) != LARGE:
                        cursor.delete()
                        deleted += 1
                    seen += 1
                    record = cursor.next(dlen=0, doff=0)
                done = record is None
            finally:
                cursor.close()
            return deleted, None if done else last

        try:
            deleted, self._sweep_from = self.transaction(options, body)
        except _RETRYABLE:
            return 0
        self._sweep_pass_deleted += deleted
        if self._sweep_from is None:  # a whole pass done
            if self._sweep_pass_deleted == 0:
                self._sweep_rest = SWEEP_REST
            self._sweep_pass_deleted = 0
        return deleted

    # -- expiry index and queues (docs/queues.md) ----------------------------------------------

    def aux_exists(self) -> bool:
        """Whether the expiry index and queues' file exists (some process has used them)."""
        return self._aux is not None or os.path.exists(self.path / AUX_FILE)

    def aux(self) -> dict[str, Any]:
        """The expiry index and queues' B-trees, opened (and created) on first use."""
        handles = self._aux
        if handles is not None:
            return handles
        with self._aux_lock:
            if self._aux is None:
                self._aux = _open_aux(self.path, self._env)
            return self._aux

    def aux_get(self, txn: Any, which: str, key: bytes, *, rmw: bool = False) -> bytes | None:
        value: bytes | None = self.aux()[which].get(key, txn=txn, flags=db.DB_RMW if rmw else 0)
        return value

    def aux_put(self, txn: Any, which: str, key: bytes, value: bytes) -> None:
        self.aux()[which].put(key, value, txn=txn)

    def aux_delete(self, txn: Any, which: str, key: bytes) -> bool:
        try:
            self.aux()[which].delete(key, txn=txn)
        except db.DBNotFoundError:
            return False
        return True

    def aux_scan(
        self,
        txn: Any,
        which: str,
        start: bytes | None,
        limit: int,
        *,
        inclusive: bool = True,
        rmw: bool = False,
    ) -> list[tuple[bytes, bytes]]:
        """Up to `limit` records of `which` from `start` (after it unless `inclusive`); with
        `rmw`, write-locked for the transaction `txn` that will change them."""
        flags = db.DB_RMW if rmw else 0
        out: list[tuple[bytes, bytes]] = []
        cursor = self.aux()[which].cursor(txn)
        try:
            record = (
                cursor.first(flags=flags) if start is None else cursor.set_range(start, flags=flags)
            )
            if record is not None and not inclusive and record[0] == start:
                record = cursor.next(flags=flags)
            while record is not None and len(out) < limit:
                out.append(record)
                record = cursor.next(flags=flags) if len(out) < limit else None
        finally:
            cursor.close()
        return out

    def log_flush(self) -> None:
        """Flush the log to disk: with a commit written NOSYNC just before, that commit is
        durable when this returns, and concurrent flushers share one fsync (group commit)
        without holding the transaction's page locks during it (docs/queues.md)."""
        self._env.log_flush()

    def wake(self) -> Any:
        """The queues' wake-up word of this directory (safe/wake.py), mapped on first use."""
        if self._wake is None:
            with self._aux_lock:
                if self._wake is None:
                    self._wake = Wake(self.path, FILE_MODE)
        return self._wake

    def purge_expired(self, budget: float = PURGE_BUDGET_S) -> int:
        """Purge overdue keys in NOSYNC transactions of PURGE_BATCH entries, for at most
        `budget` seconds; a batch that meets a lock conflict ends this round (the next tick,
        or another process, takes it up). Returns the entries handled."""
        if not self.aux_exists():
            return 0
        options = Options(durable=False, timeout=1.0, min_free_space=0)
        started = time.monotonic()
        total = 0
        while time.monotonic() - started < budget:
            now = time.time()
            first = self.aux_scan(None, "expiry", None, 1)  # a peek, no lock kept: often enough
            if not first or _expiry.split_index_key(first[0][0])[0] > now:
                break
            try:
                n = self.transaction(options, functools.partial(_purge_body, now=now))
            except _RETRYABLE:
                break
            total += n
            if n < _expiry.PURGE_BATCH:
                break
        return total

    def backup_to(self, target: Path) -> None:
        """Berkeley DB's hot backup: the data file, then every log file it needs."""
        self._env.backup(str(target), db.DB_CREATE)

    def checkpoint(self) -> None:
        _checkpoint_fully(self._env)

    def reads(self) -> int:
        """Plain reads so far (sampled ones included)."""
        return _peek(self.read_count) - 1

    def in_flight(self) -> int:
        """Calls and hot reads started and not finished yet."""
        return _peek(self._calls) - _peek(self._calls_done) + _threads_inside(self)

    def info(self) -> dict[str, Any]:
        """Environment-wide figures: log, checkpoint, cache."""
        log_stat = self._env.log_stat()
        txn_stat = self._env.txn_stat()
        mpool = self._env.memp_stat()[0]
        hits, misses = mpool.get("cache_hit", 0), mpool.get("cache_miss", 0)
        info: dict[str, Any] = {}
        if self.replicated is not None:
            info["replication"] = self.replicated.info(self._env)
        return info | {
            "last_checkpoint": txn_stat.get("time_ckp", 0),
            "cache_hit_ratio": hits / (hits + misses) if hits + misses else 1.0,
            "log_bytes": log_bytes(self.path),
            "log_file": log_stat.get("cur_file", 0),
            # The shared regions on disk (blocks, reservations included) and the cache's own
            # size now and at most: what the safe costs besides its data and log.
            "region_bytes": region_bytes(self.path),
            "cache_bytes": mpool.get("regsize", 0),
            "cache_max_bytes": mpool.get("regmax", 0),
        }

    # -- maintenance -----------------------------------------------------------------------------

    def _maintain(self) -> None:
        """Expire overdue lock waits every tick; checkpoint by log volume and by interval."""
        last_forced = time.monotonic()
        ticks = 0
        while not self._stop.wait(TICK_S):
            ticks += 1
            if not self.panicked and ticks % REGISTRANT_CHECK_TICKS == 0:
                self._check_registrants()
            try:
                # Go on expiring lock waits after a death was noticed: that is what wakes the
                # calls already waiting on the dead process's locks, which then fail at once.
                self._env.lock_detect(db.DB_LOCK_EXPIRE)
                if self.panicked:
                    continue
                self._maintain_space()
                replicated = self.replicated
                if replicated is not None:
                    if replicated.sweep_due or ticks < 50 or ticks % NODELAY_TICKS == 0:
                        replicated.nodelay_sweep()
                    replicated.check_connections(self._env)
                if ticks % PURGE_TICKS == 0 and self.is_master():
                    self.purge_expired()
                if ticks % SWEEP_TICKS == 0 and self.large_min < sys.maxsize and self.is_master():
                    self.sweep_large()
                if time.monotonic() - last_forced >= self._checkpoint_interval:
                    self._env.txn_checkpoint(0, 0, 0)
                    last_forced = time.monotonic()
                else:
                    self._env.txn_checkpoint(CHECKPOINT_KBYTES, 0, 0)
            except db.DBRunRecoveryError as e:
                self.panic_cause = f"Berkeley DB: {e}"
                self.panicked = True
                log.exception("%s: the environment needs recovery; maintenance stopped", self.path)
                return
            except db.DBError as e:
                log.warning("%s: maintenance: %s", self.path, e)

    def _maintain_space(self) -> None:
        try:
            self._refresh()
        except OSError as e:
            self._free_bytes = 0  # writes refused until a reservation succeeds again
            if e.errno != errno.ENOSPC:
                log.warning("%s: reserving room for the regions: %s", self.path, e)

    def _check_registrants(self) -> None:
        """Notice a registered process that died without closing: the environment needs recovery.

        Its locks and perhaps a region mutex stay held until recovery, and the next process to
        join will panic the environment anyway (DB_REGISTER), so new calls fail at once with
        SafeNeedsRecoveryError instead of each waiting out its deadline. A process must be seen
        dead twice in a row (unlocked slot, pid gone) so that a clean close is never mistaken.
        """
        dead = {
            pid
            for pid, holder in _registrants(self._register_fd)
            if holder is None and pid != self.pid and not _alive(pid)
        }
        confirmed = dead & self._suspects
        self._suspects = dead
        if not confirmed:
            return
        self.panic_cause = f"process {min(confirmed)} died while using it and may hold its locks"
        self.panicked = True
        log.error("%s: %s: the environment needs recovery", self.path, self.panic_cause)

    # -- closing ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop maintenance, checkpoint (so the next recovery is short), close the handles.

        A panicked environment is never closed: closing one was seen to spin forever. Its handles
        are pinned instead, and the process should exit.
        """
        if self.closed:
            return
        self.closed = True
        if self.pid != os.getpid():
            return  # inherited across fork: pinned by forget_inherited, never closed here
        self._stop.set()
        self._thread.join(timeout=5.0)
        # Calls already past their closed check (other threads, e.g. daemon threads at exit)
        # finish first: closing the handles under them crashed the process (SIGSEGV).
        deadline = time.monotonic() + CLOSE_WAIT_S
        while self.in_flight() > 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        busy = self.in_flight() > 0
        if self.replicated is not None:
            self.replicated.close()  # stops answering the peers' fence questions
        if busy and not self.panic_cause:
            self.panic_cause = "calls still running in other threads at close"
        if busy:
            self.panicked = True
        if not self.panicked and not self._thread.is_alive():
            try:
                self.checkpoint()
            except db.DBRunRecoveryError as e:
                self.panic_cause = f"Berkeley DB: {e}"
                self.panicked = True
            except db.DBError:
                pass  # e.g. a full disk: the log has everything, recovery replays it
        if self.panicked or self._thread.is_alive():
            # Left open (pinned), this process's registration stays: whoever joins next sees
            # it as dead once we exit. Say so, so that a worker exits as needing recovery.
            _pin(self._env)
            _pin(self._db)
            _pin(self._aux)
            _pin(self._large)
            raise SafeNeedsRecoveryError(
                self.path,
                "close",
                f"the environment needs recovery ({self.panic_cause or 'maintenance stuck'}); "
                "it was left open",
                "exit this process; under pmnc-runtime the supervisor recovers the safe",
            )
        failure: db.DBError | None = None
        # The environment is closed even when closing the database failed (a full disk cannot
        # take its dirty pages, which the log already has): a process that leaves without
        # closing it would look dead to the next one, which would then recover.
        aux = list(self._aux.values()) if self._aux is not None else []
        if self._large is not None:
            aux.append(self._large)
        for handle in (*aux, self._db, self._env):
            try:
                handle.close()
            except db.DBRunRecoveryError as e:
                _pin(self._env)  # never close a panicked environment
                os.close(self._register_fd)
                raise translate(self.path, "close", e) from e
            except db.DBError as e:
                failure = failure or e
        os.close(self._register_fd)
        os.close(self._dir_fd)  # last: the directory is free for recover/restore only now
        if failure is not None:
            raise translate(self.path, "close", failure) from failure

    def forget_inherited(self) -> None:
        """In a forked child: never touch these handles again, not even to free them."""
        self.usable = False
        _pin(self._env)
        _pin(self._db)
        _pin(self._aux)
        _pin(self._large)
        self.refs = 0
        # The parent's descriptor keeps its shared lock; the child's copy need not.
        with contextlib.suppress(OSError):
            os.close(self._dir_fd)


# -- the per-process registry -------------------------------------------------------------------

_registry: dict[Path, Environment] = {}
_fork_generation = 0
_registry_lock = threading.Lock()


def canonical(path: str | os.PathLike[str]) -> Path:
    """One name per safe directory (its environment's home), however it is given: a second
    name (a symlink) for a safe that is open here must not open a second DBEnv, nor make
    `users` close __db.register."""
    return Path(os.path.realpath(os.fspath(path)))


def acquire(
    path: str | os.PathLike[str],
    *,
    cache_size: int,
    checkpoint_interval: float,
    recover: bool,
    create: bool,
    min_free_space: int,
    replication: Replication | None = None,
) -> Environment:
    """This process's environment for `path`, opened on first use and counted per user."""
    home = canonical(path)
    with _registry_lock:
        env = _registry.get(home)
        if env is not None and env.panicked:
            raise SafeNeedsRecoveryError(
                home,
                "open",
                "this process already holds a panicked handle on it",
                "exit this process; under pmnc-runtime the supervisor recovers the safe",
            )
        if env is not None:
            theirs = None if env.replicated is None else env.replicated.config
            if theirs != replication:
                raise ValueError(
                    f"{home}: already open in this process with replication={theirs!r}; "
                    "every opening of a safe in one process must give the same"
                )
        if env is None:
            env = Environment(
                home,
                cache_size=cache_size,
                checkpoint_interval=checkpoint_interval,
                recover=recover,
                create=create,
                min_free_space=min_free_space,
                replication=replication,
            )
            _registry[home] = env
        env.refs += 1
        return env


def release(env: Environment) -> None:
    """Drop one user; the last one closes the handles."""
    with _registry_lock:
        env.refs -= 1
        if env.refs > 0:
            return
        if _registry.get(env.path) is env:
            del _registry[env.path]
        # Under the lock: a concurrent open of the same path must not create a second DBEnv
        # while this one is still open (DB_REGISTER allows one per process).
        try:
            env.close()
        except SafeNeedsRecoveryError:
            # Left open (pinned): it stays registered, so that opening the path again in this
            # process fails as needing recovery instead of opening a second DBEnv (BDB1528).
            env.panicked = True
            _registry[env.path] = env
            raise


def is_open_here(home: Path) -> bool:
    """Whether this process has the safe at `home` (a `canonical` path) open: safe/admin.py
    then leaves the directory and its register alone."""
    with _registry_lock:
        return home in _registry


def _after_fork_in_child() -> None:
    global _registry_lock, _fork_generation
    _fork_generation += 1
    # Another thread may have held the lock at the fork: the child gets a fresh one.
    _registry_lock = threading.Lock()
    for env in _registry.values():
        env.forget_inherited()
    _registry.clear()


def _close_all_at_exit() -> None:
    """Close what the program left open (daemon threads may still be calling: close waits)."""
    with _registry_lock:
        for env in list(_registry.values()):
            if env.pid == os.getpid():
                with contextlib.suppress(SafeError):
                    env.close()
        _registry.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_close_all_at_exit)
