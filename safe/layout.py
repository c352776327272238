"""A safe's directory: the names of its files, their modes, and the directory's lock.

One safe is one directory (docs/berkeleydb.md). This module knows which files in it are the safe's,
keeps them private to their owner whatever the umask (README, "Operating safes"), checks or
creates the directory before an opening, and flocks it so that whole-environment operations
(safe/admin.py) and openings exclude each other. It touches no Berkeley DB handle.

`is_safe` and `disk_usage` are public (pmnc.safe): tools ask them instead of knowing file names.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .errors import SafeBusyError, SafeError, SafePermissionError

log = logging.getLogger("pmnc.safe")

DB_FILE = "safe.db"
REGISTER_FILE = "__db.register"
# The expiry index and queues' B-trees (docs/queues.md), created on first use.
AUX_FILE = "extra.db"
# Values too long for a data-file page, in a B-tree of small pages (docs/footprint.md, "Large
# values"), created on the first one.
LARGE_FILE = "large.db"
# The database files, the data file first: what verify, backup and restore copy and check.
DATA_FILES = (DB_FILE, LARGE_FILE, AUX_FILE)
WAKE_FILE = "queues.wake"  # the queues' wake-up word (safe/wake.py)
# A safe's data is its owner's alone, whatever the umask (README, "Operating safes"): every
# directory made to hold one is 0700 and every file in it 0600 (tests/integration/
# test_file_modes.py walks them under umask 022 and 000).
DIR_MODE = 0o700
FILE_MODE = 0o600

# Size of a log file. The current one stays after a checkpoint, with as many blocks as were
# written into it: libdb's default of 10 MiB kept up to 10 MiB per safe that had been written,
# idle or not (a node of 50 modules: 500 MiB); 2 MiB files bound that at the same write rate.
LOG_FILE_SIZE = 2 << 20
# The shared regions Berkeley DB maps (`__db.001`, ...; `__db.register` is not one of them).
REGION_FILES = "__db.0[0-9][0-9]"


@dataclass(frozen=True)
class DiskUsage:
    """Bytes a safe takes on disk now: its database files (DATA_FILES), its log files, and its
    shared regions' blocks (reservations included: docs/footprint.md)."""

    data: int
    log: int
    regions: int


def is_safe(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is a safe's directory (it holds the data file).

    Asked before opening by whoever must not create a safe: opening any other directory would
    create one there.
    """
    return (Path(path) / DB_FILE).is_file()


def disk_usage(path: str | os.PathLike[str]) -> DiskUsage:
    """What the safe at `path` takes on disk (a log or region file removed meanwhile counts as
    nothing; no data file is an OSError: ask `is_safe` first)."""
    p = Path(path)
    data = (p / DB_FILE).stat().st_size + data_bytes(p, DATA_FILES[1:])
    return DiskUsage(data=data, log=log_bytes(p), regions=region_bytes(p))


def data_bytes(path: Path, names: tuple[str, ...] = DATA_FILES) -> int:
    """Bytes of the database files `names` that exist now."""
    total = 0
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            total += (path / name).stat().st_size
    return total


def log_bytes(path: Path) -> int:
    """Bytes of the log files (`log.0000000001`, ...) now."""
    total = 0
    for p in path.glob("log.*"):
        if p.name[4:].isdigit():
            with contextlib.suppress(FileNotFoundError):  # removed by a checkpoint meanwhile
                total += p.stat().st_size
    return total


def region_bytes(path: Path) -> int:
    """Disk blocks the shared regions (`__db.0nn`) take now, reservations included."""
    total = 0
    for region in path.glob(REGION_FILES):
        with contextlib.suppress(FileNotFoundError):
            total += os.stat(region).st_blocks * 512
    return total


def _is_safe_file(name: str) -> bool:
    """A file Berkeley DB keeps in a safe's directory: the data, its logs and the regions."""
    return name in (*DATA_FILES, WAKE_FILE, "repmgr.peers", "repmgr.fence") or name.startswith(
        ("log.", "__db.")
    )


def publish(target: Path, words: Iterable[object]) -> None:
    """Replace `target` with one line of `words`, mode 0600, atomically (a reader sees the old
    line or the new one): the small files a replication process publishes for the site's
    other processes. Raises OSError."""
    temporary = target.with_name(f".{target.name}.{os.getpid()}")
    temporary.write_text(" ".join(str(w) for w in words) + "\n")
    os.chmod(temporary, 0o600)
    os.replace(temporary, target)


def _private(path: Path, mode: int) -> None:
    """chmod `path` to `mode` if it is ours (owned by this user) and has another mode.

    A file owned by someone else is left alone (root inspecting a user's safe changes nothing
    of theirs). A failure is logged, not raised: a filesystem without Unix modes must not make
    a safe impossible to open.
    """
    try:
        st = os.lstat(path)
        mine = st.st_uid == os.geteuid() and not stat.S_ISLNK(st.st_mode)
        if mine and stat.S_IMODE(st.st_mode) != mode:
            os.chmod(path, mode)
    except FileNotFoundError:
        pass  # removed meanwhile (log removal, region removal): nothing to protect
    except OSError as e:
        log.warning("%s: cannot make it private (mode %o): %s", path, mode, e)


def _make_private(path: Path) -> None:
    """The safe's directory 0700 and every file of its own 0600: those it was created with,
    whatever the umask, and those of a safe made by an older pmnc (0755 and 0644), tightened
    here on every opening (no safe is opened read-only)."""
    _private(path, DIR_MODE)
    try:
        names = os.listdir(path)
    except OSError as e:
        log.warning("%s: cannot list it to make its files private: %s", path, e)
        return
    for name in names:
        if _is_safe_file(name):
            _private(path / name, FILE_MODE)


def _make_private_dirs(path: Path) -> None:
    """`mkdir -p` with mode 0700 for every directory it creates (mkdir's mode is cut by the
    umask, so each is chmod-ed after); directories that already exist are left as they are."""
    missing: list[Path] = []
    p = path
    while not os.path.lexists(p) and p != p.parent:
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, DIR_MODE)
        except FileExistsError:
            continue  # another process made it first: its creator sets its mode
        _private(d, DIR_MODE)
    if not path.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(path))


def _check_directory(path: Path, *, create: bool) -> None:
    """The safe's directory exists (created if allowed) and this process may use it."""
    denied = "run as its owner or fix its permissions"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except PermissionError as e:
        raise SafePermissionError(path, "open", f"permission denied: {e}", denied) from e
    except OSError as e:
        raise SafeError(path, "open", str(e)) from e
    if st is not None:
        if not stat.S_ISDIR(st.st_mode):
            raise SafeError(
                path, "open", "the path exists and is not a directory", "give a directory"
            )
        if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
            raise SafePermissionError(path, "open", "permission denied on the directory", denied)
        return
    if not create:
        raise SafeError(path, "open", "no such safe", "check the path, or open with create=True")
    try:
        _make_private_dirs(path)
    except PermissionError as e:
        raise SafePermissionError(
            path, "create the directory", f"permission denied: {e}", "fix its parent's permissions"
        ) from e
    except OSError as e:
        raise SafeError(path, "create the directory", str(e)) from e


def _lock_directory(path: Path, what: str, *, exclusive: bool) -> int:
    """flock the safe's directory: shared while a process has the safe open, exclusive for
    operations that need it to themselves (recover, verify, restore), so that no process can
    open it between their check and their work. Returns the descriptor that holds the lock."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        why = "in use by another process" if exclusive else "being recovered or restored"
        raise SafeBusyError(path, what, why, "try again when it is done") from None
    except OSError:
        os.close(fd)
        raise
    return fd
