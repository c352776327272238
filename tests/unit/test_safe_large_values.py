"""Long values live in the long values' file (safe/env.py, LARGE; docs/footprint.md, "Large
values"): the data file keeps LARGE, a tag and the value's tail in their place. Whatever path
writes, replaces or removes them, a reader sees the value, and the long values' file keeps
nothing nobody points to (after the sweep, for the one-call put that does not look at what it
replaces)."""

from __future__ import annotations

import os
import pickle
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from berkeleydb import db
from pmnc.safe import Safe, backup, restore, verify
from pmnc.safe import env as safe_env

LIMIT = safe_env.on_page_limit(safe_env.PAGE_SIZE)  # 4,078 bytes at 16 KiB
LONG = b"x" * (LIMIT + 100)  # pickles to more than the limit
SHORT = b"y" * 100


def _records(path: Path, name: str) -> dict[bytes, bytes]:
    """Every record of a database file, read outside the environment (the safe closed)."""
    d = db.DB()
    d.open(str(path / name), None, db.DB_UNKNOWN, db.DB_RDONLY)
    try:
        return _records_open(d)
    finally:
        d.close()


def _records_open(handle: Any) -> dict[bytes, bytes]:
    """Every record of an open database handle."""
    cursor = handle.cursor()
    out: dict[bytes, bytes] = {}
    record = cursor.first()
    while record is not None:
        out[record[0]] = record[1]
        record = cursor.next()
    cursor.close()
    return out


def _large_keys(safe: Safe) -> set[bytes]:
    e: Any = safe._env
    if not e.large_exists():
        return set()
    cursor = e.large().cursor()
    keys = set()
    record = cursor.first()
    while record is not None:
        keys.add(record[0])
        record = cursor.next()
    cursor.close()
    return keys


def test_a_long_value_goes_to_the_long_values_file_and_reads_back_every_way(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s"
    with Safe.open(path) as safe:
        safe["long"] = LONG
        safe["short"] = SHORT
        safe.set("expiring", LONG, ttl=60)
        assert safe["long"] == LONG
        assert safe.get("long") == LONG
        assert "long" in safe
        assert len(safe) == 3
        assert dict(safe.items()) == {"expiring": LONG, "long": LONG, "short": SHORT}
        assert sorted(safe) == ["expiring", "long", "short"]
        assert 0 < (safe.ttl("expiring") or 0) <= 60
        assert safe.get_raw("long") == pickle.dumps(LONG, 5)
        assert [k for k, _, _ in safe.raw_records()] == ["expiring", "long", "short"]
        # Plain reads go through the sampled (funnel) path one time in 64: both see it.
        assert all(safe["long"] == LONG for _ in range(140))
    data = _records(path, "safe.db")
    large = _records(path, "large.db")
    assert set(large) == {b"long", b"expiring"}
    tag = safe_env.LARGE_TAG
    for key in (b"long", b"expiring"):
        assert data[key][:1] == safe_env.LARGE
        assert data[key][1 : 1 + tag] == large[key][:tag]  # the two parts of one write
    assert data[b"expiring"][1:tag] != data[b"long"][1:tag]
    assert large[b"long"][tag:] + data[b"long"][1 + tag :] == pickle.dumps(LONG, 5)
    assert data[b"short"] == pickle.dumps(SHORT, 5)
    d = db.DB()
    d.open(str(path / "large.db"), None, db.DB_UNKNOWN, db.DB_RDONLY)
    assert d.get_pagesize() == safe_env.LARGE_PAGE_SIZE
    d.close()
    verify(path)
    with Safe.open(path) as safe:  # and after a reopen
        assert safe["long"] == LONG


def test_every_write_path_keeps_the_long_values_file_to_what_is_pointed_to(
    tmp_path: Path,
) -> None:
    with Safe.open(tmp_path / "s") as safe:
        for key in ("a", "b", "c", "d", "e", "f", "g"):
            safe[key] = LONG
        assert _large_keys(safe) == {b"a", b"b", b"c", b"d", b"e", b"f", b"g"}
        del safe["a"]
        assert safe.pop("b") == LONG
        assert safe.modify("c", lambda old: old[:10]) == LONG[:10]
        safe.set("d", SHORT, ttl=60)
        assert safe.setdefault("e", SHORT) == LONG  # present: unchanged
        assert safe.popitem() == ("c", LONG[:10])
        safe.update({"f": SHORT})
        assert _large_keys(safe) == {b"e", b"g"}
        assert safe.modify("f", lambda old: LONG) == LONG  # short -> long in a transaction
        assert _large_keys(safe) == {b"e", b"f", b"g"}
        safe.clear()
        assert len(safe) == 0
        assert _large_keys(safe) == set()


def test_a_long_value_replaced_by_a_short_one_in_one_call_is_swept(tmp_path: Path) -> None:
    """`[]=` is one Berkeley DB call and does not read what it replaces: the long record stays
    until the sweep, never read meanwhile, and the sweep leaves the records pointed to."""
    with Safe.open(tmp_path / "s") as safe:
        for i in range(300):  # more than one sweep batch
            safe[f"k{i:03d}"] = LONG
        for i in range(0, 300, 2):
            safe[f"k{i:03d}"] = SHORT
        assert all(safe[f"k{i:03d}"] == (SHORT if i % 2 == 0 else LONG) for i in range(300))
        e: Any = safe._env
        deadline = time.monotonic() + 30
        while len(_large_keys(safe)) > 150 and time.monotonic() < deadline:
            time.sleep(0.2)  # the maintenance thread sweeps SWEEP_BATCH every SWEEP_TICKS
        assert _large_keys(safe) == {f"k{i:03d}".encode() for i in range(1, 300, 2)}
        assert e.sweep_large() == 0
        assert all(safe[f"k{i:03d}"] == (SHORT if i % 2 == 0 else LONG) for i in range(300))


def test_the_sweep_reads_keys_only_and_rests_after_a_clean_pass(tmp_path: Path) -> None:
    """A sweep with nothing to delete must not read the long values themselves (it did: an idle
    process read 11 MB/s, found by a review), and rests once a whole pass found nothing."""
    with Safe.open(tmp_path / "s") as safe:
        e: Any = safe._env
        e._stop.set()  # the maintenance thread's own sweeps would race this test's
        e._thread.join(timeout=5)
        big = os.urandom(60_000)
        for i in range(300):
            safe[f"k{i:03d}"] = big
        e.checkpoint()
        stat = e._env.memp_stat()[0]
        pages = stat["cache_hit"] + stat["cache_miss"]
        assert e.sweep_large() == 0  # the first 200 keys
        assert e.sweep_large() == 0  # the other 100: a whole pass, nothing deleted
        stat = e._env.memp_stat()[0]
        touched = stat["cache_hit"] + stat["cache_miss"] - pages
        # Two per key (its large.db leaf and its safe.db record) give about 600; reading the
        # values too touched 5,137 (15 overflow pages each), from disk when not cached.
        assert touched < 1500, f"{touched} pages touched by one sweep pass over 300 keys"
        assert e._sweep_rest == safe_env.SWEEP_REST
        safe["k000"] = SHORT  # an orphan now, but the sweep rests
        assert e.sweep_large() == 0
        e._sweep_rest = 0
        assert e.sweep_large() == 1


def test_an_expired_long_value_is_absent_and_purged_with_its_record(tmp_path: Path) -> None:
    with Safe.open(tmp_path / "s") as safe:
        safe.set("t", LONG, ttl=0.2)
        assert safe["t"] == LONG
        time.sleep(0.3)
        assert "t" not in safe
        assert safe.get("t") is None
        assert len(safe) == 0
        deadline = time.monotonic() + 10
        while _large_keys(safe) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _large_keys(safe) == set()


def test_readers_never_miss_a_key_whose_value_changes_between_long_and_short(
    tmp_path: Path,
) -> None:
    """A plain read of a long value is two lookups without a transaction: a writer replacing or
    removing the value between them must not make a reader see nothing or a wrong value."""
    values = [LONG, SHORT, b"z" * (LIMIT * 3), b"w" * 10]
    stop = threading.Event()
    errors: list[BaseException] = []
    seen: set[bytes] = set()

    with Safe.open(tmp_path / "s", durable=False) as safe:
        safe["k"] = LONG

        def write() -> None:
            i = 0
            try:
                while not stop.is_set():
                    if i % 3 == 0:
                        safe.modify("k", lambda old, i=i: values[i % 4])
                    else:
                        safe["k"] = values[i % 4]
                    i += 1
            except BaseException as e:
                errors.append(e)

        def read() -> None:
            try:
                while not stop.is_set():
                    value = safe["k"]
                    assert value in values, value[:20]
                    seen.add(value[:1])  # type: ignore[index]
                    assert next(v for k, v in safe.items() if k == "k") in values
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=write) for _ in range(2)]
        threads += [threading.Thread(target=read) for _ in range(3)]
        for t in threads:
            t.start()
        time.sleep(2)
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert errors == [], errors[:3]
    assert seen == {b"x", b"y", b"z", b"w"}


def test_a_safe_made_before_keeps_its_long_values_in_its_data_file(tmp_path: Path) -> None:
    """A data file of 4 KiB pages (a safe created before 16 KiB pages) gains nothing from the
    long values' file, whose pages are as big: its values stay where they are, and so do new
    ones; no long values' file is made."""
    path = tmp_path / "s"
    old = pickle.dumps(b"o" * 3000, 5)
    env = db.DBEnv()
    path.mkdir()
    env.open(
        str(path),
        db.DB_CREATE | db.DB_INIT_MPOOL | db.DB_INIT_TXN | db.DB_INIT_LOCK | db.DB_INIT_LOG,
    )
    d = db.DB(env)
    d.set_flags(db.DB_CHKSUM)
    d.set_pagesize(4096)
    d.open("safe.db", None, db.DB_BTREE, db.DB_CREATE | db.DB_AUTO_COMMIT)
    d.put(b"old", old)
    d.close()
    env.close()
    with Safe.open(path) as safe:
        assert safe["old"] == b"o" * 3000
        safe["new"] = LONG
        assert safe["new"] == LONG
        assert safe.modify("old", lambda v: v + b"!") == b"o" * 3000 + b"!"
    assert not (path / "large.db").exists()
    assert _records(path, "safe.db") == {
        b"new": pickle.dumps(LONG, 5),
        b"old": pickle.dumps(b"o" * 3000 + b"!", 5),
    }


def test_backup_and_restore_carry_the_long_values(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with Safe.open(path) as safe:
        for i in range(20):
            safe[f"k{i}"] = LONG if i % 2 else SHORT
    assert backup(path, tmp_path / "b") == 20
    assert (tmp_path / "b" / "large.db").exists()
    assert restore(tmp_path / "b", tmp_path / "r") == 20
    with Safe.open(tmp_path / "r") as safe:
        assert all(safe[f"k{i}"] == (LONG if i % 2 else SHORT) for i in range(20))


def test_set_raw_refuses_bytes_that_would_read_as_a_pointer(tmp_path: Path) -> None:
    with Safe.open(tmp_path / "s") as safe, pytest.raises(ValueError, match="takes a pickle"):
        safe.set_raw("k", safe_env.LARGE + os.urandom(10))


def test_a_long_value_is_seen_by_another_process(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with Safe.open(path) as safe:
        safe["k"] = LONG
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            with Safe.open(path) as safe:
                code = 0 if safe["k"] == LONG else 2
                safe["k2"] = LONG * 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    with Safe.open(path) as safe:
        assert safe["k2"] == LONG * 2


@pytest.mark.parametrize("extra", [1, 40, 4063, 4064, 4065, 8128, 50000])
def test_a_long_value_fills_whole_pages_of_the_long_values_file(tmp_path: Path, extra: int) -> None:
    """LARGE_PAGE_PAYLOAD is what one checksummed 4 KiB overflow page holds: the head of a
    value (and its tag) takes exactly the pages it fills, and the tail stays on the data file's
    page. A wrong figure would show here as one page more (or fewer) than the head needs."""
    value = os.urandom(LIMIT + extra)
    with Safe.open(tmp_path / "s") as safe:
        safe["k"] = value
        e: Any = safe._env
        stored = len(pickle.dumps(value, 5))
        head = _records_open(e.large())[b"k"]
        pages = len(head) // safe_env.LARGE_PAGE_PAYLOAD
        assert len(head) == pages * safe_env.LARGE_PAGE_PAYLOAD
        assert e.large().stat()["over_pg"] == pages
        assert stored - len(head) + safe_env.LARGE_TAG < safe_env.LARGE_PAGE_PAYLOAD
        assert safe["k"] == value


def test_a_long_value_written_whole_before_the_cut_still_reads_every_way(
    tmp_path: Path,
) -> None:
    """A safe written before long values were cut at LARGE_FILE's page ends holds LARGE alone
    in the data file and the whole value in LARGE_FILE: every read finds it, the sweep keeps
    it, and a new write of the key replaces it with the cut form."""
    path = tmp_path / "s"
    whole = pickle.dumps(LONG, 5)
    with Safe.open(path) as safe:
        safe["other"] = LONG  # makes LARGE_FILE
        e: Any = safe._env
        txn = e._env.txn_begin()
        e.large().put(b"old", whole, txn=txn)
        e._db.put(b"old", safe_env.LARGE, txn=txn)
        txn.commit()
        assert safe["old"] == LONG
        assert safe.get("old") == LONG
        assert dict(safe.items())["old"] == LONG
        e._sweep_rest = 0
        e.sweep_large()
        assert b"old" in _large_keys(safe)
        assert safe.modify("old", lambda v: v + b"!") == LONG + b"!"
        assert safe["old"] == LONG + b"!"
        assert len(e._db.get(b"old")) > 1  # now LARGE, a tag and a tail
    verify(path)


def test_a_safe_made_with_32_kib_pages_keeps_them_and_its_on_page_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Main made 32 KiB data pages for a while: such a safe keeps them, values up to 8,174
    bytes stay on its pages, and longer ones are cut into the long values' file as on 16 KiB."""
    path = tmp_path / "s"
    mid, long = b"m" * 6000, b"l" * 20000
    with monkeypatch.context() as m:
        m.setattr(safe_env, "PAGE_SIZE", 32 << 10)
        with Safe.open(path) as safe:
            safe["mid"] = mid
            safe["long"] = long
    with Safe.open(path) as safe:  # today's code: 16 KiB for new files only
        assert safe["mid"] == mid and safe["long"] == long
        safe["mid2"] = mid
        assert safe._env._db.get_pagesize() == 32 << 10  # type: ignore[attr-defined]
        assert _large_keys(safe) == {b"long"}
    data = _records(path, "safe.db")
    assert data[b"mid2"] == pickle.dumps(mid, 5)  # on the page, not cut
    assert data[b"long"][:1] == safe_env.LARGE


def test_a_long_value_read_while_writers_overwrite_it_back_to_back(tmp_path: Path) -> None:
    """A plain read's two lookups have no transaction: while 6 processes overwrite one long
    value back to back, a read that retried without locks kept finding the next write's head
    (starved: 1,000 retries ran out, SafeCorruptError). Mismatched parts are now read again
    under one transaction's read locks, so every read ends, with one whole write's value."""
    path = tmp_path / "s"
    sizes = [LIMIT + 2, 8120, 8121, 12000, 20000]
    with Safe.open(path, durable=False) as safe:
        safe["k"] = b"Z" * 20000
    deadline = time.monotonic() + 3.0
    pids = []
    for i in range(6):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                with Safe.open(path, durable=False) as s:
                    n = 0
                    while time.monotonic() < deadline:
                        s["k"] = bytes([65 + n % 26]) * sizes[(n + i) % len(sizes)]
                        n += 1
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    reads = 0
    try:
        with Safe.open(path, durable=False) as safe:
            while time.monotonic() < deadline:
                for value in (safe["k"], next(v for k, v in safe.items() if k == "k")):
                    assert isinstance(value, bytes)
                    assert len(set(value)) == 1 and len(value) in [*sizes, 20000], value[:8]
                    reads += 1
    finally:
        for pid in pids:
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
    assert reads > 100, reads  # starved reads managed a few per second


@pytest.mark.parametrize("page_size", [4 << 10, 16 << 10, 32 << 10])
def test_the_on_page_limit_is_the_longest_item_kept_on_the_page(
    tmp_path: Path, page_size: int
) -> None:
    """`on_page_limit` decides which values go to the long values' file: an item of that many
    bytes must stay on a checksummed B-tree page, and one byte more take an overflow page
    (the formula was one byte too high: a value of exactly 4,079 bytes took a whole page)."""
    env = db.DBEnv()
    env.open(str(tmp_path), db.DB_CREATE | db.DB_INIT_MPOOL)
    d = db.DB(env)
    d.set_flags(db.DB_CHKSUM)
    d.set_pagesize(page_size)
    d.open("x.db", None, db.DB_BTREE, db.DB_CREATE)
    limit = safe_env.on_page_limit(page_size)
    try:
        d.put(b"k", b"x" * limit)
        assert d.stat()["over_pg"] == 0
        d.put(b"k", b"x" * (limit + 1))
        assert d.stat()["over_pg"] == 1
    finally:
        d.close()
        env.close()
