"""Supervisor policy without a process: the rules of `runtime/policy.py` on their own, then the
`Supervisor`'s crash, boot-failure and refill paths with `os.kill`, `os.waitpid` and the safes'
`prepare` faked, so that what it decides is checked apart from forking and signalling."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from pmnc.runtime import child, policy, supervisor
from pmnc.runtime.balance import Balance
from pmnc.runtime.config import load_config
from pmnc.runtime.supervisor import Supervisor, _Cage, _Child, _Reload

# -- the rules ----------------------------------------------------------------------------------


def test_backoff_is_none_for_a_first_crash_then_doubles_up_to_the_cap() -> None:
    delays = [policy.backoff(n) for n in range(1, 10)]
    assert delays[:5] == [0.0, 0.1, 0.2, 0.4, 0.8]
    assert delays[-1] == policy.BACKOFF_MAX
    assert delays == sorted(delays)


def test_a_cage_dying_again_before_it_is_stable_backs_off_further() -> None:
    health = policy.CageHealth()
    assert health.crashed(now=10.0, started=9.9) == 0.0
    assert health.down_since == 9.9
    assert not health.up
    # Back up, but only 0.5 s before the next crash: not stable yet.
    assert health.observe(10.2, ready=2, wanted=2) == pytest.approx(0.3)
    assert health.up and health.down_since is None
    assert health.crashed(now=10.7, started=10.7) == 0.1
    assert health.failures == 2
    assert health.crashed(now=10.8, started=10.8) == 0.2  # still down: a third in a row


def test_a_cage_up_for_stable_after_starts_its_backoff_over() -> None:
    health = policy.CageHealth(failures=6)
    health.observe(100.0, ready=1, wanted=1)
    assert health.crashed(now=100.0 + policy.STABLE_AFTER, started=101.0) == 0.0
    assert health.failures == 1


def test_a_cage_is_up_only_with_every_configured_worker_ready() -> None:
    health = policy.CageHealth()
    health.crashed(now=1.0, started=1.0)
    assert health.observe(2.0, ready=3, wanted=4) is None
    assert not health.up
    assert health.observe(2.5, ready=4, wanted=4) == 1.5
    assert health.observe(3.0, ready=4, wanted=4) is None  # reported once, not every tick
    assert policy.CageHealth().observe(1.0, ready=1, wanted=1) is None  # never crashed


def test_a_refill_keeps_the_earliest_time_and_is_taken_once() -> None:
    health = policy.CageHealth()
    health.schedule(5.0)
    health.schedule(7.0)
    assert health.restart_at == 5.0
    health.schedule(3.0)
    assert not health.take_due(2.9)
    assert health.take_due(3.0)
    assert not health.take_due(3.0)
    health.schedule(4.0)
    health.cancel()
    assert not health.take_due(100.0)


def test_free_slots_refills_the_missing_ones_only() -> None:
    assert policy.free_slots(4, set()) == [0, 1, 2, 3]
    assert policy.free_slots(4, {0, 2}) == [1, 3]
    assert policy.free_slots(2, {0, 1}) == []
    # A reload that shrank the cage: slots beyond the new count stay taken until they leave.
    assert policy.free_slots(2, {3, 5}) == []
    assert policy.free_slots(3, {0, 7}) == [1]


@pytest.mark.parametrize(
    ("code", "asked", "expected"),
    [
        (0, True, policy.Exit.STOPPED),
        (0, False, policy.Exit.REPLACE),
        (child.EXIT_BOOT_FAILED, False, policy.Exit.BOOT_FAILED),
        (child.EXIT_NEEDS_RECOVERY, True, policy.Exit.CRASH),
        (-signal.SIGKILL, False, policy.Exit.CRASH),
        (1, True, policy.Exit.CRASH),
    ],
)
def test_only_a_clean_exit_avoids_recovery(code: int, asked: bool, expected: policy.Exit) -> None:
    assert policy.classify_exit(code, asked_to_stop=asked) is expected


def test_describe_exit_says_why() -> None:
    assert policy.describe_exit(-signal.SIGKILL, None) == "killed by SIGKILL: out of memory?"
    assert policy.describe_exit(-signal.SIGKILL, "hung") == "killed by SIGKILL (hung)"
    assert policy.describe_exit(-200, None) == "killed by signal 200"
    assert policy.describe_exit(child.EXIT_BOOT_FAILED, None) == "could not boot"
    assert policy.describe_exit(7, None) == "exited with status 7"


def test_boot_failure_refuses_a_reload_stops_a_running_node_and_ignores_a_dropped_one() -> None:
    assert policy.on_boot_failure(current=False, reloading=True) is policy.BootFailure.REFUSE_RELOAD
    assert policy.on_boot_failure(current=True, reloading=False) is policy.BootFailure.STOP_NODE
    assert policy.on_boot_failure(current=False, reloading=False) is policy.BootFailure.IGNORE


def test_a_reload_cut_short_by_crashes_is_retried_a_bounded_number_of_times() -> None:
    retried = 0
    while policy.retry_reload(retried):
        retried += 1
    assert retried == policy.RELOAD_RETRIES


def test_kill_reason_for_a_hung_or_overdue_worker() -> None:
    def reason(now: float, **kw: object) -> str | None:
        args: dict[str, object] = {"last_beat": 0.0, "ready": True, "stop_deadline": None}
        args.update(kw)
        return policy.kill_reason(now, heartbeat_timeout=10.0, **args)  # type: ignore[arg-type]

    assert reason(9.9) is None
    assert reason(10.5) == "serving but silent for 10.5 s: hung"
    assert reason(10.5, ready=False) == "booting but silent for 10.5 s: hung"
    # Asked to stop: the deadline counts, not the heartbeat (a draining worker is busy).
    assert reason(30.0, stop_deadline=31.0) is None
    assert reason(31.5, stop_deadline=31.0) == "still running at the stop deadline"


def test_sleep_for_is_bounded_by_tick_and_never_negative() -> None:
    assert policy.sleep_for(10.0, []) == policy.TICK
    assert policy.sleep_for(10.0, [10.2, 11.0]) == pytest.approx(0.2)
    assert policy.sleep_for(10.0, [9.0]) == 0.0


# -- the supervisor with the process calls faked ------------------------------------------------


class Fakes:
    """What the supervisor asked of the OS: signals sent, children waited for, safes prepared."""

    def __init__(self) -> None:
        self.signals: list[tuple[int, int]] = []
        self.waited: list[int] = []
        self.prepared: list[Path] = []


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch) -> Iterator[Fakes]:
    f = Fakes()

    def kill(pid: int, signum: int) -> None:
        f.signals.append((pid, signum))

    def waitpid(pid: int, options: int) -> tuple[int, int]:
        if pid == -1:  # the reap loop: no other child to report
            raise ChildProcessError
        f.waited.append(pid)
        return pid, 0

    def prepare(path: Path, **_: object) -> float:  # cache_size= and the like
        f.prepared.append(path)
        return 0.01

    monkeypatch.setattr(os, "kill", kill)  # the module supervisor.py calls
    monkeypatch.setattr(os, "waitpid", waitpid)
    monkeypatch.setattr(supervisor, "prepare", prepare)
    yield f


def _supervisor(tmp_path: Path, workers: int = 3) -> tuple[Supervisor, _Cage]:
    (tmp_path / "modules").mkdir(exist_ok=True)
    config = tmp_path / "node.yaml"
    config.write_text(
        f"node: n\ndata_dir: {tmp_path / 'var'}\ncages:\n"
        f"  - name: c\n    modules: {tmp_path / 'modules'}\n    workers: {workers}\n"
    )
    cfg = load_config(config)
    sup = Supervisor(cfg)
    run_dir = tmp_path / "run"
    run_dir.mkdir(exist_ok=True)
    cage = _Cage(cfg.cages[0], ("m",), (tmp_path / "safe-m",), None, run_dir, Balance(workers))
    sup._cages = {"c": cage}
    return sup, cage


def _child(sup: Supervisor, cage: _Cage, pid: int, slot: int) -> _Child:
    r, w = os.pipe()
    os.close(w)  # the worker's end: gone, as after an exit
    child = _Child(pid, cage, None, r, 0.0, slot, 0.0, ready=True)
    sup._workers[pid] = child
    return child


def test_a_crash_kills_the_rest_of_the_cage_recovers_its_safes_then_refills(
    tmp_path: Path, fakes: Fakes
) -> None:
    sup, cage = _supervisor(tmp_path)
    for slot, pid in enumerate((101, 102, 103)):
        _child(sup, cage, pid, slot)
    cage.health.observe(0.0, ready=3, wanted=3)

    sup._on_exit(101, -signal.SIGKILL)

    assert sorted(fakes.signals) == [(102, signal.SIGKILL), (103, signal.SIGKILL)]
    assert sorted(fakes.waited) == [102, 103]  # reaped before the safes are touched
    assert fakes.prepared == [tmp_path / "safe-m"]
    assert sup._workers == {}
    assert cage.health.failures == 1
    assert cage.health.restart_at is not None  # at once: a first crash does not wait
    assert not sup._stopping
    assert sup._restarts == {("c", 0): 1, ("c", 1): 1, ("c", 2): 1}


def test_a_clean_unasked_exit_is_replaced_without_recovery(tmp_path: Path, fakes: Fakes) -> None:
    sup, cage = _supervisor(tmp_path, workers=2)
    _child(sup, cage, 201, 0)
    _child(sup, cage, 202, 1)
    sup._on_exit(201, 0)
    assert fakes.signals == [] and fakes.prepared == []
    assert list(sup._workers) == [202]
    assert cage.health.restart_at is not None and cage.health.failures == 0


def test_boot_failure_of_the_running_config_stops_the_node(tmp_path: Path, fakes: Fakes) -> None:
    sup, cage = _supervisor(tmp_path, workers=2)
    _child(sup, cage, 301, 0)
    _child(sup, cage, 302, 1)
    sup._on_exit(301, child.EXIT_BOOT_FAILED)
    assert sup._stopping and sup._exit_code == supervisor.EXIT_FAILED
    assert fakes.signals == [(302, signal.SIGTERM)]  # the others stop gracefully
    assert fakes.prepared == []


def _reloading(tmp_path: Path, old_pid: int, *new_pids: int) -> tuple[Supervisor, _Cage]:
    """A node of one worker (`old_pid`) reloading into a generation of `new_pids`."""
    sup, old = _supervisor(tmp_path, workers=1)
    _child(sup, old, old_pid, 0)
    new = _Cage(old.config, ("m",), old.safe_dirs, None, old.run_dir, Balance(1))
    sup._reload = _Reload(sup.config, {"c": new})
    for pid in new_pids:
        _child(sup, new, pid, 0)
    return sup, old


def test_boot_failure_during_a_reload_refuses_it_and_keeps_serving(
    tmp_path: Path, fakes: Fakes
) -> None:
    sup, old = _reloading(tmp_path, 401, 402, 403)

    sup._on_exit(402, child.EXIT_BOOT_FAILED)

    assert not sup._stopping
    assert sup._reload is None
    assert fakes.signals == [(403, signal.SIGTERM)]  # the new generation goes, the old stays
    assert sup._cages["c"] is old and 401 in sup._workers


def test_a_crash_during_a_reload_abandons_it_and_asks_for_it_again(
    tmp_path: Path, fakes: Fakes
) -> None:
    sup, _old = _reloading(tmp_path, 501, 502)

    sup._on_exit(501, -signal.SIGKILL)

    assert (502, signal.SIGKILL) in fakes.signals  # the whole cage, both generations
    assert sup._reload is None and sup._reload_retries == 1
    assert sup._signals.get_nowait() == signal.SIGHUP


def test_fill_forks_into_the_free_slots_only(
    tmp_path: Path, fakes: Fakes, monkeypatch: pytest.MonkeyPatch
) -> None:
    sup, cage = _supervisor(tmp_path, workers=3)
    _child(sup, cage, 601, 1)
    leaving = _child(sup, cage, 602, 0)
    leaving.stop_deadline = 1.0  # asked to stop: its slot is free again
    spawned: list[int] = []
    monkeypatch.setattr(sup, "_spawn", lambda c, slot: spawned.append(slot))
    sup._fill(cage)
    assert spawned == [0, 2]
