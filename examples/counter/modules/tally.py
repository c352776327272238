"""Two ways to count: a read then a write (loses updates), and one `modify` (exact)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pmnc.safe import Safe

# The runtime binds `pmnc_safe` to this module's own safe before running this file.
pmnc_safe: Safe = globals()["pmnc_safe"]


def naive(name: str = "n") -> None:
    """Two transactions: another worker can write `name` between the get and the set."""
    current = pmnc_safe.get(name, 0)
    assert isinstance(current, int)
    pmnc_safe[name] = current + 1


def exact(name: str = "n") -> None:
    """One transaction holding the key's write lock from the read to the write."""
    pmnc_safe.modify(name, lambda n: n + 1, 0)


def get(name: str = "n") -> object:
    return pmnc_safe.get(name, 0)
