"""The errors of pmnc.safe: one base class, one subclass per condition a caller may act on.

Every message reads "<safe path>: <what failed>: <why> (<what to do>)", after py-lmdb's habit of
putting the remedy in the error, so that a log line alone tells an operator what to do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class SafeError(Exception):
    """A safe could not do what was asked; `path` names the safe's directory."""

    def __init__(self, path: str | Path, what: str, why: str, todo: str = "") -> None:
        self.path = Path(path)
        self.what = what
        self.why = why
        self.todo = todo
        message = f"{self.path}: {what}: {why}"
        if todo:
            message += f" ({todo})"
        super().__init__(message)

    def __reduce__(self) -> tuple[type[SafeError], tuple[Path, str, str, str]]:
        # Rebuilt from its parts (args holds only the message), so that it survives pickling:
        # multiprocessing and concurrent.futures send exceptions between processes.
        return (type(self), (self.path, self.what, self.why, self.todo))


class SafeClosedError(SafeError):
    """The safe was closed; open it again to use it."""


class SafeTimeoutError(SafeError):
    """A call could not finish by its deadline (lock waits and deadlock retries included)."""


class SafeNeedsRecoveryError(SafeError):
    """The environment panicked or a process died inside it: it must be recovered.

    A worker under a supervisor should `os._exit()` at once without closing anything; the
    supervisor recovers. Standalone, exit every process using it: the next open recovers it
    (the process that holds a panicked handle cannot reopen that safe itself).
    """


class SafeNoSpaceError(SafeError):
    """The filesystem is (nearly) full; writes resume once space is freed. Reads go on."""


class SafePermissionError(SafeError):
    """The safe's directory or files cannot be accessed by this process."""


class SafeCorruptError(SafeError):
    """A file of the safe is damaged or is not a pmnc safe at all."""


class SafeBusyError(SafeError):
    """An operation that needs the safe to itself found processes using it."""


class SafeForkError(SafeError):
    """A `Safe` was used in a process other than the one that opened it (open it after fork)."""


class SafeNotMasterError(SafeError):
    """A write reached a replicated safe where it is not master; nothing was written here.

    `master` is the master site's (host, port), or None while the group has none (an election,
    or too few sites up to elect one). The runtime carries the call out on the master's node.
    """

    def __init__(
        self,
        path: str | Path,
        what: str,
        why: str,
        todo: str = "",
        master: tuple[str, int] | None = None,
    ) -> None:
        super().__init__(path, what, why, todo)
        self.master = master

    def __reduce__(self) -> tuple[type[SafeError], tuple[Any, ...]]:
        return (type(self), (self.path, self.what, self.why, self.todo, self.master))


class SafeNotAcknowledgedError(SafeError):
    """A write was committed on this (master) site but not acknowledged by the group as its
    ack policy requires within the ack timeout: it is not durable across machines, and a
    failover before the other sites catch up may lose it. Its outcome is unknown to the caller:
    retry only what is idempotent, or read back after the group recovers."""


class SafeGroupNotFormedError(SafeNotMasterError):
    """A write on a master whose group has fewer sites than its ack policy needs (a new group
    whose other nodes have not joined yet): nothing was written. Not a master elsewhere
    either, so sending the write to another node does not help: wait for the group."""
