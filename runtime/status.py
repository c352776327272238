"""Live figures of a running node: what `GET /_status` and `pmnc-runtime status` show.

Design: small JSON files in one directory per cage, `<data_dir>/run/<node>.<cage>/`.

- `cage.json`, written by the supervisor whenever its set of workers changes: node, cage,
  address, its own pid, and per live worker its pid, slot, start time, restarts of that slot.
  Only the supervisor knows restarts and which pids are live, and it writes synchronously in its
  loop: no thread, nothing new to poll, so it stays single-threaded and safe to fork.
- `<pid>.json`, written by each worker's main thread about once a second (next to its
  heartbeat): requests served by status class and, per module safe, `Safe.stats()` plus ops/s
  from the counter deltas since its previous report.

Every write is a temporary file then `os.replace`, so a reader sees a whole old or a whole new
report, never a torn one. Why files rather than the worker pipes: `/_status` is answered by
whichever worker accepts the connection, and that worker must see its siblings' figures; over
the pipes it would need a request/answer protocol through the supervisor (and the supervisor a
way to answer while it forks and reaps). A file is readable by every worker, by the CLI for a
cage without HTTP, and by an operator with `cat`, and it costs each worker one small write a
second. The answering worker's own figures are fresh; its siblings' are at most about a second
old (each carries `report_age_s`). Counters are per process: a restarted worker starts from
zero (`/metrics` keeps the cage's totals across restarts: see `metrics.py`).

The answering worker writes the report it answers with (`Reporter.collect`) before it reads
its siblings'. Without that, two `/_status` in a row could go backwards: the first answered by
worker A from its in-memory figures (200 requests), the second by worker B from A's file of
before the load (0 requests). `pmnc-runtime status` right after a load showed exactly that.

Aggregation over a cage's live workers: counts and rates are summed; per operation p50 is the
median of the workers' p50 and p99 the worst (largest) of their p99; environment-wide figures
(log size, last checkpoint, cache hit ratio, region bytes: one shared Berkeley DB environment)
come from the most recent report.

Replication (a node group, the config's `replication:`): each safe's report carries its role,
master site and log position (`Safe.replication()`). A client does not know its master's log
position, so the cage's replication process (`replicator.py`) asks the master's node for it
every couple of seconds and writes `replication.json` here: per module the sites' node names,
the master site and node it asked, the master's `lsn` and when it read it. `/_status` then
shows per safe `replication.master_node`, `master_lsn`, `lag_bytes` (`log_distance(master_lsn,
lsn)`: 0 on the master, null while unknown or when the master changed since it was read) and
`lag_checked_s` (the age of the master's figure: the lag is at most that old).

Memory: each worker reports its resident set (`rss_bytes`, from /proc/self/statm: the pages
of the shared regions it touched count in every worker that mapped them), and each safe the
disk its shared regions hold (`region_bytes`, reservations included: docs/footprint.md), so an
operator sees what a module costs besides its data.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeGuard

from pmnc.safe import Safe, SafeError, log_distance

from .config import NodeConfig

__all__ = [
    "CAGE_FILE",
    "REPLICATION_FILE",
    "REPORT_INTERVAL",
    "STATUS_PATH",
    "NotRunningError",
    "Reporter",
    "aggregate",
    "cage_status",
    "human_size",
    "read_cage",
    "read_json",
    "render",
    "replication_view",
    "run_dir",
    "write_json",
]

CAGE_FILE = "cage.json"
REPLICATION_FILE = "replication.json"  # the replication process's look at each master's lsn
STATUS_PATH = "/_status"  # GET: this document; not counted as a request
REPORT_INTERVAL = 1.0  # seconds between a worker's reports
STATUS_CLASSES = ("2xx", "4xx", "5xx")  # what the server answers (no 1xx or 3xx)


class NotRunningError(Exception):
    """No live supervisor reports for this cage: the node is not running."""


def rss_bytes(pid: int | str = "self") -> int | None:
    """Resident set size of a process (this one by default), None where /proc cannot say."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def run_dir(config: NodeConfig, cage: str) -> Path:
    """Where a cage's live reports are: `<data_dir>/run/<node>.<cage>/`."""
    return config.data_dir / "run" / f"{config.node}.{cage}"


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Replace `path` atomically (readers never see half a file); OSError if it cannot."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, separators=(",", ":")))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def read_json(path: Path) -> dict[str, Any] | None:
    """The report at `path`, or None if it is absent or unreadable (a worker just gone)."""
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class Reporter:
    """A worker's figures: `collect()` for any thread, `publish()` from the main thread.

    `requests` returns the HTTP server's counters ({"requests": n, "responses": {class: n}},
    `metrics.RequestMetrics.snapshot()`), with whatever else the server reports (connections).
    """

    def __init__(
        self,
        directory: Path,
        safes: Mapping[str, Safe],
        requests: Callable[[], dict[str, Any]],
    ) -> None:
        self.path = directory / f"{os.getpid()}.json"
        self._safes = dict(safes)
        self._requests = requests
        self._started = time.time()
        # (when, total ops per module) of the last report: ops/s is the delta since then.
        self._baseline: tuple[float, dict[str, int]] = (time.monotonic(), {})
        self._rates: dict[str, float] = {}
        self._last_publish = 0.0
        # Held from collecting a report to writing it: the file never goes back to older figures.
        self._write_lock = threading.Lock()

    def collect(self) -> dict[str, Any]:
        """This worker's report now, also written to its file; ops/s is the rate over the last
        reporting interval. What a worker answers `/_status` or `/metrics` with must be in its
        file before it is shown, or a sibling answering the next request would show less.

        Raises SafeNeedsRecoveryError like any other call on a panicked safe, OSError if the
        file cannot be written.
        """
        with self._write_lock:
            report = self._collect()
            write_json(self.path, report)
            return report

    def _collect(self) -> dict[str, Any]:
        safes: dict[str, Any] = {}
        for name, safe in self._safes.items():
            figures = safe.stats()
            # Our own stats() calls are counted as operations: leave them out of the figures.
            figures["ops"].pop("stats", None)
            figures["latency"].pop("stats", None)
            figures["ops_per_s"] = self._rates.get(name, 0.0)
            safes[name] = figures
        return {
            "pid": os.getpid(),
            "started": self._started,
            "written": time.time(),
            "rss_bytes": rss_bytes(),
            **self._requests(),
            "safes": safes,
        }

    def due(self) -> bool:
        # A little slack: the heartbeat loop wakes every second, give or take a millisecond.
        return time.monotonic() - self._last_publish >= REPORT_INTERVAL - 0.05

    def publish(self) -> None:
        """Compute the rates since the last report and write this worker's file.

        OSError if the file cannot be written; SafeError from the safes' stats.
        """
        with self._write_lock:
            now = time.monotonic()
            report = self._collect()
            then, before = self._baseline
            totals = {name: sum(s["ops"].values()) for name, s in report["safes"].items()}
            elapsed = max(now - then, 1e-3)
            self._rates = {n: max(0, t - before.get(n, 0)) / elapsed for n, t in totals.items()}
            for name, figures in report["safes"].items():
                figures["ops_per_s"] = self._rates[name]
            self._baseline = (now, totals)
            self._last_publish = now
            write_json(self.path, report)

    def leave(self) -> None:
        """This worker is leaving: write its last figures and leave the file where it is.

        The supervisor folds it into the cage's totals when it reaps this process, then removes
        it (`metrics.CageTotals.retire`): removing it here would take this worker's requests out
        of the cage's counters, which must never go backwards. Best effort: the safes may be
        unusable by now, and the last written report is then what counts.
        """
        with contextlib.suppress(SafeError, OSError):
            self.collect()


# -- reading and aggregating --------------------------------------------------------------------


def read_cage(directory: Path) -> dict[str, Any]:
    """The supervisor's `cage.json` in `directory`; NotRunningError if it is missing or the
    supervisor that wrote it is gone."""
    cage = read_json(directory / CAGE_FILE)
    if cage is None:
        raise NotRunningError(f"no live report in {directory}")
    supervisor = cage.get("supervisor_pid")
    if not isinstance(supervisor, int) or not _alive(supervisor):
        raise NotRunningError(f"{directory / CAGE_FILE}: supervisor {supervisor} is gone")
    return cage


def cage_status(directory: Path, *, live: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The `/_status` document of the cage whose reports are in `directory`.

    `live` is the caller's own fresh report (a worker answering `/_status`: the result of its
    `Reporter.collect()`, which is in its file already), used instead of re-reading that file.
    NotRunningError if the supervisor's file is missing or its pid is gone.
    """
    cage = read_cage(directory)
    reports: dict[int, dict[str, Any]] = {}
    for w in cage.get("workers", []):
        pid = w["pid"]
        report = live if live is not None and live.get("pid") == pid else None
        report = report or read_json(directory / f"{pid}.json")
        if report is not None:
            reports[pid] = dict(report)
    checked = read_json(directory / REPLICATION_FILE)
    status = aggregate(cage, reports, time.time(), replication=checked)
    if live is not None:
        status["answered_by"] = live.get("pid")
    return status


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


def aggregate(
    cage: Mapping[str, Any],
    reports: Mapping[int, Mapping[str, Any]],
    now: float,
    *,
    replication: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Combine the supervisor's view of a cage with its workers' reports (pure: unit-tested).

    Counts and rates: summed. Latency per operation: p50 the median of the workers' p50, p99 the
    worst of their p99. Log size, checkpoint, cache hit ratio: from the most recent report.
    `replication` is the replication process's `replication.json` (None: not written yet), from
    which a replicated safe gets its master's node and its lag (`replication_view`).
    """
    workers = []
    responses = dict.fromkeys(STATUS_CLASSES, 0)
    for w in cage.get("workers", []):
        report = reports.get(w["pid"], {})
        counts = report.get("responses", {})
        for k in STATUS_CLASSES:
            responses[k] += counts.get(k, 0)
        written = report.get("written")
        workers.append(
            {
                "pid": w["pid"],
                "slot": w.get("slot"),
                "uptime_s": round(max(0.0, now - w["started"]), 3),
                "restarts": w.get("restarts", 0),
                "ready": w.get("ready", False),
                "requests": report.get("requests", 0),
                "responses": {k: counts.get(k, 0) for k in STATUS_CLASSES},
                "rss_bytes": report.get("rss_bytes"),
                "report_age_s": None if written is None else round(max(0.0, now - written), 3),
            }
        )
    names = sorted({name for r in reports.values() for name in r.get("safes", {})})
    freshest = sorted(reports.values(), key=lambda r: r.get("written", 0.0), reverse=True)
    safes = {name: _aggregate_safe(name, freshest, now) for name in names}
    checked = (replication or {}).get("safes", {})
    for name, figures in safes.items():
        figures["replication"] = replication_view(
            figures["replication"], checked.get(name), cage.get("node"), now
        )
    return {
        "node": cage.get("node"),
        "cage": cage.get("cage"),
        "address": cage.get("address"),
        "supervisor_pid": cage.get("supervisor_pid"),
        "time": now,
        "requests": sum(w["requests"] for w in workers),
        "responses": responses,
        "workers": workers,
        "safes": safes,
    }


def replication_view(
    figures: Mapping[str, Any] | None,
    checked: Mapping[str, Any] | None,
    node: object,
    now: float,
) -> dict[str, Any] | None:
    """A safe's replication figures (its freshest report's; None: not replicated) with its
    master's node and its lag, from `checked`, its entry of `replication.json` (None: no look
    yet). `node` is this node's name (a master's master node is itself).

    `lag_bytes` is `log_distance(master_lsn, lsn)`: bytes of log the master had written when it
    was asked (`lag_checked_s` ago) that this copy had not applied when it last reported. 0 on
    the master; null when the master is unknown, was never asked, or is not the site that was
    asked (an election since: the figure is of another log).
    """
    if not isinstance(figures, Mapping):
        return None
    view = dict(figures)
    entry = checked if isinstance(checked, Mapping) else {}
    sites = entry.get("sites")
    master = figures.get("master")
    master_node = sites.get(master) if isinstance(sites, Mapping) and master else None
    master_lsn: object = None
    lag: int | None = None
    age: float | None = None
    if figures.get("role") == "master":
        master_node = node if master_node is None else master_node
        master_lsn, lag, age = figures.get("lsn"), 0, 0.0
    elif master is not None and entry.get("master_site") == master:
        theirs, ours, when = entry.get("master_lsn"), figures.get("lsn"), entry.get("checked")
        if _is_lsn(theirs) and _is_lsn(ours) and isinstance(when, int | float):
            master_lsn = list(theirs)
            lag = log_distance(list(theirs), list(ours))
            age = round(max(0.0, now - when), 3)
    view["master_node"] = master_node
    view["master_lsn"] = master_lsn
    view["lag_bytes"] = lag
    view["lag_checked_s"] = age
    return view


def _is_lsn(value: object) -> TypeGuard[list[int] | tuple[int, int]]:
    return (
        isinstance(value, list | tuple)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    )


def _aggregate_safe(name: str, reports: list[Mapping[str, Any]], now: float) -> dict[str, Any]:
    figures = [r["safes"][name] for r in reports if name in r.get("safes", {})]
    ops: dict[str, int] = {}
    errors: dict[str, int] = {}
    p50s: dict[str, list[float]] = {}
    p99s: dict[str, list[float]] = {}
    for f in figures:
        for op, n in f.get("ops", {}).items():
            ops[op] = ops.get(op, 0) + n
        for op, n in f.get("errors", {}).items():
            errors[op] = errors.get(op, 0) + n
        for op, lat in f.get("latency", {}).items():
            p50s.setdefault(op, []).append(lat["p50_ms"])
            p99s.setdefault(op, []).append(lat["p99_ms"])
    latest = figures[0]  # reports come freshest first: environment-wide figures
    checkpoint = latest.get("last_checkpoint") or 0
    # Queues (docs/queues.md): length, items in work and oldest age are the queue's own, from
    # the freshest report; deliveries and redeliveries are per process, summed.
    queues: dict[str, dict[str, Any]] = {}
    for f in figures:
        for queue, q in f.get("queues", {}).items():
            entry = queues.get(queue)
            if entry is None:
                entry = queues[queue] = {
                    "length": q.get("length"),
                    "leased": q.get("leased"),
                    "oldest_age_s": q.get("oldest_age_s"),
                    "deliveries": 0,
                    "redeliveries": 0,
                }
            entry["deliveries"] += q.get("deliveries", 0)
            entry["redeliveries"] += q.get("redeliveries", 0)
    return {
        # A replicated safe's role, master, log position (the freshest report's; null if not).
        "replication": latest.get("replication"),
        "ops_per_s": round(sum(f.get("ops_per_s", 0.0) for f in figures), 3),
        "ops": ops,
        "latency": {
            op: {
                "p50_ms": round(statistics.median(p50s[op]), 3),
                "p99_ms": round(max(p99s[op]), 3),
            }
            for op in sorted(p50s)
        },
        "retries": sum(f.get("retries", 0) for f in figures),
        "errors": errors,
        "log_bytes": latest.get("log_bytes"),
        "last_checkpoint_age_s": round(max(0.0, now - checkpoint), 1) if checkpoint else None,
        "cache_hit_ratio": latest.get("cache_hit_ratio"),
        "region_bytes": latest.get("region_bytes"),
        "cache_bytes": latest.get("cache_bytes"),  # the cache now, and at most (cache_size)
        "cache_max_bytes": latest.get("cache_max_bytes"),
        "queues": {name: queues[name] for name in sorted(queues)},
    }


# -- rendering ----------------------------------------------------------------------------------


def render(status: Mapping[str, Any]) -> str:
    """A cage's status as readable tables (what `pmnc-runtime status` prints)."""
    address = status.get("address")
    where = f"http://{address}" if address else "no http interface"
    r = status.get("responses", {})
    lines = [
        f"cage {status.get('cage')} of node {status.get('node')} on {where}: "
        f"supervisor {status.get('supervisor_pid')}, {len(status.get('workers', []))} worker(s), "
        f"{status.get('requests', 0)} request(s) "
        f"(2xx {r.get('2xx', 0)}, 4xx {r.get('4xx', 0)}, 5xx {r.get('5xx', 0)})",
        "",
    ]
    rows = [
        ["pid", "slot", "uptime", "restarts", "requests", "4xx", "5xx", "rss", "ready", "report"]
    ]
    for w in status.get("workers", []):
        age = w.get("report_age_s")
        rows.append(
            [
                str(w["pid"]),
                str(w.get("slot")),
                _duration(w.get("uptime_s")),
                str(w.get("restarts", 0)),
                str(w.get("requests", 0)),
                str(w["responses"].get("4xx", 0)),
                str(w["responses"].get("5xx", 0)),
                human_size(w.get("rss_bytes")),
                "yes" if w.get("ready") else "no",
                "none yet" if age is None else f"{age:.1f} s ago",
            ]
        )
    lines += _table(rows)
    safes: Mapping[str, Any] = status.get("safes", {})
    if not safes:
        lines += ["", "no safe reported yet"]
        return "\n".join(lines)
    rows = [
        ["safe", "ops/s", "ops", "retries", "errors", "log", "regions", "checkpoint", "cache hit"]
    ]
    for name, s in safes.items():
        ratio = s.get("cache_hit_ratio")
        age = s.get("last_checkpoint_age_s")
        rows.append(
            [
                name,
                f"{s['ops_per_s']:.1f}",
                str(sum(s["ops"].values())),
                str(s["retries"]),
                str(sum(s["errors"].values())),
                human_size(s.get("log_bytes")),
                human_size(s.get("region_bytes")),
                "never" if age is None else f"{_duration(age)} ago",
                "-" if ratio is None else f"{100 * ratio:.1f}%",
            ]
        )
    lines += ["", *_table(rows)]
    rows = [["safe", "role", "master", "master node", "lag", "checked", "peers", "synced"]]
    for name, s in safes.items():
        rep = s.get("replication")
        if isinstance(rep, Mapping):
            lag, checked = rep.get("lag_bytes"), rep.get("lag_checked_s")
            rows.append(
                [
                    name,
                    str(rep.get("role")),
                    str(rep.get("master") or "-"),
                    str(rep.get("master_node") or "-"),
                    "unknown" if lag is None else human_size(lag),
                    "-" if checked is None else f"{_duration(checked)} ago",
                    f"{rep.get('peers_connected', 0)}/{rep.get('peers', '?')}",
                    "yes" if rep.get("synced") else "no",
                ]
            )
    if len(rows) > 1:
        lines += ["", *_table(rows)]
    rows = [["safe", "op", "count", "p50 ms", "p99 ms"]]
    for name, s in safes.items():
        for op, lat in s["latency"].items():
            count = str(s["ops"][op]) if op in s["ops"] else "-"  # reads are counted as "read"
            rows.append([name, op, count, f"{lat['p50_ms']:.3f}", f"{lat['p99_ms']:.3f}"])
    if len(rows) > 1:
        lines += ["", *_table(rows)]
    rows = [["safe", "queue", "items", "in work", "oldest", "deliveries", "redeliveries"]]
    for name, s in safes.items():
        for queue, q in s.get("queues", {}).items():
            age = q.get("oldest_age_s")
            rows.append(
                [
                    name,
                    queue,
                    str(q.get("length")),
                    str(q.get("leased")),
                    "-" if age is None else _duration(age),
                    str(q.get("deliveries", 0)),
                    str(q.get("redeliveries", 0)),
                ]
            )
    if len(rows) > 1:
        lines += ["", *_table(rows)]
    return "\n".join(lines)


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            for row in rows]  # fmt: skip


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    return f"{hours // 24}d{hours % 24:02d}h"


def human_size(n: int | None) -> str:
    """Bytes as the status tables and `safe list` show them ("-" for unknown)."""
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")
