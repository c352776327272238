"""Bad environments give a clear SafeError naming the safe and the cause, and lose nothing."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import small_tmpfs
from pmnc.safe import (
    Safe,
    SafeCorruptError,
    SafeError,
    SafeNoSpaceError,
    SafePermissionError,
    verify,
)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 128 MiB tmpfs mounted for the test (needs root and mount privileges)."""
    with small_tmpfs(tmp_path / "mnt", 128) as mnt:
        yield mnt


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _fill(mnt: Path, leave: int) -> Path:
    filler = mnt / "filler"
    with open(filler, "wb") as f:
        f.truncate(0)
        remaining = _free(mnt) - leave
        chunk = b"\0" * (1 << 20)
        while remaining > 0:
            n = f.write(chunk[: min(len(chunk), remaining)])
            remaining -= n
        f.flush()
        os.fsync(f.fileno())
    return filler


def test_disk_full_refuses_writes_keeps_reads_and_resumes(small_fs: Path) -> None:
    path = small_fs / "safe" / "node1.demo.mod"
    s = Safe.open(path, cache_size=8 << 20, min_free_space=16 << 20)
    try:
        s.update({f"k{i}": i for i in range(200)})
        filler = _fill(small_fs, leave=8 << 20)
        time.sleep(0.3)  # the free-space reading is refreshed every 0.2 s
        with pytest.raises(SafeNoSpaceError, match="MiB free") as info:
            s["new"] = "x"
        assert str(path) in str(info.value)
        with pytest.raises(SafeNoSpaceError):
            s.modify("k1", lambda v: v + 1, 0)
        assert [s[f"k{i}"] for i in range(200)] == list(range(200))  # reads go on
        assert len(s) == 200
        filler.unlink()
        time.sleep(0.3)
        s["new"] = "written after space was freed"
        assert s.modify("k1", lambda v: v + 1, 0) == 2
    finally:
        s.close()
    with Safe.open(path) as s:
        assert len(s) == 201
        assert s["new"] == "written after space was freed"
    verify(path)


def test_a_safe_that_fills_the_disk_itself_stops_cleanly(small_fs: Path, tmp_path: Path) -> None:
    """Writing large values until the disk is full ends in SafeNoSpaceError, never SIGBUS."""
    path = small_fs / "s"
    acks, errors = tmp_path / "acks", tmp_path / "errors"
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            with Safe.open(path, cache_size=8 << 20, min_free_space=16 << 20) as s:
                fd = os.open(acks, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
                i = 0
                with contextlib.suppress(SafeNoSpaceError):
                    while True:
                        s[f"big{i}"] = os.urandom(512 << 10)
                        os.write(fd, f"big{i}\n".encode())
                        i += 1
                code = 0 if i > 10 else 2
        except BaseException:
            errors.write_text(traceback.format_exc())
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, (  # -7 would be a SIGBUS
        errors.read_text() if errors.exists() else f"status {status}"
    )
    acknowledged = acks.read_text().split()
    with Safe.open(path, min_free_space=0) as s:
        assert all(k in s for k in acknowledged)
        for k in acknowledged[-5:]:
            del s[k]  # deletes work on a nearly full disk, and give space back
    verify(path)


@pytest.mark.skipif(not hasattr(os, "setuid"), reason="needs POSIX users")
def test_permission_denied_names_the_safe(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with Safe.open(path) as s:
        s["k"] = "kept"
    path.chmod(0o700)
    if os.getuid() != 0:
        path.chmod(0o000)
        try:
            with pytest.raises(SafePermissionError, match="permission denied") as info:
                Safe.open(path)
            assert str(path) in str(info.value)
        finally:
            path.chmod(0o700)
    else:
        # Root ignores modes, so the check runs in a child that drops to "nobody".
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(read_end)
                os.setgid(65534)
                os.setuid(65534)
                try:
                    Safe.open(path)
                    outcome = "opened"
                except BaseException as e:
                    outcome = f"{type(e).__name__} {e}"
                os.write(write_end, outcome.encode())
            finally:
                os._exit(0)
        os.close(write_end)
        os.waitpid(pid, 0)
        with os.fdopen(read_end) as f:
            outcome = f.read()
        assert outcome.startswith("SafePermissionError"), outcome
        assert str(path) in outcome and "permission denied" in outcome
    with Safe.open(path) as s:
        assert s["k"] == "kept"


def test_garbage_data_file_is_reported_corrupt_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "s"
    path.mkdir()
    garbage = os.urandom(16384)
    (path / "safe.db").write_bytes(garbage)
    with pytest.raises(SafeCorruptError, match="damaged or not a pmnc safe") as info:
        Safe.open(path)
    assert str(path) in str(info.value)
    assert (path / "safe.db").read_bytes() == garbage


def test_foreign_database_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s"
    path.mkdir()
    con = sqlite3.connect(path / "safe.db")
    con.execute("create table t (x)")
    con.commit()
    con.close()
    with pytest.raises(SafeCorruptError) as info:
        Safe.open(path)
    assert str(path) in str(info.value)


def test_damaged_page_is_detected_by_checksum_and_verify(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with Safe.open(path) as s:
        s.update({f"k{i:05d}": "v" * 50 for i in range(3000)})
    data = bytearray((path / "safe.db").read_bytes())
    middle = len(data) // 2 // 4096 * 4096 + 512
    data[middle : middle + 256] = os.urandom(256)
    (path / "safe.db").write_bytes(bytes(data))
    with pytest.raises(SafeCorruptError, match="failed verification") as info:
        verify(path)
    assert str(path) in str(info.value)
    # A process reading it after a restart (fresh regions, so the page comes from disk) fails
    # with a SafeError naming the safe: checksums make damage loud, never a silent loss.
    script = (
        "from pmnc.safe import Safe, SafeError, recover\n"
        f"recover({str(path)!r})\n"
        f"s = Safe.open({str(path)!r})\n"
        "try:\n"
        "    n = sum(1 for _ in s.items())\n"
        "    print('READ', n)\n"
        "except SafeError as e:\n"
        "    print('ERROR', type(e).__name__, e)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.stdout.startswith("ERROR"), done.stdout + done.stderr
    assert str(path) in done.stdout


def test_missing_parent_permissions_and_odd_paths(tmp_path: Path) -> None:
    with pytest.raises(SafeError, match="not a directory"):
        Safe.open("/dev/null")
    f = tmp_path / "plainfile"
    f.write_text("x")
    with pytest.raises(SafeError) as info:
        Safe.open(f / "below")
    assert str(f / "below") in str(info.value)
