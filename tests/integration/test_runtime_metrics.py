"""`GET /metrics` on a real node: parsed by Prometheus' own parser, counters never going back
across scrapes answered by different workers, a `kill -9` of a worker, and a reload."""

from __future__ import annotations

import http.client
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from helpers import (
    EXAMPLES,
    Client,
    Node,
    increment_concurrently,
    wait_serving,
    worker_pids,
    write_config,
)
from pmnc.runtime import metrics
from prometheus_client.parser import text_string_to_metric_families

REQUIRED = (
    "pmnc_requests",  # the parser names counter families without their _total
    "pmnc_request_duration_seconds",
    "pmnc_safe_operations",
    "pmnc_safe_operation_duration_seconds",
    "pmnc_safe_retries",
    "pmnc_safe_log_bytes",
    "pmnc_safe_checkpoint_age_seconds",
    "pmnc_worker_restarts",
    "pmnc_recoveries",
    "pmnc_connections",
)
INCREMENT = (("code", "200"), ("function", "increment"), ("module", "counter"))
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class Scraper:
    """Scrapes a cage, over HTTP (a fresh connection each time, so any worker may answer) or
    from its run directory, and asserts that no counter or histogram sample ever goes back."""

    def __init__(self, node: Node, *, over_http: bool = True) -> None:
        self.node = node
        self.over_http = over_http
        self.run_dir = node.config.parent / "var" / "run" / "test.demo"
        self.seen: Samples = {}
        self.scrapes = 0
        self.attempts = 0

    def http(self, timeout: float = 5.0) -> Samples:
        conn = http.client.HTTPConnection("127.0.0.1", self.node.port, timeout=timeout)
        try:
            conn.request("GET", metrics.METRICS_PATH, headers={"Connection": "close"})
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        assert response.status == 200, (response.status, body[:500])
        assert response.getheader("Content-Type") == metrics.CONTENT_TYPE
        return self._check(body.decode())

    def files(self) -> Samples:
        return self._check(metrics.cage_metrics(self.run_dir))

    def until(self, ok: Callable[[Samples], bool], timeout: float = 10.0) -> Samples:
        """Scrape over HTTP (and from the files, in turn) until `ok` holds; connection errors
        are tolerated while the cage restarts, a scrape that goes back never is."""
        deadline = time.monotonic() + timeout
        while True:
            self.attempts += 1
            try:
                from_files = not self.over_http or self.attempts % 3 == 0
                samples = self.files() if from_files else self.http(timeout=2.0)
            except (OSError, http.client.HTTPException):
                samples = None
            if samples is not None and ok(samples):
                return samples
            assert time.monotonic() < deadline, f"never matched; last scrape: {samples}"
            time.sleep(0.05)

    def _check(self, text: str) -> Samples:
        self.scrapes += 1
        families = {f.name: f for f in text_string_to_metric_families(text)}
        missing = [name for name in REQUIRED if name not in families]
        assert not missing, f"missing {missing} in:\n{text}"
        samples: Samples = {}
        for family in families.values():
            for s in family.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                samples[key] = s.value
                if family.type in ("counter", "histogram") and key in self.seen:
                    assert s.value >= self.seen[key], f"{key}: {self.seen[key]} -> {s.value}"
                if family.type in ("counter", "histogram"):
                    self.seen[key] = max(s.value, self.seen.get(key, 0.0))
        return samples


def get(samples: Samples, name: str, *labels: tuple[str, str]) -> float:
    return samples.get((name, tuple(sorted(labels))), 0.0)


def calls(samples: Samples) -> float:
    return get(samples, "pmnc_requests_total", *INCREMENT)


def modify_ops(samples: Samples) -> float:
    return get(samples, "pmnc_safe_operations_total", ("op", "modify"), ("safe", "counter"))


def test_metrics_are_parsed_and_never_go_back_across_a_kill_9(
    node_factory: Callable[..., Node],
) -> None:
    node = node_factory(EXAMPLES, workers=2, threads=4).start()
    scraper = Scraper(node)
    first = scraper.http()
    assert get(first, "pmnc_worker_restarts_total") == 0
    assert get(first, "pmnc_recoveries_total") == 0

    increment_concurrently(node.port, "m", threads=4, per_thread=25, timeout=30)
    client = Client(node.port)
    try:
        for _ in range(3):
            assert client.call("nope", "x")[0] == 404
    finally:
        client.close()
    load = scraper.until(lambda s: calls(s) >= 100 and modify_ops(s) >= 100)
    assert calls(load) == 100
    # Requests that reached no function: no label from the client's path.
    unrouted = get(load, "pmnc_requests_total", ("code", "404"), ("function", ""), ("module", ""))
    assert unrouted == 3
    names = {labels for (name, labels) in load if name == "pmnc_requests_total"}
    assert not [labels for labels in names if ("module", "nope") in labels], names
    fn = (("function", "increment"), ("module", "counter"))
    assert get(load, "pmnc_request_duration_seconds_count", *fn) == 100
    assert get(load, "pmnc_request_duration_seconds_bucket", *fn, ("le", "+Inf")) == 100
    assert get(load, "pmnc_request_duration_seconds_sum", *fn) > 0
    modify = (("op", "modify"), ("safe", "counter"))
    assert get(load, "pmnc_safe_operation_duration_seconds_count", *modify) >= 100
    assert get(load, "pmnc_safe_log_bytes", ("safe", "counter")) > 0
    assert sum(v for (name, _), v in load.items() if name == "pmnc_connections") >= 0

    victim = worker_pids(node.pid)[0]
    mark = node.log_size()
    os.kill(victim, signal.SIGKILL)
    node.wait_log("serving again", 10, since=mark)
    wait_serving(node.port, 5)
    after = scraper.until(lambda s: get(s, "pmnc_recoveries_total") >= 1)
    assert calls(after) >= 100, "the killed workers' requests are still counted"
    assert modify_ops(after) >= 100
    # A crash restarts the whole cage: both workers were replaced, once each.
    assert get(after, "pmnc_worker_restarts_total") == 2
    assert get(after, "pmnc_recoveries_total") == 1

    increment_concurrently(node.port, "m", threads=2, per_thread=25, timeout=30)
    scraper.until(lambda s: calls(s) >= 150)
    assert scraper.scrapes >= 4
    assert node.stop() == 0
    assert not list(scraper.run_dir.iterdir()), "every report and the totals removed at stop"


def test_a_reload_keeps_the_counts_of_the_workers_it_replaces(
    node_factory: Callable[..., Node],
) -> None:
    node = node_factory(EXAMPLES, workers=2, threads=4).start()
    scraper = Scraper(node)
    increment_concurrently(node.port, "r", threads=2, per_thread=20, timeout=30)
    scraper.until(lambda s: calls(s) >= 40)
    before = set(worker_pids(node.pid))
    mark = node.log_size()
    node.signal(signal.SIGHUP)
    node.wait_log("reloaded", 15, since=mark)

    def replaced(_: Any) -> bool:  # the old generation reaped (folded), the new one serving
        return not before & set(worker_pids(node.pid))

    samples = scraper.until(replaced)
    assert calls(samples) >= 40  # the old workers left their last figures, folded since
    assert get(samples, "pmnc_worker_restarts_total") == 0, "a reload restarts nothing"
    assert get(samples, "pmnc_recoveries_total") == 0
    assert node.stop() == 0


def test_a_cage_without_http_is_read_from_its_files(tmp_path: Path) -> None:
    config = write_config(tmp_path / "quiet.yaml", EXAMPLES, None, workers=1)  # no http
    node = Node(config, 0, tmp_path / "quiet.log")
    try:
        node.start()
        samples = Scraper(node, over_http=False).until(
            lambda s: (
                get(s, "pmnc_workers") == 1 and ("pmnc_safe_log_bytes", (("safe", "kv"),)) in s
            )
        )
        assert get(samples, "pmnc_safe_log_bytes", ("safe", "kv")) > 0
        assert get(samples, "pmnc_worker_restarts_total") == 0
        assert node.stop() == 0
    finally:
        node.kill_group()
