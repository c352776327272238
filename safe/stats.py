"""Per-process operation counters of one environment: counts, errors, retries, latency.

`Environment.call` records every operation here; `Safe.stats()` (safe/store.py) reads a
`snapshot`, which the runtime turns into `/_status` and `/metrics` (docs/metrics.md). Recording
takes no lock and allocates nothing once a thread has met an operation
(tests/unit/test_safe_stats.py holds it to that).
"""

from __future__ import annotations

import bisect
import threading
from typing import Any

LATENCY_SAMPLES = 2048  # a power of two: the ring of recent samples is indexed with a mask
# Upper bounds (s) of the operation duration histogram's buckets, last one +Inf: from a cached
# read (~10 us) to a durable write (~1-5 ms with fsync) to a call stuck in lock waits (the 10 s
# default timeout). Fixed, so that every process's counts add up bucket by bucket.
DURATION_BUCKETS = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
# The same bounds in integer nanoseconds: a call is timed with perf_counter_ns, no float math.
_BUCKETS_NS = tuple(round(b * 1e9) for b in DURATION_BUCKETS)


class _OpStats:
    """One thread's figures for one operation: only that thread writes them, so no lock."""

    __slots__ = ("buckets", "count", "nanoseconds", "next", "samples")

    def __init__(self) -> None:
        self.count = 0
        # A ring of the recent durations (ns) gives p50/p99 of the last moments (`/_status`);
        # the bucket counts and their sum never forget, so they add up across processes
        # (`/metrics` histogram). Preallocated: recording allocates nothing.
        self.samples = [0] * LATENCY_SAMPLES
        self.next = 0
        self.buckets = [0] * (len(DURATION_BUCKETS) + 1)
        # Integer nanoseconds: sums of several processes' figures then add up to the same total
        # in any order (float additions do not, and a total must never seem to go backwards).
        self.nanoseconds = 0


class _Stats:
    """Per-process counters of one environment, cheap enough for every call.

    Each thread records into its own `_OpStats` (found through a threading.local), so recording
    takes no lock and allocates nothing once a thread has met an operation; `snapshot` sums the
    threads' figures. Every figure only grows, so a snapshot taken while threads record is at
    worst a moment behind, never backwards. A thread that has ended is folded into `_retired`
    (its counts and histogram; the ended threads' last LATENCY_SAMPLES samples) when the next
    thread starts recording, so memory follows the live threads, not every thread there was.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()  # new threads, errors and snapshots: never the hot path
        self._local = threading.local()
        self._threads: list[tuple[threading.Thread, dict[str, _OpStats], list[int]]] = []
        self._retired: dict[str, _OpStats] = {}
        self._retired_retries = 0
        self.errors: dict[str, int] = {}

    def _for_thread(self) -> dict[str, _OpStats]:
        ops: dict[str, _OpStats] = {}
        retries = [0]
        with self.lock:
            live = []
            for entry in self._threads:
                if entry[0].is_alive():
                    live.append(entry)
                else:
                    self._retire(entry[1], entry[2])
            live.append((threading.current_thread(), ops, retries))
            self._threads = live
        self._local.ops = ops
        self._local.retries = retries
        return ops

    def _retire(self, ops: dict[str, _OpStats], retries: list[int]) -> None:
        self._retired_retries += retries[0]
        for what, entry in ops.items():
            total = self._retired.get(what)
            if total is None:
                total = self._retired[what] = _OpStats()
                total.samples = []
            recent = entry.samples[: min(entry.count, LATENCY_SAMPLES)]
            total.samples = (total.samples + recent)[-LATENCY_SAMPLES:]
            total.count += entry.count
            total.nanoseconds += entry.nanoseconds
            total.buckets = [a + b for a, b in zip(total.buckets, entry.buckets, strict=True)]

    def record(self, what: str, nanoseconds: int, retries: int) -> None:
        try:
            ops: dict[str, _OpStats] = self._local.ops
        except AttributeError:
            ops = self._for_thread()
        entry = ops.get(what)
        if entry is None:
            entry = ops[what] = _OpStats()
        entry.count += 1
        i = entry.next
        entry.samples[i & (LATENCY_SAMPLES - 1)] = nanoseconds
        entry.next = i + 1
        entry.buckets[bisect.bisect_left(_BUCKETS_NS, nanoseconds)] += 1  # le: <= bound
        entry.nanoseconds += nanoseconds
        if retries:
            self._local.retries[0] += retries

    def error(self, what: str) -> None:
        with self.lock:
            self.errors[what] = self.errors.get(what, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        buckets: dict[str, list[int]] = {}
        sums: dict[str, int] = {}
        samples: dict[str, list[int]] = {}
        with self.lock:  # the retired totals change only under it: read them there
            threads = [ops for _, ops, _ in self._threads]
            retries = self._retired_retries + sum(r[0] for _, _, r in self._threads)
            errors = dict(self.errors)
            for what, entry in self._retired.items():
                counts[what] = entry.count
                buckets[what] = list(entry.buckets)
                sums[what] = entry.nanoseconds
                samples[what] = list(entry.samples)
        for ops in threads:
            for what, entry in list(ops.items()):  # list(): atomic against a thread adding one
                n = entry.count
                counts[what] = counts.get(what, 0) + n
                total = buckets.setdefault(what, [0] * len(entry.buckets))
                for b, c in enumerate(list(entry.buckets)):
                    total[b] += c
                sums[what] = sums.get(what, 0) + entry.nanoseconds
                samples.setdefault(what, []).extend(entry.samples[: min(n, LATENCY_SAMPLES)])
        latency: dict[str, dict[str, float]] = {}
        for what, recent in samples.items():
            ordered = sorted(recent)
            if ordered:
                latency[what] = {
                    "p50_ms": ordered[len(ordered) // 2] / 1e6,
                    "p99_ms": ordered[min(len(ordered) - 1, len(ordered) * 99 // 100)] / 1e6,
                }
        return {
            "ops": counts,
            "errors": errors,
            "retries": retries,
            "latency": latency,
            "durations": {what: {"counts": buckets[what], "sum_ns": sums[what]} for what in counts},
        }
