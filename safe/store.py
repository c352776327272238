"""`Safe`: a persistent dict whose every call is one Berkeley DB transaction.

Flow of a call: `Safe` method -> encode the key (UTF-8) and pickle the value (protocol 5) outside
any lock -> `Environment.call` (the one funnel: pid and closed checks, deadlock/expiry retries
with backoff until the deadline, error translation) -> one transaction or one plain read -> commit
before returning. So each call is atomic and, by default, durable when it returns; two calls are
two transactions, and nothing spans them.

The hot paths (`[]`, `get`, `[]=`) are written out in full rather than through helpers: each
Python frame, lock or allocation per call shows against raw Berkeley DB (docs/footprint.md has
the profile and the ratios). One flag says whether a call may proceed: the environment's
`usable`, and a closed Safe holds a `_ClosedEnvironment` whose flag is always False, so "closed"
is kept in one place and checked once.

After diskcache, shelve and dbm.sqlite3: the five MutableMapping methods are implemented, and the
inherited two-step `pop`, `setdefault`, `popitem`, `update` and `clear` are overridden where
atomicity matters. No writeback cache, no `__del__` doing I/O.
"""

from __future__ import annotations

import functools
import itertools
import os
import pickle
import threading
import time
from collections.abc import (
    Callable,
    ItemsView,
    Iterable,
    Iterator,
    Mapping,
    MutableMapping,
    ValuesView,
)
from pathlib import Path
from types import TracebackType
from typing import Any, overload

from . import env as _env
from . import expiry as _expiry
from . import queue as _queue
from .errors import SafeClosedError
from .replication import Replication
from .stats import DURATION_BUCKETS

PICKLE_PROTOCOL = 5
DEFAULT_MAX_VALUE_SIZE = 64 << 20
# The cache's maximum: its region only grows (and reserves disk) as data is read or written,
# so an idle or small safe pays little for it (docs/footprint.md).
DEFAULT_CACHE_SIZE = 32 << 20
DEFAULT_MIN_FREE_SPACE = 64 << 20
# Records per cursor batch when iterating, and per transaction in `clear`: small enough that no
# lock is held for long and the lock table never fills (a 144k-record transaction exhausted it).
BATCH = 1000

_MISSING: Any = object()


def _encode_key(key: object) -> bytes:
    if not isinstance(key, str):
        raise TypeError(f"safe keys are str, got {type(key).__name__}: {key!r}")
    # surrogatepass: any str is a valid key, lone surrogates included, and round-trips exactly.
    # (The hot paths try the faster strict encode first: the same bytes when it succeeds.)
    return key.encode("utf-8", "surrogatepass")


def _decode_key(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogatepass")


_loads = pickle.loads
_pickle = pickle.dumps
_DBError = _env.DBError
_SAMPLE_MASK = _env.READ_SAMPLE_MASK
# First byte of a record that carries an expiry (no pickle starts with it: safe/expiry.py).
_MARK = _expiry.MARK
_live = _expiry.live
_LARGE = _env.LARGE
# The first byte of a hot read's record from which it is not a bare pickle: LARGE or _MARK.
_SPECIAL = min(_LARGE[0], _MARK)


class _ClosedEnvironment(_env.Environment):
    """What a closed Safe holds instead of its environment: never usable, and says why."""

    def __init__(self, path: Path) -> None:  # no super().__init__: nothing is opened
        self.path = path
        self.usable = False
        self.read_count = itertools.count(1)
        self._calls = itertools.count(1)  # Environment.read counts a read it refuses
        self._calls_done = itertools.count(1)

    def raise_unusable(self, what: str) -> None:
        raise SafeClosedError(self.path, what, "the safe is closed", "open it again")


class Safe(MutableMapping[str, object]):
    """A module safe: a dict-like, persistent store shared by threads and processes.

    Durability: with `durable=True` (the default) a write has been flushed to the log on disk
    when it returns; a crash or `kill -9` afterwards loses nothing. With `durable=False` writes
    are still atomic and survive a process crash, but an OS crash or power loss may lose the
    last ones. A returned write is visible to every read that starts after it, in any thread of
    any process. Use `modify` to read-compute-write atomically (e.g. an exact counter).
    """

    def __init__(self, environment: _env.Environment, options: _env.Options, max_value_size: int):
        """Use `Safe.open`; this constructor takes an already acquired environment."""
        self._env = environment
        self._path = environment.path
        self._options = options
        self._durable = options.durable
        self._reserve = options.min_free_space  # 0: free space is not watched
        self._max_value_size = max_value_size
        self._close_lock = threading.Lock()

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        durable: bool = True,
        timeout: float = 10.0,
        max_value_size: int = DEFAULT_MAX_VALUE_SIZE,
        cache_size: int = DEFAULT_CACHE_SIZE,
        min_free_space: int = DEFAULT_MIN_FREE_SPACE,
        checkpoint_interval: float = 30.0,
        recover: bool = True,
        create: bool = True,
        replication: Replication | None = None,
    ) -> Safe:
        """Open the safe in directory `path`, creating it if missing (unless `create=False`).

        `recover=True` runs recovery when a process died with the safe open (Berkeley DB's
        DB_REGISTER tells); processes that are still using it then get SafeNeedsRecoveryError.
        Workers under a supervisor that recovers by itself pass `recover=False`.
        `cache_size` only applies when this open creates the environment's regions.
        `replication` joins the safe to a group of sites (`pmnc.safe.Replication`, README
        "Replicated safes"): writes then succeed only where it is master (SafeNotMasterError
        elsewhere) and raise SafeNotAcknowledgedError when the group did not acknowledge them.
        """
        if not os.fspath(path):  # dbm refuses it too: "" would make the current directory a safe
            raise ValueError("a safe's path must not be empty")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        if max_value_size <= 0:
            raise ValueError(f"max_value_size must be > 0 bytes, got {max_value_size!r}")
        if checkpoint_interval <= 0:
            raise ValueError(
                f"checkpoint_interval must be > 0 seconds, got {checkpoint_interval!r}"
            )
        environment = _env.acquire(
            path,
            cache_size=cache_size,
            checkpoint_interval=checkpoint_interval,
            recover=recover,
            create=create,
            min_free_space=min_free_space,
            replication=replication,
        )
        options = _env.Options(durable=durable, timeout=timeout, min_free_space=min_free_space)
        return cls(environment, options, max_value_size)

    @property
    def path(self) -> Path:
        """The safe's directory."""
        return self._path

    def __repr__(self) -> str:
        state = "closed" if isinstance(self._env, _ClosedEnvironment) else "open"
        return f"<Safe {str(self.path)!r} {state}>"

    # -- lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        """Release this opening; the process's last one closes the environment. Idempotent.

        Close a Safe once its threads are done with it: calls made after close raise
        SafeClosedError, but a call still running in another thread when the environment is
        closed under it is a programming error (as with any handle).
        """
        with self._close_lock:  # two threads closing one Safe must release it once
            environment = self._env
            if isinstance(environment, _ClosedEnvironment):
                return
            self._env = _ClosedEnvironment(self._path)
        _env.release(environment)

    def __enter__(self) -> Safe:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- the funnel ------------------------------------------------------------------------------

    def _environment_for(self, what: str) -> _env.Environment:
        environment = self._env
        if not environment.usable:
            environment.raise_unusable(what)
        return environment

    def _dumps(self, value: object) -> bytes:
        data = _pickle(value, PICKLE_PROTOCOL)
        if len(data) > self._max_value_size:
            self._too_big(len(data), "pickled ")
        return data

    def _too_big(self, size: int, how: str = "") -> None:
        raise ValueError(
            f"{self.path}: value of {size} bytes {how}exceeds max_value_size "
            f"{self._max_value_size} bytes; nothing was stored"
        )

    def _read(self, what: str, key: bytes) -> bytes | None:
        environment = self._env
        return environment.read(what, self._options, key)

    def _write(self, what: str, body: Callable[[_env.Environment, Any], Any], size: int = 0) -> Any:
        """Run `body(environment, txn)` as one transaction, retried as a whole on conflict.

        `size` (bytes about to be written, when known) lets the free-space guard keep up. The
        checks before the call use the environment uncounted: `environment` is bound before
        `usable` is checked, in this frame, for close() to find (env.IN_FLIGHT).
        """
        environment = self._env
        if not environment.usable:
            environment.raise_unusable(what)
        if self._reserve:
            environment.check_space(what, self._options, size)
        environment.before_write(self._options)
        return environment.call(what, self._options, environment.transaction, self._options, body)

    # -- MutableMapping --------------------------------------------------------------------------

    # The three methods below are the hot paths, written out in full (see the module docstring).
    # A read is counted once, for the stats; close() finds the reads in flight by their frames
    # (the two read paths are in env.IN_FLIGHT, and bind `environment` before the usable check).
    # One in READ_SAMPLE_EVERY goes through the funnel to be timed, and so does a read that
    # failed (retried, bounded, translated there).

    def __getitem__(self, key: str) -> object:
        environment = self._env
        n = next(environment.read_count)
        if n & _SAMPLE_MASK and environment.usable and type(key) is str:
            try:
                raw = environment.db_get(key.encode())
            except (UnicodeEncodeError, _DBError):
                raw = self._hot_read(environment, n, key)
        else:
            raw = self._hot_read(environment, n, key)
        if raw is None:
            raise KeyError(key)
        if raw[0] >= _SPECIAL:  # a long value or an expiring one: one comparison for both
            raw = self._special(environment, raw, key)
            if raw is None:
                raise KeyError(key)
        del environment  # done with the handles: close() need not wait for the unpickling
        return _loads(raw)

    def get(self, key: str, default: object = None) -> object:
        environment = self._env
        n = next(environment.read_count)
        if n & _SAMPLE_MASK and environment.usable and type(key) is str:
            try:
                raw = environment.db_get(key.encode())
            except (UnicodeEncodeError, _DBError):
                raw = self._hot_read(environment, n, key)
        else:
            raw = self._hot_read(environment, n, key)
        if raw is None:
            return default
        if raw[0] >= _SPECIAL:  # a long value or an expiring one: one comparison for both
            raw = self._special(environment, raw, key)
            if raw is None:
                return default
        del environment  # done with the handles: close() need not wait for the unpickling
        return _loads(raw)

    def _hot_read(self, environment: _env.Environment, n: int, key: object) -> bytes | None:
        """The hot reads' other path, inside their count: a closed or unusable safe, a key
        that is not a str or needs surrogatepass, a failed attempt, and the one read in
        READ_SAMPLE_EVERY that the funnel times (Environment.read_counted)."""
        if not environment.usable:
            environment.raise_unusable("get")
        return environment.read_counted("get", self._options, n, _encode_key(key))

    def _special(self, environment: _env.Environment, raw: bytes, key: object) -> bytes | None:
        """What a hot read's record stands for, when it begins with 0xFE or 0xFF: a long value
        (LARGE, looked up in its file), or an expiring one (None once its time has passed).

        `environment` is the one the read used: the Safe's may have been swapped for a closed
        one since. The second lookup is made straight, like the first, inside the hot read's
        frame (which close() waits for), and through the funnel only when it fails: the
        funnel's timing and frames were an eighth of a 6 KB long read (docs/footprint.md,
        "Large values")."""
        if raw[0] == _LARGE[0]:
            k = _encode_key(key)
            try:  # straight, inside the hot read's frame (which close() waits for)
                value = environment.get_large(k, raw)
            except _DBError:  # again through the funnel: retried, bounded, translated
                value = environment.call("get", self._options, environment.get_large, k, raw)
            return None if value is None else _live(value)
        return _live(raw)

    def __contains__(self, key: object) -> bool:
        raw = self._read("contains", _encode_key(key))
        return raw is not None and (raw[0] != _MARK or _live(raw) is not None)

    def __setitem__(self, key: str, value: object) -> None:
        if type(key) is str:
            try:
                k = key.encode()
            except UnicodeEncodeError:
                k = key.encode("utf-8", "surrogatepass")
        else:
            k = _encode_key(key)
        v = _pickle(value, PICKLE_PROTOCOL)
        if len(v) > self._max_value_size:
            self._too_big(len(v), "pickled ")
        environment = self._env
        if not environment.usable:
            environment.raise_unusable("set")
        if self._reserve:
            environment.check_space("set", self._options, len(k) + len(v))
        if self._durable and environment.replicated is None and len(v) <= environment.large_min:
            # Auto-commit: one libdb call, the GIL released once. Not for a replicated safe:
            # a retry after a replication rollback must use the reopened handle, which
            # put_one looks up each time (a bound db_put would keep the dead one).
            environment.call("set", self._options, environment.db_put, k, v)
        else:
            if environment.replicated is not None:
                environment.before_write(self._options)
            environment.call("set", self._options, environment.put_one, self._options, k, v)

    def __delitem__(self, key: str) -> None:
        k = _encode_key(key)

        def body(e: _env.Environment, txn: Any) -> bool:
            raw = e.get_rmw(txn, k)
            if raw is None:
                return False
            e.delete(txn, k)
            _expiry.drop_index_entry(e, txn, raw, k)
            return _live(raw) is not None  # an expired key was absent: KeyError, and gone now

        if not self._write("delete", body):
            raise KeyError(key)

    def __len__(self) -> int:
        """Keys present now: the record count less the expired records not yet purged."""
        environment = self._environment_for("len")
        n = environment.call("len", self._options, environment.count)
        if environment.aux_exists():
            n -= environment.call("len", self._options, _expiry.overdue, environment, time.time())
        return max(0, n)

    def set(self, key: str, value: object, ttl: float | None = None) -> None:
        """`self[key] = value`, expiring after `ttl` seconds (> 0) if given.

        From its expiry on, the key is absent for every read in every process (`[]`, `get`,
        `in`, `len`, iteration, `pop`, `modify`...), and the maintenance thread of any process
        that has the safe open reclaims its space in the background. Any later write of the
        key without `ttl` clears its expiry. Expiry is by the wall clock (`time.time()`): a
        clock set forward expires keys early, one set back keeps them longer. One transaction
        (the value and its entry in the expiry index), durable like `[]=`.
        """
        if ttl is None:
            self[key] = value
            return
        seconds = _expiry.check_ttl(ttl)
        k, v = _encode_key(key), self._dumps(value)

        def body(e: _env.Environment, txn: Any) -> None:
            expires = time.time() + seconds
            _expiry.drop_index_entry(e, txn, e.get_rmw(txn, k), k)
            e.put(txn, k, _expiry.wrap(v, expires))
            e.aux_put(txn, "expiry", _expiry.index_key(expires, k), b"")

        self._write("set", body, len(k) + len(v))

    def ttl(self, key: str) -> float | None:
        """Seconds until `key` expires, None if it does not expire; KeyError if absent."""
        raw = self._read("get", _encode_key(key))
        now = time.time()
        if raw is None or _live(raw, now) is None:
            raise KeyError(key)
        expires = _expiry.expires_at(raw)
        return None if expires is None else expires - now

    def _batch(self, start: bytes | None, *, inclusive: bool) -> list[tuple[bytes, bytes]]:
        environment = self._environment_for("iterate")
        scan = functools.partial(environment.scan, start, BATCH, inclusive=inclusive)
        return environment.call("iterate", self._options, scan)

    def _records(self) -> Iterator[tuple[bytes, bytes]]:
        """Walk every record in key order, a batch per short-lived cursor.

        A key deleted during the walk is simply not met; keys written meanwhile may or may not
        appear. No lock is held between batches.
        """
        batch = self._batch(None, inclusive=True)
        while True:
            now = time.time()
            for key, stored in batch:
                if not self._env.usable:  # closed (or unusable) mid-walk: say so at once,
                    self._environment_for("iterate")  # not after the rest of the batch
                raw = stored
                if raw[0] == _MARK:
                    live = _live(raw, now)
                    if live is None:
                        continue  # expired: absent, whether purged yet or not
                    raw = live
                yield key, raw
            if len(batch) < BATCH:
                return
            batch = self._batch(batch[-1][0], inclusive=False)

    def __iter__(self) -> Iterator[str]:
        for key, _ in self._records():
            yield _decode_key(key)

    def items(self) -> ItemsView[str, object]:
        return _ItemsView(self)

    def values(self) -> ValuesView[object]:
        return _ValuesView(self)

    # -- atomic read-modify-writes -----------------------------------------------------------------

    def modify(
        self,
        key: str,
        fn: Callable[[Any], object],
        default: object = None,
        *,
        ttl: float | None = None,
    ) -> object:
        """Atomically replace the value at `key` by `fn(old)` and return the new value.

        `old` is the stored value, or `default` when the key is absent. Read, compute and write
        happen in one transaction holding the key's write lock, so concurrent `modify` calls on
        one key, in any threads or processes, never lose an update. `fn` may run more than once
        (the transaction is retried after a deadlock), so it should have no side effects; if it
        raises, nothing is stored and the exception propagates. An expired key is absent
        (`fn(default)`). With `ttl` the new value expires `ttl` seconds from now (a sliding
        expiry, as `set(..., ttl=)`); without it, like any write without `ttl`, it does not.
        """
        k = _encode_key(key)
        seconds = None if ttl is None else _expiry.check_ttl(ttl)

        def body(e: _env.Environment, txn: Any) -> object:
            raw = e.get_rmw(txn, k)
            live = None if raw is None else _live(raw)
            new = fn(default if live is None else _loads(live))
            data = self._dumps(new)
            _expiry.drop_index_entry(e, txn, raw, k)
            if seconds is None:
                e.put(txn, k, data)
            else:
                expires = time.time() + seconds
                e.put(txn, k, _expiry.wrap(data, expires))
                e.aux_put(txn, "expiry", _expiry.index_key(expires, k), b"")
            return new

        return self._write("modify", body)

    @overload
    def pop(self, key: str) -> object: ...
    @overload
    def pop(self, key: str, default: object) -> object: ...

    def pop(self, key: str, default: object = _MISSING) -> object:
        """Remove `key` and return its value, in one transaction."""
        k = _encode_key(key)

        def body(e: _env.Environment, txn: Any) -> object:
            raw = e.get_rmw(txn, k)
            if raw is None:
                return _MISSING
            live = _live(raw)
            # Unpickled before the delete: an unloadable value is not lost.
            value = _MISSING if live is None else _loads(live)
            e.delete(txn, k)
            _expiry.drop_index_entry(e, txn, raw, k)
            return value

        value = self._write("pop", body)
        if value is _MISSING:
            if default is _MISSING:
                raise KeyError(key)
            return default
        return value

    def setdefault(self, key: str, default: object = None) -> object:
        """Return the value at `key`, storing `default` first if absent, in one transaction."""
        k, v = _encode_key(key), self._dumps(default)

        def body(e: _env.Environment, txn: Any) -> object:
            raw = e.get_rmw(txn, k)
            live = None if raw is None else _live(raw)
            if live is None:
                e.put(txn, k, v)
                _expiry.drop_index_entry(e, txn, raw, k)
                return default
            return _loads(live)

        return self._write("setdefault", body)

    def popitem(self) -> tuple[str, object]:
        """Remove and return the (key, value) with the smallest key, in one transaction."""

        def body(e: _env.Environment, txn: Any) -> tuple[str, object] | None:
            now = time.time()
            while True:
                record = e.first(txn)
                if record is None:
                    return None
                live = _live(record[1], now)
                if live is not None:
                    break
                e.delete(txn, record[0])  # expired: removed on the way, as the purge would
                _expiry.drop_index_entry(e, txn, record[1], record[0])
            # Unpickled inside the transaction: a value that cannot be loaded aborts the pop
            # instead of being deleted and lost.
            item = _decode_key(record[0]), _loads(live)
            e.delete(txn, record[0])
            _expiry.drop_index_entry(e, txn, record[1], record[0])
            return item

        item: tuple[str, object] | None = self._write("popitem", body)
        if item is None:
            raise KeyError("popitem(): safe is empty")
        return item

    def update(  # type: ignore[override]
        self, other: Mapping[str, object] | Iterable[tuple[str, object]] = (), /, **kwargs: object
    ) -> None:
        """Store every pair in one transaction: all of them or, on any error, none.

        Everything is encoded first, so a bad key or an unpicklable value stores nothing.
        A transaction takes one lock per page it writes: keep one call to some thousands of items.
        """
        # As dict.update: anything with keys() is a mapping, anything else gives pairs.
        pairs = (
            ((k, other[k]) for k in other.keys())  # type: ignore[index]  # noqa: SIM118
            if hasattr(other, "keys")
            else other
        )
        encoded = [(_encode_key(k), self._dumps(v)) for k, v in pairs]
        encoded += [(_encode_key(k), self._dumps(v)) for k, v in kwargs.items()]
        if not encoded:
            return

        def body(e: _env.Environment, txn: Any) -> None:
            for k, v in encoded:
                e.put(txn, k, v)

        self._write("update", body, sum(len(k) + len(v) for k, v in encoded))

    def clear(self) -> None:
        """Delete every key, in transactions of up to 1,000 keys (not atomic as a whole).

        The queues (`queue`) are not keys: they are left as they are.
        """
        while self._write("clear", lambda e, txn: e.delete_some(txn, BATCH)) == BATCH:
            pass
        environment = self._environment_for("clear")
        if environment.aux_exists():

            def drop_index(e: _env.Environment, txn: Any) -> int:
                entries = e.aux_scan(txn, "expiry", None, BATCH, rmw=True)
                for entry, _ in entries:
                    e.aux_delete(txn, "expiry", entry)
                return len(entries)

            while self._write("clear", drop_index) == BATCH:
                pass

    # -- queues ------------------------------------------------------------------------------------

    def queue(self, name: str) -> _queue.Queue:
        """The durable FIFO queue `name` of this safe (docs/queues.md): `put`, `len`, and
        `with q.get(timeout=None, lease=60.0) as item:`, delivering each item at least once.

        Queues live in the safe's environment apart from its keys: they are not in iteration,
        `len` or `clear` of the safe. A Queue is as cheap as its name; make one per use or keep it.
        """
        return _queue.Queue(self, name)

    def queues(self) -> list[str]:
        """The names of the queues that hold items now."""
        environment = self._environment_for("queues")
        if not environment.aux_exists():
            return []
        return environment.call("queues", self._options, _queue.names, environment)

    # -- raw access for tools (no unpickling) ------------------------------------------------------

    def raw_items(self, prefix: str = "") -> Iterator[tuple[str, bytes]]:
        """(key, pickled value) in key order, starting at `prefix` and keeping to it.

        For tools that must not run code stored in a safe: nothing is unpickled here. Expired
        keys are left out; an expiring key's value comes without its expiry (a dump loaded back
        does not expire).
        """
        start = _encode_key(prefix)
        batch = self._batch(start or None, inclusive=True)
        while True:
            now = time.time()
            for key, stored in batch:
                if not key.startswith(start):
                    return
                raw = stored
                if raw[0] == _MARK:
                    live = _live(raw, now)
                    if live is None:
                        continue
                    raw = live
                yield _decode_key(key), raw
            if len(batch) < BATCH:
                return
            batch = self._batch(batch[-1][0], inclusive=False)

    def get_raw(self, key: str) -> bytes:
        """The pickled value at `key`, not unpickled; KeyError if absent."""
        raw = self._read("get", _encode_key(key))
        live = None if raw is None else _live(raw)
        if live is None:
            raise KeyError(key)
        return live

    def set_raw(self, key: str, data: bytes) -> None:
        """Store an already pickled value (as `raw_items` gives it), e.g. when loading a dump."""
        if not isinstance(data, bytes):
            raise TypeError(f"set_raw takes pickled bytes, got {type(data).__name__}")
        if not data or data[0] in (_MARK, _LARGE[0]):
            raise ValueError(f"{self.path}: set_raw takes a pickle, got {data[:16]!r}...")
        if len(data) > self._max_value_size:
            self._too_big(len(data))
        k = _encode_key(key)
        self._write("set", lambda e, txn: e.put(txn, k, data), len(k) + len(data))

    # -- maintenance -------------------------------------------------------------------------------

    def replication(self) -> dict[str, Any] | None:
        """A replicated safe's state here: `role` ("master", "client" or "none" during an
        election), `master` ("host:port" or None), `lsn` (log position reached), `synced`,
        `peers_connected`; None for a safe that is not replicated."""
        environment = self._env  # bound before the check, for close() (env.IN_FLIGHT)
        if not environment.usable:
            environment.raise_unusable("replication")
        return environment.replication_info()

    def is_master(self) -> bool:
        """Whether a write here can succeed now: always, unless replicated and not master."""
        environment = self._env  # bound before the check, for close() (env.IN_FLIGHT)
        if not environment.usable:
            environment.raise_unusable("is_master")
        return environment.is_master()

    def checkpoint(self) -> None:
        """Checkpoint now: flush the cache, and let log files no longer needed be removed."""
        environment = self._environment_for("checkpoint")
        environment.call("checkpoint", self._options, environment.checkpoint)

    def stats(self) -> dict[str, Any]:
        """This process's counters for the safe (shared by its openings) and environment figures.

        `ops` counts calls by operation, plain reads (`get`, `[]`, `in`) as `read`; `latency`
        has p50/p99 (ms) of the recent samples per operation; `durations` the histogram of every
        timed call since the opening, per operation (`counts` per bucket of `duration_buckets`,
        upper bounds in seconds, plus one for larger; `sum_ns`, integer nanoseconds). Reads are
        timed one in READ_SAMPLE_EVERY (64): `durations["read"]` counts that share of them.
        """
        environment = self._environment_for("stats")
        # Through the funnel first: it refuses a Safe inherited across fork, whose counters
        # (and their lock, perhaps held at the fork) are the parent's.
        info = environment.call("stats", self._options, environment.info)
        figures: dict[str, Any] = environment.stats.snapshot()
        # Plain reads are counted apart from the other calls (only some are timed).
        # ("stats" itself is not the safe's load.)
        ops = {k: v for k, v in figures["ops"].items() if k not in ("get", "contains", "stats")}
        reads = environment.reads()
        if reads:
            ops["read"] = reads
        figures["ops"] = ops
        durations: dict[str, dict[str, Any]] = {}
        for what, histogram in figures["durations"].items():
            if what == "stats":
                continue
            name = "read" if what in ("get", "contains") else what
            if name in durations:  # get and contains: both timed reads
                merged = durations[name]
                counts = zip(merged["counts"], histogram["counts"], strict=True)
                merged["counts"] = [a + b for a, b in counts]
                merged["sum_ns"] += histogram["sum_ns"]
            else:
                durations[name] = histogram
        figures["durations"] = durations
        figures["duration_buckets"] = list(DURATION_BUCKETS)
        figures.update(info)
        # Per queue: length, items being worked on, oldest item's age (whole safe), and this
        # process's deliveries and redeliveries. Queues emptied since still show their counts.
        names = set(self.queues()) | set(environment.queue_counts)
        figures["queues"] = {name: self.queue(name).stats() for name in sorted(names)}
        return figures

    # -- raw access with expiry, for dump and load (runtime/cli/safe.py) ---------------------------

    def raw_records(self, prefix: str = "") -> Iterator[tuple[str, bytes, float | None]]:
        """`raw_items` with each key's expiry: (key, pickle, wall-clock deadline or None).

        Expired keys are left out, as everywhere. Nothing is unpickled.
        """
        start = _encode_key(prefix)
        batch = self._batch(start or None, inclusive=True)
        while True:
            now = time.time()
            for key, stored in batch:
                if not key.startswith(start):
                    return
                live = _live(stored, now)
                if live is None:
                    continue
                yield _decode_key(key), live, _expiry.expires_at(stored)
            if len(batch) < BATCH:
                return
            batch = self._batch(batch[-1][0], inclusive=False)

    def set_raw_until(self, key: str, data: bytes, expires_at: float) -> None:
        """`set_raw` of a value that expires at `expires_at` (wall-clock seconds, as
        `raw_records` gives it): the deadline itself, not a ttl, so a key loaded from a dump
        expires at the moment it would have in the dumped safe (at once if that has passed).
        One transaction (the value and its expiry index entry), like `set(..., ttl=)`."""
        if not isinstance(data, bytes):
            raise TypeError(f"set_raw_until takes pickled bytes, got {type(data).__name__}")
        if not data or data[0] in (_MARK, _LARGE[0]):
            raise ValueError(f"{self.path}: set_raw_until takes a pickle, got {data[:16]!r}...")
        deadline = _expiry.check_deadline(expires_at)
        if len(data) > self._max_value_size:
            self._too_big(len(data))
        k = _encode_key(key)
        self._write(
            "set",
            lambda e, txn: _expiry.restore(e, txn, k, data, deadline),
            len(k) + len(data),
        )


# What uses the environment outside a counted call: close() finds it in flight by its frames.
_env.IN_FLIGHT.update(
    method.__code__
    for method in (
        Safe.__getitem__,
        Safe.get,
        Safe.__setitem__,
        Safe._write,
        Safe.replication,
        Safe.is_master,
    )
)


class _ItemsView(ItemsView[str, object]):
    """Items by cursor batches: never a KeyError for a key deleted during the walk."""

    _mapping: Safe

    def __iter__(self) -> Iterator[tuple[str, object]]:
        for key, raw in self._mapping._records():
            yield _decode_key(key), _loads(raw)


class _ValuesView(ValuesView[object]):
    """Values by cursor batches: never a KeyError for a key deleted during the walk."""

    _mapping: Safe

    def __iter__(self) -> Iterator[object]:
        for _, raw in self._mapping._records():
            yield _loads(raw)
