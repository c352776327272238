"""Disk blocks for the shared regions before Berkeley DB maps them (no SIGBUS on a full disk).

A file-backed region that grows on a full disk kills the process with SIGBUS; safe/env.py calls
`_reserve_regions` at every opening, from the maintenance thread every tick, and from a write
path every WRITTEN_REFRESH bytes (docs/footprint.md, tests/integration/test_footprint.py).
"""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path
from typing import Any

from .layout import DB_FILE, LARGE_FILE, REGION_FILES, data_bytes

_libc = ctypes.CDLL(None, use_errno=True)
# Blocks reserved past the end of each region file for its growth (more lockers, mutexes, cache
# buffers) before the next reservation: the maintenance thread's tick, or a write path that
# wrote WRITTEN_REFRESH bytes.
REGION_HEADROOM = 512 << 10
# The buffer cache's: libdb grows it by at most 1 MiB at a time (measured), and writes between
# two reservations (WRITTEN_REFRESH per process) add pages to it that the data file has not yet.
CACHE_HEADROOM = 2 << 20
# `__db.001` (locks, log, transactions) reached 1,073,152 bytes at most under load (measured).
PRIMARY_RESERVE = 5 << 18
_FALLOC_FL_KEEP_SIZE = 1


def _fallocate_keep_size(fd: int, length: int) -> None:
    """Reserve blocks up to `length` without changing the file's size (Linux fallocate(2))."""
    if _libc.fallocate(fd, _FALLOC_FL_KEEP_SIZE, ctypes.c_long(0), ctypes.c_long(length)):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _reserve_regions(path: Path, env: Any, reserved: dict[str, int]) -> None:
    """Give the region files real disk blocks before libdb touches them, as lazily as is safe.

    Region files are mmapped; libdb grows them as sparse files, and touching a page that a full
    disk cannot back kills the process with SIGBUS (reads included: the cache fills on reads).
    Each file's holes are filled and blocks are reserved past its end (fallocate KEEP_SIZE):

    - the buffer cache (the last region file) as far as it could grow before the next call:
      every page the data file has (reads can bring in nothing else), plus CACHE_HEADROOM for
      pages that writes create and libdb's growth step (at most 1 MiB, measured), plus twice
      what it grew since the previous call; never past the cache's maximum (`regmax`);
    - the mutex region (`__db.002`, written whole at creation) to its maximum;
    - the others (`__db.001`: locks, log, transactions) REGION_HEADROOM past their end, and at
      least PRIMARY_RESERVE.

    Called at every opening, by the maintenance thread every tick, and by a write path every
    WRITTEN_REFRESH bytes. On a disk too full this fails cleanly with ENOSPC instead of a SIGBUS
    later. `reserved` (per file name) remembers what was reserved and the size then, so a call
    with nothing new to reserve costs a few fstats.
    """
    mpool = env.memp_stat()[0]
    cache_max = mpool.get("regmax", 0)
    mutex_max = env.mutex_stat().get("regmax", 0)
    data_size = data_bytes(path, (DB_FILE, LARGE_FILE))
    names = sorted(path.glob(REGION_FILES))
    for n, region in enumerate(names):
        fd = os.open(region, os.O_RDWR | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            if n == len(names) - 1 and n > 0:
                grew = max(0, size - reserved.get(region.name + "@", size))
                want = size + data_size + CACHE_HEADROOM + 2 * grew
                if cache_max:
                    want = max(size + REGION_HEADROOM, min(cache_max, want))
            elif region.name == "__db.002" and mutex_max:
                want = max(size + REGION_HEADROOM // 4, mutex_max)
            else:
                want = max(size + REGION_HEADROOM, PRIMARY_RESERVE)
            reserved[region.name + "@"] = size
            if reserved.get(region.name, 0) >= want:
                continue
            _fallocate_keep_size(fd, want)
            if size:
                os.posix_fallocate(fd, 0, size)
            reserved[region.name] = want
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            reserved[region.name] = 1 << 62  # no fallocate here: nothing to reserve with
        finally:
            os.close(fd)
