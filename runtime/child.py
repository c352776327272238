"""What every process the supervisor forks (a worker, a cage's replication process) shares: its
exit codes, undoing what fork copied from the supervisor, its one-line messages to the
supervisor, closing its safes, and leaving without interpreter shutdown.

Exit codes tell the supervisor what to do (runtime/policy.py decides): 0 a clean exit (every
safe closed); EXIT_BOOT_FAILED a module or safe that cannot be loaded (restarting would only
fail again); EXIT_NEEDS_RECOVERY a process that left without closing its safes: like a crash,
its cage must be recovered.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterable
from queue import SimpleQueue
from typing import NoReturn

from pmnc.safe import Safe, SafeError

from .logs import logger

__all__ = [
    "EXIT_BOOT_FAILED",
    "EXIT_NEEDS_RECOVERY",
    "Pipe",
    "beat_interval",
    "close_safes",
    "main",
    "reset_after_fork",
]

EXIT_BOOT_FAILED = 78  # EX_CONFIG
EXIT_NEEDS_RECOVERY = 75  # EX_TEMPFAIL


def main(body: Callable[[], int], what: str) -> NoReturn:
    """Run a forked child's `body` and exit with its status; never return into the parent's
    frames (popen_fork's rule), and never run interpreter shutdown: its GC would close handles
    inherited from the supervisor, which panics Berkeley DB environments (docs/berkeleydb.md,
    "Handles across fork()")."""
    code = EXIT_NEEDS_RECOVERY  # whatever escapes left the safes in an unknown state
    try:
        code = body()
    except BaseException:  # noqa: BLE001 - logged, then the unclean exit code above
        with contextlib.suppress(BaseException):
            logger.exception("%s failed", what)
    finally:
        os._exit(code)


def reset_after_fork(
    report_fd: int, inherited_fds: Iterable[int], signals: SimpleQueue[int]
) -> None:
    """Undo what fork copied from the supervisor: its signal set-up and descriptors. SIGTERM
    is queued on `signals` for the child's main loop."""
    signal.set_wakeup_fd(-1)
    for fd in inherited_fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    os.set_blocking(report_fd, False)  # a beat is dropped rather than block
    # Ctrl-C and a terminal hang-up reach the whole process group: the supervisor decides.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, lambda signum, _frame: signals.put_nowait(signum))


def beat_interval(heartbeat_timeout: float) -> float:
    """How often a child proves it is alive: several beats fit in one timeout."""
    return min(1.0, max(0.05, heartbeat_timeout / 5))


class Pipe:
    """The child's end of its pipe to the supervisor: one line per message (`ready`, `beat`,
    `leaving`, `boot-error <why>`), from any thread."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._lock = threading.Lock()

    def send(self, message: str) -> bool:
        """Send one line; False if the supervisor is gone."""
        with self._lock:
            try:
                os.write(self.fd, message.encode()[:4000] + b"\n")
            except BlockingIOError:
                return True  # the supervisor is behind; a missed beat is fine
            except OSError:
                return False
            return True


def close_safes(safes: Iterable[Safe]) -> bool:
    """Close every safe; False if one failed (the supervisor must then recover)."""
    ok = True
    for safe in safes:
        try:
            safe.close()
        except SafeError as e:
            logger.error("closing %s: %s", safe.path, e)
            ok = False
    return ok
