"""Hot backup while writers run, restore onto a stopped or new safe, and raw access for tools."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from pmnc.safe import (
    Safe,
    SafeBusyError,
    SafeError,
    backup,
    restore,
    users,
    verify,
)
from pmnc.safe.admin import _exclusively


def test_raw_access_never_unpickles(tmp_path: Path) -> None:
    with Safe.open(tmp_path / "s") as s:
        s.update({"a.1": 1, "a.2": [2], "b.1": "x", "": 0})
        assert [k for k, _ in s.raw_items("a.")] == ["a.1", "a.2"]
        assert [k for k, _ in s.raw_items()] == ["", "a.1", "a.2", "b.1"]
        assert list(s.raw_items("zzz")) == []
        raw = s.get_raw("a.2")
        assert isinstance(raw, bytes)
        s.set_raw("copy", raw)
        assert s["copy"] == [2]
        with pytest.raises(KeyError):
            s.get_raw("missing")
        with pytest.raises(TypeError):
            s.set_raw("k", "not bytes")  # type: ignore[arg-type]


def test_backup_during_writes_restores_every_write_acknowledged_before_it(tmp_path: Path) -> None:
    path, acks = tmp_path / "s", tmp_path / "acks"
    Safe.open(path).close()
    pid = os.fork()
    if pid == 0:
        try:
            fd = os.open(acks, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            with Safe.open(path, recover=False) as s:
                i = 0
                while True:
                    s[f"k{i}"] = {"i": i}
                    os.write(fd, f"k{i}\n".encode())
                    i += 1
        finally:
            os._exit(1)
    try:
        time.sleep(0.5)
        before = acks.read_text().split()
        assert len(before) > 10, "the writer wrote nothing: the test would prove nothing"
        count = backup(path, tmp_path / "backup")
        assert count >= len(before)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert not list((tmp_path / "backup").glob("__db.*")), "a backup holds no region files"
    restored = tmp_path / "restored"
    assert restore(tmp_path / "backup", restored) == count
    with Safe.open(restored) as s:
        missing = [k for k in before if k not in s]
        assert missing == []
        assert len(s) == count
    verify(restored)


def test_restore_replaces_a_stopped_safe_and_refuses_a_busy_one(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with Safe.open(path) as s:
        s["v"] = "old"
    backup(path, tmp_path / "b1")
    with Safe.open(path) as s:
        s["v"] = "new"
        s["extra"] = 1
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                try:
                    restore(tmp_path / "b1", path)
                except SafeBusyError as e:
                    code = 0 if f"in use by pid {os.getppid()}" in str(e) else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    assert users(path) == []
    assert restore(tmp_path / "b1", path) == 1
    with Safe.open(path) as s:
        assert dict(s) == {"v": "old"}


def test_backup_refuses_a_non_empty_destination_and_a_missing_safe(tmp_path: Path) -> None:
    with Safe.open(tmp_path / "s") as s:
        s["k"] = 1
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "file").write_text("x")
    with pytest.raises(SafeError, match="not an empty directory"):
        backup(tmp_path / "s", tmp_path / "dest")
    with pytest.raises(SafeError, match="no such safe"):
        backup(tmp_path / "missing", tmp_path / "d2")
    with pytest.raises(SafeError, match=r"no safe\.db and log files"):
        restore(tmp_path / "dest", tmp_path / "r")


def test_restore_refuses_a_directory_that_is_not_a_safe(tmp_path: Path) -> None:
    with Safe.open(tmp_path / "s") as s:
        s["k"] = 1
    backup(tmp_path / "s", tmp_path / "b")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "precious.txt").write_text("keep me")
    with pytest.raises(SafeError, match="not empty and is not a safe"):
        restore(tmp_path / "b", docs)
    assert (docs / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "docs", "s"]


def test_no_process_can_open_a_safe_while_it_is_recovered_or_restored(tmp_path: Path) -> None:
    """recover, verify and restore hold the directory exclusively for their whole run: a process
    cannot slip in between their "nobody uses it" check and their work (and, for restore, write
    into the directory about to be replaced)."""
    path = tmp_path / "s"
    with Safe.open(path) as s:
        s["k"] = 1
    with (
        _exclusively(path, "restore"),
        pytest.raises(SafeBusyError, match="being recovered or restored"),
    ):
        Safe.open(path)
    with Safe.open(path) as s:  # free again
        assert s["k"] == 1
        with pytest.raises(SafeBusyError):
            _exclusively(path, "recover").__enter__()
