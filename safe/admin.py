"""Whole-environment operations for supervisors and tools: prepare, recover, verify, backup.

Each works on a safe as a whole, mostly one that no process is using (`users`, read from
`__db.register`, says who is), and leaves no handle open: a supervisor calls `prepare` before it
forks (docs/berkeleydb.md), an operator's tool (`pmnc-runtime safe`) the others, and `restore`
puts a backup in place. The per-process `Environment` that a `Safe` uses is safe/env.py's; these
borrow its opening, its translation of Berkeley DB errors and its registry.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from berkeleydb import db

from .env import (
    Options,
    _checkpoint_fully,
    _close_env,
    _open_db,
    _open_env,
    acquire,
    canonical,
    is_open_here,
    release,
    translate,
)
from .errors import SafeBusyError, SafeCorruptError, SafeError, SafeNoSpaceError
from .layout import (
    DATA_FILES,
    DB_FILE,
    DIR_MODE,
    FILE_MODE,
    REGISTER_FILE,
    WAKE_FILE,
    _check_directory,
    _lock_directory,
    _make_private,
    _make_private_dirs,
    _private,
)
from .register import holders

# Cache of an environment that recovery (re)creates outside any Safe.open.
RECOVERY_CACHE_SIZE = 32 << 20


@contextlib.contextmanager
def _exclusively(path: Path, what: str) -> Iterator[None]:
    fd = _lock_directory(path, what, exclusive=True)
    try:
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def _environment(path: Path, what: str, **open_args: Any) -> Iterator[Any]:
    """A DBEnv for one whole-environment operation: Berkeley DB errors inside become SafeErrors
    naming `what`, and the env is closed at the end (pinned instead if it panicked)."""
    env = _open_env(path, **open_args)
    failure: BaseException | None = None
    try:
        yield env
    except SafeError as e:
        failure = e
        raise
    except db.DBError as e:
        failure = e
        raise translate(path, what, e) from e
    finally:
        _close_env(env, failure)


def prepare(path: str | os.PathLike[str], *, cache_size: int, min_free_space: int) -> float:
    """Create the safe or recover it if a registered process died; leave nothing open.

    For a supervisor before it forks: this process becomes the region's creator (cache size,
    deadlock detector), creates the database, checkpoints, and closes every handle, so nothing
    crosses the fork. No thread is started.
    """
    home = canonical(path)
    if is_open_here(home):
        raise SafeBusyError(
            home, "prepare", "this process has the safe open", "close it first, then prepare"
        )
    started = time.monotonic()
    _check_directory(home, create=True)
    with _environment(
        home, "prepare", cache_size=cache_size, recover=db.DB_RECOVER, min_free_space=min_free_space
    ) as env:
        _open_db(home, env, create=True).close()
        _checkpoint_fully(env)
    return time.monotonic() - started


def users(path: str | os.PathLike[str]) -> list[int]:
    """Pids holding the environment open, read from DB_REGISTER's fcntl slot locks.

    Opening and closing __db.register drops this process's own registration (fcntl semantics),
    so a process that has the safe open answers from its registry instead of touching the file.
    """
    home = canonical(path)
    if is_open_here(home):
        return [os.getpid()]
    try:
        return holders(home)
    except PermissionError as e:
        raise translate(home, "list its users", e) from e


def recover(path: str | os.PathLike[str], *, catastrophic: bool = False) -> float:
    """Run recovery on a safe that no process is using; SafeBusyError naming the users otherwise."""
    home = canonical(path)
    if not (home / DB_FILE).exists():
        raise SafeError(home, "recover", "no such safe", "check the path")
    pids = users(home)
    if pids:
        raise SafeBusyError(
            home,
            "recover",
            f"in use by pid {', '.join(map(str, pids))}",
            "stop those processes first",
        )
    with _exclusively(home, "recover"):
        return _recover_unused(home, catastrophic=catastrophic)


def _recover_unused(home: Path, *, catastrophic: bool) -> float:
    started = time.monotonic()
    # Without DB_REGISTER, recovery always runs (with it, it is skipped when nobody died).
    with _environment(
        home,
        "recover",
        cache_size=RECOVERY_CACHE_SIZE,
        recover=db.DB_RECOVER_FATAL if catastrophic else db.DB_RECOVER,
        min_free_space=RECOVERY_CACHE_SIZE,
        register=False,
    ) as env:
        _checkpoint_fully(env)
    return time.monotonic() - started


def verify(path: str | os.PathLike[str]) -> None:
    """Check the structure of a safe's database file; SafeCorruptError if it is damaged.

    Berkeley DB's verify reads the file outside the environment, so it is only run on a safe
    that no process is using (SafeBusyError otherwise).
    """
    home = canonical(path)
    if not (home / DB_FILE).exists():
        raise SafeError(home, "verify", "no such safe", "check the path")
    pids = users(home)
    if pids:
        raise SafeBusyError(
            home, "verify", f"in use by pid {', '.join(map(str, pids))}", "stop those processes"
        )
    with _exclusively(home, "verify"):
        _verify_file(home)


def _verify_file(home: Path, todo: str = "restore it from a backup") -> None:
    for name in DATA_FILES:
        if name != DB_FILE and not (home / name).exists():
            continue
        handle = db.DB()
        try:
            handle.verify(str(home / name))
        except db.DBError as e:
            raise SafeCorruptError(home, "verify", f"{name} failed verification: {e}", todo) from e


# -- backup and restore ---------------------------------------------------------------------------


def _check_backup_dir(home: Path) -> None:
    """A consistent copy (data file and logs) that catastrophic recovery brings up to date."""
    if not (home / DB_FILE).exists() or not list(home.glob("log.*")):
        raise SafeError(
            home, "read the backup", f"no {DB_FILE} and log files here", "give a backup directory"
        )


def _recover_copy(home: Path) -> int:
    """Catastrophic recovery on a private copy (no other process sees it), then count and
    verify its records; the copy is left as plain files (regions removed)."""
    with _environment(
        home,
        "recover the copy",
        cache_size=RECOVERY_CACHE_SIZE,
        recover=db.DB_RECOVER_FATAL,
        min_free_space=RECOVERY_CACHE_SIZE,
        register=False,
    ) as env:
        handle = db.DB(env)
        handle.open(DB_FILE, None, db.DB_BTREE, db.DB_AUTO_COMMIT | db.DB_RDONLY, 0o600)
        count: int = handle.stat()["ndata"]
        handle.close()
        _checkpoint_fully(env)
    with contextlib.suppress(db.DBError):
        db.DBEnv().remove(str(home))
    _verify_file(home, "take the backup again")
    return count


def backup(path: str | os.PathLike[str], dest: str | os.PathLike[str]) -> int:
    """Hot backup of a safe, in use or not, into the new or empty directory `dest`.

    Berkeley DB copies the data file and then the logs, so the copy is consistent once
    recovered. Before returning, a scratch copy of the backup is recovered catastrophically,
    verified and counted: the number of keys is returned, and a backup that would not restore
    raises instead.
    """
    home, target = canonical(path), canonical(dest)
    if not (home / DB_FILE).exists():
        raise SafeError(home, "back up", "no such safe", "check the path")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise SafeError(
            target,
            "back up",
            "the destination exists and is not an empty directory",
            "give a new or empty directory",
        )
    needed = sum(
        p.stat().st_size for p in home.iterdir() if p.name in DATA_FILES or p.name[:4] == "log."
    )
    if os.path.exists(target.parent):
        free = os.statvfs(target.parent)
        if free.f_bavail * free.f_frsize < needed:
            raise SafeNoSpaceError(
                target, "back up", f"needs about {needed >> 20} MiB", "free space"
            )
    try:
        _make_private_dirs(target)
    except OSError as e:
        raise translate(target, "back up", e) from e
    environment = acquire(
        home,
        cache_size=8 << 20,
        checkpoint_interval=60,
        recover=False,
        create=False,
        min_free_space=0,
    )
    try:
        environment.call(
            "back up",
            Options(durable=True, timeout=600, min_free_space=0),
            lambda: environment.backup_to(target),
        )
    finally:
        release(environment)
    # DEST holds a copy of the data: private too, even if it was given as an existing directory.
    _make_private(target)
    scratch = target.parent / f".{target.name}.check-{os.getpid()}"
    try:
        _copy_files(target, scratch)
        return _recover_copy(scratch)
    finally:
        _remove_tree(scratch)


def restore(backup_dir: str | os.PathLike[str], path: str | os.PathLike[str]) -> int:
    """Make `path` a copy of the backup (a new safe, or a stopped one, replaced whole).

    The backup is copied beside the target, recovered and verified there, and only then swapped
    in, so a failure leaves the old safe as it was. Returns the number of keys restored.
    """
    source, home = canonical(backup_dir), canonical(path)
    _check_backup_dir(source)
    if home.exists() and not home.is_dir():
        raise SafeError(home, "restore", "the path exists and is not a directory", "give a safe")
    if home.exists() and any(home.iterdir()) and not (home / DB_FILE).exists():
        raise SafeError(
            home,
            "restore",
            "the directory is not empty and is not a safe",
            "restore onto a safe, a new path or an empty directory",
        )
    lock: int | None = None
    if home.exists():
        pids = users(home)
        if pids:
            raise SafeBusyError(
                home, "restore", f"in use by pid {', '.join(map(str, pids))}", "stop them first"
            )
        # Held until the swap is done: nobody can open the old safe meanwhile and write into
        # what is about to be deleted.
        lock = _lock_directory(home, "restore", exclusive=True)
    staging = home.parent / f".{home.name}.restore-{os.getpid()}"
    _make_private_dirs(home.parent)
    _remove_tree(staging)
    try:
        _copy_files(source, staging)
        count = _recover_copy(staging)
        _make_private(staging)
        if home.exists():
            old = home.parent / f".{home.name}.old-{os.getpid()}"
            os.rename(home, old)
            os.rename(staging, home)
            _remove_tree(old)
        else:
            os.rename(staging, home)
        return count
    finally:
        _remove_tree(staging)
        if lock is not None:
            os.close(lock)


def _copy_files(source: Path, dest: Path) -> None:
    """Copy the data file and logs (never __db.* regions or the register) with fsync, into a
    private directory as private files (0700, 0600), whatever the umask."""
    _make_private_dirs(dest)
    _private(dest, DIR_MODE)
    for p in sorted(source.iterdir()):
        if p.name in DATA_FILES or (p.name.startswith("log.") and p.name[4:].isdigit()):
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
            with open(p, "rb") as src, open(os.open(dest / p.name, flags, FILE_MODE), "wb") as dst:
                os.fchmod(dst.fileno(), FILE_MODE)  # exact, before a byte of data is in it
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
                dst.flush()
                os.fsync(dst.fileno())


def _remove_tree(path: Path) -> None:
    """Remove a safe's directory: only its own files, so anything else stops the removal."""
    if path.exists():
        for p in path.iterdir():
            if p.name in (*DATA_FILES, WAKE_FILE, REGISTER_FILE) or p.name[:4] in (
                "log.",
                "__db",
            ):
                p.unlink()
        with contextlib.suppress(OSError):
            path.rmdir()
