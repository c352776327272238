"""Durable queues and expiring keys: what they cost, next to the alternatives, on one run.

    ./dev bench queues [--seconds 2] [--dir DIR] [--poll 0.01]

1. Throughput, durable, at 1x1 and 4x8 (processes x threads, forked, each with its own
   opening): puts/s, then get+done/s draining what was put, for
   - `Safe.queue` (`put`; `with q.get(timeout=0)`),
   - the safe's own durable `[]=` of new keys, each thread writing its own run of keys like
     bench/runner.py's `set_new` (the target: queue put >= 0.8x of it),
   - diskcache's `Deque` (`append`; `popleft`), SQLite in WAL mode without fsync per call,
   - a plain Safe used as a queue: keys `q:<time ns>:<pid>:<n>`, taken by `raw_items` +
     `pop` (what a module would write without `Safe.queue`).
2. Latency from a put in one process to its delivery in another (p50/p99 over 150 items put
   every 20 ms): `Safe.queue` (blocked get, futex wake-up), and the two polling loops above,
   sleeping `--poll` between empty looks.
3. Berkeley DB's Queue access method against a B-tree with sequence keys, raw binding, durable,
   1 thread and 8 threads: DB_QUEUE (`DB_APPEND` of fixed-length 256-byte records;
   `DB_CONSUME`) against B-tree put/first+delete, both committed with fsync.
4. TTL: durable `set(k, v, ttl=3600)` against `[]=` at 1x1, and the purge's effect on
   concurrent writes: one thread writing new keys durably while 20,000 expired keys are purged
   in the background, against the same writer with nothing to purge (writes/s and p99 ms).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import queue as queue_mod
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import report

ROOT = Path(__file__).resolve().parent.parent
VALUE = {"order": 12345, "item": "tea", "qty": 2, "note": "x" * 100}
KINDS = ("pmnc queue", "pmnc set", "diskcache Deque", "Safe polling")


def _fork(body: Callable[[], object], out: Path) -> int:
    """Run `body` in a forked child; its JSON result (or its traceback) goes to `out`."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            out.write_text(json.dumps(body()))
            code = 0
        except BaseException:
            out.write_text(json.dumps({"error": traceback.format_exc()}))
        finally:
            os._exit(code)
    return pid


def _join(pids: list[int], outs: list[Path], timeout: float) -> list[Any]:
    deadline = time.monotonic() + timeout
    for pid in pids:
        while True:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                for p in pids:
                    with contextlib.suppress(OSError):
                        os.kill(p, signal.SIGKILL)
                        os.waitpid(p, 0)
                raise SystemExit(f"bench queues: a child outlived {timeout:.0f} s")
            time.sleep(0.01)
    results = [json.loads(o.read_text()) for o in outs]
    for r in results:
        if isinstance(r, dict) and "error" in r:
            raise SystemExit(f"bench queues: a child failed:\n{r['error']}")
    return results


class _Ops:
    """One kind's put and take (True if it took an item, False if there was none)."""

    def __init__(self, kind: str, path: Path) -> None:
        self.kind = kind
        self.n = 0
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.handle: Any
        if kind == "diskcache Deque":
            import diskcache  # noqa: PLC0415 - a peer, installed with the bench extra

            self.handle = diskcache.Deque(directory=str(path))
        else:
            from pmnc.safe import Safe  # noqa: PLC0415

            self.handle = Safe.open(path, recover=False)
            self.q = self.handle.queue("bench")

    def close(self) -> None:
        if self.kind != "diskcache Deque":
            self.handle.close()

    def put(self, item: object) -> None:
        if self.kind == "pmnc queue":
            self.q.put(item)
        elif self.kind == "diskcache Deque":
            self.handle.append(item)
        else:
            with self.lock:
                self.n += 1
                n = self.n
            if self.kind == "Safe polling":  # time-ordered: the oldest is the first key
                self.handle[f"q:{time.time_ns():020}:{self.pid}:{n}"] = item
            else:  # new keys, each thread its own run of them (bench/runner.py's set_new)
                self.handle[f"new{self.pid}-{threading.get_ident()}-{n:09d}"] = item

    def take(self) -> object | None:
        """An item, or None when there is none now."""
        if self.kind == "pmnc queue":
            try:
                with self.q.get(timeout=0) as item:
                    return item  # type: ignore[no-any-return]
            except queue_mod.Empty:
                return None
        if self.kind == "diskcache Deque":
            try:
                return self.handle.popleft()  # type: ignore[no-any-return]
            except IndexError:
                return None
        for _ in range(100):  # Safe polling: the oldest key, unless another taker popped it
            oldest = next(iter(self.handle.raw_items("q:")), None)
            if oldest is None:
                return None
            popped = self.handle.pop(oldest[0], None)
            if popped is not None:
                return popped  # type: ignore[no-any-return]
        return None


def _prepare(kind: str, path: Path) -> None:
    if kind != "diskcache Deque":
        from pmnc.safe import Safe  # noqa: PLC0415

        Safe.open(path).close()


def throughput(kind: str, base: Path, procs: int, threads: int, seconds: float) -> dict[str, float]:
    """puts/s for `seconds`, then get+done/s draining them (for at most `seconds`)."""
    path = base / f"tp-{kind.replace(' ', '-')}-{procs}x{threads}"
    _prepare(kind, path)
    out: dict[str, float] = {}
    phases = ("put", "take") if kind != "pmnc set" else ("put",)
    for phase in phases:

        def child(phase: str = phase) -> dict[str, float]:
            ops = _Ops(kind, path)
            counts = [0] * threads
            start = time.monotonic()
            deadline = start + seconds

            def work(t: int) -> None:
                while time.monotonic() < deadline:
                    if phase == "put":
                        ops.put(VALUE)
                    elif ops.take() is None:
                        return
                    counts[t] += 1

            pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
            for th in pool:
                th.start()
            for th in pool:
                th.join(seconds + 60)
            elapsed = time.monotonic() - start
            ops.close()
            return {"n": sum(counts), "elapsed": elapsed}

        outs = [base / f"out-{i}" for i in range(procs)]
        results = _join([_fork(child, o) for o in outs], outs, seconds + 120)
        total = sum(r["n"] for r in results)
        elapsed = max(r["elapsed"] for r in results)
        out[phase] = total / elapsed
    return out


def latency(kind: str, base: Path, poll: float, count: int = 150) -> dict[str, float]:
    """p50/p99 ms from a put in this process's child to its delivery in another child."""
    path = base / f"lat-{kind.replace(' ', '-')}"
    _prepare(kind, path)
    ready = base / f"ready-{kind.replace(' ', '-')}"

    def consumer() -> list[float]:
        ops = _Ops(kind, path)
        seen: list[float] = []
        ready.write_text("1")
        deadline = time.monotonic() + count * 0.02 + 60
        while len(seen) < count and time.monotonic() < deadline:
            if kind == "pmnc queue":
                try:
                    with ops.q.get(timeout=5) as sent:
                        seen.append(time.time() - sent)
                except queue_mod.Empty:
                    continue
            else:
                taken = ops.take()
                if isinstance(taken, float):
                    seen.append(time.time() - taken)
                else:
                    time.sleep(poll)
        ops.close()
        return seen

    def producer() -> int:
        ops = _Ops(kind, path)
        while not ready.exists():
            time.sleep(0.01)
        for _ in range(count):
            time.sleep(0.02)
            ops.put(time.time())
        ops.close()
        return count

    outs = [base / "lat-c", base / "lat-p"]
    pids = [_fork(consumer, outs[0]), _fork(producer, outs[1])]
    seen = sorted(_join(pids, outs, count * 0.02 + 120)[0])
    return {
        "p50_ms": 1000 * seen[len(seen) // 2],
        "p99_ms": 1000 * seen[min(len(seen) - 1, len(seen) * 99 // 100)],
    }


class _AccessMethod:
    """Threads appending or consuming through one raw handle, each call its own fsync'd
    transaction; deadlocks are retried."""

    def __init__(self, env: Any, d: Any, method: str, record: bytes, db: Any) -> None:
        self.env, self.d, self.method, self.record, self.db = env, d, method, record, db
        self.seq = iter(range(1, 1 << 62))
        self.seq_lock = threading.Lock()

    def _one(self, phase: str) -> bool:
        db, d = self.db, self.d
        txn = self.env.txn_begin()
        try:
            if phase == "append" and self.method == "DB_QUEUE":
                d.append(self.record, txn=txn)
            elif phase == "append":
                with self.seq_lock:
                    n = next(self.seq)
                d.put(n.to_bytes(8, "big"), self.record, txn=txn)
            elif self.method == "DB_QUEUE":
                if d.consume(txn=txn) is None:
                    txn.abort()
                    return False
            else:
                c = d.cursor(txn)
                got = c.first(flags=db.DB_RMW)
                if got is not None:
                    c.delete()
                c.close()
                if got is None:
                    txn.abort()
                    return False
        except (db.DBLockDeadlockError, db.DBLockNotGrantedError):
            txn.abort()
            return True
        txn.commit()
        return True

    def run(self, phase: str, threads: int, seconds: float) -> float:
        counts = [0] * threads
        deadline = time.monotonic() + seconds

        def work(t: int) -> None:
            while time.monotonic() < deadline and self._one(phase):
                counts[t] += 1

        started = time.monotonic()
        pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        for th in pool:
            th.start()
        for th in pool:
            th.join(seconds + 60)
        return sum(counts) / (time.monotonic() - started)


def access_methods(base: Path, seconds: float) -> list[list[str]]:
    """Raw binding: DB_QUEUE append/consume against B-tree put/first+delete, fsync'd commits."""
    from berkeleydb import db  # noqa: PLC0415 - only the raw comparison needs the binding

    rows = [["access method", "threads", "append/s", "consume/s"]]
    record = pickle.dumps(VALUE, 5).ljust(256, b"\0")
    for method in ("DB_QUEUE", "B-tree"):
        for threads in (1, 8):
            path = base / f"am-{method}-{threads}"
            path.mkdir()
            env = db.DBEnv()
            env.set_lk_detect(db.DB_LOCK_DEFAULT)
            flags = db.DB_CREATE | db.DB_INIT_LOCK | db.DB_INIT_LOG | db.DB_INIT_MPOOL
            env.open(str(path), flags | db.DB_INIT_TXN | db.DB_THREAD, 0o600)
            d = db.DB(env)
            if method == "DB_QUEUE":
                d.set_re_len(256)
                d.open("q.db", None, db.DB_QUEUE, db.DB_CREATE | db.DB_AUTO_COMMIT | db.DB_THREAD)
            else:
                d.open("q.db", None, db.DB_BTREE, db.DB_CREATE | db.DB_AUTO_COMMIT | db.DB_THREAD)
            am = _AccessMethod(env, d, method, record, db)
            rates = [am.run(phase, threads, seconds) for phase in ("append", "consume")]
            d.close()
            env.close()
            rows.append([method, str(threads), f"{rates[0]:,.0f}", f"{rates[1]:,.0f}"])
    return rows


def ttl_cost(base: Path, seconds: float) -> list[list[str]]:
    from pmnc.safe import Safe  # noqa: PLC0415

    rows = [["write (durable, 1x1)", "ops/s"]]
    with Safe.open(base / "ttl") as s:
        writes: list[tuple[str, Callable[[str], None]]] = [
            ("[]= new key", lambda k: s.__setitem__(k, VALUE)),
            ("set(k, v, ttl=3600)", lambda k: s.set(k, VALUE, ttl=3600)),
            ("[]= new key (again)", lambda k: s.__setitem__(k, VALUE)),
        ]
        for label, write in writes:
            n, deadline = 0, time.monotonic() + seconds
            started = time.monotonic()
            while time.monotonic() < deadline:
                write(f"{label[:3]}{n}")
                n += 1
            rows.append([label, f"{n / (time.monotonic() - started):,.0f}"])
    return rows


def purge_effect(base: Path, seconds: float, backlog: int = 20000) -> list[list[str]]:
    from pmnc.safe import Safe  # noqa: PLC0415

    rows = [["writer (durable [] = new keys)", "writes/s", "p99 ms", "purged"]]
    for label, expiring in (("nothing to purge", 0), (f"{backlog:,} keys purging", backlog)):
        path = base / f"purge-{expiring}"
        with Safe.open(path, durable=False) as fill:
            fill.update({f"pad{i}": VALUE for i in range(1000)})
            for i in range(expiring):
                fill.set(f"exp{i:06}", VALUE, ttl=0.5)
        time.sleep(0.6 if expiring else 0)
        with Safe.open(path) as s:
            before = s._env.count()
            times: list[float] = []
            deadline = time.monotonic() + seconds
            n = 0
            while time.monotonic() < deadline:
                t = time.perf_counter()
                s[f"w{n}"] = VALUE
                times.append(time.perf_counter() - t)
                n += 1
            purged = before + n - s._env.count()
        times.sort()
        rows.append(
            [
                label,
                f"{n / seconds:,.0f}",
                f"{1000 * times[len(times) * 99 // 100]:.2f}",
                f"{purged:,}",
            ]
        )
    return rows


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="./dev bench queues", description=__doc__)
    ap.add_argument("--dir", type=Path, default=ROOT / "bench-results" / "tmp")
    ap.add_argument("--seconds", type=float, default=2.0, help="per cell")
    ap.add_argument("--poll", type=float, default=0.01, help="the polling loops' sleep (s)")
    ap.add_argument("--only", choices=("throughput", "latency", "access", "ttl"), action="append")
    args = ap.parse_args(argv)
    if args.seconds <= 0 or args.poll <= 0:
        ap.error("--seconds and --poll must be positive")
    parts = args.only or ["throughput", "latency", "access", "ttl"]
    args.dir.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="queues-", dir=args.dir))
    started = time.monotonic()
    lines = ["pmnc queues and expiry benchmark", f"machine:   {report.machine_line()}"]
    lines.append(f"directory: {base} ({report.filesystem_of(base)})")
    try:
        if "throughput" in parts:
            rows = [["durable", "procs x threads", "put/s", "get+done/s"]]
            for procs, threads in ((1, 1), (4, 8)):
                for kind in KINDS:
                    r = throughput(kind, base, procs, threads, args.seconds)
                    take = f"{r['take']:,.0f}" if "take" in r else "-"
                    rows.append([kind, f"{procs}x{threads}", f"{r['put']:,.0f}", take])
                    print(f"queues: {kind} {procs}x{threads} {rows[-1][2:]}", flush=True)
            lines += ["", *report.columns(rows)]
        if "latency" in parts:
            rows = [["put -> delivery, across processes", "p50 ms", "p99 ms"]]
            for kind in ("pmnc queue", "diskcache Deque", "Safe polling"):
                r = latency(kind, base, args.poll)
                name = kind if kind == "pmnc queue" else f"{kind} (sleep {args.poll:g} s)"
                rows.append([name, f"{r['p50_ms']:.3f}", f"{r['p99_ms']:.3f}"])
                print(f"queues: latency {rows[-1]}", flush=True)
            lines += ["", *report.columns(rows)]
        if "access" in parts:
            lines += ["", *report.columns(access_methods(base, args.seconds))]
        if "ttl" in parts:
            lines += ["", *report.columns(ttl_cost(base, args.seconds))]
            lines += ["", *report.columns(purge_effect(base, args.seconds))]
    finally:
        shutil.rmtree(base, ignore_errors=True)
    lines += ["", f"total time {time.monotonic() - started:.0f} s"]
    print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
