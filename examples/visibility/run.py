"""What concurrent readers in other worker processes see of a write, measured on a real node.

    python examples/visibility/run.py [--seconds 10] [--readers 3]

Starts `pmnc-runtime start` on a generated config (a temporary data directory, a free port,
4 workers) serving examples/visibility/modules/probe.py, then runs two experiments, each for
half the time, with one writer process and several reader processes, every request on a new
connection so that it lands on any of the workers:

1. The writer stores x = 1, 2, 3, ... Readers read x in a loop. For each write and reader, the
   first read that *started after the write returned* must see it (or something newer), and
   the example prints how long after the write returned that read completed (p50/p99), only
   for reads served by a worker other than the writer's. A stale read would be a violation.
2. The writer calls `a = i; b = i` (two transactions). Readers read `b`, then `a`. The table
   counts what they saw: both equal, `a` ahead of `b` (between the writes, or across several),
   and `b` ahead of `a`, which must never happen.
"""

from __future__ import annotations

import argparse
import bisect
import multiprocessing
import sys
import tempfile
import time
from collections import Counter
from multiprocessing.queues import Queue
from pathlib import Path
from typing import Any

from pmnc.runtime.harness import TRANSPORT_ERRORS, Client, NodeProcess, percentile

HERE = Path(__file__).resolve().parent
WORKERS, THREADS = 4, 4
WRITE_PAUSE = 0.005  # between the writes of experiment 1, so that readers see every value


def writer(port: int, seconds: float, experiment: int, out: Queue[Any]) -> None:
    """Experiment 1: [(i, sent, returned, pid)]; experiment 2: the number of a/b rounds."""
    client = Client("127.0.0.1", port, keep_alive=False)
    deadline = time.monotonic() + seconds
    log: list[tuple[int, float, float, int]] = []
    i = 0
    failed = 0
    while time.monotonic() < deadline:
        i += 1
        sent = time.monotonic()
        try:
            if experiment == 1:
                pid = client.result("probe", "write", key="x", value=i)
                log.append((i, sent, time.monotonic(), pid))
                time.sleep(WRITE_PAUSE)
            else:
                client.result("probe", "write_ab", i=i)
        except (*TRANSPORT_ERRORS, RuntimeError):
            failed += 1
    out.put(("writer", log if experiment == 1 else i, failed))


def reader(port: int, seconds: float, experiment: int, out: Queue[Any]) -> None:
    """Experiment 1: [(started, returned, value, pid)]; experiment 2: Counter of (b, a) states."""
    client = Client("127.0.0.1", port, keep_alive=False)
    deadline = time.monotonic() + seconds
    log: list[tuple[float, float, int, int]] = []
    states: Counter[str] = Counter()
    failed = 0
    while time.monotonic() < deadline:
        started = time.monotonic()
        try:
            if experiment == 1:
                value, pid = client.result("probe", "read", key="x")
                log.append((started, time.monotonic(), value or 0, pid))
            else:
                b, a, _ = client.result("probe", "read_ba")
                states[classify(b, a)] += 1
        except (*TRANSPORT_ERRORS, RuntimeError):
            failed += 1
    out.put(("reader", log if experiment == 1 else states, failed))


def classify(b: int, a: int) -> str:
    if b == a:
        return "a == b (both writes or neither)"
    if a == b + 1:
        return "a == b + 1 (a new, b old)"
    if a > b:
        return "a > b + 1 (later rounds between the reads)"
    return "b > a (b newer than a: never)"


def run(port: int, seconds: float, readers: int, experiment: int) -> tuple[Any, list[Any], int]:
    """Fork the writer and the readers, collect what they logged (bounded waits)."""
    fork = multiprocessing.get_context("fork")
    out: Queue[Any] = fork.Queue()
    procs = [fork.Process(target=writer, args=(port, seconds, experiment, out))]
    procs += [
        fork.Process(target=reader, args=(port, seconds, experiment, out)) for _ in range(readers)
    ]
    for p in procs:
        p.start()
    written: Any = None
    read: list[Any] = []
    failed = 0
    for _ in procs:
        role, log, errors = out.get(timeout=seconds + 60)
        failed += errors
        if role == "writer":
            written = log
        else:
            read.append(log)
    for p in procs:
        p.join(10)
        if p.is_alive():
            p.kill()
            raise SystemExit("a client process did not finish")
    return written, read, failed


def report_visibility(writes: list[tuple[int, float, float, int]], reads: list[Any]) -> int:
    """Print experiment 1; the number of stale reads."""
    delays: list[float] = []
    stale = checked = before_ack = 0
    pids: set[int] = set()
    for log in reads:
        starts = [r[0] for r in log]
        values = [r[2] for r in log]
        for i, _, returned, writer_pid in writes:
            # the first read of this reader that started after the write returned
            j = bisect.bisect_right(starts, returned)
            if j == len(log):
                continue
            _, done, value, pid = log[j]
            pids.add(pid)
            checked += 1
            if value < i:
                stale += 1
            elif pid != writer_pid:
                delays.append(done - returned)
        # how often another worker already saw a value before its writer got the answer
        for i, _, returned, writer_pid in writes:
            k = bisect.bisect_left(values, i)  # one reader's values only grow
            if k < len(log) and log[k][1] < returned and log[k][3] != writer_pid:
                before_ack += 1
    ms = [d * 1000 for d in delays]
    print(f"1. visibility of a returned write ({len(writes)} writes, {len(reads)} readers)")
    print(f"   reads checked (first read started after a write returned): {checked}")
    print(f"   of those, stale (missed the write): {stale}")
    print(
        f"   served by another worker than the write's: {len(ms)}; that read completed "
        f"p50 {percentile(ms, 50):.2f} ms, p99 {percentile(ms, 99):.2f} ms after the write returned"
    )
    print(
        f"   writes another worker already returned before their writer had its answer: "
        f"{before_ack}; workers seen by readers: {len(pids)}; "
        f"reads in all: {sum(len(r) for r in reads)}"
    )
    return stale


def report_ab(rounds: int, states: list[Counter[str]]) -> int:
    """Print experiment 2's table; the number of impossible observations."""
    total: Counter[str] = Counter()
    for s in states:
        total.update(s)
    n = sum(total.values())
    order = [classify(1, 1), classify(1, 2), classify(1, 3), classify(2, 1)]
    print(f"\n2. a = i; b = i ({rounds} rounds written), readers read b then a ({n} reads)")
    print(f"   {'observed':46} {'count':>8} {'share':>7}")
    for state in order:
        print(f"   {state:46} {total[state]:>8} {100 * total[state] / max(1, n):>6.2f}%")
    return total[classify(2, 1)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="both experiments together")
    parser.add_argument("--readers", type=int, default=3, help="reader processes")
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="pmnc-visibility-") as tmp,
        NodeProcess.one_cage(
            Path(tmp), HERE / "modules", node="visibility", workers=WORKERS, threads=THREADS
        ) as node,
    ):
        node.start()
        port = node.port
        print(
            f"node: {WORKERS} workers x {THREADS} threads; 1 writer and {args.readers} reader "
            f"processes, a new connection per request, {args.seconds:g} s\n",
            flush=True,
        )
        half = args.seconds / 2
        writes, reads, failed1 = run(port, half, args.readers, 1)
        stale = report_visibility(writes, reads)
        rounds, states, failed2 = run(port, half, args.readers, 2)
        impossible = report_ab(rounds, states)
        status = node.stop()
    print(f"\nfailed requests: {failed1 + failed2}; node stopped with status {status}")
    return 0 if stale == 0 and impossible == 0 and status == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
