"""`/metrics`: request counters, the text format (read back by Prometheus' own parser), and the
cage totals that keep counters monotonic while workers come and go (runtime/metrics.py)."""

from __future__ import annotations

import json
import os
import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pmnc.runtime import metrics, status
from pmnc.safe import Safe
from prometheus_client.parser import text_string_to_metric_families

NOW = 1_000_000.0


def parse(text: str) -> dict[str, Any]:
    """{family name: family}, checking that every family appears once."""
    families: dict[str, Any] = {}
    for family in text_string_to_metric_families(text):
        assert family.name not in families, f"{family.name} twice"
        families[family.name] = family
    return families


def value(families: dict[str, Any], sample: str, **labels: str) -> float:
    found = [
        s.value
        for f in families.values()
        for s in f.samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(found) == 1, (sample, labels, found)
    return float(found[0])


def counter_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of every counter and histogram family (the ones that must only grow)."""
    out = {}
    for family in text_string_to_metric_families(text):
        if family.type in ("counter", "histogram"):
            for s in family.samples:
                out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


# -- RequestMetrics -------------------------------------------------------------------------------


def test_request_metrics_are_exact_under_threads() -> None:
    requests = metrics.RequestMetrics()
    threads, each = 8, 5000

    def hammer(i: int) -> None:
        for n in range(each):
            code = (200, 404, 500)[n % 3] if i % 2 else 200
            requests.observe("counter", "increment", code, 0.0001 * (n % 7))

    pool = [threading.Thread(target=hammer, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(30)
    assert not [t for t in pool if t.is_alive()], "deadlocked"
    snap = json.loads(json.dumps(requests.snapshot()))  # JSON-able
    assert snap["requests"] == threads * each
    assert sum(snap["responses"].values()) == threads * each
    odd = threads // 2  # the threads that answer 404 and 500 too
    assert snap["responses"]["4xx"] == odd * len(range(1, each, 3))
    assert snap["responses"]["5xx"] == odd * len(range(2, each, 3))
    [[module, function, counts, nanoseconds]] = snap["call_durations"]
    assert (module, function) == ("counter", "increment")
    assert sum(counts) == threads * each and len(counts) == len(metrics.REQUEST_BUCKETS) + 1
    assert nanoseconds == threads * sum(round(0.0001 * (n % 7) * 1e9) for n in range(each))


def test_a_duration_on_a_bound_falls_in_that_bucket() -> None:
    requests = metrics.RequestMetrics()
    requests.observe("m", "f", 200, metrics.REQUEST_BUCKETS[0])  # le="0.0005": <= counts
    requests.observe("m", "f", 200, 100.0)  # over the last bound: +Inf only
    [[_, _, counts, _]] = requests.snapshot()["call_durations"]
    assert counts[0] == 1 and counts[-1] == 1 and sum(counts) == 2


# -- the text format ------------------------------------------------------------------------------

CAGE = {"node": "n", "cage": 'c"1\\', "supervisor_pid": 1, "workers": [{"pid": 10}, {"pid": 11}]}


def worker_report(pid: int, calls: int, *, written: float = NOW, log: int = 100) -> dict[str, Any]:
    requests = metrics.RequestMetrics()
    for _ in range(calls):
        requests.observe("counter", "increment", 200, 0.002)
    requests.observe("", "", 404, 0.0)
    buckets = [0.001, 0.01]
    return {
        "pid": pid,
        "started": NOW - 10,
        "written": written,
        **requests.snapshot(),
        "connections": {"idle": 2, "reading": 1, "active": 0, "writing": 0},
        "safes": {
            "counter": {
                "ops": {"modify": calls, "read": 3},
                "errors": {"modify": 1},
                "retries": 2,
                "durations": {"modify": {"counts": [calls, 0, 0], "sum_ns": 500_000 * calls}},
                "duration_buckets": buckets,
                "log_bytes": log,
                "last_checkpoint": NOW - 30,
                "cache_hit_ratio": 0.5,
            }
        },
    }


def test_render_is_read_back_by_prometheus_parser() -> None:
    reports = [worker_report(10, 5, written=NOW - 0.5, log=111), worker_report(11, 7, log=222)]
    totals = {"restarts": 3, "recoveries": 1, **worker_report(9, 20)}
    text = metrics.render(CAGE, reports, totals, NOW)
    families = parse(text)
    assert families["pmnc_requests"].type == "counter"  # the parser drops _total from the name
    assert families["pmnc_request_duration_seconds"].type == "histogram"
    assert families["pmnc_connections"].type == "gauge"
    for name in ("pmnc_safe_log_bytes", "pmnc_safe_checkpoint_age_seconds"):
        assert families[name].type == "gauge"

    calls = {"module": "counter", "function": "increment"}
    assert value(families, "pmnc_requests_total", code="200", **calls) == 32
    assert value(families, "pmnc_requests_total", module="", function="", code="404") == 3
    assert value(families, "pmnc_request_duration_seconds_count", **calls) == 32
    assert value(families, "pmnc_request_duration_seconds_sum", **calls) == pytest.approx(0.064)
    assert value(families, "pmnc_request_duration_seconds_bucket", le="0.001", **calls) == 0
    assert value(families, "pmnc_request_duration_seconds_bucket", le="0.0025", **calls) == 32
    assert value(families, "pmnc_request_duration_seconds_bucket", le="+Inf", **calls) == 32
    buckets = [
        s.value
        for s in families["pmnc_request_duration_seconds"].samples
        if s.name.endswith("_bucket") and s.labels["module"] == "counter"
    ]
    assert buckets == sorted(buckets), "buckets are cumulative"

    safe = {"safe": "counter"}
    assert value(families, "pmnc_safe_operations_total", op="modify", **safe) == 32
    assert value(families, "pmnc_safe_operations_total", op="read", **safe) == 9
    assert value(families, "pmnc_safe_errors_total", op="modify", **safe) == 3
    assert value(families, "pmnc_safe_retries_total", **safe) == 6
    assert value(families, "pmnc_safe_operation_duration_seconds_count", op="modify", **safe) == 32
    h = "pmnc_safe_operation_duration_seconds_bucket"
    assert value(families, h, op="modify", le="0.001", **safe) == 32
    assert value(families, "pmnc_safe_log_bytes", **safe) == 222  # the freshest report's
    assert value(families, "pmnc_safe_checkpoint_age_seconds", **safe) == 30
    assert value(families, "pmnc_worker_restarts_total") == 3
    assert value(families, "pmnc_recoveries_total") == 1
    assert value(families, "pmnc_connections", state="idle") == 4  # live workers only
    assert value(families, "pmnc_workers") == 2
    assert value(families, "pmnc_cage_info", node="n", cage='c"1\\') == 1  # escaped and back


def test_an_empty_cage_still_has_every_required_series() -> None:
    families = parse(metrics.render(CAGE, [], {}, NOW))
    for name in (
        "pmnc_requests",
        "pmnc_request_duration_seconds",
        "pmnc_safe_operations",
        "pmnc_safe_operation_duration_seconds",
        "pmnc_safe_retries",
        "pmnc_safe_log_bytes",
        "pmnc_safe_checkpoint_age_seconds",
        "pmnc_worker_restarts",
        "pmnc_recoveries",
        "pmnc_connections",
    ):
        assert name in families, name
    assert value(families, "pmnc_worker_restarts_total") == 0


# -- totals: monotonic while workers come and go --------------------------------------------------


def cage_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "run"
    directory.mkdir()
    status.write_json(
        directory / status.CAGE_FILE,
        {"node": "n", "cage": "c", "supervisor_pid": os.getpid(), "workers": []},
    )
    return directory


def test_a_retired_worker_stays_counted_and_its_restart_too(tmp_path: Path) -> None:
    directory = cage_dir(tmp_path)
    status.write_json(directory / "10.json", worker_report(10, 5))
    status.write_json(directory / "11.json", worker_report(11, 7))
    calls = {"module": "counter", "function": "increment", "code": "200"}
    before = parse(metrics.cage_metrics(directory))
    assert value(before, "pmnc_requests_total", **calls) == 12

    totals = metrics.CageTotals(directory)
    totals.retire(directory / "10.json", restarted=True)
    totals.recovered()
    assert not (directory / "10.json").exists(), "removed once folded"
    after = parse(metrics.cage_metrics(directory))
    assert value(after, "pmnc_requests_total", **calls) == 12
    assert value(after, "pmnc_safe_operations_total", safe="counter", op="modify") == 12
    assert value(after, "pmnc_worker_restarts_total") == 1
    assert value(after, "pmnc_recoveries_total") == 1

    # Folded but not removed yet (the supervisor between its two steps): counted once.
    status.write_json(directory / "10.json", worker_report(10, 5))
    again = parse(metrics.cage_metrics(directory))
    assert value(again, "pmnc_requests_total", **calls) == 12

    totals.retire(directory / "12.json", restarted=True)  # died before its first report
    assert value(parse(metrics.cage_metrics(directory)), "pmnc_worker_restarts_total") == 2
    totals.remove()
    assert not (directory / metrics.TOTALS_FILE).exists()


def test_totals_that_cannot_be_written_keep_the_report_in_place(tmp_path: Path) -> None:
    directory = cage_dir(tmp_path)
    status.write_json(directory / "10.json", worker_report(10, 5))
    totals = metrics.CageTotals(directory)
    (directory / metrics.TOTALS_FILE).mkdir()  # os.replace onto a directory fails
    with pytest.raises(OSError):
        totals.retire(directory / "10.json", restarted=False)
    assert (directory / "10.json").exists(), "still counted as a live report"
    calls = {"module": "counter", "function": "increment", "code": "200"}
    assert value(parse(metrics.cage_metrics(directory)), "pmnc_requests_total", **calls) == 5
    (directory / metrics.TOTALS_FILE).rmdir()
    totals.recovered()  # the next write that succeeds
    assert not (directory / "10.json").exists()
    assert value(parse(metrics.cage_metrics(directory)), "pmnc_requests_total", **calls) == 5


def test_no_scrape_goes_backwards_while_workers_are_retired(tmp_path: Path) -> None:
    """A driver plays workers (reports that grow) and the supervisor (retiring them, starting
    new ones) while scrapers read the directory: every counter sample only grows."""
    directory = cage_dir(tmp_path)
    totals = metrics.CageTotals(directory)
    stop = threading.Event()
    failures: list[BaseException] = []
    scrapes = [0]

    def scrape() -> None:
        seen: dict[Any, float] = {}
        try:
            while not stop.is_set():
                for key, v in counter_samples(metrics.cage_metrics(directory)).items():
                    assert v >= seen.get(key, 0), f"{key} went from {seen[key]} to {v}"
                    seen[key] = v
                scrapes[0] += 1
        except BaseException as e:
            failures.append(e)

    pool = [threading.Thread(target=scrape) for _ in range(2)]
    for t in pool:
        t.start()
    rng = random.Random(8)
    live: dict[int, int] = {}
    next_pid, retired = 100, 0
    deadline = time.monotonic() + 1.5
    try:
        while time.monotonic() < deadline and not failures:
            if len(live) < 3:
                live[next_pid] = 0
                next_pid += 1
            pid = rng.choice(list(live))
            live[pid] += rng.randint(0, 5)
            status.write_json(directory / f"{pid}.json", worker_report(pid, live[pid]))
            if rng.random() < 0.2:
                totals.retire(directory / f"{pid}.json", restarted=True)
                del live[pid]
                retired += 1
    finally:
        stop.set()
        for t in pool:
            t.join(10)
    assert not [t for t in pool if t.is_alive()], "scrapers deadlocked"
    assert not failures, failures
    assert retired > 10 and scrapes[0] > 10, (retired, scrapes)


# -- where the figures come from: a real safe, a real report file --------------------------------


def test_safe_stats_histogram_counts_every_timed_call(tmp_path: Path) -> None:
    with Safe.open(tmp_path / "s") as safe:
        for i in range(10):
            safe[f"k{i}"] = i
        safe.modify("n", lambda n: n + 1, 0)
        for _ in range(64):
            safe.get("k1")
        figures = json.loads(json.dumps(safe.stats()))
    bounds = figures["duration_buckets"]
    assert bounds == sorted(bounds) and bounds[-1] >= 10
    durations = figures["durations"]
    assert sum(durations["set"]["counts"]) == figures["ops"]["set"] == 10
    assert sum(durations["modify"]["counts"]) == 1
    assert 1 <= sum(durations["read"]["counts"]) <= figures["ops"]["read"] // 8  # sampled
    assert all(len(h["counts"]) == len(bounds) + 1 for h in durations.values())
    assert durations["set"]["sum_ns"] > 0
    assert "stats" not in durations


def test_what_a_worker_answers_with_is_in_its_file_first(tmp_path: Path) -> None:
    """Otherwise a sibling answering the next scrape reads an older file: figures go back."""
    requests = metrics.RequestMetrics()
    with Safe.open(tmp_path / "s") as safe:
        reporter = status.Reporter(tmp_path, {"s": safe}, requests.snapshot)
        requests.observe("m", "f", 200, 0.001)
        shown = reporter.collect()
        assert status.read_json(reporter.path) == json.loads(json.dumps(shown))
        requests.observe("m", "f", 200, 0.001)
        reporter.leave()  # a leaving worker leaves its last figures for the supervisor
        left = status.read_json(reporter.path)
        assert left is not None and left["requests"] == 2
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_report_from_a_reused_pid_is_not_skipped(tmp_path: Path) -> None:
    directory = cage_dir(tmp_path)
    status.write_json(directory / "10.json", worker_report(10, 5))
    metrics.CageTotals(directory).retire(directory / "10.json", restarted=True)
    reused = {**worker_report(10, 2), "started": NOW}  # same pid, another process
    status.write_json(directory / "10.json", reused)
    calls = {"module": "counter", "function": "increment", "code": "200"}
    assert value(parse(metrics.cage_metrics(directory)), "pmnc_requests_total", **calls) == 7


def test_not_running_without_a_live_supervisor(tmp_path: Path) -> None:
    with pytest.raises(status.NotRunningError):
        metrics.cage_metrics(tmp_path)


def test_memory_gauges_and_queue_figures() -> None:
    """RSS per live worker and region bytes per safe (gauges, freshest report); per queue its
    length and oldest age (gauges) and deliveries and redeliveries summed over the live workers
    and the departed ones (counters)."""

    def report(pid: int, rss: int, region: int, written: float, redelivered: int) -> dict[str, Any]:
        r = worker_report(pid, 1, written=written)
        r["rss_bytes"] = rss
        r["safes"]["counter"]["region_bytes"] = region
        r["safes"]["counter"]["queues"] = {
            "orders": {
                "length": 7 if pid == 11 else 9,
                "leased": 1,
                "oldest_age_s": 2.5 if pid == 11 else 1.0,
                "deliveries": 10,
                "redeliveries": redelivered,
            }
        }
        return r

    reports = [report(10, 50 << 20, 1000, NOW - 0.5, 1), report(11, 60 << 20, 2000, NOW, 2)]
    totals = {**report(9, 1, 1, NOW - 60, 4)}  # a departed worker, folded
    totals["rss_bytes"] = None
    families = parse(metrics.render(CAGE, reports, totals, NOW))
    assert families["pmnc_worker_rss_bytes"].type == "gauge"
    assert families["pmnc_safe_region_bytes"].type == "gauge"
    assert value(families, "pmnc_worker_rss_bytes", pid="10") == 50 << 20
    assert value(families, "pmnc_worker_rss_bytes", pid="11") == 60 << 20
    assert not [s for s in families["pmnc_worker_rss_bytes"].samples if s.labels["pid"] == "9"]
    assert value(families, "pmnc_safe_region_bytes", safe="counter") == 2000  # the freshest
    q = {"safe": "counter", "queue": "orders"}
    assert value(families, "pmnc_safe_queue_items", **q) == 7
    assert value(families, "pmnc_safe_queue_oldest_age_seconds", **q) == 2.5
    assert families["pmnc_safe_queue_redeliveries"].type == "counter"
    assert value(families, "pmnc_safe_queue_redeliveries_total", **q) == 1 + 2 + 4
    assert value(families, "pmnc_safe_queue_deliveries_total", **q) == 30

    cage = {"workers": [{"pid": 10, "started": NOW - 10}, {"pid": 11, "started": NOW - 10}]}
    aggregated = status.aggregate(cage, {10: reports[0], 11: reports[1]}, NOW)
    assert aggregated["safes"]["counter"]["queues"]["orders"] == {
        "length": 7,
        "leased": 1,
        "oldest_age_s": 2.5,
        "deliveries": 20,
        "redeliveries": 3,
    }
    assert "orders" in status.render(aggregated)


def test_a_safes_stats_carry_its_queues(tmp_path: Path) -> None:
    with Safe.open(tmp_path / "s") as s:
        q = s.queue("orders")
        q.put(1)
        q.put(2)
        with pytest.raises(RuntimeError), q.get(timeout=1):
            raise RuntimeError
        figures = s.stats()["queues"]["orders"]
    assert figures["length"] == 2 and figures["leased"] == 0
    assert figures["deliveries"] == 1 and figures["redeliveries"] == 0
    assert 0 <= figures["oldest_age_s"] < 5


def test_replication_gauges_and_the_not_acknowledged_counter() -> None:
    """Per replicated safe: master or not, lag, its age, peers connected, synced (gauges from
    the freshest report and replication.json), and commits not acknowledged summed over the
    live workers and the departed ones (a counter). A safe without a group has none of them."""

    def report(pid: int, written: float, lsn: list[int], perm_failed: int) -> dict[str, Any]:
        r = worker_report(pid, 1, written=written)
        r["safes"]["counter"]["replication"] = {
            "role": "client",
            "master": "127.0.0.1:7002",
            "lsn": lsn,
            "synced": True,
            "peers_connected": 1,
            "peers": 2,
            "perm_failed": perm_failed,
        }
        r["safes"]["plain"] = dict(worker_report(pid, 0)["safes"]["counter"])
        return r

    reports = [report(10, NOW - 0.5, [2, 100], 1), report(11, NOW, [2, 300], 2)]
    totals = metrics._Counters()
    totals.add(report(9, NOW - 60, [1, 1], 4))  # a departed worker, folded into totals.json
    look = {
        "safes": {
            "counter": {
                "sites": {"127.0.0.1:7001": "n", "127.0.0.1:7002": "other"},
                "master_site": "127.0.0.1:7002",
                "master_lsn": [2, 1000],
                "checked": NOW - 1.5,
            }
        }
    }
    families = parse(metrics.render(CAGE, reports, totals.to_json(), NOW, replication=look))
    s = {"safe": "counter"}
    assert value(families, "pmnc_safe_replication_master", **s) == 0
    assert value(families, "pmnc_safe_replication_lag_bytes", **s) == 700  # from [2, 300]
    assert value(families, "pmnc_safe_replication_lag_age_seconds", **s) == 1.5
    assert value(families, "pmnc_safe_replication_peers_connected", **s) == 1
    assert value(families, "pmnc_safe_replication_synced", **s) == 1
    assert families["pmnc_safe_replication_not_acknowledged"].type == "counter"
    assert value(families, "pmnc_safe_replication_not_acknowledged_total", **s) == 1 + 2 + 4
    for family in families.values():
        if family.name.startswith("pmnc_safe_replication"):
            assert all(sample.labels["safe"] == "counter" for sample in family.samples)

    # Before the replication process's first look: no lag (not a made-up 0), the rest is there.
    families = parse(metrics.render(CAGE, reports, {}, NOW))
    assert not families["pmnc_safe_replication_lag_bytes"].samples
    assert value(families, "pmnc_safe_replication_synced", **s) == 1
    reports[1]["safes"]["counter"]["replication"]["role"] = "master"
    families = parse(metrics.render(CAGE, reports, {}, NOW))
    assert value(families, "pmnc_safe_replication_master", **s) == 1
    assert value(families, "pmnc_safe_replication_lag_bytes", **s) == 0
