"""A fixed-size log-linear latency histogram: bounded memory, mergeable across threads and
processes, about 3 % resolution (32 sub-buckets per power of two), like HdrHistogram.

A bucket index for a latency of `ns` nanoseconds: values below 64 get their own bucket; above,
`shift = bit_length - 6` and the index is `32 * shift + (ns >> shift)`, where `ns >> shift`
lies in [32, 64). Indexes are contiguous, so the histogram is a plain list of counts.
"""

from __future__ import annotations

SUB_BITS = 5
_SUB = 1 << SUB_BITS  # 32
_LINEAR = 2 * _SUB  # 64: values below are exact
SIZE = _SUB * 40 + _LINEAR  # up to 2**45 ns (about 9.7 hours): more than any cell runs


def new() -> list[int]:
    return [0] * SIZE


def index(ns: int) -> int:
    if ns < _LINEAR:
        return max(ns, 0)
    shift = ns.bit_length() - (SUB_BITS + 1)
    return min(_SUB * shift + (ns >> shift), SIZE - 1)


def lower_bound(idx: int) -> int:
    """The smallest latency (ns) counted in bucket `idx`."""
    if idx < _LINEAR:
        return idx
    shift = idx // _SUB - 1
    return (idx - _SUB * shift) << shift


def merge(into: list[int], other: list[int]) -> None:
    for i, n in enumerate(other):
        if n:
            into[i] += n


def percentile(hist: list[int], q: float) -> float:
    """The q-quantile (0 < q <= 1) in milliseconds, at the middle of its bucket; nan if empty."""
    total = sum(hist)
    if total == 0:
        return float("nan")
    rank = q * total
    seen = 0
    for i, n in enumerate(hist):
        seen += n
        if seen >= rank and n:
            lo = lower_bound(i)
            hi = lower_bound(i + 1) if i + 1 < SIZE else lo
            return (lo + hi) / 2 / 1e6
    return float("nan")  # pragma: no cover - unreachable: seen reaches total


def to_sparse(hist: list[int]) -> dict[int, int]:
    return {i: n for i, n in enumerate(hist) if n}


def from_sparse(sparse: dict[int, int]) -> list[int]:
    hist = new()
    for i, n in sparse.items():
        hist[int(i)] += n
    return hist


class Percentiles:
    """p50/p99 in ms of a result's latency histogram (`hist`), for the result dataclasses."""

    hist: list[int]

    @property
    def p50_ms(self) -> float:
        return percentile(self.hist, 0.50)

    @property
    def p99_ms(self) -> float:
        return percentile(self.hist, 0.99)
