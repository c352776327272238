"""The supervisor's decisions, apart from the process calls that carry them out.

`supervisor.py` forks, signals, reaps and recovers; what it should do at each turn is decided
here, from numbers and flags only (no `os`, no sockets, no clock of its own: `now` is passed
in), so that every rule can be read in one place and unit-tested without starting a process
(`tests/unit/test_supervisor_policy.py`):

- which exit is a clean stop, a replacement, a boot failure or a crash (`classify_exit`), and
  how to say why a worker ended (`describe_exit`);
- the back-off of a cage that keeps dying, and when it has stopped dying (`CageHealth`);
- when a cage is "up" (every configured worker ready), and how long it was down;
- which worker slots to refill (`free_slots`);
- a worker that cannot boot: stop the node, refuse the reload it belongs to, or ignore it
  (`on_boot_failure`); a reload cut short by a crash: start it again or give up
  (`retry_reload`);
- a worker to kill: silent past the heartbeat timeout, or still there at its stop deadline
  (`kill_reason`);
- how long the main loop may sleep (`sleep_for`).
"""

from __future__ import annotations

import enum
import signal
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from .child import EXIT_BOOT_FAILED, EXIT_NEEDS_RECOVERY

__all__ = [
    "BACKOFF_FIRST",
    "BACKOFF_MAX",
    "RELOAD_RETRIES",
    "STABLE_AFTER",
    "TICK",
    "BootFailure",
    "CageHealth",
    "Exit",
    "backoff",
    "classify_exit",
    "describe_exit",
    "free_slots",
    "kill_reason",
    "on_boot_failure",
    "retry_reload",
    "sleep_for",
]

RELOAD_RETRIES = 3  # a reload cut short by a crash is started again this many times in a row
STABLE_AFTER = 1.0  # a cage fully up this long has stopped "dying": its backoff starts over
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 5.0  # short enough that a burst of outside kills (OOM) is not a long outage
TICK = 0.5  # longest sleep of the loop, for deadlines nothing else wakes it for


class Exit(enum.Enum):
    """What a worker's exit asks of the supervisor."""

    STOPPED = "stopped"  # a clean exit it was asked for: nothing to do
    REPLACE = "replace"  # a clean exit nobody asked for: refill its slot, no recovery needed
    BOOT_FAILED = "boot failed"  # it cannot load its modules: restarting would fail again
    CRASH = "crash"  # anything else may have left locks held: kill the cage, recover, refill


def classify_exit(code: int, *, asked_to_stop: bool) -> Exit:
    """`code` as `os.waitstatus_to_exitcode` gives it (negative: killed by that signal).

    Only status 0 means every safe was closed; EXIT_NEEDS_RECOVERY, a signal or any other
    status is a crash (`worker.py` documents the codes).
    """
    if code == 0:
        return Exit.STOPPED if asked_to_stop else Exit.REPLACE
    if code == EXIT_BOOT_FAILED:
        return Exit.BOOT_FAILED
    return Exit.CRASH


def describe_exit(code: int, kill_reason: str | None) -> str:
    """Why a worker ended, for the log."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        if kill_reason:
            return f"killed by {name} ({kill_reason})"
        hint = ": out of memory?" if -code == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    if code == 0:
        return "exited cleanly"
    if code == EXIT_BOOT_FAILED:
        return "could not boot"
    if code == EXIT_NEEDS_RECOVERY:
        return "exited leaving a safe to recover"
    return f"exited with status {code}"


def backoff(failures: int) -> float:
    """Seconds to wait before refilling a cage after its `failures`-th crash in a row.

    The first crash is refilled at once (a single `kill -9` must cost well under a second:
    README, "Signals and behaviour"); then 0.1 s, doubling, at most BACKOFF_MAX.
    """
    if failures <= 1:
        return 0.0
    return min(BACKOFF_MAX, BACKOFF_FIRST * 2.0 ** (failures - 2))


@dataclass
class CageHealth:
    """A cage's crash history: crashes in a row, the pending refill, down and up times.

    Times are `time.monotonic()` values passed in by the caller.
    """

    failures: int = 0  # crashes in a row, for the backoff
    restart_at: float | None = None  # when to fork the missing workers
    down_since: float | None = None  # the crash the cage is recovering from
    up_since: float | None = None  # since when every worker is ready

    @property
    def up(self) -> bool:
        """Whether every configured worker has been ready since the last crash."""
        return self.up_since is not None

    def crashed(self, now: float, started: float) -> float:
        """Record a crash handled from `started` to `now`; the backoff before the refill.

        A cage that had been up for STABLE_AFTER counts this as its first crash again, so an
        occasional kill never waits; one that dies again before that backs off further.
        """
        stable = self.up_since is not None and now - self.up_since >= STABLE_AFTER
        self.failures = 1 if stable else self.failures + 1
        self.up_since = None
        if self.down_since is None:
            self.down_since = started
        return backoff(self.failures)

    def schedule(self, at: float) -> None:
        """Refill at `at`, or earlier if a refill is already due before."""
        self.restart_at = at if self.restart_at is None else min(self.restart_at, at)

    def cancel(self) -> None:
        self.restart_at = None

    def take_due(self, now: float) -> bool:
        """Whether the refill is due at `now`; it is then no longer pending."""
        if self.restart_at is not None and self.restart_at <= now:
            self.restart_at = None
            return True
        return False

    def observe(self, now: float, ready: int, wanted: int) -> float | None:
        """Note `ready` of `wanted` workers ready at `now`; the seconds the cage was down when
        this makes it up again after a crash (None otherwise: still down, or never crashed)."""
        if ready < wanted or self.up_since is not None:
            return None
        self.up_since = now
        if self.down_since is None:
            return None
        down, self.down_since = self.down_since, None
        return now - down


def free_slots(workers: int, taken: Collection[int]) -> list[int]:
    """The slots (0..workers-1) to fork workers into so that `workers` run, given the slots
    `taken` by running workers (not those asked to stop: they are leaving)."""
    free = [slot for slot in range(workers) if slot not in taken]
    return free[: max(0, workers - len(taken))]


class BootFailure(enum.Enum):
    """What a worker that cannot boot (a module fails to load) leads to."""

    IGNORE = "ignore"  # its generation was already given up (a refused reload)
    REFUSE_RELOAD = "refuse the reload"  # the new generation cannot boot: keep the old one
    STOP_NODE = "stop the node"  # the running config cannot boot: crash-looping would not help


def on_boot_failure(*, current: bool, reloading: bool) -> BootFailure:
    """`current`: the worker belongs to the generation serving now; `reloading`: to the one a
    SIGHUP is starting."""
    if reloading:
        return BootFailure.REFUSE_RELOAD
    if current:
        return BootFailure.STOP_NODE
    return BootFailure.IGNORE


def retry_reload(retries: int) -> bool:
    """A cage crashed during a reload, which was therefore abandoned after `retries` retries in
    a row: whether to start it again (the operator asked for it) rather than give up."""
    return retries < RELOAD_RETRIES


def kill_reason(
    now: float,
    *,
    last_beat: float,
    ready: bool,
    stop_deadline: float | None,
    heartbeat_timeout: float,
) -> str | None:
    """Why a worker must be SIGKILLed at `now`, or None: a worker asked to stop that is still
    there at its deadline, or one silent (no heartbeat, no report) for `heartbeat_timeout`."""
    if stop_deadline is not None:
        return "still running at the stop deadline" if now > stop_deadline else None
    if now - last_beat > heartbeat_timeout:
        state = "serving" if ready else "booting"
        return f"{state} but silent for {now - last_beat:.1f} s: hung"
    return None


def sleep_for(now: float, deadlines: Iterable[float]) -> float:
    """How long the main loop may wait for a signal or a report: until the next deadline it
    must act on (a refill, a stop deadline), TICK at most, never negative."""
    return max(0.0, min([TICK, *(d - now for d in deadlines)]))
