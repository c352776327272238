"""What a safe costs on disk, and that costing less gave back no guarantee (docs/footprint.md).

- An idle open safe takes a few MiB, not the 60 MiB of fully reserved regions it used to.
- The regions' reservation follows the data: the cache region is reserved up to what the data
  file could bring into it, so reads on a disk that another program filled never touch an
  unbacked page (SIGBUS); writes are refused with SafeNoSpaceError.
- New data files get 16 KiB pages and stay within 1.5x the payload; a safe created with
  yesterday's parameters (4 KiB pages, a 32 MiB cache, regions already on disk) opens and keeps
  its data and its page size.
- Recovery after kill -9 of a writer works on the new regions, as fast as before.

Children are forked and end in os._exit; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from berkeleydb import db
from forking import fork, wait
from helpers import small_tmpfs
from pmnc.safe import Safe, SafeNoSpaceError, disk_usage, recover, verify

MiB = 1 << 20


def disk_bytes(path: Path) -> int:
    """Blocks every file of a safe holds (what `du` says), reservations included."""
    return sum(p.stat().st_blocks * 512 for p in path.iterdir() if p.is_file())


def regions(path: Path) -> list[Path]:
    return sorted(path.glob("__db.0[0-9][0-9]"))


def unbacked(path: Path) -> list[str]:
    """Region files with bytes inside their size that have no disk block: a SIGBUS waiting."""
    out = []
    for region in regions(path):
        with contextlib.suppress(FileNotFoundError):
            st = region.stat()
            if st.st_blocks * 512 < st.st_size:
                out.append(f"{region.name}: {st.st_size} bytes, {st.st_blocks * 512} backed")
    return out


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 160 MiB tmpfs mounted for the test (needs root and mount privileges). The tests fill it
    on purpose; its size is only headroom for the set-up (96 MiB ran out once in a full run:
    22 MiB of data, its log before a checkpoint removed it, the cache's regions)."""
    with small_tmpfs(tmp_path / "mnt", 160) as mnt:
        yield mnt


def test_an_idle_open_safe_takes_a_few_mib_and_twenty_take_twenty_times_that(
    tmp_path: Path,
) -> None:
    safes = [Safe.open(tmp_path / f"m{i}") for i in range(20)]
    try:
        for s in safes:
            s["counter"] = 1
        figures = safes[0].stats()
        # After stats(): a reservation only grows while open, and the maintenance thread may
        # grow it at any moment, so the directory measured now holds what stats() reported.
        sizes = [disk_bytes(s.path) for s in safes]
    finally:
        for s in safes:
            s.close()
    print(f"\nidle open safe: {max(sizes) / MiB:.2f} MiB on disk; 20 safes {sum(sizes) / MiB:.1f}")
    assert max(sizes) <= 8 * MiB, f"an idle safe takes {max(sizes) / MiB:.1f} MiB"
    assert 0 < figures["region_bytes"] <= sizes[0]
    assert figures["cache_max_bytes"] >= 32 * MiB  # the default cache, only reserved as used
    # Closed, a safe keeps its regions (they are reused by the next opening): the same size.
    assert max(disk_bytes(s.path) for s in safes) <= 8 * MiB


def test_regions_stay_backed_while_the_cache_fills_with_data(tmp_path: Path) -> None:
    """The cache region grows as pages are read and written; at no moment may a byte of it be
    without a disk block. A sampler thread checks every millisecond while 4 threads write
    20 MiB of 4 KiB values and then read all of it back."""
    path = tmp_path / "s"
    stop = threading.Event()
    seen: list[str] = []

    def sample() -> None:
        while not stop.is_set():
            seen.extend(unbacked(path))
            time.sleep(0.001)

    with Safe.open(path, durable=False) as safe:
        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            errors: list[BaseException] = []

            def write(t: int) -> None:
                try:
                    for i in range(1250):
                        safe[f"t{t}.{i}"] = os.urandom(4096)
                except BaseException as e:
                    errors.append(e)

            threads = [threading.Thread(target=write, args=(t,)) for t in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=120)
            assert not any(t.is_alive() for t in threads), "deadlocked"
            assert errors == []
            assert sum(len(v) for v in safe.values()) == 5000 * 4096  # type: ignore[arg-type]
            figures = safe.stats()
        finally:
            stop.set()
            sampler.join(timeout=10)
    assert seen == [], seen[:5]
    data = (path / "safe.db").stat().st_size
    print(
        f"\n20 MiB written: data file {data / MiB:.1f} MiB, regions "
        f"{figures['region_bytes'] / MiB:.1f} MiB (cache {figures['cache_bytes'] / MiB:.1f} "
        f"of at most {figures['cache_max_bytes'] / MiB:.1f})"
    )
    # The regions follow the data: no more than the cache's maximum plus the fixed regions.
    assert figures["region_bytes"] <= figures["cache_max_bytes"] + 8 * MiB


def test_reads_on_a_disk_another_program_filled_never_sigbus(
    small_fs: Path, tmp_path: Path
) -> None:
    """Fresh regions, 22 MiB of data file, the disk then filled by another file but for
    768 KiB: reading every key grows the cache by some 20 MiB, all of it reserved at opening
    (the data file's size); writes are refused cleanly. A SIGBUS would kill the child (exit -7):
    it does when the cache's reservation ignores the data file."""
    path = small_fs / "s"
    errors = tmp_path / "errors"
    with Safe.open(path, min_free_space=MiB) as safe:
        for i in range(3000):
            safe[f"k{i}"] = bytes([i % 251]) * 4096
    recover(path)
    for region in regions(path):  # regions made anew by the next opening: an empty cache
        region.unlink()

    def child() -> None:
        with Safe.open(path, min_free_space=MiB, recover=False) as safe:
            filler = small_fs / "filler"
            with open(filler, "wb", buffering=0) as f:
                for chunk in (b"\0" * MiB, b"\0" * 4096):
                    with contextlib.suppress(OSError):  # ENOSPC: as full as it gets
                        while True:
                            f.write(chunk)
            assert os.statvfs(small_fs).f_bavail == 0
            # A little room again: enough for libdb to extend a region file by writing its last
            # byte (on a disk with no block left at all that fails cleanly), not to back the
            # hole it leaves before it: the case that was a SIGBUS.
            os.truncate(filler, filler.stat().st_size - 768 * 1024)
            time.sleep(0.3)  # the maintenance thread sees the full disk
            for i in range(3000):
                assert safe[f"k{i}"] == bytes([i % 251]) * 4096
            with contextlib.suppress(SafeNoSpaceError):
                safe["new"] = b"x" * 4096
                raise AssertionError("a write on a full disk was not refused")
            filler.unlink()

    pid = fork(child, errors)
    code = wait(pid, 120)
    assert code == 0, errors.read_text() if errors.exists() else f"exit {code} (-7: SIGBUS)"
    with Safe.open(path) as safe:
        assert len(safe) == 3000
        assert "new" not in safe
    verify(path)


def _old_safe(path: Path, items: dict[str, object]) -> None:
    """A safe as pmnc made them before docs/footprint.md: 4 KiB pages, a 32 MiB cache, every
    region file fully reserved (1.25 x cache + 4 MiB for the cache region, 2 MiB for others)."""
    path.mkdir(mode=0o700)
    env = db.DBEnv()
    env.set_cachesize(0, 32 * MiB, 1)
    env.set_lk_detect(db.DB_LOCK_DEFAULT)
    flags = (
        db.DB_CREATE
        | db.DB_INIT_LOCK
        | db.DB_INIT_LOG
        | db.DB_INIT_MPOOL
        | db.DB_INIT_TXN
        | db.DB_THREAD
        | db.DB_REGISTER
    )
    env.open(str(path), flags | db.DB_RECOVER, 0o600)
    d = db.DB(env)
    d.set_flags(db.DB_CHKSUM)
    d.open("safe.db", None, db.DB_BTREE, db.DB_THREAD | db.DB_AUTO_COMMIT | db.DB_CREATE, 0o600)
    for key, value in items.items():
        d.put(key.encode(), pickle.dumps(value, 5))
    assert d.get_pagesize() == 4096
    d.close()
    env.txn_checkpoint(0, 0, db.DB_FORCE)
    env.close()
    names = regions(path)
    for n, region in enumerate(names):
        with open(region, "r+b") as f:
            size = os.fstat(f.fileno()).st_size
            want = size + 2 * MiB
            if n == len(names) - 1:
                want = max(want, 40 * MiB + 4 * MiB)
            os.posix_fallocate(f.fileno(), 0, want)


def test_a_safe_created_before_keeps_its_page_size_regions_and_data(tmp_path: Path) -> None:
    path = tmp_path / "old"
    items = {f"k{i}": {"n": i, "v": "x" * (i % 1500)} for i in range(2000)}
    _old_safe(path, items)
    before = disk_bytes(path)
    with Safe.open(path) as safe:
        assert dict(safe.items()) == items
        safe["new"] = "written by today's code"
        assert safe.modify("k1", lambda v: {**v, "n": -1})["n"] == -1  # type: ignore[index]
        figures = safe.stats()
    assert figures["cache_max_bytes"] > 32 * MiB  # the old region's cache, read from the files
    d = db.DB()
    d.open(str(path / "safe.db"), None, db.DB_UNKNOWN, db.DB_RDONLY)
    try:
        assert d.get_pagesize() == 4096
    finally:
        d.close()
    print(f"\nold safe: {before / MiB:.1f} MiB on disk before, {disk_bytes(path) / MiB:.1f} after")
    with Safe.open(path) as safe:
        assert len(safe) == 2001
        assert safe["new"] == "written by today's code"
    verify(path)


def test_a_new_safe_has_16_kib_pages_and_its_data_file_follows_the_payload(
    tmp_path: Path,
) -> None:
    """Keys written in key order; every database file counted (disk_usage: the data file and the
    long values' file). Sizes from the issue and the benchmark (KB as 1,000 bytes), and the
    long values around each overflow page's end: just over the data file's on-page limit
    (4,078 bytes at 16 KiB) and over one, two and three LARGE_FILE pages, and 64 KiB exactly."""
    ratios = {}
    sizes = (100, 1000, 4000, 4100, 6000, 8200, 12300, 16400, 30000, 43000, 64000, 65536)
    for size in sizes:
        path = tmp_path / f"v{size}"
        n = max(50, (4 * MiB) // size)
        with Safe.open(path, durable=False) as safe:
            payload = 0
            for start in range(0, n, 500):
                batch = {f"k{i:07d}": os.urandom(size) for i in range(start, min(n, start + 500))}
                safe.update(batch)
                payload += sum(len(k) + len(pickle.dumps(v, 5)) for k, v in batch.items())
            safe.checkpoint()
        ratios[size] = disk_usage(path).data / payload
        d = db.DB()
        d.open(str(path / "safe.db"), None, db.DB_UNKNOWN, db.DB_RDONLY)
        try:
            assert d.get_pagesize() == 16384
        finally:
            d.close()
    print("\ndata file / payload: " + ", ".join(f"{k} B {v:.2f}" for k, v in ratios.items()))
    # Just over the on-page limit a whole value took three of LARGE_FILE's 4 KiB pages for 8.2
    # KB: 1.52x. Cut at the pages' end, its head takes two and its tail stays in the data file.
    # Before LARGE_FILE it was a 32 KiB page: 4x.
    assert all(r <= 1.5 for r in ratios.values()), ratios


def test_recovery_after_kill_9_of_a_writer_on_the_new_regions(tmp_path: Path) -> None:
    path = tmp_path / "s"
    acks = tmp_path / "acks"
    errors = tmp_path / "errors"
    Safe.open(path).close()

    def writer() -> None:
        with Safe.open(path, recover=False) as safe:
            fd = os.open(acks, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            for i in range(1_000_000):
                safe[f"k{i}"] = bytes([i % 251]) * 2000
                os.write(fd, f"k{i}\n".encode())

    pid = fork(writer, errors)
    deadline = time.monotonic() + 30
    while (not acks.exists() or acks.stat().st_size < 20_000) and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    assert wait(pid, 30) == -signal.SIGKILL, errors.read_text() if errors.exists() else ""
    acknowledged = acks.read_text().split()
    started = time.monotonic()
    with Safe.open(path) as safe:  # recover=True: the dead registrant is noticed, recovered
        took = time.monotonic() - started
        lost = [k for k in acknowledged if safe.get(k) != bytes([int(k[1:]) % 251]) * 2000]
    print(f"\nkill -9 after {len(acknowledged)} acknowledged writes: recovered in {took:.3f} s")
    assert not lost, f"{len(lost)} acknowledged writes lost"
    assert took < 5.0
    assert unbacked(path) == []
    verify(path)
