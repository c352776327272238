"""`Safe.queue(name)`: a durable FIFO in the safe's environment, shared by threads and processes.

Layout (docs/queues.md has the measurements behind it). Items are records of the B-tree
`queues` in the safe's `extra.db`, apart from its keys. The record key is the queue's name
(length-prefixed UTF-8), the putting thread's shard (one of SHARDS), then the put's wall-clock
nanoseconds, pid and a per-process counter; the value is a lease header (lease end, wall clock;
deliveries so far) and the pickle. Shards keep concurrent durable puts off one B-tree tail page
(measured at 4 processes x 8 threads: 17,000 puts/s on one tail, 30,000-39,000 with shards,
as many as the safe's own durable sets); a taker looks at the first free item of each shard
and takes the oldest of them, so the order is the order of the puts' times across threads and
processes (exactly the put order for one putting thread).

Delivery is at least once:
- `get` finds the oldest free item without a transaction, then leases it in one short
  transaction that checks again, under the record's write lock, that it is still free: each
  item has one taker at a time.
- The `with` block's clean exit deletes it for good; an exception clears its lease, so it is
  the head of the queue again at once; a taker that dies inside the block leaves its lease to
  run out, and the next `get` after that delivers the item again (a redelivery, counted).
- Leases and deletions commit without fsync (DB_TXN_WRITE_NOSYNC: they survive a process's
  death, and losing the last of them to an OS crash only delivers an item again, which at least
  once allows). A `put` commits the same way and then flushes the log, so it is durable when it
  returns while its page lock is not held during the fsync: concurrent puts share fsyncs
  (group commit) instead of queueing behind each other's (measured: 17,000 puts/s at 4x8 with a
  synchronous commit, 30,000 and more with the flush).

Waiting: a taker with nothing to take sleeps on the safe's wake-up word (safe/wake.py) until a
put or a given-back item in any process bumps it, or until the earliest running lease it saw
runs out, or for a 1 s backstop; `queue.Empty` once `timeout` has passed.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import math
import os
import pickle
import queue as _queue
import struct
import threading
import time
from collections.abc import Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any

from . import env as _env

if TYPE_CHECKING:
    from .store import Safe

PICKLE_PROTOCOL = 5
# Lease end (wall-clock seconds, 0.0: free) and how many times the item was delivered.
_LEASE = struct.Struct(">dI")
_NAME_LEN = struct.Struct(">H")
_ORDER = struct.Struct(">BQII")  # shard, put time (ns), pid, per-process counter
# Putting threads write to SHARDS separate runs of keys (by thread), so that concurrent durable
# puts do not all wait for the page lock of one B-tree tail (docs/queues.md has the numbers).
SHARDS = 16
MAX_NAME_BYTES = 1024
WAIT_BACKSTOP_S = 1.0
_SCAN = 64  # records per cursor step while looking past leased items
_DUMP_BATCH = 1000  # records per cursor step of `fifo_items`
_counter = itertools.count()
_last_ns = 0
_shards = itertools.count()
_local = threading.local()


def name_prefix(name: str) -> bytes:
    """The key prefix of queue `name`'s items (ValueError for a name that cannot be one)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a queue name is a non-empty str, got {name!r}")
    raw = name.encode("utf-8", "surrogatepass")
    if len(raw) > MAX_NAME_BYTES:
        raise ValueError(f"queue name of {len(raw)} bytes exceeds {MAX_NAME_BYTES}")
    return _NAME_LEN.pack(len(raw)) + raw


def item_key(prefix: bytes, shard: int, ns: int, pid: int, n: int) -> bytes:
    return prefix + _ORDER.pack(shard % SHARDS, ns, pid & 0xFFFFFFFF, n & 0xFFFFFFFF)


def _thread_shard() -> int:
    """This thread's shard: threads of a process take consecutive ones, offset by the pid."""
    try:
        shard: int = _local.shard
    except AttributeError:
        shard = _local.shard = (os.getpid() + next(_shards)) % SHARDS
    return shard


def split_key(key: bytes) -> tuple[str, int]:
    """(queue name, put time in ns) of an item's key."""
    (length,) = _NAME_LEN.unpack_from(key, 0)
    name = key[2 : 2 + length].decode("utf-8", "surrogatepass")
    ns = _ORDER.unpack_from(key, 2 + length)[1]
    return name, int(ns)


def _next_order() -> tuple[int, int]:
    """This process's (ns, counter) for a new item: never behind its previous one."""
    global _last_ns
    ns = max(time.time_ns(), _last_ns + 1)
    _last_ns = ns
    return ns, next(_counter)


def candidates(
    e: _env.Environment, prefix: bytes, now: float
) -> tuple[list[tuple[int, bytes]], float]:
    """The first free item of each shard as (put time ns, key), and the earliest end of the
    leases met on the way (math.inf if none). Read without a transaction: `take` checks its
    pick again under a write lock."""
    found: list[tuple[int, bytes]] = []
    soonest = math.inf
    shard = 0
    start, inclusive = prefix + bytes([0]), True
    size = len(prefix) + 1
    limit = 1  # a shard's first item is usually free: look at more only when it is not
    while shard < SHARDS:
        batch = e.aux_scan(None, "queues", start, limit, inclusive=inclusive)
        moved = False
        for key, value in batch:
            if not key.startswith(prefix):
                return found, soonest
            if key[size - 1] != shard:  # this shard has no free item: on to the key's shard
                shard = key[size - 1]
            until = _LEASE.unpack_from(value)[0]
            if until <= now:
                found.append((_ORDER.unpack_from(key, size - 1)[1], key))
                shard += 1
                start, inclusive, limit = prefix + bytes([shard]), True, 1
                moved = True
                break
            soonest = min(soonest, until)
        if moved:
            continue
        if len(batch) < limit:
            return found, soonest
        start, inclusive, limit = batch[-1][0], False, 8
    return found, soonest


def take(
    e: _env.Environment, options: _env.Options, *, prefix: bytes, now: float, lease: float
) -> tuple[tuple[bytes, bytes, bytes, int] | None, float]:
    """Lease the oldest free item of the queue: ((key, lease header, pickle, deliveries before),
    math.inf) or (None, earliest end of the leases met, math.inf if none)."""
    for _ in range(10):
        found, soonest = candidates(e, prefix, now)
        if not found:
            return None, soonest
        for _, key in sorted(found):

            def claim(e: _env.Environment, txn: Any, key: bytes = key) -> Any:
                value = e.aux_get(txn, "queues", key, rmw=True)
                if value is None:
                    return None  # taken for good meanwhile
                until, delivered = _LEASE.unpack_from(value)
                if until > now:
                    return None  # leased by another taker meanwhile
                header = _LEASE.pack(now + lease, delivered + 1)
                e.aux_put(txn, "queues", key, header + value[_LEASE.size :])
                return key, header, value[_LEASE.size :], delivered

            got = e.transaction(options, claim)
            if got is not None:
                return got, math.inf
    return None, 0.0  # lost every race ten times: look again at once


def finish(e: _env.Environment, txn: Any, key: bytes, header: bytes, *, done: bool) -> bool:
    """Delete (`done`) or give back the item, if it is still under our lease."""
    value = e.aux_get(txn, "queues", key, rmw=True)
    if value is None or value[: _LEASE.size] != header:
        return False  # our lease ran out and another taker has it now
    if done:
        e.aux_delete(txn, "queues", key)
    else:
        _, delivered = _LEASE.unpack_from(value)
        e.aux_put(txn, "queues", key, _LEASE.pack(0.0, delivered) + value[_LEASE.size :])
    return True


def scan_queue(e: _env.Environment, prefix: bytes) -> tuple[int, int | None, int]:
    """(items, put time in ns of the oldest, items under a running lease), read in batches."""
    count = leased = 0
    oldest: int | None = None
    start, inclusive = prefix, True
    now = time.time()
    while True:
        batch = e.aux_scan(None, "queues", start, 1000, inclusive=inclusive)
        for key, value in batch:
            if not key.startswith(prefix):
                return count, oldest, leased
            ns = split_key(key)[1]
            oldest = ns if oldest is None else min(oldest, ns)
            count += 1
            if _LEASE.unpack_from(value)[0] > now:
                leased += 1
        if len(batch) < 1000:
            return count, oldest, leased
        start, inclusive = batch[-1][0], False


def _shard_items(
    e: _env.Environment, options: _env.Options, shard_prefix: bytes
) -> Iterator[tuple[tuple[int, bytes], bytes]]:
    """One shard's items as ((put time ns, key), pickle) in key order, a batch per call."""
    start, inclusive = shard_prefix, True
    size = len(shard_prefix)
    while True:
        scan = functools.partial(
            e.aux_scan, None, "queues", start, _DUMP_BATCH, inclusive=inclusive
        )
        batch = e.call("queue items", options, scan)
        for key, value in batch:
            if not key.startswith(shard_prefix):
                return
            yield (_ORDER.unpack_from(key, size - 1)[1], key), value[_LEASE.size :]
        if len(batch) < _DUMP_BATCH:
            return
        start, inclusive = batch[-1][0], False


def fifo_items(e: _env.Environment, options: _env.Options, prefix: bytes) -> Iterator[bytes]:
    """Every item's pickle of the queue with key prefix `prefix`, in the order `take` would
    deliver them if none were leased: by put time across the shards (each shard is already in
    that order, so the shards are merged, a batch of each at a time, never the whole queue).
    Leased items are included, as if free. Read without a transaction, like iteration: items
    put or removed meanwhile may or may not appear."""
    shards = [_shard_items(e, options, prefix + bytes([shard])) for shard in range(SHARDS)]
    for _, data in heapq.merge(*shards, key=lambda item: item[0]):
        yield data


def names(e: _env.Environment) -> list[str]:
    """The queues that hold items now, one cursor step per queue."""
    out: list[str] = []
    start: bytes | None = None
    while True:
        batch = e.aux_scan(None, "queues", start, 1)
        if not batch:
            return out
        name, _ = split_key(batch[0][0])
        out.append(name)
        start = name_prefix(name) + b"\xff" * (_ORDER.size + 1)


class Queue:
    """A durable FIFO named `name` in a safe (get one with `Safe.queue(name)`).

    `put(item)` is durable when it returns (like a durable `[]=`); `len(q)` counts the items
    not yet removed for good, those being worked on included; `with q.get(timeout, lease) as
    item:` delivers the oldest item at least once (see the module docstring). Keep each block
    shorter than its `lease`: once the lease runs out the item may go to another taker.
    """

    def __init__(self, safe: Safe, name: str) -> None:
        self._safe = safe
        self.name = name
        self._prefix = name_prefix(name)
        self._nosync = _nosync(safe._options)

    def __repr__(self) -> str:
        return f"<Queue {self.name!r} of {self._safe!r}>"

    def put(self, item: object) -> None:
        """Append `item` (any picklable value); durable when it returns (unless the safe was
        opened with durable=False), and a taker blocked in `get` in any process wakes."""
        data = pickle.dumps(item, PICKLE_PROTOCOL)
        if len(data) > self._safe._max_value_size:
            self._safe._too_big(len(data), "pickled ")
        self._append(data)

    def _append(self, data: bytes) -> None:
        safe = self._safe
        ns, n = _next_order()
        key = item_key(self._prefix, _thread_shard(), ns, os.getpid(), n)
        value = _LEASE.pack(0.0, 0) + data
        environment = safe._env  # bound before the check, for close() (env.IN_FLIGHT)
        if not environment.usable:
            environment.raise_unusable("queue put")
        options = safe._options
        if safe._reserve:
            environment.check_space("queue put", options, len(key) + len(value))
        environment.before_write(options)
        environment.call(
            "queue put",
            options,
            environment.transaction,
            self._nosync,
            lambda e, txn: e.aux_put(txn, "queues", key, value),
        )
        if options.durable:
            environment.call("queue put", options, environment.log_flush)
        environment.wake().notify()

    def put_raw(self, data: bytes) -> None:
        """Append an already pickled item (as `raw_items` gives it), e.g. when loading a dump:
        `put` without the pickling, so nothing is unpickled; the item goes after every item the
        queue holds (put times order the queue)."""
        if not isinstance(data, bytes):
            raise TypeError(f"put_raw takes pickled bytes, got {type(data).__name__}")
        if not data:
            raise ValueError(f"{self._safe.path}: put_raw takes a pickle, got b''")
        if len(data) > self._safe._max_value_size:
            self._safe._too_big(len(data))
        self._append(data)

    def raw_items(self) -> Iterator[bytes]:
        """Every item's pickle, not unpickled, in delivery order (the put times), items being
        worked on (leased) included as if free: for tools such as `pmnc-runtime safe dump`.
        Read in batches without a transaction: not a snapshot of a queue in use."""
        environment = self._safe._environment_for("queue items")
        if not environment.aux_exists():
            return iter(())
        return fifo_items(environment, self._safe._options, self._prefix)

    def __len__(self) -> int:
        environment = self._safe._environment_for("queue len")
        if not environment.aux_exists():
            return 0
        count, _, _ = environment.call(
            "queue len", self._safe._options, scan_queue, environment, self._prefix
        )
        return count

    def stats(self) -> dict[str, Any]:
        """`length`, `leased` (being worked on), `oldest_age_s` (None when empty), and this
        process's `deliveries` and `redeliveries` of the queue's items."""
        environment = self._safe._environment_for("queue stats")
        count, oldest, leased = 0, None, 0
        if environment.aux_exists():
            count, oldest, leased = environment.call(
                "queue stats", self._safe._options, scan_queue, environment, self._prefix
            )
        counts = environment.queue_counts.get(self.name, {})
        return {
            "length": count,
            "leased": leased,
            "oldest_age_s": None if oldest is None else max(0.0, time.time() - oldest / 1e9),
            "deliveries": counts.get("deliveries", 0),
            "redeliveries": counts.get("redeliveries", 0),
        }

    def get(self, timeout: float | None = None, lease: float = 60.0) -> Delivery:
        """Wait for the oldest item and lease it; use as `with q.get() as item:`.

        `timeout` (seconds, None: forever) bounds the wait, then `queue.Empty`. The item is
        removed for good when the block exits without an exception, back at the head of the
        queue at once if it raises, and delivered again after `lease` seconds if this process
        dies inside the block.
        """
        if not lease > 0 or not math.isfinite(lease):
            raise ValueError(f"lease must be > 0 seconds, got {lease!r}")
        if timeout is not None and (timeout < 0 or math.isnan(timeout)):
            raise ValueError(f"timeout must be >= 0 seconds or None, got {timeout!r}")
        safe = self._safe
        deadline = None if timeout is None else time.monotonic() + timeout
        environment = safe._environment_for("queue get")
        options = safe._options
        wake = environment.wake()
        while True:
            seen = wake.value()
            got: tuple[bytes, bytes, bytes, int] | None = None
            soonest = math.inf
            now = time.time()
            if environment.aux_exists():
                got, soonest = environment.call(
                    "queue get",
                    options,
                    functools.partial(
                        take, environment, self._nosync, prefix=self._prefix, now=now, lease=lease
                    ),
                )
            if got is not None:
                key, header, data, delivered = got
                counts = environment.queue_counts.setdefault(
                    self.name, {"deliveries": 0, "redeliveries": 0}
                )
                counts["deliveries"] += 1
                if delivered:
                    counts["redeliveries"] += 1
                return Delivery(self, key, header, pickle.loads(data), delivered)
            wait = WAIT_BACKSTOP_S
            if soonest < math.inf:
                wait = min(wait, max(0.001, soonest - time.time()))
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise _queue.Empty
                wait = min(wait, left)
            wake.wait(seen, wait)
            if not environment.usable:
                environment.raise_unusable("queue get")

    def _finish(self, key: bytes, header: bytes, *, done: bool) -> bool:
        safe = self._safe
        environment = safe._environment_for("queue done" if done else "queue give back")
        options = safe._options
        kept = environment.call(
            "queue done" if done else "queue give back",
            options,
            environment.transaction,
            self._nosync,
            lambda e, txn: finish(e, txn, key, header, done=done),
        )
        if not done:
            environment.wake().notify()
        return bool(kept)


# Uses the environment before its call (free space, group checks): close() finds it in flight.
_env.IN_FLIGHT.add(Queue._append.__code__)


class Delivery:
    """One leased item: `with` gives the item; a clean exit removes it for good, an exception
    gives it back at the head of the queue (and propagates)."""

    def __init__(self, q: Queue, key: bytes, header: bytes, item: object, delivered: int):
        self._queue = q
        self._key = key
        self._header = header
        self.item = item
        # How many times it had been delivered before (0: first delivery).
        self.redelivered = delivered
        self._finished = False

    def __enter__(self) -> Any:
        return self.item

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._finished:
            return
        self._finished = True
        self._queue._finish(self._key, self._header, done=exc_type is None)


def _nosync(options: _env.Options) -> _env.Options:
    return _env.Options(
        durable=False, timeout=options.timeout, min_free_space=options.min_free_space
    )
