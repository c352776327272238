"""Live status: `GET /_status` and `pmnc-runtime status` reflect a known load on a real node."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from helpers import (
    EXAMPLES,
    Client,
    Node,
    cli,
    increment_concurrently,
    wait_serving,
    worker_pids,
    write_config,
)


def get_status(port: int, method: str = "GET", timeout: float = 5.0) -> tuple[int, Any]:
    client = Client(port, timeout=timeout, keep_alive=False)
    try:
        code, body = client.request(method, "/_status")
        return code, json.loads(body)
    finally:
        client.close()


def wait_status(port: int, ok: Callable[[Any], bool], timeout: float = 5.0) -> Any:
    """The first /_status document for which `ok` holds (workers report about once a second)."""
    deadline = time.monotonic() + timeout
    while True:
        code, doc = get_status(port)
        assert code == 200, doc
        if ok(doc):
            return doc
        assert time.monotonic() < deadline, f"status never matched: {json.dumps(doc, indent=1)}"
        time.sleep(0.1)


def run_status(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*cli(), "status", str(config), *extra],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def modify_ops(doc: Any) -> int:
    return int(doc["safes"].get("counter", {}).get("ops", {}).get("modify", 0))


def test_status_reflects_a_known_load(node_factory: Callable[..., Node]) -> None:
    began = time.time()
    node = node_factory(EXAMPLES, workers=2, threads=4).start()
    pids = set(worker_pids(node.pid))
    code, doc = get_status(node.port)
    alive_for = time.time() - began
    assert code == 200, doc
    assert (doc["node"], doc["cage"]) == ("test", "demo")
    assert doc["address"] == f"127.0.0.1:{node.port}"
    assert {w["pid"] for w in doc["workers"]} == pids
    assert sorted(w["slot"] for w in doc["workers"]) == [0, 1]
    # The workers were forked within this test, and the figure is seconds (not ms, not the
    # supervisor's age): 0 would be the aggregation's clamp hiding a clock from the future.
    assert all(w["restarts"] == 0 for w in doc["workers"])
    assert all(0 < w["uptime_s"] <= alive_for + 0.5 for w in doc["workers"]), doc["workers"]
    first = doc["workers"]
    for method in ("POST", "PUT", "DELETE"):
        code, answer = get_status(node.port, method)
        assert code == 405 and answer["error"].startswith("MethodNotAllowed"), answer

    calls, threads = 200, 4
    increment_concurrently(
        node.port, "load", threads=threads, per_thread=calls // threads, timeout=30
    )

    doc = wait_status(node.port, lambda d: modify_ops(d) >= calls and d["requests"] >= calls)
    assert sum(w["requests"] for w in doc["workers"]) == doc["requests"]
    assert doc["responses"]["2xx"] >= calls
    counter = doc["safes"]["counter"]
    assert counter["latency"]["modify"]["p99_ms"] >= counter["latency"]["modify"]["p50_ms"] > 0
    # An int from the safes' own figures, and not a retry storm: modify on one key locks it
    # for writing (README, "What a safe guarantees"), so a deadlock retry is the exception.
    assert type(counter["retries"]) is int and counter["retries"] <= calls, counter
    assert counter["log_bytes"] > 0
    later = {w["pid"]: w["uptime_s"] for w in doc["workers"]}
    assert all(later[w["pid"]] > w["uptime_s"] for w in first), (first, later)
    assert 0.0 <= counter["cache_hit_ratio"] <= 1.0
    assert "stats" not in counter["ops"], "the reports' own stats() calls are not operations"
    assert set(doc["safes"]) == {"counter", "kv"}

    result = run_status(node.config)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"cage demo of node test on http://127.0.0.1:{node.port}" in out
    assert all(str(pid) in out for pid in pids)
    for word in ("counter", "kv", "modify", "p99 ms", "cache hit", "checkpoint"):
        assert word in out, out
    result = run_status(node.config, "--json")
    assert result.returncode == 0
    assert json.loads(result.stdout)["cages"][0]["cage"] == "demo"

    assert node.stop() == 0
    assert not list((node.config.parent / "var" / "run" / "test.demo").iterdir())
    result = run_status(node.config)
    assert result.returncode == 3
    assert "not running" in result.stderr and len(result.stderr.splitlines()) == 1


def test_status_never_shows_less_than_an_answer_before(node_factory: Callable[..., Node]) -> None:
    """All the load on one worker (one keep-alive connection), then `/_status` on fresh
    connections, answered by either worker: none shows less than the first that showed the load.
    (An answering worker used to show its in-memory figures without writing them: its sibling,
    answering next, read its older file and showed 0 requests. `pmnc-runtime status` right
    after a load did.)"""
    node = node_factory(EXAMPLES, workers=2, threads=4).start()
    calls = 50
    increment_concurrently(node.port, "one", threads=1, per_thread=calls, timeout=30)
    wait_status(node.port, lambda d: d["requests"] >= calls and modify_ops(d) >= calls)
    for _ in range(20):
        code, doc = get_status(node.port)
        assert code == 200, doc
        assert doc["requests"] >= calls and modify_ops(doc) >= calls, doc
    assert node.stop() == 0


def test_status_answers_under_load_and_counts_restarts(node_factory: Callable[..., Node]) -> None:
    node = node_factory(EXAMPLES, workers=2, threads=4).start()
    stop = threading.Event()
    done: list[int] = []
    failures: list[BaseException] = []

    def hammer() -> None:
        client = Client(node.port)
        try:
            while not stop.is_set():
                client.result("counter", "increment", name="busy")
                done.append(1)
        except BaseException as e:
            failures.append(e)
        finally:
            client.close()

    pool = [threading.Thread(target=hammer) for _ in range(4)]
    for t in pool:
        t.start()
    try:
        slowest = 0.0
        for _ in range(10):
            start = time.monotonic()
            code, doc = get_status(node.port, timeout=5)
            slowest = max(slowest, time.monotonic() - start)
            assert code == 200, doc
            assert len(doc["workers"]) == 2
            time.sleep(0.2)
        assert slowest < 2.0, f"/_status took {slowest:.2f} s under load"
        doc = wait_status(node.port, lambda d: d["safes"]["counter"]["ops_per_s"] > 0)
    finally:
        stop.set()
        for t in pool:
            t.join(15)
    assert not [t for t in pool if t.is_alive()], "client threads deadlocked"
    assert not failures, failures
    assert len(done) > 0

    # A worker killed: its slot is refilled and its restart counted.
    victim = doc["workers"][0]
    mark = node.log_size()
    os.kill(victim["pid"], signal.SIGKILL)
    node.wait_log("serving again", 10, since=mark)
    wait_serving(node.port, 5)
    doc = wait_status(node.port, lambda d: victim["pid"] not in {w["pid"] for w in d["workers"]})
    assert {w["pid"] for w in doc["workers"]} == set(worker_pids(node.pid))
    restarts = {w["slot"]: w["restarts"] for w in doc["workers"]}
    assert restarts[victim["slot"]] >= 1, doc
    assert node.stop() == 0


def test_status_of_a_cage_without_http(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "quiet.yaml", EXAMPLES, None, node="quiet", cage="backstage", workers=2
    )
    node = Node(config, 0, tmp_path / "quiet.log")  # no http
    try:
        node.start()
        deadline = time.monotonic() + 5
        while True:  # until both workers have written their first report
            result = run_status(config, "--json")
            assert result.returncode == 0, result.stderr
            doc = json.loads(result.stdout)["cages"][0]
            if all(w["report_age_s"] is not None for w in doc["workers"]):
                break
            assert time.monotonic() < deadline, doc
            time.sleep(0.1)
        assert {w["pid"] for w in doc["workers"]} == set(worker_pids(node.pid))
        assert doc["address"] is None and set(doc["safes"]) == {"counter", "kv"}
        result = run_status(config)
        assert result.returncode == 0
        assert "cage backstage of node quiet on no http interface" in result.stdout
        assert node.stop() == 0
        result = run_status(config)
        assert result.returncode == 3 and "not running" in result.stderr
    finally:
        node.kill_group()
