"""The physical limit: how many small synchronous writes per second the disk takes, measured
in the directory the stores use (same filesystem), by one thread.

Two variants, as in docs/berkeleydb.md, "Durability and group commit": appending 512 bytes
to a growing file, and overwriting 512 bytes in place in a preallocated block; each write
followed by fdatasync.
A durable commit needs at least one such flush, so one writer cannot beat this rate; only
group commit (several commits per flush) can.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import histogram

BLOCK = 512


@dataclass
class FsyncResult(histogram.Percentiles):
    variant: str
    ops: int
    seconds: float
    hist: list[int] = field(default_factory=histogram.new)

    @property
    def per_s(self) -> float:
        return self.ops / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, object]:
        return {
            "variant": self.variant,
            "ops": self.ops,
            "seconds": self.seconds,
            "per_s": self.per_s,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
        }


def measure(directory: Path, variant: str, seconds: float) -> FsyncResult:
    """`variant` is "append" or "overwrite"."""
    path = directory / f"fsync-{variant}.dat"
    buf = b"x" * BLOCK
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        if variant == "overwrite":
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        result = FsyncResult(variant, 0, 0.0)
        clock = time.monotonic_ns
        start = clock()
        end = start + int(seconds * 1e9)
        now = start
        while now < end:
            if variant == "append":
                os.write(fd, buf)
            else:
                os.pwrite(fd, buf, 0)
            os.fdatasync(fd)
            t1 = clock()
            result.hist[histogram.index(t1 - now)] += 1
            result.ops += 1
            now = t1
        result.seconds = (now - start) / 1e9
        return result
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
