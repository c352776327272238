"""How `/_status` combines a cage's worker reports: sums, median p50, worst p99, freshest env."""

from __future__ import annotations

from typing import Any

from pmnc.runtime.status import aggregate, render
from pmnc.safe import log_distance

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


# -- replicated safes (a node group): role, master node, lag ---------------------------------------

SITES = {"127.0.0.1:7001": "n", "127.0.0.1:7002": "peer2", "127.0.0.1:7003": "peer3"}


def replicated(pid: int, written: float, role: str, master: str | None, lsn: list[int]) -> Any:
    r = report(pid, written, 1.0, 2.0, 100)
    r["safes"]["counter"]["replication"] = {
        "role": role,
        "master": master,
        "lsn": lsn,
        "synced": True,
        "queued": 0,
        "peers_connected": 2,
        "peers": 2,
        "unconnected_s": 0.0,
        "perm_failed": 0,
        "elections": 1,
    }
    return r


def checked(site: str | None, lsn: list[int] | None, when: float | None) -> dict[str, Any]:
    """What the replication process writes to replication.json (runtime/replicator.py)."""
    entry = {
        "sites": SITES,
        "master_site": site,
        "master_node": SITES.get(site or ""),
        "master_lsn": lsn,
        "checked": when,
    }
    return {"written": NOW, "node": "n", "safes": {"counter": entry}}


def test_a_client_shows_its_master_node_and_its_lag_from_the_freshest_report() -> None:
    """The lag is the log between the master's lsn as last read and this copy's own lsn in its
    freshest report (the answering worker's), across a log file boundary too."""
    reports = {
        10: replicated(10, NOW - 0.9, "client", "127.0.0.1:7002", [3, 1000]),
        11: replicated(11, NOW - 0.1, "client", "127.0.0.1:7002", [3, 5000]),
    }
    doc = aggregate(CAGE, reports, NOW, replication=checked("127.0.0.1:7002", [3, 9000], NOW - 2))
    rep = doc["safes"]["counter"]["replication"]
    assert rep["role"] == "client" and rep["master"] == "127.0.0.1:7002"
    assert rep["master_node"] == "peer2"
    assert rep["master_lsn"] == [3, 9000]
    assert rep["lag_bytes"] == 4000  # from [3, 5000], the freshest, not [3, 1000]
    assert rep["lag_checked_s"] == 2.0
    text = render(doc)
    assert "peer2" in text and "3.9 KiB" in text and "2.0 s ago" in text and "2/2" in text, text

    one_file_on = checked("127.0.0.1:7002", [4, 100], NOW)
    rep = aggregate(CAGE, reports, NOW, replication=one_file_on)["safes"]["counter"]["replication"]
    assert rep["lag_bytes"] == log_distance([4, 100], [3, 5000]) > 100

    caught_up = checked("127.0.0.1:7002", [3, 4000], NOW)  # an older figure than our own lsn
    rep = aggregate(CAGE, reports, NOW, replication=caught_up)["safes"]["counter"]["replication"]
    assert rep["lag_bytes"] == 0


def test_the_lag_is_unknown_before_a_look_and_after_an_election() -> None:
    reports = {11: replicated(11, NOW, "client", "127.0.0.1:7003", [3, 5000])}
    rep = aggregate(CAGE, reports, NOW)["safes"]["counter"]["replication"]
    assert rep["lag_bytes"] is None and rep["lag_checked_s"] is None and rep["master_node"] is None
    assert "unknown" in render(aggregate(CAGE, reports, NOW))
    # replication.json last read peer2 as master; this copy now follows peer3: another log.
    stale = checked("127.0.0.1:7002", [3, 9000], NOW - 1)
    rep = aggregate(CAGE, reports, NOW, replication=stale)["safes"]["counter"]["replication"]
    assert rep["master_node"] == "peer3" and rep["lag_bytes"] is None
    none = {11: replicated(11, NOW, "client", None, [3, 5000])}  # no master: an election
    rep = aggregate(CAGE, none, NOW, replication=stale)["safes"]["counter"]["replication"]
    assert rep["master_node"] is None and rep["lag_bytes"] is None


def test_the_master_lags_nothing_and_unreplicated_safes_show_no_replication() -> None:
    reports = {11: replicated(11, NOW, "master", "127.0.0.1:7001", [3, 5000])}
    for look in (None, checked("127.0.0.1:7002", [3, 9000], NOW - 5)):  # an old look: ignored
        rep = aggregate(CAGE, reports, NOW, replication=look)["safes"]["counter"]["replication"]
        assert rep["role"] == "master" and rep["master_node"] == "n"
        assert rep["lag_bytes"] == 0 and rep["lag_checked_s"] == 0.0
        assert rep["master_lsn"] == [3, 5000]
    plain = aggregate(
        CAGE, {10: report(10, NOW, 1.0, 2.0, 100)}, NOW, replication=checked(None, None, None)
    )
    assert plain["safes"]["counter"]["replication"] is None
    assert "master node" not in render(plain)
