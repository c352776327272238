"""The plain-text report: a header describing the machine and the disk's limit, one table per
operation with every figure also as a ratio to raw Berkeley DB from the same run, what each
store guarantees, and pmnc's performance targets checked against the measured numbers."""

from __future__ import annotations

import datetime
import math
import os
import platform
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.fsync import FsyncResult
from bench.runner import OP_TITLES, CellResult
from bench.stores import Store

BASELINE = "berkeleydb"
WRITE_OPS = ("set_new", "overwrite")


@dataclass
class Filesystem:
    device: str
    fstype: str
    mountpoint: str

    def __str__(self) -> str:
        return f"{self.fstype} on {self.device} (mounted at {self.mountpoint})"


def filesystem_of(path: Path) -> Filesystem:
    """The mount holding `path`: the longest mount point that is a prefix of its real path."""
    real = os.path.realpath(path)
    best = Filesystem("?", "?", "/")
    best_len = -1
    try:
        with open("/proc/self/mounts", encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                device, mnt, fstype = parts[0], parts[1].replace("\\040", " "), parts[2]
                inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
                if inside and len(mnt) >= best_len:
                    best, best_len = Filesystem(device, fstype, mnt), len(mnt)
    except OSError:
        pass
    return best


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def tree_state(root: Path) -> str:
    """The commit the code under test comes from, and which of its files differ from it."""
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "log", "-1", "--format=%h (committed %cI)"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "safe", "runtime", "bench"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return "? (not a git checkout)"
    changed = [line[3:] for line in dirty if line.strip()]
    note = f"; uncommitted: {', '.join(changed)}" if changed else "; clean"
    return f"{head}{note}"


def machine_line() -> str:
    return (
        f"{os.cpu_count()} CPUs ({cpu_model()}), {platform.system()} {platform.release()} "
        f"{platform.machine()}, Python {platform.python_version()}"
    )


def header(
    *,
    argv: Sequence[str],
    started: datetime.datetime,
    directory: Path,
    stores: Sequence[Store],
    duration: float,
    prefill: int,
    value_size: int,
    fsync_runs: Sequence[tuple[str, FsyncResult]],
    load_start: str,
    results: Sequence[CellResult] = (),
    tree: str = "?",
) -> list[str]:
    lines = [
        "pmnc benchmark",
        f"command:   {' '.join(argv)}",
        f"date:      {started.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"machine:   {machine_line()}",
        f"code:      {tree}",
        f"load avg:  {load_start} at start, {loadavg()} at end (1/5/15 min)",
        f"directory: {directory}",
        f"filesystem: {filesystem_of(directory)}",
        f"cell:      {duration:g} s measured per cell, fresh store directory per cell; "
        f"{prefill:,} keys prefilled for overwrite/get/mixed",
        f"value:     {{(None,): [1, 'bar', Decimal('1.0')], 'n': i}} ({value_size} B pickled); "
        "str keys; each thread writes only its own keys",
        "versions:  " + "; ".join(s.version() for s in stores),
        "",
        "physical limit: 512 B write + fdatasync, one thread, in the same directory",
    ]
    base = next(
        (
            r
            for r in results
            if (r.store, r.op, r.config) == (BASELINE, "set_new", "1x1") and not r.failed
        ),
        None,
    )
    for when, r in fsync_runs:
        vs = (
            f"   = {fmt_ratio(_ratio(r.per_s, base.ops_per_s))} raw berkeleydb set_new 1x1"
            if base
            else ""
        )
        lines.append(
            f"  {r.variant:<9} ({when}): {r.per_s:>8,.0f} /s   p50 {fmt_ms(r.p50_ms)} ms   "
            f"p99 {fmt_ms(r.p99_ms)} ms   ({r.ops:,} in {r.seconds:.1f} s){vs}"
        )
    return lines


def fmt_ms(ms: float) -> str:
    if math.isnan(ms):
        return "-"
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def fmt_ratio(x: float | None) -> str:
    if x is None or math.isnan(x) or math.isinf(x):
        return "-"
    return f"{x:.2f}x"


def _ratio(a: float, b: float) -> float | None:
    if b <= 0 or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def _notes(r: CellResult) -> str:
    parts = []
    if r.failed:
        parts.append(f"FAILED: {r.failed}")
    if r.errors:
        sample = r.error_samples[0] if r.error_samples else ""
        parts.append(f"{r.errors:,} errors ({sample})")
    if r.retries:
        parts.append(f"{r.retries:,} deadlock retries")
    if r.stuck_threads:
        parts.append(f"{r.stuck_threads} thread(s) stuck past the window")
    return "; ".join(parts)


def columns(rows: list[list[str]]) -> list[str]:
    """Rows as aligned text columns: the first left-aligned, the figures right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]


def tables(results: Sequence[CellResult], ops: Sequence[str], configs: Sequence[str]) -> list[str]:
    index = {(r.store, r.op, r.config): r for r in results}
    lines: list[str] = []
    for op in ops:
        rows = [r for r in results if r.op == op]
        if not rows:
            continue
        lines += ["", f"== {OP_TITLES[op]} ({op}) ==", ""]
        head = (
            f"{'store':<11} {'PxT':>4} {'ops/s':>9} {'x bdb':>6}  {'p50 ms':>7} {'x bdb':>6}"
            f"  {'p99 ms':>7} {'x bdb':>6}  notes"
        )
        lines += [head, "-" * len(head)]
        for config in configs:
            base = index.get((BASELINE, op, config))
            for r in rows:
                if r.config != config:
                    continue
                ok_base = base is not None and not base.failed
                rt = _ratio(r.ops_per_s, base.ops_per_s) if ok_base and base else None
                r50 = _ratio(r.p50_ms, base.p50_ms) if ok_base and base else None
                r99 = _ratio(r.p99_ms, base.p99_ms) if ok_base and base else None
                ops_s = "-" if r.failed else f"{r.ops_per_s:,.0f}"
                lines.append(
                    f"{r.store:<11} {r.config:>4} {ops_s:>9} {fmt_ratio(rt):>6}  "
                    f"{fmt_ms(r.p50_ms):>7} {fmt_ratio(r50):>6}  {fmt_ms(r.p99_ms):>7} "
                    f"{fmt_ratio(r99):>6}  {_notes(r)}".rstrip()
                )
    return lines


def durability(stores: Iterable[Store]) -> list[str]:
    lines = ["", "What a returned set guarantees, per store as configured here:"]
    for s in stores:
        lines.append(f"  {s.name:<11} {s.durability}")
    return lines


def targets(
    results: Sequence[CellResult], fsync_append: FsyncResult | None, configs: Sequence[str]
) -> list[str]:
    """Issue 2's targets for pmnc, each met / not met / not measured, with the numbers."""
    index = {(r.store, r.op, r.config): r for r in results if not r.failed}
    lines = ["", "== targets, measured on this run =="]

    def verdict(ok: bool | None) -> str:
        return {True: "[met]    ", False: "[NOT MET]", None: "[n/a]    "}[ok]

    def rate(store: str, op: str, config: str) -> float | None:
        r = index.get((store, op, config))
        return r.ops_per_s if r else None

    def compare(op: str, config: str, other: str, factor: float) -> tuple[bool | None, str]:
        mine, theirs = rate("pmnc", op, config), rate(other, op, config)
        if mine is None or theirs is None or theirs <= 0:
            return None, f"{op} {config}: not measured"
        ratio = mine / theirs
        return ratio >= factor, (
            f"{op} {config}: pmnc {mine:,.0f}/s vs {other} {theirs:,.0f}/s = {ratio:.2f}x"
        )

    def emit(title: str, checks: list[tuple[bool | None, str]]) -> None:
        measured = [ok for ok, _ in checks if ok is not None]
        overall = None if not measured else all(measured)
        lines.append(f"{verdict(overall)} {title}")
        for ok, text in checks:
            lines.append(f"            {verdict(ok).strip():<9} {text}")

    emit(
        "durable writes at 4x8 >= 0.9x raw berkeleydb",
        [compare(op, "4x8", BASELINE, 0.9) for op in WRITE_OPS],
    )
    checks: list[tuple[bool | None, str]] = []
    for op in WRITE_OPS:
        mine = rate("pmnc", op, "4x8")
        if mine is None or fsync_append is None or fsync_append.per_s <= 0:
            checks.append((None, f"{op} 4x8: not measured"))
            continue
        ratio = mine / fsync_append.per_s
        checks.append(
            (
                ratio >= 3.0,
                f"{op} 4x8: pmnc {mine:,.0f}/s vs fdatasync (append, one thread) "
                f"{fsync_append.per_s:,.0f}/s = {ratio:.2f}x",
            )
        )
    emit("durable writes at 4x8 >= 3x the single-thread fdatasync rate", checks)
    emit(
        "reads >= 0.85x raw berkeleydb (every configuration measured)",
        [compare("get", c, BASELINE, 0.85) for c in configs],
    )
    emit(
        ">= 3x diskcache on durable writes and reads (every configuration measured)",
        [compare(op, c, "diskcache", 3.0) for op in (*WRITE_OPS, "get") for c in configs],
    )
    return lines


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
