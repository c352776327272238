"""The Berkeley DB behaviour pmnc.safe is built around, proven on the raw binding.

Each test states one fact of docs/berkeleydb.md (the section is named in its docstring) and
shows it with `berkeleydb` directly, so that a new libdb or binding that behaves otherwise fails
here, by name, rather than somewhere deep in the safe's tests.

Every experiment runs in a fresh interpreter (`_run`), bounded by a timeout, and ends in
`os._exit`: several of them panic an environment on purpose, and a panicked handle must never be
closed (that was seen to spin forever) nor be left to pytest's process to garbage-collect (which
closes it); a failed `DBEnv.open` also leaves its process unable to open that environment again.
Children forked inside an experiment end in `os._exit` too, so they never close what they
inherited.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from berkeleydb import db
from forking import fork
from pmnc.safe import Safe, verify

# Shared by every experiment: pmnc's environment flags (safe/env.py ENV_FLAGS) and helpers.
PRELUDE = r'''
import fcntl, json, os, struct, sys, threading, time
from berkeleydb import db

FLAGS = (db.DB_CREATE | db.DB_INIT_LOCK | db.DB_INIT_LOG | db.DB_INIT_MPOOL | db.DB_INIT_TXN
         | db.DB_THREAD | db.DB_REGISTER)
HOME = sys.argv[1]
os.makedirs(HOME, exist_ok=True)
KEEP = []  # handles a child must not close: a DBEnv that is garbage-collected is closed


def open_env(extra=0, *, register=True, cache=None, detect=db.DB_LOCK_DEFAULT, timeout_us=0):
    env = db.DBEnv()
    if cache:
        env.set_cachesize(0, cache, 1)
    env.set_lk_detect(detect)
    if timeout_us:
        env.set_timeout(timeout_us, db.DB_SET_LOCK_TIMEOUT)
    env.open(HOME, (FLAGS if register else FLAGS & ~db.DB_REGISTER) | extra, 0o600)
    return env


def open_db(env, create=False):
    d = db.DB(env)
    flags = db.DB_THREAD | db.DB_AUTO_COMMIT | (db.DB_CREATE if create else 0)
    d.open("safe.db", None, db.DB_BTREE, flags, 0o600)
    return d


def outcome(fn):
    """What fn() returned, or the Berkeley DB error it raised, as text."""
    try:
        return fn()
    except db.DBError as e:
        return f"{type(e).__name__}: {e}"


def in_child(fn):
    """fn() in a forked child that ends in os._exit (closing nothing it inherited)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        result = outcome(fn)
        os.write(w, json.dumps(result).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 1 << 16):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(data)


def slots():
    """Each line of __db.register and whether its lock is held, as another process sees it."""
    fd = os.open(os.path.join(HOME, "__db.register"), os.O_RDONLY)
    try:
        out, offset = [], 0
        for line in os.pread(fd, 1 << 20, 0).split(b"\n"):
            if line.strip():
                probe = struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0)
                kind = struct.unpack("hhqqi", fcntl.fcntl(fd, fcntl.F_GETLK, probe))[0]
                out.append([line.strip().decode().split()[0], kind != fcntl.F_UNLCK])
            offset += len(line) + 1
        return out
    finally:
        os.close(fd)


def join_and_read():
    env = open_env()
    d = open_db(env)
    value = d.get(b"k")
    d.close()
    env.close()
    return value.decode()


def create():
    env = open_env(db.DB_RECOVER)
    d = open_db(env, create=True)
    d.put(b"k", b"v")
    d.close()
    env.close()
    return "created"


def done(**results):
    sys.stdout.write(json.dumps(results) + "\n")
    sys.stdout.flush()
    os._exit(0)
'''

PANIC = "DBRunRecoveryError"
RECOVERY_NEEDED = "BDB1567"  # "The DB_RECOVER flag was not specified, and recovery is needed"


def _run(tmp_path: Path, body: str, timeout: float = 60) -> dict[str, Any]:
    """Run PRELUDE + body in a new interpreter on the environment tmp_path/env; its results."""
    script = tmp_path / "experiment.py"
    script.write_text(PRELUDE + body)
    try:
        done = subprocess.run(
            [sys.executable, str(script), str(tmp_path / "env")],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"the experiment hung for {timeout} s")
    assert done.returncode == 0 and done.stdout, done.stdout + done.stderr
    results: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return results


def test_one_dbenv_per_process_and_a_failed_second_open_unregisters_the_first(
    tmp_path: Path,
) -> None:
    """One DBEnv per process per environment (docs/berkeleydb.md).

    libdb refuses a second DBEnv in a process (BDB1528), and the refused attempt also drops the
    first one's registration, so the next process to join takes the holder for dead and panics
    it."""
    r = _run(
        tmp_path,
        """
in_child(create)
env = open_env()
d = open_db(env)
before = in_child(slots)
second = outcome(lambda: open_env() and "opened")
after = in_child(slots)
joiner = in_child(join_and_read)
holder = outcome(lambda: d.put(b"k", b"w") or "ok")
done(before=before, second=second, after=after, joiner=joiner, holder=holder, pid=os.getpid())
""",
    )
    assert r["before"] == [[str(r["pid"]), True]]
    assert "BDB1528" in r["second"], r
    assert r["after"] == [[str(r["pid"]), False]], "the holder's slot lock was dropped"
    assert RECOVERY_NEEDED in r["joiner"], r
    assert r["holder"].startswith(PANIC), r


def test_closing_any_descriptor_of_db_register_unregisters_its_process(tmp_path: Path) -> None:
    """Never open or close __db.register (docs/berkeleydb.md).

    DB_REGISTER holds an fcntl lock, and closing any descriptor of that file in the holding
    process drops it (POSIX record locks); the next process to join then panics the environment
    for everyone."""
    r = _run(
        tmp_path,
        """
in_child(create)
env = open_env()
d = open_db(env)
open(os.path.join(HOME, "__db.register")).read()  # a harmless-looking diagnostic
after = in_child(slots)
joiner = in_child(join_and_read)
holder = outcome(lambda: d.put(b"k", b"w") or "ok")
done(after=after, joiner=joiner, holder=holder, pid=os.getpid())
""",
    )
    assert r["after"] == [[str(r["pid"]), False]]
    assert RECOVERY_NEEDED in r["joiner"], r
    assert r["holder"].startswith(PANIC), r


@pytest.mark.parametrize(
    ("child_ends", "parent"),
    [
        ("d.close(); env.close(); os._exit(0)", "panicked"),  # closes what it inherited
        ("sys.exit(0)", "panicked"),  # interpreter shutdown deallocates (closes) them
        ("os._exit(0)", "ok"),  # touches nothing
    ],
)
def test_a_child_that_closes_or_collects_inherited_handles_panics_its_parent(
    tmp_path: Path, child_ends: str, parent: str
) -> None:
    """Handles across fork() (docs/berkeleydb.md).

    A forked child that closes the parent's handles, or lets interpreter shutdown deallocate
    them, marks the parent's DB_REGISTER slot closed and panics the parent's environment; a
    child that leaves with os._exit harms nothing."""
    r = _run(
        tmp_path,
        f"""
in_child(create)
env = open_env()
d = open_db(env)
pid = os.fork()
if pid == 0:
    {child_ends}
os.waitpid(pid, 0)
parent = outcome(lambda: d.put(b"k", b"w") or "ok")
done(parent=parent, slots=in_child(slots), pid=os.getpid())
""",
    )
    if parent == "ok":
        assert r["parent"] == "ok"
        assert r["slots"] == [[str(r["pid"]), True]]
    else:
        assert r["parent"].startswith(PANIC), r
        assert r["slots"][0][0] == "X", "the child wrote 'closed' into the parent's slot"


def test_register_with_recover_recovers_only_when_a_registrant_died(tmp_path: Path) -> None:
    """Recovery after kill -9 (docs/berkeleydb.md).

    With DB_REGISTER, DB_RECOVER runs recovery only if a registered process died without
    closing, so it is harmless beside live processes; a joiner without DB_RECOVER that finds a
    dead registrant fails (BDB1567) and panics the live ones. A brand-new environment also needs
    DB_RECOVER (pmnc creates with it: Safe.open's default, prepare)."""
    r = _run(
        tmp_path,
        """
new = outcome(lambda: open_env() and "opened")   # this process may not open HOME again
def later():
    results = {}
    in_child(create)
    env = open_env()
    d = open_db(env)
    def recover_beside_live():
        started = time.monotonic()
        e = open_env(db.DB_RECOVER)
        took = time.monotonic() - started
        e.close()
        return took
    results["recover_beside_live"] = in_child(recover_beside_live)
    results["live_after_recover"] = outcome(lambda: d.put(b"k", b"1") or "ok")
    results["dead"] = in_child(lambda: KEEP.append(open_env()) or "joined, left without closing")
    results["slots"] = in_child(slots)
    results["joiner"] = in_child(join_and_read)
    results["live_after_joiner"] = outcome(lambda: d.put(b"k", b"2") or "ok")
    return results
done(new=new, **in_child(later))
""",
    )
    assert RECOVERY_NEEDED in r["new"], r
    assert r["recover_beside_live"] < 1.0
    assert r["live_after_recover"] == "ok", "recovery was skipped: nobody had died"
    assert [locked for _, locked in r["slots"]] == [True, False]
    assert RECOVERY_NEEDED in r["joiner"], r
    assert r["live_after_joiner"].startswith(PANIC), r


def test_recovery_after_a_registrant_died_keeps_every_commit(tmp_path: Path) -> None:
    """Recovery after kill -9 (docs/berkeleydb.md).

    The recovering open (DB_RECOVER, every user gone) brings the environment back with what was
    committed, whoever died holding it."""
    r = _run(
        tmp_path,
        """
in_child(create)
def die_holding():
    env = open_env()
    d = open_db(env)
    for i in range(100):
        d.put(b"n%d" % i, b"v")
    txn = env.txn_begin()
    d.put(b"uncommitted", b"x", txn=txn)
    KEEP.extend([env, d, txn])
    return "left without closing, a transaction open"
died = in_child(die_holding)
def recover_and_read():
    env = open_env(db.DB_RECOVER)
    d = open_db(env)
    keys = sorted(k.decode() for k, _ in d.items())
    d.close()
    env.close()
    return keys
done(died=died, keys=in_child(recover_and_read))
""",
    )
    assert r["keys"] == sorted(["k"] + [f"n{i}" for i in range(100)]), r


def test_recovery_without_register_panics_a_live_process(tmp_path: Path) -> None:
    """Recovery after kill -9 (docs/berkeleydb.md).

    Without DB_REGISTER, DB_RECOVER always recovers, rebuilding the regions under anyone still
    attached, who is panicked: so pmnc's offline recover runs only on a safe nobody uses, and
    the supervisor recovers only after every worker of the cage is gone."""
    r = _run(
        tmp_path,
        """
in_child(create)
env = open_env()
d = open_db(env)
recovered = in_child(lambda: open_env(db.DB_RECOVER, register=False).close() or "recovered")
done(recovered=recovered, live=outcome(lambda: d.put(b"k", b"w") or "ok"))
""",
    )
    assert r["recovered"] == "recovered"
    assert r["live"].startswith(PANIC), r


def test_region_settings_are_fixed_by_the_process_that_creates_the_region(
    tmp_path: Path,
) -> None:
    """Region settings belong to the creator (docs/berkeleydb.md).

    The deadlock detector and the cache size are those of whoever created the region; a joiner's
    are ignored, and so are a DB_RECOVER opener's when recovery is skipped. Only recovery
    without DB_REGISTER makes the region anew."""
    r = _run(
        tmp_path,
        """
def first():
    env = open_env(db.DB_RECOVER, cache=8 << 20, detect=db.DB_LOCK_YOUNGEST)
    open_db(env, create=True).close()
    env.close()
    return "created"
in_child(first)
def seen(extra, register=True):
    def f():
        env = open_env(extra, register=register, cache=32 << 20, detect=db.DB_LOCK_DEFAULT)
        figures = [env.get_lk_detect(), env.get_cachesize()[1] >> 20]
        env.close()
        return figures
    return in_child(f)
done(
    join=seen(0),
    recover_register=seen(db.DB_RECOVER),
    recover_no_register=seen(db.DB_RECOVER, register=False),
    youngest=db.DB_LOCK_YOUNGEST,
    default=db.DB_LOCK_DEFAULT,
)
""",
    )
    creator = [r["youngest"], 10]  # 8 MiB asked; libdb adds its overhead to a small cache
    assert r["join"] == creator, r
    assert r["recover_register"] == creator, r
    assert r["recover_no_register"][0] == r["default"], r
    assert r["recover_no_register"][1] >= 32, r


def test_a_lock_timeout_acts_only_when_the_detector_runs(tmp_path: Path) -> None:
    """Lock timeouts and lock_detect(DB_LOCK_EXPIRE) (docs/berkeleydb.md).

    A waiter past its lock timeout stays blocked until something runs the detector for expired
    requests; then it fails at once with DBLockDeadlockError (which pmnc's funnel retries).
    pmnc's maintenance thread runs that detector every 0.1 s."""
    r = _run(
        tmp_path,
        """
env = open_env(db.DB_RECOVER, timeout_us=200_000)
d = open_db(env, create=True)
d.put(b"k", b"0")
holder = env.txn_begin()
d.put(b"k", b"held", txn=holder)
waiter = {}
def wait_for_lock():
    waiter["error"] = outcome(lambda: d.put(b"k", b"w") or "granted")
thread = threading.Thread(target=wait_for_lock)
thread.start()
thread.join(1.5)  # 7 times the lock timeout
blocked = thread.is_alive()
started = time.monotonic()
expired = env.lock_detect(db.DB_LOCK_EXPIRE)
thread.join(5)
woken = time.monotonic() - started
still = thread.is_alive()
holder.abort()
thread.join(5)
done(blocked=blocked, expired=expired, woken=woken, still=still, error=waiter.get("error"))
""",
    )
    assert r["blocked"], "the waiter gave up by itself: libdb now enforces lock timeouts"
    assert r["expired"] == 1
    assert not r["still"] and r["woken"] < 1.0, r
    assert r["error"].startswith("DBLockDeadlockError"), r


def test_read_then_write_deadlocks_and_db_rmw_serializes_instead(tmp_path: Path) -> None:
    """Deadlocks, retries and DB_RMW (docs/berkeleydb.md).

    Two transactions that read a key and then write it deadlock (each holds the read lock the
    other's write needs); the detector aborts one. Read with DB_RMW (a write lock from the
    start), the second waits for the first and reads its committed value: what `modify` does
    (Environment.get_rmw)."""
    r = _run(
        tmp_path,
        """
env = open_env(db.DB_RECOVER)
d = open_db(env, create=True)
d.put(b"k", b"0")
def plain():
    both_read = threading.Barrier(2)
    outcomes = []
    def txn_body(n):
        txn = env.txn_begin()
        try:
            d.get(b"k", txn=txn)
            both_read.wait(10)
            time.sleep(0.1 * n)
            d.put(b"k", b"%d" % n, txn=txn)
            txn.commit()
            outcomes.append("committed")
        except db.DBLockDeadlockError:
            txn.abort()
            outcomes.append("deadlock")
    threads = [threading.Thread(target=txn_body, args=(n,)) for n in range(2)]
    for t in threads: t.start()
    for t in threads: t.join(20)
    return sorted(outcomes), any(t.is_alive() for t in threads)
def rmw():
    first_has_it = threading.Event()
    seen = {}
    def first():
        txn = env.txn_begin()
        d.get(b"k", txn=txn, flags=db.DB_RMW)
        first_has_it.set()
        time.sleep(0.3)
        d.put(b"k", b"first", txn=txn)
        txn.commit()
    def second():
        first_has_it.wait(10)
        txn = env.txn_begin()
        started = time.monotonic()
        seen["value"] = d.get(b"k", txn=txn, flags=db.DB_RMW).decode()
        seen["waited"] = time.monotonic() - started
        d.put(b"k", b"second", txn=txn)
        txn.commit()
    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads: t.start()
    for t in threads: t.join(20)
    return seen, any(t.is_alive() for t in threads)
done(plain=plain(), rmw=rmw(), deadlocks=env.lock_stat()["ndeadlocks"])
""",
    )
    assert r["plain"] == [["committed", "deadlock"], False], r
    seen, hung = r["rmw"]
    assert not hung
    assert seen["value"] == "first" and seen["waited"] > 0.1, r
    assert r["deadlocks"] == 1, "the DB_RMW pair added no deadlock"


def test_durable_commits_are_flushed_and_concurrent_ones_share_a_flush(tmp_path: Path) -> None:
    """Durability and group commit (docs/berkeleydb.md).

    With the default full sync, each commit of a lone writer flushes the log itself; concurrent
    committers (threads here, processes alike) share flushes; DB_TXN_WRITE_NOSYNC commits flush
    nothing."""
    r = _run(
        tmp_path,
        """
env = open_env(db.DB_RECOVER, cache=16 << 20)
d = open_db(env, create=True)
def load(threads, flags=0, seconds=0.7):
    syncs, commits = env.log_stat()["scount"], env.txn_stat()["ncommits"]
    end = time.monotonic() + seconds
    def write(t):
        i = 0
        while time.monotonic() < end:
            key = b"%d.%d" % (t, i % 500)
            if flags:
                txn = env.txn_begin(flags=flags)
                d.put(key, b"x" * 100, txn=txn)
                txn.commit()
            else:
                d.put(key, b"x" * 100)
            i += 1
    workers = [threading.Thread(target=write, args=(t,)) for t in range(threads)]
    for w in workers: w.start()
    for w in workers: w.join(30)
    return [env.txn_stat()["ncommits"] - commits, env.log_stat()["scount"] - syncs]
done(one=load(1), eight=load(8), nosync=load(8, db.DB_TXN_WRITE_NOSYNC))
""",
    )
    commits, flushes = r["one"]
    assert commits > 50 and flushes >= commits, r
    commits, flushes = r["eight"]
    print(f"\n8 threads: {commits} commits, {flushes} log flushes ({commits / flushes:.1f} each)")
    assert commits > 100 and commits >= 1.5 * flushes, r
    commits, flushes = r["nosync"]
    assert commits > 100 and flushes <= 2, r


def test_log_removal_keeps_the_log_from_where_the_last_checkpoint_began(tmp_path: Path) -> None:
    """Checkpoints and log removal (docs/berkeleydb.md).

    With DB_LOG_AUTO_REMOVE, a checkpoint removes every log file before the one where it began
    (libdb's stable LSN: the last checkpoint's ckp_lsn), so after a quiet checkpoint only the
    current file is left; without checkpoints nothing goes."""
    r = _run(
        tmp_path,
        """
env = db.DBEnv()
env.set_lk_detect(db.DB_LOCK_DEFAULT)
env.set_lg_max(1 << 20)
env.open(HOME, FLAGS | db.DB_RECOVER, 0o600)
env.log_set_config(db.DB_LOG_AUTO_REMOVE, 1)
d = open_db(env, create=True)
logs = lambda: sorted(p for p in os.listdir(HOME) if p.startswith("log."))
for i in range(2500):
    d.put(b"k%d" % (i % 300), os.urandom(2000))
written = logs()
env.txn_checkpoint(0, 0, db.DB_FORCE)
done(written=written, after=logs())
""",
    )
    assert len(r["written"]) >= 5, r
    assert r["after"] == r["written"][-1:], r


def _nosync_writer(path: Path, acks: Path, errors: Path) -> int:
    """Fork a child writing unique keys with durable=False, logging each returned write."""

    def write() -> None:
        fd = os.open(acks, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with Safe.open(path, recover=False, durable=False) as s:
            for i in range(10_000_000):
                s[f"k{i}"] = i
                os.write(fd, f"k{i}\n".encode())

    return fork(write, errors)


def test_a_write_nosync_commit_survives_kill_9_of_its_process(tmp_path: Path) -> None:
    """Durability and group commit (docs/berkeleydb.md).

    DB_TXN_WRITE_NOSYNC (Safe.open(durable=False)) writes the log into the OS at commit without
    flushing it, so a process crash loses nothing that returned (an OS crash may: not testable
    here)."""
    path, acks, errors = tmp_path / "s", tmp_path / "acks", tmp_path / "errors"
    Safe.open(path).close()
    pid = _nosync_writer(path, acks, errors)
    time.sleep(random.uniform(0.5, 1.0))
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while not os.waitpid(pid, os.WNOHANG)[0]:
        assert time.monotonic() < deadline, "the writer outlived SIGKILL"
        time.sleep(0.01)
    assert not errors.exists(), errors.read_text()
    acknowledged = acks.read_text().split()
    assert len(acknowledged) > 100
    with Safe.open(path) as s:  # recovers: the writer died registered
        missing = [k for k in acknowledged if s.get(k) != int(k[1:])]
    assert missing == []
    verify(path)


def test_the_binding_takes_bytes_and_reports_absence_its_own_way(tmp_path: Path) -> None:
    """Keys, values and the binding (docs/berkeleydb.md).

    Keys and values are bytes only (str raises TypeError), the empty key is a key, `get` of a
    missing key is None, `delete` of one raises DBNotFoundError (a KeyError), and the retried
    errors are DBErrors."""
    d = db.DB()
    d.open(str(tmp_path / "plain.db"), None, db.DB_BTREE, db.DB_CREATE, 0o600)
    try:
        with pytest.raises(TypeError):
            d.put("text", b"v")
        with pytest.raises(TypeError):
            d.put(b"k", "text")
        d.put(b"", b"empty key")
        assert d.get(b"") == b"empty key"
        assert d.get(b"missing") is None
        with pytest.raises(db.DBNotFoundError) as info:
            d.delete(b"missing")
        assert isinstance(info.value, KeyError)
    finally:
        d.close()
    assert issubclass(db.DBLockDeadlockError, db.DBError)
    assert issubclass(db.DBLockNotGrantedError, db.DBError)
