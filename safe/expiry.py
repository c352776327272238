"""Expiring keys: how an expiry is stored, read and purged (docs/queues.md, "Expiry").

Storage, chosen for the hot paths. An expiring value is stored in the key's own record, as
`MARK` + its expiry (wall-clock seconds, a big-endian double) + the pickle; a value without
expiry is the bare pickle, exactly as before this existed. Pickles of protocol 2 and up begin
with PROTO (0x80) and no pickle begins with 0xFF, so one byte tells them apart: a plain
`get`/`[]` pays one comparison, a plain `[]=` nothing at all, and a safe created before expiry
existed reads as it always did (tests/unit/test_expiry.py opens one). Every read judges the
record by itself, so a key is absent for every process the moment its time passes, whether or
not it was purged yet.

A second B-tree, `expiry` in the file `extra.db` of the same environment (created on first
use), orders `(expiry, key)` so that the background purge takes the overdue keys from its
front, a bounded batch per short transaction, without walking the data. A write without `ttl`
(`[]=`, `update`) leaves the key's old index entry behind, unchecked, so that the hot path
stays one libdb call; the purge and `len` check each index entry against the record's own
expiry, and drop entries that no longer match. Writes that read the record anyway (`set` with
`ttl`, `modify`, `pop`, `setdefault`, `del`) remove the old entry in the same transaction.

Time is `time.time()` in every process: a forward jump of the clock expires keys early, a
backward jump keeps them longer; nothing else depends on the clock.
"""

from __future__ import annotations

import math
import struct
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .env import Environment

MARK = 0xFF
_HEADER = struct.Struct(">Bd")
HEADER_SIZE = _HEADER.size
_TIME = struct.Struct(">d")
# Index entries per purge transaction: a few milliseconds of locks at most, never a long one.
PURGE_BATCH = 100


def check_ttl(ttl: object) -> float:
    """`ttl` as seconds > 0, or ValueError/TypeError naming what was given."""
    if isinstance(ttl, bool) or not isinstance(ttl, int | float):
        raise TypeError(f"ttl must be a number of seconds, got {type(ttl).__name__}: {ttl!r}")
    if not ttl > 0 or not math.isfinite(ttl):
        raise ValueError(f"ttl must be > 0 seconds and finite, got {ttl!r}")
    return float(ttl)


def check_deadline(expires_at: object) -> float:
    """`expires_at` as wall-clock seconds (finite, > 0), or ValueError/TypeError."""
    if isinstance(expires_at, bool) or not isinstance(expires_at, int | float):
        raise TypeError(f"an expiry time is seconds, got {type(expires_at).__name__}")
    if not expires_at > 0 or not math.isfinite(expires_at):
        raise ValueError(f"an expiry time must be > 0 and finite, got {expires_at!r}")
    return float(expires_at)


def wrap(data: bytes, expires_at: float) -> bytes:
    """The stored record of pickle `data` that expires at `expires_at` (wall clock)."""
    return _HEADER.pack(MARK, expires_at) + data


def expires_at(raw: bytes) -> float | None:
    """The expiry a stored record carries, or None."""
    if raw[0] != MARK:
        return None
    t: float = _TIME.unpack_from(raw, 1)[0]
    return t


def live(raw: bytes, now: float | None = None) -> bytes | None:
    """The pickle of a stored record, or None if it has expired (`now`: time.time())."""
    if raw[0] != MARK:
        return raw
    if _TIME.unpack_from(raw, 1)[0] <= (time.time() if now is None else now):
        return None
    return raw[HEADER_SIZE:]


def index_key(expires: float, key: bytes) -> bytes:
    """The expiry index's key: big-endian doubles of positive times sort as the times do."""
    return _TIME.pack(expires) + key


def split_index_key(entry: bytes) -> tuple[float, bytes]:
    t: float = _TIME.unpack_from(entry, 0)[0]
    return t, entry[_TIME.size :]


def drop_index_entry(e: Environment, txn: Any, raw: bytes | None, key: bytes) -> None:
    """Inside a write of `key` that has read its old record: remove that record's index entry."""
    if raw is not None and raw[0] == MARK:
        e.aux_delete(txn, "expiry", index_key(_TIME.unpack_from(raw, 1)[0], key))


def restore(e: Environment, txn: Any, key: bytes, data: bytes, expires: float) -> None:
    """Inside a write: store pickle `data` at `key` expiring at `expires` (wall clock), with
    its index entry, dropping the old record's; what `Safe.set` writes, for a given deadline
    rather than a ttl (a dump loaded back keeps each key's moment of expiry)."""
    drop_index_entry(e, txn, e.get_rmw(txn, key), key)
    e.put(txn, key, wrap(data, expires))
    e.aux_put(txn, "expiry", index_key(expires, key), b"")


def purge_step(e: Environment, txn: Any, now: float, limit: int = PURGE_BATCH) -> int:
    """Delete up to `limit` overdue index entries and the records that still carry their expiry.

    Returns how many entries were handled; fewer than `limit` means nothing is overdue now.
    """
    done = 0
    for entry, _ in e.aux_scan(txn, "expiry", None, limit, rmw=True):
        expires, key = split_index_key(entry)
        if expires > now:
            break
        raw = e.get_rmw(txn, key)
        if raw is not None and raw[0] == MARK and _TIME.unpack_from(raw, 1)[0] == expires:
            e.delete(txn, key)
        e.aux_delete(txn, "expiry", entry)
        done += 1
    return done


def overdue(e: Environment, now: float) -> int:
    """Records expired and not purged yet (index entries that still match their record).

    Read in batches without a transaction, like iteration: `len` subtracts it from the record
    count. The purge keeps it small, so this walks little.
    """
    count = 0
    start: bytes | None = None
    limit = 16  # usually nothing is overdue: look at a few entries first, then at more
    while True:
        batch = e.aux_scan(None, "expiry", start, limit, inclusive=start is None)
        for entry, _ in batch:
            expires, key = split_index_key(entry)
            if expires > now:
                return count
            raw = e.get(key)
            if raw is not None and raw[0] == MARK and _TIME.unpack_from(raw, 1)[0] == expires:
                count += 1
        if len(batch) < limit:
            return count
        start, limit = batch[-1][0], min(1000, limit * 4)
