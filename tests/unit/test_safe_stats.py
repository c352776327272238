"""Safe.stats() without locks on the hot path: exact under threads, never backwards, bounded.

Each thread records into its own counters (safe/stats.py, `_Stats`); these tests hold that to the
figures `/metrics` and `/_status` rely on (docs/footprint.md, "Per-call overhead").
"""

from __future__ import annotations

import threading
from pathlib import Path

from pmnc.safe import Safe


def _run(threads: list[threading.Thread]) -> None:
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "deadlocked"


def test_counts_are_exact_under_threads_and_never_go_backwards(tmp_path: Path) -> None:
    with Safe.open(tmp_path / "s", durable=False) as safe:
        errors: list[BaseException] = []
        seen: list[int] = []
        stop = threading.Event()

        def write(t: int) -> None:
            try:
                for i in range(500):
                    safe[f"t{t}.{i}"] = i
                    safe.modify("n", lambda n: n + 1, 0)
            except BaseException as e:
                errors.append(e)

        def watch() -> None:
            while not stop.is_set():
                seen.append(safe.stats()["ops"].get("set", 0))

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            _run([threading.Thread(target=write, args=(t,)) for t in range(8)])
        finally:
            stop.set()
            watcher.join(timeout=10)
        assert errors == []
        figures = safe.stats()
    assert figures["ops"]["set"] == 4000
    assert figures["ops"]["modify"] == 4000
    for op in ("set", "modify"):
        histogram = figures["durations"][op]
        assert sum(histogram["counts"]) == 4000
        assert histogram["sum_ns"] > 0
        assert 0 < figures["latency"][op]["p50_ms"] <= figures["latency"][op]["p99_ms"]
    assert seen == sorted(seen), "a count went backwards"


def test_threads_that_ended_are_folded_in_and_their_counts_kept(tmp_path: Path) -> None:
    with Safe.open(tmp_path / "s", durable=False) as safe:

        def write(t: int) -> None:
            for i in range(10):
                safe[f"t{t}.{i}"] = i

        for batch in range(10):
            _run([threading.Thread(target=write, args=(batch * 10 + t,)) for t in range(10)])
        safe["last"] = 1  # a new recording thread (this one) folds in the ended ones
        figures = safe.stats()
        per_thread = len(safe._env.stats._threads)  # the bound under test
    assert figures["ops"]["set"] == 1001
    assert sum(figures["durations"]["set"]["counts"]) == 1001
    assert per_thread <= 11, f"{per_thread} threads' counters kept for 1 live recording thread"
