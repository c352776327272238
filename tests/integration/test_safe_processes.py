"""One safe shared by real processes: forked, started independently, and killed with SIGKILL.

Children are forked and always end in os._exit (a child that returned into pytest's frames, or
ran the interpreter's shutdown, would run the parent's code twice). Every wait is bounded; a
child still alive after its bound counts as hung.
"""

from __future__ import annotations

import contextlib
import gc
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from forking import assert_children_ok, fork, wait
from pmnc.safe import (
    Safe,
    SafeError,
    SafeForkError,
    SafeNeedsRecoveryError,
    SafeTimeoutError,
    users,
    verify,
)


def test_forked_and_independent_processes_see_each_others_returned_writes(tmp_path: Path) -> None:
    path, errors = tmp_path / "s", tmp_path / "errors"
    with Safe.open(path) as s:
        s["parent"] = 1

    def child() -> None:
        with Safe.open(path, recover=False) as c:
            assert c["parent"] == 1
            c["forked"] = {"pid": os.getpid()}

    assert_children_ok([fork(child, errors)], errors)
    script = textwrap.dedent(f"""
        from pmnc.safe import Safe
        with Safe.open({str(path)!r}) as s:
            assert s["forked"]["pid"] > 0
            s["independent"] = "yes"
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    with Safe.open(path) as s:
        assert s["independent"] == "yes"
        assert set(s) == {"parent", "forked", "independent"}


def test_a_safe_used_across_fork_raises_and_the_parent_is_unharmed(tmp_path: Path) -> None:
    """Using, closing or garbage-collecting an inherited handle would panic the parent."""
    path, errors = tmp_path / "s", tmp_path / "errors"
    s = Safe.open(path)
    s["before"] = 1

    def child() -> None:
        with pytest.raises(SafeForkError, match=f"opened in pid {os.getppid()}"):
            s["x"]
        s.close()  # must not close the parent's handles
        gc.collect()
        with Safe.open(path, recover=False) as own:
            own["child"] = os.getpid()

    try:
        assert_children_ok([fork(child, errors)], errors)
        for i in range(200):
            s[f"after{i}"] = i
        assert s["child"] > 0
        assert len(s) == 202
    finally:
        s.close()
    verify(path)


def test_modify_is_exact_across_4_processes_of_8_threads(tmp_path: Path) -> None:
    path, errors = tmp_path / "s", tmp_path / "errors"
    per_thread = 60
    Safe.open(path).close()

    def child() -> None:
        failures: list[BaseException] = []
        with Safe.open(path, recover=False) as c:

            def work() -> None:
                try:
                    for _ in range(per_thread):
                        c.modify("n", lambda n: n + 1, 0)
                except BaseException as e:
                    failures.append(e)

            threads = [threading.Thread(target=work) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=90)
            assert not any(t.is_alive() for t in threads), "deadlocked"
            assert failures == []

    assert_children_ok([fork(child, errors) for _ in range(4)], errors, timeout=120)
    with Safe.open(path) as s:
        assert s["n"] == 4 * 8 * per_thread


def test_concurrent_setdefault_and_pop_agree(tmp_path: Path) -> None:
    path, errors = tmp_path / "s", tmp_path / "errors"
    with Safe.open(path) as s:
        s.update({f"job{i}": i for i in range(300)})
    results = tmp_path / "results"
    results.mkdir()

    def child() -> None:
        with Safe.open(path, recover=False) as c:
            winner = c.setdefault("leader", os.getpid())
            popped = []
            for i in range(300):
                value = c.pop(f"job{i}", None)
                if value is not None:
                    popped.append(value)
        (results / str(os.getpid())).write_text(f"{winner} {' '.join(map(str, popped))}")

    pids = [fork(child, errors) for _ in range(4)]
    assert_children_ok(pids, errors)
    lines = [p.read_text().split() for p in results.iterdir()]
    leaders = {line[0] for line in lines}
    assert len(leaders) == 1
    assert int(leaders.pop()) in pids
    popped = [int(v) for line in lines for v in line[1:]]
    assert sorted(popped) == list(range(300)), "every job popped by exactly one process"
    with Safe.open(path) as s:
        assert list(s) == ["leader"]


def test_two_writes_are_two_transactions_never_seen_out_of_order(tmp_path: Path) -> None:
    """A writer does a = i; b = i. Readers read b, then a: a is never older than b."""
    path, errors = tmp_path / "s", tmp_path / "errors"
    with Safe.open(path) as s:
        s.update(a=0, b=0)
    stop_at = time.time() + 2.0
    counts = tmp_path / "counts"
    counts.mkdir()

    def writer() -> None:
        with Safe.open(path, recover=False, durable=False) as w:
            i = 0
            while time.time() < stop_at:
                i += 1
                w["a"] = i
                w["b"] = i

    def reader() -> None:
        same = a_ahead = 0
        with Safe.open(path, recover=False) as r:
            while time.time() < stop_at:
                b = r["b"]
                a = r["a"]
                assert a >= b, f"saw b={b} newer than a={a}"  # type: ignore[operator]
                if a == b:
                    same += 1
                else:
                    a_ahead += 1
        (counts / str(os.getpid())).write_text(f"{same} {a_ahead}")

    pids = [fork(writer, errors)] + [fork(reader, errors) for _ in range(2)]
    assert_children_ok(pids, errors)
    observed = [tuple(map(int, p.read_text().split())) for p in counts.iterdir()]
    assert sum(same + ahead for same, ahead in observed) > 100, observed


def _acknowledging_writer(path: Path, acks: Path, prefix: str) -> None:
    """Write unique keys forever, appending each key to `acks` only after its write returned."""
    fd = os.open(acks, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with Safe.open(path, recover=False, timeout=3) as s:
        i = 0
        while True:
            key = f"{prefix}{i}"
            s[key] = {"i": i, "pad": "x" * random.randint(0, 300)}
            os.write(fd, f"{key}\n".encode())
            i += 1


@pytest.mark.parametrize("round_", range(3))
def test_kill_9_loses_no_acknowledged_write(tmp_path: Path, round_: int) -> None:
    path, errors, acks = tmp_path / "s", tmp_path / "errors", tmp_path / "acks"
    Safe.open(path).close()
    pids = [fork(lambda p=p: _acknowledging_writer(path, acks, f"w{p}."), errors) for p in range(2)]
    time.sleep(random.uniform(0.3, 1.2))
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    for pid in pids:
        assert wait(pid, 10) == -signal.SIGKILL
    acknowledged = acks.read_text().split()
    assert len(acknowledged) > 20
    with Safe.open(path) as s:  # recovers: the registered writers died
        missing = [k for k in acknowledged if k not in s]
    assert missing == []
    verify(path)


def test_lock_waits_are_bounded_and_a_dead_holder_is_noticed(tmp_path: Path) -> None:
    """A lock held too long times out the waiter; a holder killed with SIGKILL is noticed.

    The holder sits inside `modify` (its transaction holds the key's write lock) when it is
    killed, the case that would otherwise block every later writer of that key forever.
    """
    path, errors = tmp_path / "s", tmp_path / "errors"
    with Safe.open(path) as s:
        s["k"] = "committed"
    holding = tmp_path / "holding"

    def holder() -> None:
        def slow(old: object) -> object:
            holding.touch()
            time.sleep(120)
            return "never committed"

        with Safe.open(path, recover=False) as h:
            h.modify("k", slow)

    def waiter() -> None:
        w = Safe.open(path, recover=False, timeout=1.5)
        started = time.monotonic()
        with pytest.raises(SafeTimeoutError, match="could not get the locks"):
            w["k"] = "blocked"
        assert 1.4 < time.monotonic() - started < 4
        (tmp_path / "timed-out").touch()
        while not (tmp_path / "killed").exists():
            time.sleep(0.01)
        started = time.monotonic()
        with pytest.raises(SafeNeedsRecoveryError, match=r"process \d+ died"):
            while True:  # fails within the bound: a lock wait, then the dead holder noticed
                w["k"] = "after"
        assert time.monotonic() - started < 4
        with pytest.raises(SafeNeedsRecoveryError, match="left open"):
            w.close()  # its environment needs recovery: a worker would exit 75

    victim = fork(holder, errors)
    deadline = time.monotonic() + 10
    while not holding.exists():
        assert time.monotonic() < deadline, "holder never got the lock"
        time.sleep(0.01)
    pid = fork(waiter, errors)
    while not (tmp_path / "timed-out").exists():
        assert time.monotonic() < deadline + 10, "waiter never timed out"
        time.sleep(0.01)
    os.kill(victim, signal.SIGKILL)
    wait(victim, 10)
    (tmp_path / "killed").touch()
    assert_children_ok([pid], errors, timeout=20)
    with Safe.open(path) as s:  # every user gone: this open recovers
        assert s["k"] == "committed"
        s["k"] = "writable again"
    verify(path)


def test_kill_9_of_one_writer_among_others_loses_nothing(tmp_path: Path) -> None:
    """Survivors notice the death (or stay blocked on a region mutex the dead process held,
    which only killing them ends: what pmnc-runtime's supervisor does); nothing acknowledged is
    lost after recovery."""
    path, errors, acks = tmp_path / "s", tmp_path / "errors", tmp_path / "acks"
    Safe.open(path).close()
    outcomes = tmp_path / "outcomes"
    outcomes.mkdir()

    def survivor(n: int) -> None:
        fd = os.open(acks, os.O_WRONLY | os.O_APPEND)
        outcome = "finished"
        with Safe.open(path, recover=False, timeout=3) as s:
            end = time.monotonic() + 5
            i = 0
            try:
                while time.monotonic() < end:
                    s[f"s{n}.{i}"] = i
                    os.write(fd, f"s{n}.{i}\n".encode())
                    s.modify("hot", lambda v: v + 1, 0)
                    i += 1
            except SafeError as e:
                outcome = type(e).__name__
        (outcomes / str(n)).write_text(outcome)

    acks.touch()
    victim = fork(lambda: _acknowledging_writer(path, acks, "v."), errors)
    time.sleep(0.3)
    pids = [fork(lambda n=n: survivor(n), errors) for n in range(2)]
    time.sleep(random.uniform(0.3, 1.0))
    os.kill(victim, signal.SIGKILL)
    wait(victim, 10)
    time.sleep(6)
    for pid in pids:  # as the supervisor does: whoever is still blocked is killed
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait(pid, 10)
    finished = {p.name: p.read_text() for p in outcomes.iterdir()}
    assert set(finished.values()) <= {"finished", "SafeNeedsRecoveryError", "SafeTimeoutError"}
    acknowledged = acks.read_text().split()
    assert any(k.startswith("s") for k in acknowledged)
    with Safe.open(path) as s:
        missing = [k for k in acknowledged if k not in s]
    assert missing == []
    assert users(path) == []
    verify(path)


def test_closing_a_safe_whose_environment_needs_recovery_says_so(tmp_path: Path) -> None:
    """A worker must not exit as if all were well when it left its environment open."""
    path, errors = tmp_path / "s", tmp_path / "errors"
    Safe.open(path).close()
    started = tmp_path / "started"

    def victim() -> None:
        with Safe.open(path, recover=False):
            started.touch()
            time.sleep(60)

    def survivor() -> None:
        s = Safe.open(path, recover=False)
        while not started.exists():
            time.sleep(0.01)
        (tmp_path / "ready").touch()
        deadline = time.monotonic() + 10
        while True:  # the victim is killed meanwhile; its death is noticed
            try:
                s["k"] = 1
            except SafeNeedsRecoveryError:
                break
            assert time.monotonic() < deadline, "the dead process was never noticed"
            time.sleep(0.05)
        with pytest.raises(SafeNeedsRecoveryError, match="left open"):
            s.close()
        # Still registered in this process: no second DBEnv (BDB1528), a clear error instead.
        with pytest.raises(SafeNeedsRecoveryError, match="panicked handle"):
            Safe.open(path, recover=False)

    v = fork(victim, errors)
    pid = fork(survivor, errors)
    deadline = time.monotonic() + 10
    while not (tmp_path / "ready").exists():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(v, signal.SIGKILL)
    wait(v, 10)
    assert_children_ok([pid], errors, timeout=30)
    with Safe.open(path) as s:  # every user gone: this open recovers
        s["k"] = 2
    verify(path)
