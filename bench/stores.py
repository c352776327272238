"""One adapter per store: how it is created and prefilled (in a set-up process), opened in a
worker process after fork, and what one `get` / durable `set` is.

Every adapter pickles values (protocol 5 where the store lets us choose) and unpickles on
`get`, so each figure includes the same codec work. `DURABILITY` says what a returned `set`
guarantees for each store, as configured here; the report prints it next to the tables.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import pickle
import random
import shelve
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

PICKLE_PROTOCOL = 5
BATCH = 1000  # prefill records per transaction (a 144k-record transaction runs out of locks)
CACHE_SIZE = 32 << 20  # raw Berkeley DB's cache: pmnc.safe's default, so the two compare
LMDB_MAP_SIZE = 4 << 30  # sparse; far above what a cell writes


class Handle(ABC):
    """A store opened in one worker process, shared by its threads."""

    retries = 0  # contention retries (deadlocks) this process made, where the adapter retries

    @abstractmethod
    def get(self, key: str) -> object: ...

    @abstractmethod
    def set(self, key: str, value: object) -> None: ...

    @abstractmethod
    def close(self) -> None: ...


class Store(ABC):
    name: str
    durability: str
    processes_max: int | None = None  # None: any number of processes may open it

    def unavailable(self) -> str | None:
        """Why this store cannot run here, or None."""
        return None

    @abstractmethod
    def version(self) -> str: ...

    @abstractmethod
    def create(self, path: Path, items: Iterable[tuple[str, object]]) -> None:
        """Create the store in the empty directory `path` and write `items` (fast, not timed);
        close everything. Runs in a set-up process of its own before the workers fork."""

    @abstractmethod
    def open(self, path: Path, threads: int) -> Handle:
        """Open the store in a worker process (after fork), for `threads` threads."""


def _batches(items: Iterable[tuple[str, object]]) -> Iterator[list[tuple[str, object]]]:
    it = iter(items)
    while batch := list(islice(it, BATCH)):
        yield batch


def _dist_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


# --------------------------------------------------------------------------- pmnc.safe


def _pmnc_safe() -> Any:
    """pmnc.safe, used only through its public API (docs/safe-api.md). Imported by name so
    that the benchmark type-checks on its own: mypy cannot follow the editable install."""
    return importlib.import_module("pmnc.safe")


class PmncStore(Store):
    name = "pmnc"
    durability = (
        "Safe.open(dir): one auto-commit transaction per call, log fsynced before a write "
        "returns (group commit across threads and processes)"
    )

    def unavailable(self) -> str | None:
        try:
            _pmnc_safe()
        except ImportError as e:
            return f"pmnc.safe is not importable ({e})"
        return None

    def version(self) -> str:
        return f"pmnc {_dist_version('pmnc')}"

    def create(self, path: Path, items: Iterable[tuple[str, object]]) -> None:
        pmnc_safe = _pmnc_safe()
        # As the runtime's supervisor does: create (the region creator sets cache and the
        # deadlock detector), then the workers open with recover=False.
        pmnc_safe.prepare(path)
        with pmnc_safe.Safe.open(path, durable=False, recover=False) as safe:
            for batch in _batches(items):
                safe.update(batch)
            safe.checkpoint()

    def open(self, path: Path, threads: int) -> Handle:
        return _PmncHandle(_pmnc_safe().Safe.open(path, recover=False))


class _PmncHandle(Handle):
    def __init__(self, safe: Any) -> None:
        self._safe = safe

    def get(self, key: str) -> object:
        return self._safe[key]

    def set(self, key: str, value: object) -> None:
        self._safe[key] = value

    def close(self) -> None:
        self._safe.close()


# --------------------------------------------------------------------------- raw berkeleydb


class BerkeleyDBStore(Store):
    """The binding used directly, with pmnc's flags (docs/berkeleydb.md, "Environment flags")."""

    name = "berkeleydb"
    durability = (
        "auto-commit DB.put, default full sync: log fsynced before put returns (group commit); "
        "32 MiB cache; plain DB.get without a transaction"
    )

    def version(self) -> str:
        from berkeleydb import db  # noqa: PLC0415

        major, minor, patch = db.version()
        return f"berkeleydb {_dist_version('berkeleydb')}, libdb {major}.{minor}.{patch}"

    @staticmethod
    def _flags() -> int:
        from berkeleydb import db  # noqa: PLC0415

        return int(
            db.DB_CREATE
            | db.DB_INIT_LOCK
            | db.DB_INIT_LOG
            | db.DB_INIT_MPOOL
            | db.DB_INIT_TXN
            | db.DB_THREAD
            | db.DB_REGISTER
        )

    def create(self, path: Path, items: Iterable[tuple[str, object]]) -> None:
        from berkeleydb import db  # noqa: PLC0415

        env = db.DBEnv()
        # Only the region's creator sets these: a joiner's values are ignored
        # (docs/berkeleydb.md, "Region settings belong to the creator").
        env.set_cachesize(0, CACHE_SIZE, 1)
        env.set_lk_detect(db.DB_LOCK_DEFAULT)
        env.open(str(path), self._flags() | db.DB_RECOVER, 0o600)
        try:
            env.log_set_config(db.DB_LOG_AUTO_REMOVE, 1)
            d = db.DB(env)
            d.open("data.db", None, db.DB_BTREE, db.DB_THREAD | db.DB_AUTO_COMMIT | db.DB_CREATE)
            try:
                for batch in _batches(items):
                    txn = env.txn_begin()
                    try:
                        for key, value in batch:
                            d.put(key.encode(), pickle.dumps(value, PICKLE_PROTOCOL), txn=txn)
                    except BaseException:
                        txn.abort()
                        raise
                    txn.commit()
            finally:
                d.close()
            env.txn_checkpoint()
        finally:
            env.close()

    def open(self, path: Path, threads: int) -> Handle:
        from berkeleydb import db  # noqa: PLC0415

        env = db.DBEnv()
        env.open(str(path), self._flags(), 0o600)
        d = db.DB(env)
        d.open("data.db", None, db.DB_BTREE, db.DB_THREAD | db.DB_AUTO_COMMIT)
        return _BerkeleyDBHandle(env, d)


class _BerkeleyDBHandle(Handle):
    def __init__(self, env: Any, d: Any) -> None:
        from berkeleydb import db  # noqa: PLC0415

        self._env = env
        self._db = d
        self._retryable: tuple[type[BaseException], ...] = (
            db.DBLockDeadlockError,
            db.DBLockNotGrantedError,
        )

    def get(self, key: str) -> object:
        raw = self._db.get(key.encode())
        if raw is None:
            raise KeyError(key)
        return pickle.loads(raw)

    def set(self, key: str, value: object) -> None:
        # The notes' retry policy: even single auto-commit operations deadlock, rarely.
        raw = pickle.dumps(value, PICKLE_PROTOCOL)
        for attempt in range(100):
            try:
                self._db.put(key.encode(), raw)
            except self._retryable:
                self.retries += 1
                time.sleep(random.uniform(0, min(0.05, 0.001 * 2**attempt)))
            else:
                return
        raise RuntimeError(f"berkeleydb: put {key!r}: still deadlocked after 100 attempts")

    def close(self) -> None:
        self._db.close()
        self._env.close()


# --------------------------------------------------------------------------- diskcache


class DiskcacheStore(Store):
    name = "diskcache"
    durability = (
        "Cache(dir, sqlite_synchronous=2): SQLite WAL with synchronous=FULL, the WAL fsynced "
        "on every committed set; one Cache per process, a connection per thread"
    )

    def version(self) -> str:
        return f"diskcache {_dist_version('diskcache')}"

    def create(self, path: Path, items: Iterable[tuple[str, object]]) -> None:
        import diskcache  # noqa: PLC0415

        with diskcache.Cache(str(path), sqlite_synchronous=2) as cache:
            for batch in _batches(items):
                with cache.transact():
                    for key, value in batch:
                        cache.set(key, value)

    def open(self, path: Path, threads: int) -> Handle:
        import diskcache  # noqa: PLC0415

        return _DiskcacheHandle(diskcache.Cache(str(path), sqlite_synchronous=2))


class _DiskcacheHandle(Handle):
    def __init__(self, cache: Any) -> None:
        self._cache = cache

    def get(self, key: str) -> object:
        return self._cache[key]

    def set(self, key: str, value: object) -> None:
        self._cache[key] = value

    def close(self) -> None:
        self._cache.close()


# --------------------------------------------------------------------------- sqlitedict


class SqlitedictStore(Store):
    name = "sqlitedict"
    durability = (
        "SqliteDict(file, autocommit=True): every set is committed before it returns, but "
        "sqlitedict hard-codes PRAGMA synchronous=OFF (rollback journal), so a returned set "
        "survives a process crash, not an OS crash or power loss: no fsync at all. All calls "
        "of a SqliteDict object go through its one background thread, so the threads of a "
        "process are serialised; processes contend on SQLite's file lock (5 s busy timeout)"
    )

    def version(self) -> str:
        return f"sqlitedict {_dist_version('sqlitedict')}"

    def create(self, path: Path, items: Iterable[tuple[str, object]]) -> None:
        from sqlitedict import SqliteDict  # noqa: PLC0415

        d = SqliteDict(str(path / "data.sqlite"), autocommit=False)
        try:
            for batch in _batches(items):
                for key, value in batch:
                    d[key] = value
                d.commit()
        finally:
            d.close()

    def open(self, path: Path, threads: int) -> Handle:
        from sqlitedict import SqliteDict  # noqa: PLC0415

        return _SqlitedictHandle(SqliteDict(str(path / "data.sqlite"), autocommit=True))


class _SqlitedictHandle(Handle):
    def __init__(self, d: Any) -> None:
        self._d = d

    def get(self, key: str) -> object:
        return self._d[key]

    def set(self, key: str, value: object) -> None:
        self._d[key] = value

    def close(self) -> None:
        self._d.close()


# --------------------------------------------------------------------------- lmdb


class LmdbStore(Store):
    name = "lmdb"
    durability = (
        "lmdb.open(dir, sync=True): each write transaction fsyncs its pages and meta page "
        "before commit returns; one writer at a time across all processes (no group commit); "
        "one Environment per process, a transaction per call"
    )

    def version(self) -> str:
        import lmdb  # noqa: PLC0415

        major, minor, patch = lmdb.version()
        return f"py-lmdb {_dist_version('lmdb')}, liblmdb {major}.{minor}.{patch}"

    @staticmethod
    def _open(path: Path) -> Any:
        import lmdb  # noqa: PLC0415

        return lmdb.open(
            str(path), map_size=LMDB_MAP_SIZE, sync=True, metasync=True, max_readers=512
        )

    def create(self, path: Path, items: Iterable[tuple[str, object]]) -> None:
        env = self._open(path)
        try:
            for batch in _batches(items):
                with env.begin(write=True) as txn:
                    for key, value in batch:
                        txn.put(key.encode(), pickle.dumps(value, PICKLE_PROTOCOL))
        finally:
            env.close()

    def open(self, path: Path, threads: int) -> Handle:
        return _LmdbHandle(self._open(path))


class _LmdbHandle(Handle):
    def __init__(self, env: Any) -> None:
        self._env = env

    def get(self, key: str) -> object:
        with self._env.begin() as txn:
            raw = txn.get(key.encode())
        if raw is None:
            raise KeyError(key)
        return pickle.loads(raw)

    def set(self, key: str, value: object) -> None:
        raw = pickle.dumps(value, PICKLE_PROTOCOL)
        with self._env.begin(write=True) as txn:
            txn.put(key.encode(), raw)

    def close(self) -> None:
        self._env.close()


# --------------------------------------------------------------------------- shelve


class ShelveStore(Store):
    name = "shelve"
    processes_max = 1
    durability = (
        "shelve.open(file) on this Python's dbm backend, one process only; with several "
        "threads every call holds one lock (dbm is not thread-safe). No fsync: dbm.dumb "
        "writes the value at once but its index only at sync/close, so a crash loses the "
        "writes since the last sync"
    )

    def version(self) -> str:
        import dbm  # noqa: PLC0415

        names = []
        for name in dbm._names:  # type: ignore[attr-defined]
            try:
                __import__(name)
            except ImportError:
                continue
            names.append(name)
        return f"shelve on {names[0] if names else 'no dbm backend'}"

    def create(self, path: Path, items: Iterable[tuple[str, object]]) -> None:
        with shelve.open(str(path / "shelf"), protocol=PICKLE_PROTOCOL) as shelf:
            for key, value in items:
                shelf[key] = value

    def open(self, path: Path, threads: int) -> Handle:
        return _ShelveHandle(shelve.open(str(path / "shelf"), protocol=PICKLE_PROTOCOL))


class _ShelveHandle(Handle):
    def __init__(self, shelf: shelve.Shelf[object]) -> None:
        self._shelf = shelf
        self._lock = threading.Lock()

    def get(self, key: str) -> object:
        with self._lock:
            return self._shelf[key]

    def set(self, key: str, value: object) -> None:
        with self._lock:
            self._shelf[key] = value

    def close(self) -> None:
        self._shelf.close()


STORES: dict[str, Store] = {
    s.name: s
    for s in (
        PmncStore(),
        BerkeleyDBStore(),
        DiskcacheStore(),
        SqlitedictStore(),
        LmdbStore(),
        ShelveStore(),
    )
}
