"""`GET /metrics`: a whole cage's figures in Prometheus' text exposition format (0.0.4).

Nothing to set up: no environment variable, no directory to create or wipe. The figures travel
the way `/_status`'s do (`status.py`): each worker rewrites `<data_dir>/run/<node>.<cage>/
<pid>.json` about once a second, and whichever worker accepts a scrape reads its siblings'
files. On top of that, what makes the counters of a whole cage monotonic:

- A counter is a sum over processes, and processes come and go (a crash restarts the whole
  cage, a reload replaces every worker). So the supervisor, when it reaps a worker, folds that
  worker's last report into the cage's `totals.json` *before* it removes the report, and lists
  the report it folded (by pid and start time: a pid can be reused). It keeps there too what
  only it counts: worker restarts and cage recoveries. (client_python's multiprocess mode asks
  for an environment variable and a directory wiped by hand, and loses or resets counters as
  workers churn: this is the part it gets wrong.)
- A reader reads the live reports first and `totals.json` second, and skips every report the
  totals list. Either it saw a report before the supervisor removed it (then it is either
  counted live, or listed and counted in the totals, never both), or it did not find it, and
  then the totals it reads afterwards already hold it. Every file is replaced atomically.
- A scrape is answered from files only. The answering worker first writes its own report
  (`status.Reporter.collect` writes what it returns), so no later scrape, answered by another
  worker reading that file, can show less than this one did. Answering from its fresher
  in-memory figures without writing them would let the next scrape, answered by a sibling,
  go backwards.

What this does not cover: the requests a worker served after its last written report are never
counted when it is killed (at most about a second of them, `REPORT_INTERVAL`; fewer if a scrape
made it write meanwhile), and a crash kills every worker of the cage, so up to about a second of
the cage's traffic. They are missing, not subtracted: no scrape ever showed them. A new
`pmnc-runtime start` starts every counter from zero (Prometheus sees a counter reset, as after
any restart). docs/metrics.md lists every series; tests/unit/test_metrics.py and
tests/integration/test_runtime_metrics.py (a `kill -9` under scrapes) hold it to this.
"""

from __future__ import annotations

import bisect
import contextlib
import math
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from . import status

__all__ = [
    "CONNECTION_STATES",
    "CONTENT_TYPE",
    "METRICS_PATH",
    "REQUEST_BUCKETS",
    "TOTALS_FILE",
    "CageTotals",
    "RequestMetrics",
    "cage_metrics",
    "render",
]

METRICS_PATH = "/metrics"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TOTALS_FILE = "totals.json"
# Upper bounds (s) of the request duration histogram; one more bucket for larger (+Inf). From a
# cached read answered in well under a millisecond to the 30 s request timeout.
REQUEST_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
CONNECTION_STATES = ("idle", "reading", "active", "writing")
# How long a folded report stays listed in the totals. A reader that read that report before it
# was removed, then the totals, must still find it listed (or it would count it twice); a
# reader takes milliseconds between the two reads. Longer lists only cost bytes per scrape.
FOLDED_KEEP_S = 300.0


class RequestMetrics:
    """One worker's request counters: by (module, function, status code), and a duration
    histogram by (module, function). Shared by its serving threads; one short lock per request.

    `module` and `function` are "" for a request that reached no served function: label values
    come from the modules loaded, never from a name the client chose (unbounded series).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: dict[tuple[str, str, int], int] = {}
        self._durations: dict[tuple[str, str], _Histogram] = {}

    def observe(self, module: str, function: str, code: int, seconds: float) -> None:
        index = bisect.bisect_left(REQUEST_BUCKETS, seconds)  # le: the first bound >= seconds
        with self._lock:
            key = (module, function, code)
            self._calls[key] = self._calls.get(key, 0) + 1
            histogram = self._durations.get((module, function))
            if histogram is None:
                histogram = self._durations[module, function] = _Histogram(len(REQUEST_BUCKETS))
            histogram.counts[index] += 1
            histogram.sum_ns += round(seconds * 1e9)

    def snapshot(self) -> dict[str, Any]:
        """JSON-able: {"requests": total, "responses": {"2xx": n, ...}} (what `/_status`
        shows) plus "calls" [[module, function, code, n], ...] and "call_durations"
        [[module, function, [count per bucket], sum_ns], ...] (what `/metrics` adds up)."""
        with self._lock:
            counts = dict(self._calls)
            durations = [[m, f, list(h.counts), h.sum_ns] for (m, f), h in self._durations.items()]
        responses: dict[str, int] = {}
        for (_, _, code), n in counts.items():
            key = f"{code // 100}xx"
            responses[key] = responses.get(key, 0) + n
        calls = [[m, f, c, n] for (m, f, c), n in counts.items()]
        return {
            "requests": sum(responses.values()),
            "responses": responses,
            "calls": calls,
            "call_durations": durations,
        }


class _Histogram:
    __slots__ = ("counts", "sum_ns")

    def __init__(self, bounds: int) -> None:
        self.counts = [0] * (bounds + 1)  # per bucket, not cumulative; the last one: +Inf
        # Integer nanoseconds, like the safes' (safe/stats.py): integer sums come out the same in
        # any order, where float sums of the same figures can differ in the last bit, and a
        # scrape adding live reports and totals in another order would seem to go backwards.
        self.sum_ns = 0

    def add(self, counts: Iterable[int], nanoseconds: int) -> None:
        counts = list(counts)
        if len(counts) != len(self.counts):
            return  # another bucket layout (never within one run of the node): not comparable
        self.counts = [a + b for a, b in zip(self.counts, counts, strict=True)]
        self.sum_ns += nanoseconds


def report_key(report: Mapping[str, Any]) -> str:
    """Which worker process wrote a report: its pid and start time (pids are reused)."""
    return f"{report.get('pid')}:{report.get('started')!r}"


class _Counters:
    """The counters of any number of reports added up: a cage's live workers, the totals."""

    def __init__(self) -> None:
        self.calls: dict[tuple[str, str, int], int] = {}
        self.call_durations: dict[tuple[str, str], _Histogram] = {}
        self.safe_ops: dict[tuple[str, str], int] = {}
        self.safe_errors: dict[tuple[str, str], int] = {}
        self.safe_retries: dict[str, int] = {}
        self.safe_durations: dict[tuple[str, str], _Histogram] = {}
        self.safe_buckets: list[float] = []
        # (safe, queue) -> {"deliveries": n, "redeliveries": n}: per-process counts, summed.
        self.queue_counts: dict[tuple[str, str], dict[str, int]] = {}
        # Replicated safes only: commits reported SafeNotAcknowledgedError, per process, summed:
        # acknowledgements missing (`Safe.replication()["perm_failed"]`) or acknowledged but not
        # confirmed by the fence (`["fence_refused"]`, safe/fence.py). Kept as "perm_failed".
        self.not_acknowledged: dict[str, int] = {}

    def add(self, figures: Mapping[str, Any]) -> None:
        """Add a worker's report, or another `_Counters`' `to_json()` (the same keys)."""
        for module, function, code, n in figures.get("calls", []):
            key = (module, function, code)
            self.calls[key] = self.calls.get(key, 0) + n
        for module, function, counts, nanoseconds in figures.get("call_durations", []):
            histogram = self.call_durations.get((module, function))
            if histogram is None:
                histogram = _Histogram(len(REQUEST_BUCKETS))
                self.call_durations[module, function] = histogram
            histogram.add(counts, nanoseconds)
        for name, safe in figures.get("safes", {}).items():
            for op, n in safe.get("ops", {}).items():
                self.safe_ops[name, op] = self.safe_ops.get((name, op), 0) + n
            for op, n in safe.get("errors", {}).items():
                self.safe_errors[name, op] = self.safe_errors.get((name, op), 0) + n
            self.safe_retries[name] = self.safe_retries.get(name, 0) + safe.get("retries", 0)
            replication = safe.get("replication")
            if isinstance(replication, Mapping):
                n = replication.get("perm_failed", 0) + replication.get("fence_refused", 0)
                self.not_acknowledged[name] = self.not_acknowledged.get(name, 0) + n
            for queue, q in safe.get("queues", {}).items():
                counts = self.queue_counts.setdefault((name, queue), {})
                for what in ("deliveries", "redeliveries"):
                    counts[what] = counts.get(what, 0) + q.get(what, 0)
            buckets = safe.get("duration_buckets")
            if buckets and not self.safe_buckets:
                self.safe_buckets = list(buckets)
            if buckets != self.safe_buckets:
                continue  # another layout (never within one run of the node): not comparable
            for op, h in safe.get("durations", {}).items():
                histogram = self.safe_durations.get((name, op))
                if histogram is None:
                    histogram = _Histogram(len(self.safe_buckets))
                    self.safe_durations[name, op] = histogram
                histogram.add(h["counts"], h["sum_ns"])

    def to_json(self) -> dict[str, Any]:
        safes: dict[str, dict[str, Any]] = {}

        def safe(name: str) -> dict[str, Any]:
            return safes.setdefault(
                name,
                {
                    "ops": {},
                    "errors": {},
                    "retries": 0,
                    "durations": {},
                    "duration_buckets": self.safe_buckets,
                },
            )

        for (name, op), n in self.safe_ops.items():
            safe(name)["ops"][op] = n
        for (name, op), n in self.safe_errors.items():
            safe(name)["errors"][op] = n
        for name, n in self.safe_retries.items():
            safe(name)["retries"] = n
        for (name, op), h in self.safe_durations.items():
            safe(name)["durations"][op] = {"counts": h.counts, "sum_ns": h.sum_ns}
        for (name, queue), counts in self.queue_counts.items():
            safe(name).setdefault("queues", {})[queue] = dict(counts)
        for name, n in self.not_acknowledged.items():
            safe(name)["replication"] = {"perm_failed": n}
        return {
            "calls": [[m, f, c, n] for (m, f, c), n in self.calls.items()],
            "call_durations": [
                [m, f, h.counts, h.sum_ns] for (m, f), h in self.call_durations.items()
            ],
            "safes": safes,
        }


class CageTotals:
    """The supervisor's side: a cage's `totals.json`, what its departed workers and the
    supervisor itself counted. Used from the supervisor's single-threaded loop only."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / TOTALS_FILE
        self._counters = _Counters()
        self._restarts = 0
        self._recoveries = 0
        self._folded: dict[str, float] = {}  # report key -> when it was folded
        self._unremoved: list[Path] = []  # folded reports to remove once the totals are written

    def retire(self, report: Path, *, restarted: bool) -> None:
        """Fold the report of a reaped worker into the totals, write them, then remove it.

        If the totals cannot be written (OSError, raised), the report stays where it is: it is
        still counted as a live one, and removed after the next write that succeeds.
        """
        figures = status.read_json(report)
        if figures is not None and report_key(figures) not in self._folded:
            self._counters.add(figures)
            self._folded[report_key(figures)] = time.time()
        if figures is not None or report.exists():
            self._unremoved.append(report)
        if restarted:
            self._restarts += 1
        self._write()

    def recovered(self) -> None:
        """Count one recovery of the cage's safes after a crash; OSError if not written."""
        self._recoveries += 1
        self._write()

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()

    def _write(self) -> None:
        now = time.time()
        self._folded = {k: t for k, t in self._folded.items() if now - t < FOLDED_KEEP_S}
        status.write_json(
            self.path,
            {
                "written": now,
                "folded": self._folded,
                "restarts": self._restarts,
                "recoveries": self._recoveries,
                **self._counters.to_json(),
            },
        )
        for path in self._unremoved:
            with contextlib.suppress(OSError):
                path.unlink()
        self._unremoved.clear()


# -- reading and rendering ----------------------------------------------------------------------


def cage_metrics(directory: Path, *, live: Mapping[str, Any] | None = None) -> str:
    """The exposition text for the cage whose run directory is `directory`.

    `live` is the answering worker's own report, already written to its file
    (`Reporter.collect()` does both); without it that file is read like the others.
    NotRunningError if the supervisor's `cage.json` is missing or its pid is gone.
    """
    cage = status.read_cage(directory)
    reports: dict[str, dict[str, Any]] = {}
    for path in directory.glob("*.json"):  # live reports first, the totals second: see above
        if path.stem.isdigit():
            report = status.read_json(path)
            if report is not None:
                reports[report_key(report)] = report
    if live is not None:
        reports[report_key(live)] = dict(live)
    totals = status.read_json(directory / TOTALS_FILE) or {}
    folded = totals.get("folded", {})
    live_reports = [r for k, r in reports.items() if k not in folded]
    checked = status.read_json(directory / status.REPLICATION_FILE)
    return render(cage, live_reports, totals, time.time(), replication=checked)


def render(
    cage: Mapping[str, Any],
    reports: Iterable[Mapping[str, Any]],
    totals: Mapping[str, Any],
    now: float,
    *,
    replication: Mapping[str, Any] | None = None,
) -> str:
    """The exposition text from the supervisor's `cage.json`, the live workers' reports (none
    of them folded into `totals`), the totals and the replication process's look at each
    safe's master (`replication.json`, None if there is none; pure: unit-tested)."""
    reports = sorted(reports, key=lambda r: r.get("written", 0.0), reverse=True)  # freshest first
    live_pids = {w.get("pid") for w in cage.get("workers", [])}
    counters = _Counters()
    counters.add(totals)
    for r in reports:
        counters.add(r)
    out = _Writer()

    out.family("pmnc_cage_info", "gauge", "The node and cage these figures are of (always 1).")
    out.sample("pmnc_cage_info", {"node": cage.get("node"), "cage": cage.get("cage")}, 1)
    out.family("pmnc_workers", "gauge", "Worker processes of the cage the supervisor counts live.")
    out.sample("pmnc_workers", {}, len(cage.get("workers", [])))
    out.family(
        "pmnc_worker_restarts_total",
        "counter",
        "Workers replaced after they died (a crash restarts every worker of the cage).",
    )
    out.sample("pmnc_worker_restarts_total", {}, totals.get("restarts", 0))
    out.family(
        "pmnc_recoveries_total",
        "counter",
        "Recoveries of the cage's safes after a worker died leaving them to recover.",
    )
    out.sample("pmnc_recoveries_total", {}, totals.get("recoveries", 0))

    out.family(
        "pmnc_requests_total",
        "counter",
        "HTTP requests answered, by module, function and status code "
        '(module and function "" when none was reached).',
    )
    for (module, function, code), n in sorted(counters.calls.items()):
        labels = {"module": module, "function": function, "code": str(code)}
        out.sample("pmnc_requests_total", labels, n)
    out.family(
        "pmnc_request_duration_seconds",
        "histogram",
        "Time from a complete HTTP request to its answer, by module and function.",
    )
    for (module, function), h in sorted(counters.call_durations.items()):
        labels = {"module": module, "function": function}
        out.histogram("pmnc_request_duration_seconds", labels, REQUEST_BUCKETS, h)

    connections = dict.fromkeys(CONNECTION_STATES, 0)
    for r in reports:
        for state, n in r.get("connections", {}).items():
            connections[state] = connections.get(state, 0) + n
    out.family(
        "pmnc_connections",
        "gauge",
        "Open HTTP connections of the cage's workers by state: idle (keep-alive, between "
        "requests), reading (a request arriving), active (being served), writing (the answer).",
    )
    for state, n in connections.items():
        out.sample("pmnc_connections", {"state": state}, n)

    out.family(
        "pmnc_safe_operations_total",
        "counter",
        "Operations on each module's safe (plain reads counted as op read).",
    )
    for (name, op), n in sorted(counters.safe_ops.items()):
        out.sample("pmnc_safe_operations_total", {"safe": name, "op": op}, n)
    out.family("pmnc_safe_errors_total", "counter", "Operations on a safe that raised an error.")
    for (name, op), n in sorted(counters.safe_errors.items()):
        out.sample("pmnc_safe_errors_total", {"safe": name, "op": op}, n)
    out.family(
        "pmnc_safe_operation_duration_seconds",
        "histogram",
        "Duration of operations on a safe, retries included (reads: one in 16 is timed).",
    )
    for (name, op), h in sorted(counters.safe_durations.items()):
        labels = {"safe": name, "op": op}
        out.histogram("pmnc_safe_operation_duration_seconds", labels, counters.safe_buckets, h)
    out.family(
        "pmnc_safe_retries_total",
        "counter",
        "Retries of operations on a safe after a deadlock or an expired lock wait.",
    )
    for name, n in sorted(counters.safe_retries.items()):
        out.sample("pmnc_safe_retries_total", {"safe": name}, n)

    # Environment-wide figures (one Berkeley DB environment per safe): the freshest report's.
    environment: dict[str, Mapping[str, Any]] = {}
    for r in reports:
        for name, figures in r.get("safes", {}).items():
            environment.setdefault(name, figures)
    out.family("pmnc_safe_log_bytes", "gauge", "Bytes of Berkeley DB log files of a safe.")
    for name, figures in sorted(environment.items()):
        if isinstance(figures.get("log_bytes"), int):
            out.sample("pmnc_safe_log_bytes", {"safe": name}, figures["log_bytes"])
    out.family(
        "pmnc_safe_checkpoint_age_seconds",
        "gauge",
        "Seconds since a safe's last checkpoint (absent before its first).",
    )
    for name, figures in sorted(environment.items()):
        checkpoint = figures.get("last_checkpoint")
        if checkpoint:
            age = round(max(0.0, now - checkpoint), 3)
            out.sample("pmnc_safe_checkpoint_age_seconds", {"safe": name}, age)
    out.family("pmnc_safe_cache_hit_ratio", "gauge", "Share of page reads a safe's cache answered.")
    for name, figures in sorted(environment.items()):
        ratio = figures.get("cache_hit_ratio")
        if isinstance(ratio, int | float):
            out.sample("pmnc_safe_cache_hit_ratio", {"safe": name}, ratio)
    out.family(
        "pmnc_safe_region_bytes",
        "gauge",
        "Disk blocks a safe's shared Berkeley DB regions take, reservations included.",
    )
    for name, figures in sorted(environment.items()):
        if isinstance(figures.get("region_bytes"), int):
            out.sample("pmnc_safe_region_bytes", {"safe": name}, figures["region_bytes"])
    out.family(
        "pmnc_worker_rss_bytes",
        "gauge",
        "Resident set of each live worker (shared region pages it touched count in each).",
    )
    for r in sorted(reports, key=lambda r: r.get("pid", 0)):
        if isinstance(r.get("rss_bytes"), int) and r.get("pid") in live_pids:
            out.sample("pmnc_worker_rss_bytes", {"pid": r["pid"]}, r["rss_bytes"])

    # Replicated safes (a node group): role, lag, connections from the freshest report and the
    # replication process's look at the master (status.replication_view); none for the others.
    checked = (replication or {}).get("safes", {})
    views = {
        name: view
        for name, figures in sorted(environment.items())
        if (view := status.replication_view(
            figures.get("replication"), checked.get(name), cage.get("node"), now
        )) is not None
    }  # fmt: skip
    out.family(
        "pmnc_safe_replication_master",
        "gauge",
        "1 if this node's copy of a replicated safe is its group's master, 0 otherwise.",
    )
    for name, view in views.items():
        out.sample("pmnc_safe_replication_master", {"safe": name}, int(view["role"] == "master"))
    out.family(
        "pmnc_safe_replication_lag_bytes",
        "gauge",
        "Bytes of log a replicated safe's master had written that this copy had not applied "
        "(0 on the master; absent while unknown).",
    )
    for name, view in views.items():
        if isinstance(view["lag_bytes"], int):
            out.sample("pmnc_safe_replication_lag_bytes", {"safe": name}, view["lag_bytes"])
    out.family(
        "pmnc_safe_replication_lag_age_seconds",
        "gauge",
        "Age of the master's log position the lag is measured against.",
    )
    for name, view in views.items():
        if isinstance(view["lag_checked_s"], int | float):
            labels = {"safe": name}
            out.sample("pmnc_safe_replication_lag_age_seconds", labels, view["lag_checked_s"])
    out.family(
        "pmnc_safe_replication_peers_connected",
        "gauge",
        "Sites of a replicated safe's group (the same safe on the other nodes) it is connected to.",
    )
    for name, view in views.items():
        if isinstance(view.get("peers_connected"), int):
            labels = {"safe": name}
            out.sample("pmnc_safe_replication_peers_connected", labels, view["peers_connected"])
    out.family(
        "pmnc_safe_replication_synced",
        "gauge",
        "1 if a replicated safe is the master or a client that finished its start-up sync.",
    )
    for name, view in views.items():
        out.sample("pmnc_safe_replication_synced", {"safe": name}, int(bool(view.get("synced"))))
    out.family(
        "pmnc_safe_replication_not_acknowledged_total",
        "counter",
        "Commits on a replicated safe that did not get the acknowledgements its ack policy "
        "asks for in time (SafeNotAcknowledgedError).",
    )
    for name, n in sorted(counters.not_acknowledged.items()):
        out.sample("pmnc_safe_replication_not_acknowledged_total", {"safe": name}, n)

    # Queues (docs/queues.md): lengths and ages are the queue's own (freshest report), the
    # delivery counters are per process, summed with the departed workers' totals.
    queues = {
        (name, queue): q
        for name, figures in environment.items()
        for queue, q in figures.get("queues", {}).items()
    }
    out.family("pmnc_safe_queue_items", "gauge", "Items in a safe's queue, in work or waiting.")
    for (name, queue), q in sorted(queues.items()):
        if isinstance(q.get("length"), int):
            out.sample("pmnc_safe_queue_items", {"safe": name, "queue": queue}, q["length"])
    out.family(
        "pmnc_safe_queue_oldest_age_seconds",
        "gauge",
        "Age of the oldest item of a safe's queue (absent when it is empty).",
    )
    for (name, queue), q in sorted(queues.items()):
        age = q.get("oldest_age_s")
        if isinstance(age, int | float):
            labels = {"safe": name, "queue": queue}
            out.sample("pmnc_safe_queue_oldest_age_seconds", labels, round(age, 3))
    for what, help_text in (
        ("deliveries", "Items of a safe's queue handed to a taker, redeliveries included."),
        (
            "redeliveries",
            "Items delivered again: after an exception in the block or a lease "
            "that ran out (its taker died or was too slow).",
        ),
    ):
        family = f"pmnc_safe_queue_{what}_total"
        out.family(family, "counter", help_text)
        for (name, queue), counts in sorted(counters.queue_counts.items()):
            out.sample(family, {"safe": name, "queue": queue}, counts.get(what, 0))
    return out.text()


class _Writer:
    """Lines of the text format: HELP and TYPE once per family, then its samples."""

    def __init__(self) -> None:
        self._lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        escaped = help_text.replace("\\", "\\\\").replace("\n", "\\n")
        self._lines += [f"# HELP {name} {escaped}", f"# TYPE {name} {kind}"]

    def sample(self, name: str, labels: Mapping[str, object], value: float) -> None:
        if labels:
            inside = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
            self._lines.append(f"{name}{{{inside}}} {_number(value)}")
        else:
            self._lines.append(f"{name} {_number(value)}")

    def histogram(
        self,
        name: str,
        labels: Mapping[str, str],
        bounds: Iterable[float],
        h: _Histogram,
    ) -> None:
        cumulative = 0
        for bound, n in zip([*bounds, math.inf], h.counts, strict=True):
            cumulative += n
            self.sample(f"{name}_bucket", {**labels, "le": _number(float(bound))}, cumulative)
        self.sample(f"{name}_sum", labels, h.sum_ns / 1e9)
        self.sample(f"{name}_count", labels, cumulative)

    def text(self) -> str:
        return "\n".join(self._lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)
