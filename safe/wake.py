"""Waking a blocked `Queue.get` in any process within microseconds of a `put` (docs/queues.md).

A small shared file (`queues.wake` in the safe's directory) is mapped by every process that
uses a queue of the safe; its first word is a counter used as a Linux futex (futex(2) on a
shared file mapping works across processes: the kernel keys it by file and offset). A taker
reads the counter, looks for an item, and if there is none sleeps in FUTEX_WAIT on the value it
read: a `put` (or an item given back) committed in between has changed the counter, so the wait
returns at once instead of missing it. A putter commits, bumps the counter, and FUTEX_WAKEs
every sleeper. No polling: a taker sleeps until woken, until a lease it saw runs out, or for at
most its backstop (1 s), whichever is first.

The counter's increment is a plain aligned store, not atomic: two concurrent putters may both
write the same value, but each also calls FUTEX_WAKE, and a taker that read the old value sees
the new one, so no wake-up is lost. Where futex is not available (not Linux on x86-64 or
arm64), `wait` sleeps in steps of 2 ms instead.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import time
from pathlib import Path

WAKE_FILE = "queues.wake"
_SIZE = 4096
_FUTEX_WAIT = 0
_FUTEX_WAKE = 1
_SYS_FUTEX = {"x86_64": 202, "aarch64": 98, "arm64": 98}.get(platform.machine())
_FALLBACK_STEP_S = 0.002

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class Wake:
    """The wake-up word of one safe directory, mapped in this process."""

    def __init__(self, directory: Path, mode: int = 0o600) -> None:
        fd = os.open(directory / WAKE_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, mode)
        try:
            # Real blocks, not a hole: touching a mapped hole on a full disk is SIGBUS.
            os.posix_fallocate(fd, 0, _SIZE)
            self._map = mmap.mmap(fd, _SIZE)
        finally:
            os.close(fd)
        self._word = ctypes.c_uint32.from_buffer(self._map)
        self._address = ctypes.addressof(self._word)

    def value(self) -> int:
        return int(self._word.value)

    def notify(self) -> None:
        """Bump the counter and wake every process waiting on it."""
        self._word.value = (self._word.value + 1) & 0xFFFFFFFF
        if _SYS_FUTEX is not None:
            _libc.syscall(
                ctypes.c_long(_SYS_FUTEX),
                ctypes.c_void_p(self._address),
                ctypes.c_int(_FUTEX_WAKE),
                ctypes.c_int(0x7FFFFFFF),
                None,
                None,
                ctypes.c_int(0),
            )

    def wait(self, seen: int, seconds: float) -> None:
        """Sleep until the counter differs from `seen`, a notify, or `seconds` pass."""
        if seconds <= 0:
            return
        if _SYS_FUTEX is None:
            time.sleep(min(seconds, _FALLBACK_STEP_S))
            return
        whole = int(seconds)
        timeout = _Timespec(whole, int((seconds - whole) * 1e9))
        # ctypes releases the GIL for the call; EINTR, EAGAIN and ETIMEDOUT all mean "look again".
        _libc.syscall(
            ctypes.c_long(_SYS_FUTEX),
            ctypes.c_void_p(self._address),
            ctypes.c_int(_FUTEX_WAIT),
            ctypes.c_uint32(seen),
            ctypes.byref(timeout),
            None,
            ctypes.c_int(0),
        )
