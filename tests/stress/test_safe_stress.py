"""Many processes x threads on one safe, then invariants; a long run keeps the log bounded.

Each forked child opens its own Safe after the fork (handles never cross fork), runs threads of
mixed operations for the time budget, reports what it did through a JSON file, and ends in
`os._exit`. The parent checks: the shared counter equals the acknowledged increments, every key
a thread last wrote holds its last value, every key it deleted is gone, `verify` passes, and
the number of log files stayed bounded while the load ran.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import stat
import threading
import time
import traceback
from pathlib import Path

import pytest
from pmnc.safe import Safe, verify

pytestmark = pytest.mark.stress

PROCESSES = 4
THREADS = 4


def log_files(path: Path) -> list[str]:
    return sorted(p.name for p in path.glob("log.*"))


def dir_size(path: Path) -> int:
    """Bytes actually allocated (region and log files are sparse or preallocated); a log file
    removed between the listing and its stat counts as gone."""
    total = 0
    for p in path.iterdir():
        with contextlib.suppress(FileNotFoundError):
            st = p.stat()
            if stat.S_ISREG(st.st_mode):
                total += st.st_blocks * 512
    return total


def child(path: Path, index: int, seconds: float, report: Path) -> None:
    """One process: THREADS threads of mixed operations; the outcome in `report`."""
    errors: list[str] = []
    expected: dict[str, object] = {}  # key -> value, None = deleted
    increments = [0] * THREADS
    lock = threading.Lock()
    safe = Safe.open(path, checkpoint_interval=0.5)
    deadline = time.monotonic() + seconds

    def work(t: int) -> None:
        rng = random.Random(index * 100 + t)
        mine: dict[str, object] = {}
        n = 0
        try:
            while time.monotonic() < deadline:
                n += 1
                op = rng.random()
                key = f"p{index}t{t}k{rng.randrange(200)}"
                if op < 0.35:
                    value = {"n": n, "blob": "x" * rng.randrange(0, 2000)}
                    safe[key] = value
                    mine[key] = value
                elif op < 0.45:
                    safe.pop(key, None)
                    mine[key] = None
                elif op < 0.65:
                    got = safe.get(key)
                    if got != mine.get(key):
                        errors.append(f"{key}: read {got!r}, wrote {mine.get(key)!r}")
                elif op < 0.85:
                    safe.modify("counter", lambda c: c + 1, 0)
                    increments[t] += 1
                elif op < 0.95:
                    safe.setdefault(f"p{index}t{t}once", n)
                    safe.modify(f"p{index}count", lambda c: c + 1, 0)
                    safe.modify(f"p{index}count", lambda c: c - 1, 0)
                else:
                    for i, k in enumerate(safe.keys()):  # a cursor walk under writers
                        if i > 300:
                            break
                        assert isinstance(k, str)
        except BaseException:
            errors.append(traceback.format_exc())
        with lock:
            expected.update(mine)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(seconds + 60)
    if any(th.is_alive() for th in threads):
        errors.append("threads still running: deadlocked")
    else:
        safe.close()
    report.write_text(
        json.dumps({"errors": errors, "increments": sum(increments), "expected": expected})
    )


def test_processes_and_threads_mixed_operations_keep_every_invariant(
    tmp_path: Path, stress_seconds: float
) -> None:
    path = tmp_path / "safe"
    Safe.open(path).close()  # created before the children join it
    pids: dict[int, Path] = {}
    for i in range(PROCESSES):
        report = tmp_path / f"child{i}.json"
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest's frames
            code = 1
            try:
                child(path, i, stress_seconds, report)
                code = 0
            finally:
                os._exit(code)
        pids[pid] = report
    # While they run: the log must not grow without bound (checkpoints remove old files).
    most_logs, sizes, seen = 0, [], set()
    began = time.monotonic()
    deadline = began + stress_seconds + 90
    running = set(pids)
    while running and time.monotonic() < deadline:
        for pid in list(running):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                running.discard(pid)
                assert os.waitstatus_to_exitcode(status) == 0, f"child {pid}: status {status}"
        names = log_files(path)
        seen.update(names)
        most_logs = max(most_logs, len(names))
        sizes.append(dir_size(path))
        time.sleep(0.1)
    for pid in running:  # still running: deadlocked; kill them so the test ends
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    assert not running, f"children deadlocked: {running}"

    reports = [json.loads(r.read_text()) for r in pids.values()]
    errors = [e for r in reports for e in r["errors"]]
    assert not errors, errors[:5]
    increments = sum(r["increments"] for r in reports)
    with Safe.open(path) as safe:
        assert safe["counter"] == increments
        lost = [k for r in reports for k, v in r["expected"].items() if safe.get(k) != v]
        assert not lost, f"{len(lost)} keys wrong, e.g. {lost[:5]}"
        for i in range(PROCESSES):
            assert safe.get(f"p{i}count", 0) == 0
        keys = len(safe)
    verify(path)
    print(
        f"\n{PROCESSES}x{THREADS} for {stress_seconds:g} s: {increments} exact increments, "
        f"{keys} keys, at most {most_logs} log files, directory at most {max(sizes) >> 20} MiB"
    )
    # Checkpoint lag, as in the long-run test below: log removal keeps the log from where the
    # last checkpoint began, and a checkpoint under load takes 1-3 s; a flat bound of 4 files
    # failed once (5) on a loaded CI. Allow 10 s of this run's own log rate, at least 4 (that
    # files are removed at all is the long-run test's to prove, below).
    files_per_s = len(seen) / max(1.0, time.monotonic() - began)
    allowed = max(4, int(files_per_s * 10) + 3)
    assert most_logs <= allowed, f"{most_logs} log files at once: checkpoints do not remove logs"


# Long enough for several checkpoint cycles (1-3 s each under this load), so that a log that
# kept growing could not pass, whatever PMNC_STRESS_SECONDS says.
LONG_RUN_MIN_S = 20.0


def test_long_run_removes_logs_and_keeps_the_directory_bounded(
    tmp_path: Path, stress_seconds: float
) -> None:
    """Overwrite a fixed set of keys for the whole budget: the history must not pile up."""
    path = tmp_path / "safe"
    seen: set[str] = set()
    most_logs, sizes = 0, []
    errors: list[BaseException] = []
    stop = threading.Event()
    # Distinct values: an overwrite with the same bytes is logged as almost nothing (Berkeley
    # DB logs the changed part of a record), and this test is about log growth.
    values = [os.urandom(4000) for _ in range(61)]
    writes = [0]
    count_lock = threading.Lock()

    with Safe.open(path, checkpoint_interval=0.5, cache_size=8 << 20) as safe:

        def writer(t: int) -> None:
            try:
                n = 0
                while not stop.is_set():
                    safe[f"t{t}k{n % 500}"] = values[n % 61]
                    n += 1
                with count_lock:
                    writes[0] += n
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        deadline = time.monotonic() + max(stress_seconds, LONG_RUN_MIN_S)
        while time.monotonic() < deadline:
            names = log_files(path)
            seen.update(names)
            most_logs = max(most_logs, len(names))
            sizes.append(dir_size(path))
            time.sleep(0.1)
        stop.set()
        for th in threads:
            th.join(30)
        assert not [th for th in threads if th.is_alive()], "writer threads deadlocked"
        assert not errors, errors
        settled = dir_size(path)
    closed = dir_size(path)
    verify(path)
    data = 4 * 500 * 4000
    duration = max(stress_seconds, LONG_RUN_MIN_S)
    print(
        f"\n{writes[0]} writes ({writes[0] * 4000 >> 20} MiB) in {duration:g} s: "
        f"{len(seen)} log files in all, at most {most_logs} at once; directory max "
        f"{max(sizes) >> 20} MiB, {settled >> 20} MiB at the end, {closed >> 20} MiB closed"
    )
    assert writes[0] * 4000 > 3 * data, "too few writes to say anything"
    # The bound is checkpoint lag, not history: log removal keeps the log from where the last
    # checkpoint began, and a checkpoint under this load takes 1-3 s (libdb waits a
    # second whenever a page it must flush is pinned by a writer). So what is kept is the log
    # of the last few seconds: measured up to ~7 s worth; allow 10 s of this run's own rate.
    files_per_s = len(seen) / duration
    allowed = int(files_per_s * 10) + 3
    assert most_logs <= allowed, f"{most_logs} log files at once, {files_per_s:.1f} written/s"
    assert len(seen) >= 2 * most_logs, "the log kept growing: files are not removed"
    if len(seen) > 3:
        assert len(seen) > most_logs, "old log files were never removed while open"
    # data + the 8 MiB cache region + that window of 10 MiB log files, whatever the history
    assert max(sizes) < data * 3 + (16 << 20) + (allowed + 1) * (10 << 20), sizes[-5:]
    assert closed < data * 3 + (8 << 20) + (10 << 20), "closed: one log file at most"
