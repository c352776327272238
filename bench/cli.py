"""Options, the order of the cells, and the run. See bench/__init__.py."""

from __future__ import annotations

import argparse
import datetime
import json
import pickle
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench import fsync, report, runner
from bench.stores import STORES, Store

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIGS = ("1x1", "1x8", "4x1", "4x8")


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _config(text: str) -> tuple[int, int]:
    try:
        p, t = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected PxT such as 4x8, got {text!r}") from None
    if not (1 <= p <= 64 and 1 <= t <= 256):
        raise argparse.ArgumentTypeError(f"{text}: processes 1..64, threads 1..256")
    return p, t


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="./dev bench",
        description="pmnc.safe next to raw Berkeley DB, diskcache, sqlitedict, lmdb, shelve "
        "and the disk's fdatasync rate: ops/s, p50/p99 latency, ratio to raw berkeleydb.",
    )
    ap.add_argument("--duration", type=float, default=None, help="seconds per cell (default 3)")
    ap.add_argument(
        "--stores",
        type=_csv,
        default=None,
        help=f"comma-separated, from {','.join(STORES)} (default: all)",
    )
    ap.add_argument(
        "--configs",
        type=_csv,
        default=list(DEFAULT_CONFIGS),
        help="processes x threads, comma-separated (default 1x1,1x8,4x1,4x8)",
    )
    ap.add_argument(
        "--ops",
        type=_csv,
        default=list(runner.OPS),
        help=f"comma-separated, from {','.join(runner.OPS)} (default: all)",
    )
    ap.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="where the stores go (a fresh directory is made inside; default "
        "./bench-results/tmp, on the project's filesystem)",
    )
    ap.add_argument("--json", type=Path, default=None, help="also write raw results here")
    ap.add_argument("--quick", action="store_true", help="short cells: a smoke test")
    ap.add_argument("--prefill", type=int, default=None, help="keys prefilled (default 20000)")
    ap.add_argument(
        "--fsync-seconds", type=float, default=None, help="per fdatasync variant (default 2)"
    )
    ap.add_argument("--keep", action="store_true", help="keep the store directories")
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure each cell this many times and report the median round (default 1)",
    )
    ap.add_argument(
        "--http",
        action="store_true",
        help="also run pmnc-runtime on a generated node and load it over HTTP (write and "
        "read handlers), next to pmnc used directly at the same processes x threads",
    )
    ap.add_argument(
        "--http-node",
        default="4x8",
        help="the generated cage's workers x threads (default 4x8)",
    )
    ap.add_argument(
        "--http-load",
        default="4x8",
        help="load processes x threads, one keep-alive connection per thread (default 4x8)",
    )
    ap.add_argument(
        "--kill-recovery",
        type=int,
        default=0,
        metavar="N",
        help="kill -9 one worker of the generated node N times; time until it serves again",
    )
    args = ap.parse_args(argv)
    if args.duration is None:
        args.duration = 0.5 if args.quick else 3.0
    if args.prefill is None:
        args.prefill = 2000 if args.quick else 20000
    if args.fsync_seconds is None:
        args.fsync_seconds = 0.5 if args.quick else 2.0
    if args.stores is None:
        args.stores = list(STORES)
    for s in args.stores:
        if s not in STORES:
            ap.error(f"--stores: unknown store {s!r} (known: {', '.join(STORES)})")
    for o in args.ops:
        if o not in runner.OPS:
            ap.error(f"--ops: unknown operation {o!r} (known: {', '.join(runner.OPS)})")
    try:
        args.config_pairs = [_config(c) for c in args.configs]
    except argparse.ArgumentTypeError as e:
        ap.error(f"--configs: {e}")
    args.configs = [f"{p}x{t}" for p, t in args.config_pairs]
    if args.duration <= 0 or args.prefill < 1 or args.rounds < 1 or args.kill_recovery < 0:
        ap.error("--duration, --prefill and --rounds must be positive")
    try:
        args.http_node_pair = _config(args.http_node)
        args.http_load_pair = _config(args.http_load)
    except argparse.ArgumentTypeError as e:
        ap.error(f"--http-node/--http-load: {e}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    started = datetime.datetime.now(datetime.UTC)
    load_start = report.loadavg()
    tree = report.tree_state(ROOT)  # at the start: the code the cells ran

    stores: list[Store] = []
    for name in args.stores:
        store = STORES[name]
        why = store.unavailable()
        if why:
            report.progress(f"bench: skipping {name}: {why}")
        else:
            stores.append(store)

    base = args.dir if args.dir is not None else ROOT / "bench-results" / "tmp"
    base.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix=started.strftime("run-%Y%m%d-%H%M%S-"), dir=base))

    cells = []
    skipped: list[str] = []
    for op in args.ops:
        for (p, t), config in zip(args.config_pairs, args.configs, strict=True):
            for store in stores:
                if store.processes_max is not None and p > store.processes_max:
                    if f"{store.name} {config}" not in skipped:
                        skipped.append(f"{store.name} {config}")
                    continue
                cells.append((op, p, t, config, store))
    estimate = len(cells) * (args.duration + 0.7) + 4 * args.fsync_seconds
    report.progress(
        f"bench: {len(cells)} cells of {args.duration:g} s in {run_dir} "
        f"({report.filesystem_of(run_dir)}); about {estimate / 60:.1f} min"
    )
    t_start = time.monotonic()
    http_part: report.HttpPart | None = None
    try:
        fsync_runs = []
        for variant in ("append", "overwrite"):
            fsync_runs.append(("start", fsync.measure(run_dir, variant, args.fsync_seconds)))
        results: list[runner.CellResult] = []
        for n, (op, p, t, config, store) in enumerate(cells, 1):
            cell_dir = run_dir / f"{n:03d}-{store.name}-{op}-{config}"
            r = _measure(args, store, op, p, t, cell_dir)
            results.append(r)
            elapsed = time.monotonic() - t_start
            status = (
                f"FAILED: {r.failed}"
                if r.failed
                else f"{r.ops_per_s:>9,.0f} ops/s  p50 {report.fmt_ms(r.p50_ms)} ms  "
                f"p99 {report.fmt_ms(r.p99_ms)} ms" + (f"  {r.errors} errors" if r.errors else "")
            )
            report.progress(
                f"[{n:>3}/{len(cells)} {elapsed:5.0f}s] {store.name:<10} {op:<9} {config:>4}  "
                f"{status}"
            )
        if args.http or args.kill_recovery:
            http_part = _run_http(args, stores, results, run_dir)
        for variant in ("append", "overwrite"):
            fsync_runs.append(("end", fsync.measure(run_dir, variant, args.fsync_seconds)))
    finally:
        if not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)

    # The stricter (higher) of the two append measurements is the one the target compares to.
    appends = [r for _, r in fsync_runs if r.variant == "append"]
    fsync_append = max(appends, key=lambda r: r.per_s) if appends else None
    value_size = len(pickle.dumps(runner.make_value(123456), 5))
    lines = report.header(
        argv=["./dev bench", *argv],
        started=started,
        directory=run_dir,
        stores=stores,
        duration=args.duration,
        prefill=args.prefill,
        value_size=value_size,
        fsync_runs=fsync_runs,
        load_start=load_start,
        results=results,
        tree=tree,
    )
    lines += report.tables(results, args.ops, args.configs)
    if skipped:
        lines += ["", "not run: " + ", ".join(skipped) + " (shelve is one process only)"]
    lines += report.durability(stores)
    if "pmnc" in {s.name for s in stores}:
        lines += report.targets(results, fsync_append, args.configs)
        lines.append(
            "            (fdatasync rate: the higher of the start and end append measurements)"
        )
    if http_part is not None:
        lines += report.http_section(http_part, args.duration)
    lines.append("")
    lines.append(f"total time {time.monotonic() - t_start:.0f} s")
    print("\n".join(lines), flush=True)

    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "argv": argv,
                    "date": started.isoformat(),
                    "machine": report.machine_line(),
                    "code": tree,
                    "filesystem": str(report.filesystem_of(base)),
                    "versions": {s.name: s.version() for s in stores},
                    "duration_s": args.duration,
                    "prefill": args.prefill,
                    "fsync": [{"when": w, **r.to_json()} for w, r in fsync_runs],
                    "cells": [r.to_json() for r in results],
                    "http": http_part.to_json() if http_part is not None else None,
                },
                indent=1,
            )
            + "\n",
            encoding="utf-8",
        )
    failed = [r for r in results if r.failed]
    return 1 if failed else 0


def _measure(
    args: argparse.Namespace, store: Store, op: str, p: int, t: int, cell_dir: Path
) -> runner.CellResult:
    """One cell, `--rounds` times on fresh directories; the round with the median rate."""
    rounds = []
    for k in range(args.rounds):
        where = cell_dir if args.rounds == 1 else cell_dir.with_name(f"{cell_dir.name}-r{k + 1}")
        rounds.append(
            runner.run_cell(store, op, p, t, args.duration, args.prefill, where, keep=args.keep)
        )
    failed = [r for r in rounds if r.failed]
    if failed:
        return failed[0]
    rounds.sort(key=lambda r: r.ops_per_s)
    return rounds[(len(rounds) - 1) // 2]


def _run_http(
    args: argparse.Namespace, stores: list[Store], results: list[runner.CellResult], run_dir: Path
) -> report.HttpPart:
    """The end-to-end part: pmnc direct at the load's PxT (reused from the main cells when
    they ran), then the node over HTTP, then the kills."""
    from bench import http  # noqa: PLC0415 - only this mode needs it

    part = report.HttpPart(
        node=args.http_node, load=args.http_load, direct=[], http=[], kills=None, stopped=""
    )
    lp, lt = args.http_load_pair
    if args.http:
        pmnc = STORES["pmnc"]
        why = pmnc.unavailable()
        for op in ("set_new", "get"):
            found = [
                r for r in results if r.store == "pmnc" and r.op == op and r.config == f"{lp}x{lt}"
            ]
            if found:
                part.direct.append(found[0])
            elif why is None:
                r = _measure(args, pmnc, op, lp, lt, run_dir / f"direct-{op}")
                report.progress(f"direct pmnc {op} {r.config}: {r.ops_per_s:,.0f} ops/s")
                part.direct.append(r)
    wp, wt = args.http_node_pair
    try:
        part.http, part.kills, part.stopped = http.run(
            run_dir,
            workers=wp,
            threads=wt,
            load=(lp, lt),
            duration=args.duration,
            prefill=args.prefill,
            kills=args.kill_recovery,
            do_load=args.http,
            progress=report.progress,
        )
    except Exception as e:
        part.stopped = f"FAILED: {type(e).__name__}: {e}"
        report.progress(f"http: {part.stopped}")
    return part
