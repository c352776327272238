"""Expiring keys seen from other processes: absent everywhere at once when their time passes,
and purged by whichever process has the safe open (tests/unit/test_expiry.py has the rest)."""

from __future__ import annotations

import time
from pathlib import Path

from forking import assert_children_ok, fork, wait_file
from pmnc.safe import Safe


def test_a_key_set_with_ttl_is_seen_expired_from_another_process(tmp_path: Path) -> None:
    path, errors, ready = tmp_path / "s", tmp_path / "errors", tmp_path / "ready"
    ttl = 0.6
    Safe.open(path).close()

    def reader() -> None:
        with Safe.open(path, recover=False) as s:
            wait_file(ready, 10)
            expires = float(ready.read_text())
            assert s["session"] == {"user": "ann"}  # set by the parent, not expired yet
            remaining = s.ttl("session")
            assert remaining is not None and 0 < remaining <= ttl
            assert len(s) == 2
            while time.time() < expires:
                time.sleep(0.01)
            # Expired: absent for every read at once, purged or not.
            assert "session" not in s and s.get("session") is None
            assert len(s) == 1 and list(s) == ["plain"]

    pid = fork(reader, errors)
    with Safe.open(path, recover=False) as s:
        s["plain"] = 1
        s.set("session", {"user": "ann"}, ttl=ttl)
        ready.write_text(str(time.time() + ttl))
        assert_children_ok([pid], errors, timeout=30)


def test_another_processs_maintenance_purges_what_this_one_set(tmp_path: Path) -> None:
    path, errors, done = tmp_path / "s", tmp_path / "errors", tmp_path / "done"
    Safe.open(path).close()
    with Safe.open(path, recover=False) as s:
        for i in range(50):
            s.set(f"k{i}", i, ttl=0.2)

    def holder() -> None:
        with Safe.open(path, recover=False) as s:
            deadline = time.monotonic() + 10
            while s._env.count() > 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert s._env.count() == 0, "not purged within 10 s"
            done.write_text("ok")

    assert_children_ok([fork(holder, errors)], errors, timeout=30)
    assert done.read_text() == "ok"
