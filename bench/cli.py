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
from typing import TYPE_CHECKING

from bench import fsync, report, runner
from bench.stores import STORES, Store

if TYPE_CHECKING:
    from bench.http import Part as HttpPart

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
        help="also run the HTTP part: pmnc-runtime and gunicorn (gthread) serving "
        "examples/modules, loaded by wrk (reads, durable writes, a fresh client alone and "
        "beside hostile connections)",
    )
    ap.add_argument(
        "--http-only",
        action="store_true",
        help="the HTTP part alone (no store cells, no fdatasync measurement)",
    )
    ap.add_argument(
        "--http-node",
        default="4x8",
        help="workers x threads of both servers (default 4x8)",
    )
    ap.add_argument(
        "--wrk",
        default="2x32",
        help="wrk's threads x connections for the load runs (default 2x32)",
    )
    ap.add_argument(
        "--http-seconds",
        type=float,
        default=None,
        help="seconds per wrk run (default 5; 1 with --quick)",
    )
    ap.add_argument(
        "--http-steps",
        type=_csv,
        default=None,
        help="which HTTP measurements, from write,read,fresh,fresh_hostile (default: all)",
    )
    ap.add_argument(
        "--http-prefill",
        type=int,
        default=None,
        help="keys prefilled for the reads (default 10000; 500 with --quick)",
    )
    ap.add_argument(
        "--hostile",
        default=None,
        metavar="IDLE,SLOW",
        help="idle keep-alive and slow-head connections held beside the fresh client "
        "(default 1000,64; 50,8 with --quick)",
    )
    ap.add_argument(
        "--runtime",
        default=None,
        metavar="PATH",
        help="the pmnc-runtime to measure (default: this environment's)",
    )
    ap.add_argument(
        "--baseline-runtime",
        default=None,
        metavar="PATH",
        help="another pmnc-runtime (e.g. from a worktree of the last commit, with its own venv) "
        "measured in the same run, labelled 'baseline'",
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
        args.wrk_pair = _config(args.wrk)
    except argparse.ArgumentTypeError as e:
        ap.error(f"--http-node/--wrk: {e}")
    if args.http_seconds is None:
        args.http_seconds = 1.0 if args.quick else 5.0
    if args.http_prefill is None:
        args.http_prefill = 500 if args.quick else 10000
    try:
        idle, slow = (
            int(x) for x in (args.hostile or ("50,8" if args.quick else "1000,64")).split(",")
        )
    except ValueError:
        ap.error(f"--hostile: expected IDLE,SLOW such as 1000,64, got {args.hostile!r}")
    if idle < 0 or slow < 0 or args.http_seconds <= 0 or args.http_prefill < 1:
        ap.error("--hostile, --http-seconds and --http-prefill must be positive")
    args.hostile_pair = (idle, slow)
    steps = ("write", "read", "fresh", "fresh_hostile")
    args.http_steps = tuple(args.http_steps or steps)
    for step in args.http_steps:
        if step not in steps:
            ap.error(f"--http-steps: unknown {step!r} (known: {', '.join(steps)})")
    if args.http_only:
        args.http = True
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["footprint"]:  # disk per payload byte, idle footprint: bench/footprint.py
        from bench import footprint  # noqa: PLC0415

        return footprint.main(argv[1:])
    if argv[:1] == ["queues"]:  # durable queues and expiry: bench/queues.py
        from bench import queues  # noqa: PLC0415

        return queues.main(argv[1:])
    if argv[:1] == ["replication"]:  # replicated node groups: bench/replication.py
        from bench import replication  # noqa: PLC0415

        return replication.main(argv[1:])
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
    for op in [] if args.http_only else args.ops:
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
    http_part: HttpPart | None = None
    fsync_variants = () if args.http_only else ("append", "overwrite")
    try:
        fsync_runs = []
        for variant in fsync_variants:
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
            http_part = _run_http(args, run_dir)
        for variant in fsync_variants:
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
    if args.http_only:  # the machine and the code; nothing about stores or the disk
        keep = ("pmnc benchmark", "command:", "date:", "machine:", "code:", "load avg:")
        lines = [x for x in lines if x.startswith(keep)] + ["versions:  " + _http_versions()]
    lines += report.tables(results, args.ops, args.configs)
    if skipped:
        lines += ["", "not run: " + ", ".join(skipped) + " (shelve is one process only)"]
    if not args.http_only:
        lines += report.durability(stores)
    if "pmnc" in {s.name for s in stores} and results:
        lines += report.targets(results, fsync_append, args.configs)
        lines.append(
            "            (fdatasync rate: the higher of the start and end append measurements)"
        )
    if http_part is not None:
        from bench import http  # noqa: PLC0415 - only this mode needs it

        lines += http.section(http_part)
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
    return 1 if failed or (http_part is not None and http_part.failed()) else 0


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


def _http_versions() -> str:
    from bench import http  # noqa: PLC0415 - only this mode needs it

    return http.versions()


def _run_http(args: argparse.Namespace, run_dir: Path) -> HttpPart:
    """The HTTP part: every server in rounds, then the kills."""
    from bench import http  # noqa: PLC0415 - only this mode needs it

    workers, threads = args.http_node_pair
    wrk_threads, wrk_connections = args.wrk_pair
    idle, slow = args.hostile_pair
    opts = http.Options(
        workers=workers,
        threads=threads,
        wrk_threads=wrk_threads,
        wrk_connections=wrk_connections,
        seconds=args.http_seconds,
        fresh_seconds=args.http_seconds,
        prefill=args.http_prefill,
        idle=idle,
        slow=slow,
        rounds=args.rounds,
        steps=args.http_steps,
        hostile_ready_s=10.0 if args.quick else 30.0,
        settle_s=0.5 if args.quick else 2.0,
    )
    # 1,064 hostile connections and wrk's: the servers and the helper inherit this limit.
    http.raise_nofile(65536)
    return http.run(
        run_dir,
        opts,
        runtime=[args.runtime] if args.runtime else None,
        baseline=[args.baseline_runtime] if args.baseline_runtime else None,
        kills=args.kill_recovery,
        do_load=args.http,
        progress=report.progress,
    )
