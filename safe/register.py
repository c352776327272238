"""Reading `__db.register`: which processes have joined a safe's environment, and which died.

DB_REGISTER (docs/berkeleydb.md) keeps one line per process that joined, each process holding an
fcntl lock on its line. The maintenance thread reads it to notice a registrant that died
(safe/env.py, `Environment._check_registrants`); `users` (safe/admin.py) to name who uses a safe.
Never open or close this file in a process that has the safe open: closing any descriptor of it
drops that process's own registration lock (fcntl semantics).
"""

from __future__ import annotations

import fcntl
import os
import struct
from pathlib import Path

from .layout import REGISTER_FILE


def holders(path: Path) -> list[int]:
    """Pids holding a slot of the register of the safe at `path` ([] without a register).

    Not for a safe this process has open (see the module docstring): `users` answers for it.
    """
    try:
        fd = os.open(path / REGISTER_FILE, os.O_RDONLY)
    except FileNotFoundError:
        return []
    try:
        return sorted({holder for _, holder in _registrants(fd) if holder is not None})
    finally:
        os.close(fd)


def _registrants(fd: int) -> list[tuple[int, int | None]]:
    """(pid written in the slot, pid holding the slot's lock or None) for each live slot.

    DB_REGISTER's file has one line per process that joined: its pid, right-aligned, or "X"
    once it closed cleanly; the process holds an fcntl lock on the first byte of its line.
    """
    data = os.pread(fd, 1 << 20, 0)
    out: list[tuple[int, int | None]] = []
    offset = 0
    for line in data.split(b"\n"):
        text = line.strip()
        if text.isdigit():
            probe = struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0)
            kind, _, _, _, holder = struct.unpack("hhqqi", fcntl.fcntl(fd, fcntl.F_GETLK, probe))
            out.append((int(text), holder if kind != fcntl.F_UNLCK else None))
        offset += len(line) + 1
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
