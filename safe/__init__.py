"""pmnc.safe: a module's private, persistent, dict-like safe on Berkeley DB.

    with Safe.open("var/safe/node1.demo.counter") as safe:
        safe["foo"] = {(None,): [1, "bar", Decimal("1.0")]}
        safe.modify("hits", lambda n: n + 1, 0)

Every call is one transaction, atomic and (by default) durable when it returns. This package
knows nothing of the runtime; `prepare`, `recover` and `users` are what a supervisor or an
operator's tool needs around it, `is_safe` and `disk_usage` what it asks of a directory instead
of knowing a safe's file names.
"""

from __future__ import annotations

import os

from . import admin as _admin
from .errors import (
    SafeBusyError,
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
from .layout import DiskUsage, disk_usage, is_safe
from .queue import Delivery, Queue
from .replication import ACK_POLICIES, Replication, log_distance, writes_committed
from .store import DEFAULT_CACHE_SIZE, DEFAULT_MIN_FREE_SPACE, Safe

__all__ = [
    "ACK_POLICIES",
    "DEFAULT_CACHE_SIZE",
    "Delivery",
    "DiskUsage",
    "Queue",
    "Replication",
    "Safe",
    "SafeBusyError",
    "SafeClosedError",
    "SafeCorruptError",
    "SafeError",
    "SafeForkError",
    "SafeGroupNotFormedError",
    "SafeNeedsRecoveryError",
    "SafeNoSpaceError",
    "SafeNotAcknowledgedError",
    "SafeNotMasterError",
    "SafePermissionError",
    "SafeTimeoutError",
    "backup",
    "disk_usage",
    "is_safe",
    "log_distance",
    "prepare",
    "recover",
    "restore",
    "users",
    "verify",
    "writes_committed",
]


def prepare(
    path: str | os.PathLike[str],
    *,
    cache_size: int = DEFAULT_CACHE_SIZE,
    min_free_space: int = DEFAULT_MIN_FREE_SPACE,
) -> float:
    """Create the safe, or recover it if a process died using it; leave no handle open.

    For a supervisor before it forks its workers. Returns the seconds it took.
    """
    return _admin.prepare(path, cache_size=cache_size, min_free_space=min_free_space)


def recover(path: str | os.PathLike[str], *, catastrophic: bool = False) -> float:
    """Recover a safe that no process is using (SafeBusyError naming the pids otherwise)."""
    return _admin.recover(path, catastrophic=catastrophic)


def users(path: str | os.PathLike[str]) -> list[int]:
    """The pids of the processes that have the safe open now."""
    return _admin.users(path)


def verify(path: str | os.PathLike[str]) -> None:
    """Check a safe that no process is using; SafeCorruptError if its database is damaged."""
    _admin.verify(path)


def backup(path: str | os.PathLike[str], dest: str | os.PathLike[str]) -> int:
    """Hot backup into a new or empty directory, proven restorable; returns its key count."""
    return _admin.backup(path, dest)


def restore(backup_dir: str | os.PathLike[str], path: str | os.PathLike[str]) -> int:
    """Replace a stopped (or create a new) safe with a backup; returns its key count."""
    return _admin.restore(backup_dir, path)
