"""Named counters, exact under any number of concurrent workers and threads.

Try: curl -d '{"name": "hits"}' http://127.0.0.1:8080/counter/increment

Every change is one `pmnc_safe.modify` call: read, add and write in one transaction holding the
key's lock, so no increment is lost between processes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pmnc.safe import Safe

# The runtime binds `pmnc_safe` to this module's own safe before running this file.
pmnc_safe: Safe = globals()["pmnc_safe"]


def increment(name: str = "hits", by: int = 1) -> int:
    """Add `by` to counter `name` (0 if new) and return the new value."""
    if not isinstance(by, int) or isinstance(by, bool):
        raise TypeError(f"by must be an integer, got {by!r}")
    new = pmnc_safe.modify(name, lambda old: old + by, 0)
    assert isinstance(new, int)
    return new


def get(name: str = "hits") -> int:
    """The value of counter `name`, 0 if it was never incremented."""
    value = pmnc_safe.get(name, 0)
    assert isinstance(value, int)
    return value


def reset(name: str = "hits") -> bool:
    """Forget counter `name`; whether it existed."""
    return pmnc_safe.pop(name, None) is not None
