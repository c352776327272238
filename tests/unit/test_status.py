"""How `/_status` combines a cage's worker reports: sums, median p50, worst p99, freshest env."""

from __future__ import annotations

from typing import Any

from pmnc.runtime.status import aggregate, render

NOW = 1_000_000.0
CAGE = {
    "node": "n",
    "cage": "c",
    "address": "127.0.0.1:8080",
    "supervisor_pid": 1,
    "workers": [
        {"pid": 10, "slot": 0, "started": NOW - 60, "restarts": 2, "ready": True},
        {"pid": 11, "slot": 1, "started": NOW - 5, "restarts": 0, "ready": True},
        {"pid": 12, "slot": 2, "started": NOW - 1, "restarts": 0, "ready": False},
    ],
}


def report(pid: int, written: float, p50: float, p99: float, log: int) -> dict[str, Any]:
    return {
        "pid": pid,
        "written": written,
        "requests": 100,
        "responses": {"2xx": 90, "4xx": 7, "5xx": 3},
        "safes": {
            "counter": {
                "ops": {"modify": 100, "read": 10},
                "errors": {"modify": 1},
                "retries": 4,
                "latency": {"modify": {"p50_ms": p50, "p99_ms": p99}},
                "ops_per_s": 50.0,
                "last_checkpoint": NOW - 30,
                "cache_hit_ratio": 0.5,
                "log_bytes": log,
            }
        },
    }


def test_counts_and_rates_sum_p50_is_the_median_p99_the_worst_env_the_freshest() -> None:
    reports = {10: report(10, NOW - 0.5, 1.0, 9.0, 111), 11: report(11, NOW - 0.1, 3.0, 4.0, 222)}
    doc = aggregate(CAGE, reports, NOW)
    assert doc["requests"] == 200
    assert doc["responses"] == {"2xx": 180, "4xx": 14, "5xx": 6}
    assert [w["pid"] for w in doc["workers"]] == [10, 11, 12]
    booting = doc["workers"][2]
    assert booting["requests"] == 0 and booting["report_age_s"] is None
    assert doc["workers"][0]["uptime_s"] == 60 and doc["workers"][0]["restarts"] == 2
    counter = doc["safes"]["counter"]
    assert counter["ops"] == {"modify": 200, "read": 20}
    assert counter["ops_per_s"] == 100.0
    assert counter["errors"] == {"modify": 2} and counter["retries"] == 8
    assert counter["latency"] == {"modify": {"p50_ms": 2.0, "p99_ms": 9.0}}
    assert counter["log_bytes"] == 222  # from the freshest report
    assert counter["last_checkpoint_age_s"] == 30.0


def test_render_shows_every_worker_and_safe() -> None:
    doc = aggregate(CAGE, {10: report(10, NOW, 1.0, 2.0, 3 << 20)}, NOW)
    text = render(doc)
    assert "cage c of node n on http://127.0.0.1:8080" in text
    for needle in ("10 ", "11 ", "12 ", "none yet", "counter", "modify", "3.0 MiB", "50.0%"):
        assert needle in text, text


def test_a_cage_with_no_report_yet_renders() -> None:
    doc = aggregate({**CAGE, "address": None}, {}, NOW)
    assert doc["safes"] == {} and doc["requests"] == 0
    assert "no http interface" in render(doc) and "no safe reported yet" in render(doc)
