"""What a store costs on disk, and pmnc's per-call cost against raw Berkeley DB, from one run.

    ./dev bench footprint [--dir DIR] [--payload MIB] [--ratios] [--rounds 3] [--duration 3]

1. Idle footprint: each store created with one key and held open by this process (an idle
   module safe), its directory's disk blocks (what `du` counts: reservations included, sparse
   files not).
2. Disk per payload byte by value size (100 B, 1, 4, 10, 30 and 64 KB: KB as 1,000 bytes, values of
   random bytes pickled): about `--payload` MiB of values loaded through each store's bulk path
   in key order (and 1 KB once more in random key order, what a B-tree's page splits cost),
   then the data file(s) alone and the whole directory, divided by the payload (key + pickled
   value bytes). Measured after the store is closed: logs that a checkpoint let go are gone.
3. With `--ratios`: pmnc against raw `berkeleydb` at 1x1 and 4x8 for durable set, overwrite
   and get, on the same run (bench/runner.py's cells, the median of `--rounds`).

Stores: pmnc (`Safe.open` defaults), raw berkeleydb with the binding's defaults (a 256 KiB cache,
libdb's page size), diskcache, lmdb, sqlitedict (bench/stores.py's settings). A store that is
not installed is skipped, saying so.
"""

from __future__ import annotations

import argparse
import os
import pickle
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from bench import report, runner
from bench.stores import STORES, BerkeleyDBStore, Handle, Store

ROOT = Path(__file__).resolve().parent.parent
SIZES = (100, 1000, 4000, 10000, 30000, 64000)
FOOTPRINT_STORES = ("pmnc", "berkeleydb", "diskcache", "lmdb", "sqlitedict")
# Files that hold the data itself (the rest: logs, regions, WAL, locks), per store.
DATA_FILES = {
    "pmnc": ("safe.db", "large.db"),
    "berkeleydb": ("data.db",),
    "diskcache": ("cache.db",),
    "lmdb": ("data.mdb",),
    "sqlitedict": ("data.sqlite",),
}
MiB = 1 << 20


class DefaultBerkeleyDB(BerkeleyDBStore):
    """Raw berkeleydb as a user would start: the same flags, every size left at its default."""

    durability = "auto-commit DB.put; the binding's defaults (256 KiB cache, libdb's page size)"

    def create(self, path: Path, items: Iterable[tuple[str, object]]) -> None:
        from berkeleydb import db  # noqa: PLC0415

        env = db.DBEnv()
        env.set_lk_detect(db.DB_LOCK_DEFAULT)
        env.open(str(path), self._flags() | db.DB_RECOVER, 0o600)
        try:
            env.log_set_config(db.DB_LOG_AUTO_REMOVE, 1)
            d = db.DB(env)
            d.open("data.db", None, db.DB_BTREE, db.DB_THREAD | db.DB_AUTO_COMMIT | db.DB_CREATE)
            try:
                batch: list[tuple[str, object]] = []
                for item in items:
                    batch.append(item)
                    if len(batch) == 1000:
                        _put_batch(env, d, batch)
                        batch = []
                _put_batch(env, d, batch)
            finally:
                d.close()
            env.txn_checkpoint(0, 0, db.DB_FORCE)
            env.txn_checkpoint(0, 0, db.DB_FORCE)
        finally:
            env.close()


def _put_batch(env: Any, d: Any, batch: list[tuple[str, object]]) -> None:
    txn = env.txn_begin()
    try:
        for key, value in batch:
            d.put(key.encode(), pickle.dumps(value, 5), txn=txn)
    except BaseException:
        txn.abort()
        raise
    txn.commit()


def _stores() -> dict[str, Store]:
    out: dict[str, Store] = {}
    for name in FOOTPRINT_STORES:
        out[name] = DefaultBerkeleyDB() if name == "berkeleydb" else STORES[name]
    return out


def disk_bytes(path: Path, names: tuple[str, ...] | None = None) -> int:
    """Blocks held by the files under `path` (all, or those named), as `du` counts them."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            if names is None or f in names:
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
    return total


def _items(size: int, count: int, order: str) -> Iterator[tuple[str, object]]:
    keys = list(range(count))
    if order == "random":
        random.Random(7).shuffle(keys)
    for i in keys:
        yield f"key{i:08d}", os.urandom(size)


def _payload(size: int, count: int) -> int:
    return count * (len("key00000000") + len(pickle.dumps(os.urandom(size), 5)))


def idle(store: Store, where: Path) -> int:
    """Disk blocks of a store holding one key, while this process has it open."""
    where.mkdir(parents=True)
    store.create(where, [("counter", 1)])
    handle: Handle = store.open(where, 1)
    try:
        handle.get("counter")
        handle.set("counter", 2)
        time.sleep(0.3)  # pmnc's maintenance thread has made its first reservation
        return disk_bytes(where)
    finally:
        handle.close()


def per_payload(
    store: Store, where: Path, size: int, count: int, order: str
) -> tuple[float, float]:
    """(data file(s) / payload, whole directory / payload) after a bulk load in `order`."""
    where.mkdir(parents=True)
    store.create(where, _items(size, count, order))
    payload = _payload(size, count)
    return (disk_bytes(where, DATA_FILES[store.name]) / payload, disk_bytes(where) / payload)


def measure(base: Path, payload_mib: float, progress: Any = report.progress) -> list[str]:
    stores = {n: s for n, s in _stores().items() if not s.unavailable()}
    missing = [n for n in FOOTPRINT_STORES if n not in stores]
    lines = ["", "== footprint: an idle store (one key, held open) =="]
    rows = [["store", "on disk"]]
    idle_pmnc = 0
    for name, store in stores.items():
        progress(f"footprint: idle {name}")
        n = idle(store, base / f"idle-{name}")
        idle_pmnc = n if name == "pmnc" else idle_pmnc
        rows.append([name, f"{n / MiB:.2f} MiB"])
    lines += report.columns(rows)
    lines += [
        "",
        "== footprint: bytes on disk per payload byte (data file / whole directory) ==",
        f"   about {payload_mib:g} MiB of random-byte values per cell, loaded in key order "
        "unless said; KB = 1,000 bytes",
    ]
    cells = [(size, "key order") for size in SIZES] + [(1000, "random")]
    header = ["store"] + [
        f"{s} B" if s < 1000 else f"{s // 1000} KB" + (" random" if o == "random" else "")
        for s, o in cells
    ]
    rows = [header]
    for name, store in stores.items():
        row = [name]
        for size, order in cells:
            count = max(20, int(payload_mib * MiB) // size)
            progress(f"footprint: {name} {count} x {size} B, {order}")
            where = base / f"{name}-{size}-{order.replace(' ', '')}"
            data, total = per_payload(store, where, size, count, order)
            row.append(f"{data:.2f} / {total:.2f}")
            shutil.rmtree(where, ignore_errors=True)
        rows.append(row)
    lines += report.columns(rows)
    if missing:
        lines.append(f"not measured (not installed): {', '.join(missing)}")
    return lines


def ratios(base: Path, duration: float, rounds: int, prefill: int) -> list[str]:
    """pmnc / raw berkeleydb (bench/stores.py's, the same flags and cache) per cell."""
    lines = ["", "== pmnc / raw berkeleydb, same run (median of rounds) =="]
    rows = [["op", "PxT", "pmnc ops/s", "raw ops/s", "ratio"]]
    n = 0
    for op in ("set_new", "overwrite", "get"):
        for p, t in ((1, 1), (4, 8)):
            rates: dict[str, list[float]] = {"pmnc": [], "berkeleydb": []}
            for _ in range(rounds):  # interleaved: a noisy moment hits both
                for name, rate in rates.items():
                    n += 1
                    cell = runner.run_cell(
                        STORES[name], op, p, t, duration, prefill, base / f"r{n:03d}"
                    )
                    if cell.failed:
                        raise RuntimeError(f"{name} {op} {p}x{t}: {cell.failed}")
                    rate.append(cell.ops_per_s)
                    report.progress(f"ratios: {name} {op} {p}x{t} {cell.ops_per_s:,.0f}/s")
            ours, raw = (sorted(v)[(len(v) - 1) // 2] for v in rates.values())
            rows.append([op, f"{p}x{t}", f"{ours:,.0f}", f"{raw:,.0f}", f"{ours / raw:.2f}x"])
    return lines + report.columns(rows)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="./dev bench footprint", description=__doc__)
    ap.add_argument("--dir", type=Path, default=ROOT / "bench-results" / "tmp")
    ap.add_argument("--payload", type=float, default=8.0, help="MiB of values per cell")
    ap.add_argument("--ratios", action="store_true", help="also pmnc / raw at 1x1 and 4x8")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=3.0, help="seconds per ratio cell")
    ap.add_argument("--prefill", type=int, default=20000)
    args = ap.parse_args(argv)
    if args.payload <= 0 or args.rounds < 1 or args.duration <= 0:
        ap.error("--payload, --rounds and --duration must be positive")
    args.dir.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="footprint-", dir=args.dir))
    started = time.monotonic()
    try:
        lines = [
            "pmnc footprint benchmark",
            f"machine:   {report.machine_line()}",
            f"directory: {base} ({report.filesystem_of(base)})",
        ]
        lines += measure(base, args.payload)
        if args.ratios:
            lines += ratios(base, args.duration, args.rounds, args.prefill)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    lines += ["", f"total time {time.monotonic() - started:.0f} s"]
    print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
