"""Expiring keys (`Safe.set(..., ttl=)`, `Safe.ttl`): every read treats an expired key as
absent, the purge reclaims it, a write without ttl clears the expiry, and a safe made before
expiry existed opens and reads as before. Multi-process visibility: tests/integration/
test_safe_expiry_processes.py."""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path

import pytest
from berkeleydb import db
from pmnc.safe import Safe, expiry
from pmnc.safe import env as safe_env

SHORT = 0.15  # seconds: long enough to read the key before it expires on a loaded machine


def expire(s: Safe, *keys: str, ttl: float = SHORT) -> None:
    """Set `keys` to expire in `ttl` seconds, check they are there, then wait them out."""
    for k in keys:
        s.set(k, f"v-{k}", ttl=ttl)
    for k in keys:
        assert k in s
    time.sleep(ttl + 0.05)


def records(s: Safe) -> int:
    """Records in the data file, expired or not (what the purge reclaims)."""
    environment = s._env
    return int(environment.count())


def index_entries(s: Safe) -> int:
    return len(s._env.aux_scan(None, "expiry", None, 10_000))


@pytest.fixture(params=["values", "long values"])
def safe(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Each test twice: as it is, and with every value over 16 bytes kept in the long values'
    file (safe/env.py, LARGE), where an expiring value's deadline is kept with it."""
    if request.param == "long values":
        monkeypatch.setattr(safe_env, "on_page_limit", lambda page_size: 16)
    with Safe.open(tmp_path / "s") as s:
        yield s


def test_check_ttl_refuses_what_is_not_a_positive_number() -> None:
    assert expiry.check_ttl(1) == 1.0
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="ttl must be > 0"):
            expiry.check_ttl(bad)
    for wrong in (True, "5", None):
        with pytest.raises(TypeError):
            expiry.check_ttl(wrong)


def test_the_record_header_is_told_from_any_pickle_by_its_first_byte() -> None:
    for value in (None, 0, "x", b"", [1], {"a": (1, 2)}, 1.5):
        for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
            data = pickle.dumps(value, protocol)
            assert data[0] != expiry.MARK
            assert expiry.live(data) is data and expiry.expires_at(data) is None
    wrapped = expiry.wrap(b"\x80\x05K\x01.", 2000.0)
    assert expiry.expires_at(wrapped) == 2000.0
    assert expiry.live(wrapped, now=1999.0) == b"\x80\x05K\x01."
    assert expiry.live(wrapped, now=2000.0) is None


def test_index_keys_sort_by_time_then_key() -> None:
    times = [0.001, 1.0, 1.5, 1e9, 1.7e9, 1.7e9 + 0.25, 4e9]
    keys = [expiry.index_key(t, b"k") for t in reversed(times)]
    assert [expiry.split_index_key(k)[0] for k in sorted(keys)] == times
    assert expiry.split_index_key(expiry.index_key(3.0, b"key")) == (3.0, b"key")


def test_every_read_treats_an_expired_key_as_absent(safe: Safe) -> None:
    safe["plain"] = 1
    expire(safe, "gone")
    assert safe.get("gone", "default") == "default"
    with pytest.raises(KeyError):
        safe["gone"]
    with pytest.raises(KeyError):
        safe.ttl("gone")
    with pytest.raises(KeyError):
        safe.get_raw("gone")
    assert "gone" not in safe
    assert len(safe) == 1
    assert list(safe) == ["plain"] == list(safe.keys())
    assert dict(safe.items()) == {"plain": 1}
    assert list(safe.values()) == [1]
    assert [k for k, _ in safe.raw_items()] == ["plain"]


def test_read_modify_writes_treat_an_expired_key_as_absent(safe: Safe) -> None:
    expire(safe, "p", "s", "m", "d", "a")
    assert safe.pop("p", "none") == "none"
    with pytest.raises(KeyError):
        safe.pop("p")
    assert safe.setdefault("s", "fresh") == "fresh"
    assert safe.modify("m", lambda old: old + 1, 41) == 42
    with pytest.raises(KeyError):
        del safe["d"]
    assert safe.popitem() == ("m", 42)  # "a" is expired: skipped, and removed on the way
    assert set(safe) == {"s"}
    assert safe.ttl("s") is None  # written without ttl: no expiry


def test_a_live_expiring_key_reads_like_any_other(safe: Safe) -> None:
    safe.set("k", {"a": [1]}, ttl=60)
    remaining = safe.ttl("k")
    assert remaining is not None and 59 < remaining <= 60
    assert safe["k"] == {"a": [1]} and safe.get("k") == {"a": [1]} and "k" in safe
    assert len(safe) == 1 and dict(safe.items()) == {"k": {"a": [1]}}
    assert pickle.loads(safe.get_raw("k")) == {"a": [1]}  # without the expiry header
    assert safe.pop("k") == {"a": [1]}
    assert index_entries(safe) == 0  # the pop dropped its index entry in the same transaction


def test_a_write_without_ttl_clears_the_expiry(safe: Safe) -> None:
    for write in (
        lambda: safe.__setitem__("k", 2),
        lambda: safe.update({"k": 2}),
        lambda: safe.modify("k", lambda v: 2),
        lambda: safe.set("k", 2),
        lambda: safe.set_raw("k", pickle.dumps(2)),
    ):
        safe.set("k", 1, ttl=SHORT)
        write()
        assert safe.ttl("k") is None
        time.sleep(SHORT + 0.05)
        assert safe["k"] == 2
        assert len(safe) == 1
        safe._env.purge_expired()
        assert safe["k"] == 2  # the stale index entry does not purge the new value
        assert index_entries(safe) == 0


def test_setting_a_new_ttl_replaces_the_old_one(safe: Safe) -> None:
    safe.set("k", 1, ttl=SHORT)
    safe.set("k", 2, ttl=60)
    assert index_entries(safe) == 1  # the earlier entry went in the same transaction
    time.sleep(SHORT + 0.05)
    assert safe["k"] == 2
    safe.set("k", 3, ttl=SHORT)
    time.sleep(SHORT + 0.05)
    assert "k" not in safe


def test_the_purge_reclaims_expired_records_in_the_background(safe: Safe) -> None:
    # 250 durable writes take longer than SHORT on a loaded machine (seen in a full run): a
    # second, so that all of them are still there to be counted before they expire.
    for i in range(250):  # more than one purge batch
        safe.set(f"k{i:03}", i, ttl=1.0)
    safe["stays"] = 1
    assert records(safe) == 251 and len(safe) == 251
    time.sleep(1.05)
    assert len(safe) == 1  # counted out at once, purged or not
    deadline = time.monotonic() + 10
    while records(safe) > 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert records(safe) == 1, "the maintenance thread did not purge within 10 s"
    assert index_entries(safe) == 0
    assert list(safe) == ["stays"]


def test_clear_removes_expiring_keys_and_their_index_but_not_queues(safe: Safe) -> None:
    safe.set("a", 1, ttl=60)
    safe["b"] = 2
    safe.queue("q").put("item")
    safe.clear()
    assert len(safe) == 0 and index_entries(safe) == 0
    assert len(safe.queue("q")) == 1


def test_set_raw_refuses_what_is_not_a_pickle(safe: Safe) -> None:
    with pytest.raises(ValueError, match="takes a pickle"):
        safe.set_raw("k", expiry.wrap(pickle.dumps(1), 1e12))
    with pytest.raises(ValueError, match="takes a pickle"):
        safe.set_raw("k", b"")


def test_a_safe_made_before_expiry_existed_opens_and_reads(tmp_path: Path) -> None:
    """Made with the raw binding as the earlier pmnc did: one B-tree `safe.db`, bare pickles,
    no `extra.db`. It reads as before, and takes expiring keys from then on."""
    path = tmp_path / "old"
    path.mkdir()
    env = db.DBEnv()
    env.open(
        str(path),
        db.DB_CREATE | db.DB_INIT_LOCK | db.DB_INIT_LOG | db.DB_INIT_MPOOL | db.DB_INIT_TXN,
        0o600,
    )
    handle = db.DB(env)
    handle.set_flags(db.DB_CHKSUM)
    handle.open("safe.db", None, db.DB_BTREE, db.DB_CREATE | db.DB_AUTO_COMMIT, 0o600)
    for i in range(10):
        handle.put(f"k{i}".encode(), pickle.dumps({"i": i}, 4))
    handle.close()
    env.close()
    assert not (path / "extra.db").exists()
    with Safe.open(path) as s:
        assert len(s) == 10 and s["k3"] == {"i": 3} and s.ttl("k3") is None
        assert dict(s.items()) == {f"k{i}": {"i": i} for i in range(10)}
        assert s.queues() == [] and len(s.queue("q")) == 0
        assert not (path / "extra.db").exists()  # reading creates nothing
        s.set("new", 1, ttl=60)
        assert len(s) == 11
    assert sorted(os.listdir(path)).count("extra.db") == 1
