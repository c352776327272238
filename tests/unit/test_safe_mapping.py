"""A Safe behaves as a MutableMapping[str, object] whose every call is one transaction."""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import pytest
from pmnc.safe import Safe, SafeClosedError, SafeError
from pmnc.safe import env as safe_env
from pmnc.safe import store as safe_store

SEED = {(None,): [1, "bar", Decimal("1.0")]}


@pytest.fixture(params=["values", "long values"])
def safe(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Each test twice: as it is, and with every value over 16 bytes kept in the long values'
    file (safe/env.py, LARGE), so that each path through it is the same mapping."""
    if request.param == "long values":
        monkeypatch.setattr(safe_env, "on_page_limit", lambda page_size: 16)
    with Safe.open(tmp_path / "node1.demo.mod") as s:
        yield s


def test_seed_value_round_trips_and_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with Safe.open(path) as s:
        s["foo"] = SEED
        assert s["foo"] == SEED
    with Safe.open(path) as s:
        assert s["foo"] == SEED
        assert s.get("foo", None) == SEED


@pytest.mark.parametrize("key", ["", "ключ", "鍵🔑", "a\x00b", "\udcff lone surrogate", "x" * 4000])
def test_any_str_key_round_trips(safe: Safe, key: str) -> None:
    safe[key] = key
    assert safe[key] == key
    assert key in safe
    assert list(safe) == [key]


@pytest.mark.parametrize("key", [1, b"bytes", None, ("t",), 1.5])
def test_non_str_keys_raise_type_error_naming_the_expectation(safe: Safe, key: object) -> None:
    with pytest.raises(TypeError, match="safe keys are str"):
        safe[key] = 1  # type: ignore[index]
    with pytest.raises(TypeError, match="safe keys are str"):
        safe.get(key)  # type: ignore[arg-type]
    assert len(safe) == 0


def test_missing_keys(safe: Safe) -> None:
    with pytest.raises(KeyError) as info:
        safe["nope"]
    assert info.value.args == ("nope",)
    with pytest.raises(KeyError):
        del safe["nope"]
    assert safe.get("nope") is None
    assert safe.get("nope", 7) == 7
    assert "nope" not in safe


def test_set_overwrite_delete_len_and_iteration_in_key_order(safe: Safe) -> None:
    for k in ["b", "a", "c"]:
        safe[k] = k.upper()
    safe["a"] = "A2"
    assert len(safe) == 3
    assert list(safe) == ["a", "b", "c"]
    assert list(safe.keys()) == ["a", "b", "c"]
    assert list(safe.values()) == ["A2", "B", "C"]
    assert dict(safe.items()) == {"a": "A2", "b": "B", "c": "C"}
    assert ("a", "A2") in safe.items()
    del safe["b"]
    assert dict(safe) == {"a": "A2", "c": "C"}


def test_iteration_spans_batches(safe: Safe) -> None:
    safe.update({f"k{i:05d}": i for i in range(2500)})
    assert len(safe) == 2500
    assert [int(k[1:]) for k in safe] == list(range(2500))
    assert sum(safe.values()) == sum(range(2500))  # type: ignore[arg-type]


def test_iteration_never_raises_for_keys_deleted_meanwhile(safe: Safe) -> None:
    safe.update({f"k{i:05d}": i for i in range(3000)})
    seen = []
    for i, (k, v) in enumerate(safe.items()):
        seen.append(k)
        if i == 10:
            for j in range(11, 3000, 2):
                del safe[f"k{j:05d}"]
        assert safe.get(k, v) == v
    # Keys deleted after their batch was read may still appear; every survivor appears once.
    assert len(seen) == len(set(seen))
    assert set(safe) <= set(seen)
    assert len(safe) == 11 + (3000 - 11) // 2
    assert f"k{2999:05d}" not in seen  # a later batch, read after the deletes


def test_pop_setdefault_popitem(safe: Safe) -> None:
    assert safe.setdefault("a", [1]) == [1]
    assert safe.setdefault("a", [2]) == [1]
    assert safe.pop("a") == [1]
    assert safe.pop("a", "dflt") == "dflt"
    with pytest.raises(KeyError):
        safe.pop("a")
    safe["x"], safe["y"] = 1, 2
    assert safe.popitem() == ("x", 1)
    assert safe.popitem() == ("y", 2)
    with pytest.raises(KeyError):
        safe.popitem()
    assert safe.setdefault("n") is None
    assert "n" in safe


def test_modify_returns_new_value_and_uses_default(safe: Safe) -> None:
    assert safe.modify("n", lambda n: n + 1, 0) == 1
    assert safe.modify("n", lambda n: n + 1, 0) == 2
    assert safe.modify("l", lambda v: [*v, "x"], []) == ["x"]
    assert safe["n"] == 2


def test_modify_that_raises_stores_nothing(safe: Safe) -> None:
    safe["n"] = 5

    def boom(_: object) -> object:
        raise RuntimeError("no")

    with pytest.raises(RuntimeError, match="no"):
        safe.modify("n", boom, 0)
    assert safe["n"] == 5


def test_unpicklable_value_raises_pickling_error_and_keeps_old(safe: Safe) -> None:
    safe["k"] = "old"
    with pytest.raises((pickle.PicklingError, TypeError, AttributeError)):
        safe["k"] = threading.Lock()
    with pytest.raises((pickle.PicklingError, TypeError, AttributeError)):
        safe["k"] = lambda: 1
    assert safe["k"] == "old"
    with pytest.raises((pickle.PicklingError, TypeError, AttributeError)):
        safe.update({"a": 1, "k": threading.Lock()})
    assert "a" not in safe
    assert safe["k"] == "old"


def test_oversize_value_raises_value_error_naming_the_limit(tmp_path: Path) -> None:
    with Safe.open(tmp_path / "s", max_value_size=1000) as s:
        s["k"] = "old"
        with pytest.raises(ValueError, match="max_value_size 1000") as info:
            s["k"] = "x" * 2000
        assert str(tmp_path / "s") in str(info.value)
        assert s["k"] == "old"
        s["k"] = "y" * 900
        assert s["k"] == "y" * 900


def test_large_value_round_trips(safe: Safe) -> None:
    big = b"\xab" * (8 << 20)
    safe["big"] = big
    assert safe["big"] == big


def test_update_forms_and_clear_over_many_batches(safe: Safe) -> None:
    safe.update([("a", 1)], b=2)
    safe.update({"c": 3})
    assert dict(safe) == {"a": 1, "b": 2, "c": 3}
    safe.update({f"k{i}": i for i in range(5000)})  # one transaction
    assert len(safe) == 5003
    safe.clear()
    assert len(safe) == 0
    assert list(safe) == []


def test_closed_safe_raises_safe_closed_error_naming_the_path(tmp_path: Path) -> None:
    s = Safe.open(tmp_path / "s")
    s["k"] = 1
    s.close()
    s.close()  # idempotent
    with pytest.raises(SafeClosedError, match=str(tmp_path / "s")):
        s["k"]
    with pytest.raises(SafeClosedError):
        s["k"] = 2
    with pytest.raises(SafeClosedError):
        list(s)
    with pytest.raises(SafeClosedError):
        "k" in s  # noqa: B015 (a funnel read, not a hot one)
    with pytest.raises(SafeClosedError):
        s.ttl("k")
    with pytest.raises(SafeClosedError):
        s.get_raw("k")


def test_same_path_twice_in_a_process_shares_one_environment(tmp_path: Path) -> None:
    a = Safe.open(tmp_path / "s")
    b = Safe.open(tmp_path / "s")
    a["k"] = 1
    assert b["k"] == 1
    a.close()
    b["k"] = 2  # still open through b
    assert b["k"] == 2
    b.close()
    with Safe.open(tmp_path / "s") as c:
        assert c["k"] == 2


def test_not_durable_safe_reads_back(tmp_path: Path) -> None:
    with Safe.open(tmp_path / "s", durable=False) as s:
        for i in range(100):
            s[str(i)] = i
    with Safe.open(tmp_path / "s") as s:
        assert len(s) == 100


def test_create_false_refuses_a_missing_safe(tmp_path: Path) -> None:
    with pytest.raises(SafeError, match="no such safe"):
        Safe.open(tmp_path / "missing", create=False)
    assert not (tmp_path / "missing").exists()


def test_path_that_is_a_file_is_refused_naming_it(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("hello")
    with pytest.raises(SafeError, match="not a directory") as info:
        Safe.open(f)
    assert str(f) in str(info.value)
    assert f.read_text() == "hello"


def test_threads_share_one_safe(safe: Safe) -> None:
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(200):
                safe[f"{t}.{i}"] = i
                assert safe[f"{t}.{i}"] == i
                safe.modify("total", lambda n: n + 1, 0)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "deadlocked"
    assert errors == []
    assert safe["total"] == 1600
    assert len(safe) == 1601


def test_log_files_are_removed_while_open_and_after_close(tmp_path: Path) -> None:
    """A long overwrite run does not keep its history: old log files go while the safe is open.

    Berkeley DB keeps the log back to the start of the last checkpoint, so what stays at once
    follows the write rate times a checkpoint's duration (tests/stress measures it over time).
    """
    path = tmp_path / "s"
    with Safe.open(path, durable=False, checkpoint_interval=0.5) as s:
        removed_while_open = False
        i = 0
        deadline = time.monotonic() + 20
        # 60,000 writes at least, and on until the first log file is gone: under this load
        # (150-250 MB of log a second) the first checkpoint took up to 1.2 s, a whole run.
        while (i < 60_000 or not removed_while_open) and time.monotonic() < deadline:
            # A different value each time: an overwrite of an on-page item is logged as the
            # bytes that changed. (A 4 KiB value is long at 16 KiB pages: its head fills one
            # page of the long values' file, docs/footprint.md.)
            s[f"k{i % 1000}"] = bytes([i % 251]) * (4 << 10)
            if i % 1000 == 0 and not (path / "log.0000000001").exists():
                removed_while_open = True
            i += 1
        written = max(int(p.name[4:]) for p in path.glob("log.*"))
    assert written >= 20, f"only {written} log files written: the test wrote too little"
    assert removed_while_open
    assert len(list(path.glob("log.*"))) <= 2
    total = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    assert total < 80 << 20, f"{total >> 20} MiB on disk for 1,000 4 KiB values"


def test_checkpoint_and_stats(safe: Safe) -> None:
    safe["a"] = 1
    safe.get("a")
    safe.checkpoint()
    stats = safe.stats()
    assert stats["ops"] == {"set": 1, "read": 1, "checkpoint": 1}  # type: ignore[comparison-overlap]
    assert "p99_ms" in stats["latency"]["set"]  # type: ignore[index]
    assert stats["retries"] == 0


class _Gone:
    """A class whose pickles cannot be loaded once it is removed from its module."""


def test_pop_and_popitem_of_an_unloadable_value_lose_nothing(safe: Safe) -> None:
    global _Gone
    safe["a"] = _Gone()
    cls = _Gone
    del _Gone  # its pickle now names a class that cannot be found
    try:
        with pytest.raises(AttributeError):
            safe.popitem()
        with pytest.raises(AttributeError):
            safe.pop("a")
        assert "a" in safe, "a failed pop must not delete the value"
    finally:
        _Gone = cls
    assert isinstance(safe.pop("a"), _Gone)


def test_a_second_name_for_an_open_safe_shares_its_environment(tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to(tmp_path / "s", target_is_directory=True)
    with Safe.open(tmp_path / "s") as a:
        a["k"] = 1
        with Safe.open(tmp_path / "link") as b:
            assert b["k"] == 1
            assert b.path == a.path


class _KeysOnly:
    """Has keys() and [] but is no Mapping: dict.update treats it as a mapping."""

    def __init__(self, data: dict[str, object]) -> None:
        self._data = data

    def keys(self) -> list[str]:
        return list(self._data)

    def __getitem__(self, key: str) -> object:
        return self._data[key]


def test_update_treats_anything_with_keys_as_a_mapping_like_dict(safe: Safe) -> None:
    safe.update(_KeysOnly({"ab": 1, "cd": 2}))  # type: ignore[arg-type]
    expected: dict[str, object] = {}
    expected.update(_KeysOnly({"ab": 1, "cd": 2}))  # type: ignore[call-overload]
    assert dict(safe) == expected == {"ab": 1, "cd": 2}


def test_safe_errors_survive_pickling(tmp_path: Path) -> None:
    s = Safe.open(tmp_path / "s")
    s.close()
    with pytest.raises(SafeClosedError) as info:
        s["k"]
    copy = pickle.loads(pickle.dumps(info.value))
    assert type(copy) is SafeClosedError
    assert str(copy) == str(info.value)
    assert copy.path == tmp_path / "s"


def test_a_safe_whose_directory_vanished_raises_safe_error(tmp_path: Path) -> None:
    s = Safe.open(tmp_path / "s")
    try:
        shutil.rmtree(tmp_path / "s")
        time.sleep(0.25)  # past the free-space reading's period
        with pytest.raises(SafeError) as info:
            s["k"] = 1
        assert str(tmp_path / "s") in str(info.value)
    finally:
        with contextlib.suppress(SafeError):
            s.close()


def test_exit_with_daemon_threads_still_writing_does_not_crash(tmp_path: Path) -> None:
    """The exit hook waits for calls in flight before closing the handles under them."""
    script = textwrap.dedent(f"""
        import threading
        from pmnc.safe import Safe
        s = Safe.open({str(tmp_path / "s")!r})
        def work(t):
            i = 0
            while True:
                s[f"{{t}}.{{i % 50}}"] = i
                i += 1
        for t in range(8):
            threading.Thread(target=work, args=(t,), daemon=True).start()
        import time
        time.sleep(0.3)
    """)
    for _ in range(6):
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    with Safe.open(tmp_path / "s") as s:  # and the safe opens cleanly afterwards
        assert len(s) > 0


def test_an_empty_path_is_refused_not_the_current_directory(tmp_path: Path) -> None:
    """dbm and sqlite3's dbm refuse an empty path; Safe.open("") used to make cwd a safe."""
    before = sorted(os.listdir(tmp_path))
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(ValueError, match="must not be empty"):
            Safe.open("")
    finally:
        os.chdir(cwd)
    assert sorted(os.listdir(tmp_path)) == before, "nothing created in the current directory"


def test_an_iterator_started_before_close_raises_at_once_after_it(tmp_path: Path) -> None:
    """Not the rest of its batch: the next item after close() raises SafeClosedError."""
    safe = Safe.open(tmp_path / "s")
    safe.update({f"k{i:03d}": i for i in range(50)})  # one batch
    walk = iter(safe)
    assert next(walk) == "k000"
    safe.close()
    with pytest.raises(SafeClosedError):
        next(walk)


def test_close_waits_for_a_read_blocked_on_another_process_lock(tmp_path: Path) -> None:
    """A read waiting on a lock that another process holds is inside Berkeley DB, its
    thread's GIL released, for up to the lock timeout: close() must not close the handles
    under it (that crashed the process). It waits: the read ends cleanly, with the other's
    write or, when its lock wait timed out after close() began, with SafeClosedError."""
    path, signal = tmp_path / "s", tmp_path / "holding"
    with Safe.open(path) as s:
        s["k"] = "before"
    holder = textwrap.dedent(
        f"""
        import pathlib, time
        from pmnc.safe import Safe
        with Safe.open({str(path)!r}) as s:
            def body(v):
                pathlib.Path({str(signal)!r}).touch()
                time.sleep(1.5)
                return "after"
            s.modify("k", body)
        """
    )
    reader = textwrap.dedent(
        f"""
        import pathlib, threading, time
        from pmnc.safe import Safe
        s = Safe.open({str(path)!r})
        while not pathlib.Path({str(signal)!r}).exists():
            time.sleep(0.01)
        seen = []

        def read():
            try:
                seen.append(s["k"])
            except Exception as e:
                seen.append(type(e).__name__)

        t = threading.Thread(target=read)
        t.start()
        time.sleep(0.2)  # the read now waits on the holder's lock
        s.close()
        t.join()
        print(seen)
        """
    )
    held = subprocess.Popen([sys.executable, "-c", holder])
    try:
        done = subprocess.run(
            [sys.executable, "-c", reader], check=False, capture_output=True, text=True, timeout=60
        )
    finally:
        assert held.wait(timeout=60) == 0
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() in (["['after']"], ["['SafeClosedError']"])


class _SlowToLoad:
    """A short value whose unpickling takes 5 ms: a read spends most of its time in `get`."""

    def __init__(self) -> None:
        self.state = 1  # pickle calls __setstate__ only for a non-empty state

    def __setstate__(self, state: dict[str, object]) -> None:
        time.sleep(0.005)
        self.__dict__.update(state)


def test_a_close_from_a_signal_handler_inside_a_read_of_its_own_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() looks for hot reads in flight in the other threads only: a handler (SIGTERM, a
    finalizer) that closes the safe while its own thread is inside `get` must not wait for
    that read, which cannot go on until the handler returns (it waited CLOSE_WAIT_S, then
    left the environment as needing recovery). Reads are not sampled here: a sampled read
    goes through the funnel, a call like any other, which close() still waits for (a call
    interrupted by a handler in its own thread cannot finish: docs/footprint.md)."""
    monkeypatch.setattr(safe_store, "_SAMPLE_MASK", (1 << 62) - 1)
    s = Safe.open(tmp_path / "s")
    s["k"] = _SlowToLoad()
    result: dict[str, object] = {}

    def handler(signum: int, frame: object) -> None:
        started = time.monotonic()
        f = frame
        while f is not None:
            if getattr(f, "f_code", None) is Safe.get.__code__:
                result["inside"] = True
            f = getattr(f, "f_back", None)
        s.close()
        result["took"] = time.monotonic() - started

    previous = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(SafeClosedError):
            while True:
                s.get("k")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert result.get("inside"), "the signal came outside get: the test proved nothing"
    assert float(result["took"]) < 1.0  # type: ignore[arg-type]


@pytest.mark.parametrize("shared", [False, True])
def test_a_long_read_whose_safe_is_closed_meanwhile(tmp_path: Path, shared: bool) -> None:
    """A hot read of a long value looks it up after its first lookup. If the Safe was closed in
    between (by another thread), the lookup goes through the environment the read used, not
    the closed Safe's placeholder (that raised AttributeError): SafeClosedError when the
    environment closed with it, the value when another Safe of the path keeps it open."""
    s1 = Safe.open(tmp_path / "s")
    s2 = Safe.open(tmp_path / "s") if shared else None
    s1["k"] = b"x" * 20000
    env = s1._env  # type: ignore[attr-defined]
    real = env.db_get

    def db_get(key: bytes) -> bytes | None:
        out = real(key)
        s1.close()  # what another thread's close() can do at this moment
        return out

    env.db_get = db_get
    try:
        if shared:
            assert s1["k"] == b"x" * 20000
        else:
            with pytest.raises(SafeClosedError):
                s1["k"]
    finally:
        env.db_get = real
    if s2 is not None:
        assert s2["k"] == b"x" * 20000
        s2.close()


def test_close_waits_for_a_write_still_checking_free_space(tmp_path: Path) -> None:
    """A write checks free space (and may extend the regions' reservation through the
    environment) before its funnel counts it: close() must find it there too, and wait for
    it, rather than close the handles under it. The write then refuses cleanly."""
    s = Safe.open(tmp_path / "s")
    env = s._env  # type: ignore[attr-defined]
    real = env.check_space
    checking = threading.Event()

    def check_space(what: str, options: object, size: int) -> None:
        checking.set()
        time.sleep(0.4)  # close() runs meanwhile, in the main thread
        real(what, options, size)

    env.check_space = check_space

    def write() -> object:
        s["k"] = 1
        return None

    took, outcome = _close_while(s, write, checking)
    assert took >= 0.25, f"close() did not wait for the write ({took:.3f} s)"
    assert isinstance(outcome, SafeClosedError), outcome


def _close_while(
    s: Safe, work: Callable[[], object], inside: threading.Event
) -> tuple[float, object]:
    """Run `work()` in a thread, close `s` once `inside` is set: how long close() took, and
    what `work` returned or raised."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(work())
        except BaseException as e:
            outcome.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    assert inside.wait(10)
    started = time.monotonic()
    s.close()
    took = time.monotonic() - started
    thread.join(10)
    assert len(outcome) == 1, outcome
    return took, outcome[0]


def test_close_waits_for_a_replication_status_read_in_another_thread(tmp_path: Path) -> None:
    """`Safe.replication()` and `is_master()` read the environment's state (rep_stat) without
    a funnel call; the runtime polls them. close() must wait for one in flight, not close the
    handle under it (it returned in 1 ms, and the poll got a raw DBError)."""
    s = Safe.open(tmp_path / "s")
    env = s._env  # type: ignore[attr-defined]
    inside = threading.Event()

    def replication_info() -> dict[str, object]:
        inside.set()
        time.sleep(0.3)  # close() runs meanwhile, in the main thread
        return {"regsize": env._env.memp_stat()[0]["regsize"]}  # a real handle call

    env.replication_info = replication_info
    took, outcome = _close_while(s, s.replication, inside)
    assert took >= 0.2, f"close() did not wait for the status read ({took:.3f} s)"
    assert isinstance(outcome, dict), outcome


class _OpensASafeWhenLoaded:
    """A value whose unpickling opens another safe, as a careless __setstate__ may."""

    where = ""

    def __init__(self) -> None:
        self.state = 1

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        if threading.current_thread().name == "reader":
            time.sleep(0.2)  # close() begins meanwhile, holding the registry of environments
            Safe.open(self.where).close()


def test_close_does_not_wait_for_a_read_that_is_only_unpickling(tmp_path: Path) -> None:
    """A hot read is done with the handles once it has its bytes: close() must not wait for
    its unpickling, which runs user code. Here that code opens another safe, which waits for
    the registry lock close() holds: close() waited CLOSE_WAIT_S, then left the environment
    needing recovery, and the path could not be opened again in this process."""
    _OpensASafeWhenLoaded.where = str(tmp_path / "other")
    s = Safe.open(tmp_path / "s")
    s["k"] = _OpensASafeWhenLoaded()
    reader = threading.Thread(target=lambda: s.get("k"), name="reader")
    reader.start()
    time.sleep(0.1)  # the reader is in __setstate__'s sleep
    started = time.monotonic()
    s.close()
    assert time.monotonic() - started < 1.0
    reader.join(10)
    with Safe.open(tmp_path / "s") as again:
        assert isinstance(again["k"], _OpensASafeWhenLoaded)
