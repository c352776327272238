"""What the visibility example calls: every answer says which worker process gave it."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pmnc.safe import Safe

# The runtime binds `pmnc_safe` to this module's own safe before running this file.
pmnc_safe: Safe = globals()["pmnc_safe"]


def write(key: str, value: int) -> int:
    """Store `value` (committed when this returns); the worker's pid."""
    pmnc_safe[key] = value
    return os.getpid()


def read(key: str) -> list[object]:
    """[value or None, the worker's pid]."""
    return [pmnc_safe.get(key), os.getpid()]


def write_ab(i: int) -> int:
    """`a = i; b = i`: two writes, so two transactions, `a` first."""
    pmnc_safe["a"] = i
    pmnc_safe["b"] = i
    return os.getpid()


def read_ba() -> list[object]:
    """[b, a, pid], reading `b` first: `b` is written second, so it can never be the newer."""
    b = pmnc_safe.get("b", 0)
    a = pmnc_safe.get("a", 0)
    return [b, a, os.getpid()]
