"""Chaos on a running node: kill -9 of random workers, and of the whole tree, under HTTP writes.

Client threads write unique keys and log every acknowledged (200) write with its time. After
the chaos every acknowledged write must be in the safe; the failed-request fraction is printed;
with kills spaced as a real crash would be, the longest stretch without any acknowledgement
must stay under GAP_BOUND (the contract: a cage serves again within about a second).
"""

from __future__ import annotations

import http.client
import itertools
import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import Client, Node, worker_pids, write_modules
from pmnc.safe import Safe, verify

pytestmark = pytest.mark.stress

GAP_BOUND = 2.5  # seconds without any acknowledged write, kills at least 1.5 s apart
CHK = """
pmnc_safe = globals()["pmnc_safe"]


def put(key, value):
    pmnc_safe[key] = value


def missing(keys):
    return [k for k in keys if pmnc_safe.get(k) != k]
"""


class Writers:
    """Writer threads: unique keys (value = key); acknowledged keys and times, failures by kind."""

    def __init__(self, port: int, threads: int, prefix: str = "w") -> None:
        self.port = port
        self.prefix = prefix
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.acked: list[str] = []
        self.times: list[float] = []
        self.failed: Counter[str] = Counter()
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def __enter__(self) -> Writers:
        self.started = time.monotonic()
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)
        assert not [t for t in self.threads if t.is_alive()], "writer threads deadlocked"
        assert not self.errors, self.errors[:3]

    def _run(self, index: int) -> None:
        client = Client(self.port, timeout=10.0)
        n = 0
        try:
            while not self.stop.is_set():
                key = f"{self.prefix}{index}-{n}"
                n += 1
                try:
                    status, answer = client.call("chk", "put", key=key, value=key)
                    kind = str(status)
                except (OSError, http.client.HTTPException, ValueError) as e:
                    status, answer, kind = 0, None, type(e).__name__
                with self.lock:
                    if status == 200:
                        self.acked.append(key)
                        self.times.append(time.monotonic())
                    else:
                        self.failed[kind] += 1
                if status != 200:
                    assert status in (0, 503), (status, answer)  # never a half-done 500
                    time.sleep(0.01)
        except BaseException as e:
            self.errors.append(e)
        finally:
            client.close()

    def longest_gap(self) -> float:
        with self.lock:
            times = sorted([self.started, *self.times])
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)

    def report(self, what: str) -> str:
        failed = sum(self.failed.values())
        total = failed + len(self.acked)
        return (
            f"{what}: {len(self.acked)} acknowledged, {failed} failed of {total} "
            f"({100 * failed / max(1, total):.2f}%: {dict(self.failed)}), "
            f"longest gap {self.longest_gap():.3f} s"
        )


def missing_over_http(port: int, keys: list[str]) -> list[str]:
    client = Client(port, timeout=30.0)
    try:
        lost: list[str] = []
        for i in range(0, len(keys), 2000):
            lost += client.result("chk", "missing", keys=keys[i : i + 2000])
        return lost
    finally:
        client.close()


def kill_random_workers(node: Node, seconds: float, low: float, high: float) -> int:
    rng = random.Random()
    deadline = time.monotonic() + seconds
    kills = 0
    while True:
        time.sleep(rng.uniform(low, high))
        if time.monotonic() > deadline:
            return kills
        pids = worker_pids(node.pid)
        assert node.proc is not None and node.proc.poll() is None, node.text()
        if pids:
            try:
                os.kill(rng.choice(pids), signal.SIGKILL)
                kills += 1
            except ProcessLookupError:
                pass


def test_random_worker_kills_lose_no_acknowledged_write_and_service_gaps_stay_short(
    tmp_path: Path, node_factory: Callable[..., Node], stress_seconds: float
) -> None:
    modules = write_modules(tmp_path / "modules", {"chk": CHK})
    node = node_factory(modules, workers=4, threads=4).start()
    with Writers(node.port, threads=6) as writers:
        kills = kill_random_workers(node, max(stress_seconds, 4.0), 1.5, 3.0)
        time.sleep(1.0)  # the last kill is served again before the writers stop
    print("\n" + writers.report(f"{kills} worker kills"))
    assert kills >= 1
    assert node.text().count("serving again") >= kills
    assert node.stop() == 0
    safe_dir = tmp_path / "var" / "safe" / "test.demo.chk"
    with Safe.open(safe_dir, create=False) as safe:
        lost = [k for k in writers.acked if safe.get(k) != k]
    assert not lost, f"{len(lost)} of {len(writers.acked)} acknowledged writes lost: {lost[:5]}"
    verify(safe_dir)
    assert writers.longest_gap() < GAP_BOUND, writers.report("gap")


def test_rapid_worker_kills_even_during_recovery_lose_nothing(
    tmp_path: Path, node_factory: Callable[..., Node], stress_seconds: float
) -> None:
    """Kills faster than the cage restarts: back-off, but no loss, and service comes back."""
    modules = write_modules(tmp_path / "modules", {"chk": CHK})
    node = node_factory(modules, workers=3, threads=4).start()
    with Writers(node.port, threads=4) as writers:
        kills = kill_random_workers(node, stress_seconds, 0.05, 0.6)
        mark = len(writers.acked)
        started = time.monotonic()
        deadline = started + 15  # past the longest restart back-off (5 s) and a recovery
        while len(writers.acked) == mark and time.monotonic() < deadline:
            time.sleep(0.05)
        back = time.monotonic() - started
        assert len(writers.acked) > mark, "no write acknowledged after the kills stopped"
        assert back < 7, f"served again only {back:.1f} s after the last kill"
    print("\n" + writers.report(f"{kills} rapid kills, served again {back:.2f} s after the last"))
    assert node.stop() == 0
    safe_dir = tmp_path / "var" / "safe" / "test.demo.chk"
    with Safe.open(safe_dir, create=False) as safe:
        lost = [k for k in writers.acked if safe.get(k) != k]
    assert not lost, f"{len(lost)} of {len(writers.acked)} acknowledged writes lost: {lost[:5]}"
    verify(safe_dir)


def test_whole_tree_kill_9_then_restart_in_a_loop_loses_nothing(
    tmp_path: Path, node_factory: Callable[..., Node], stress_seconds: float
) -> None:
    modules = write_modules(tmp_path / "modules", {"chk": CHK})
    node = node_factory(modules, workers=2, threads=4).start()
    rng = random.Random()
    deadline = time.monotonic() + stress_seconds
    acked: list[str] = []
    rounds = 0
    restarts: list[float] = []
    while rounds < 2 or time.monotonic() < deadline:
        with Writers(node.port, threads=4, prefix=f"r{rounds}-") as writers:
            time.sleep(rng.uniform(0.3, 1.2))
            os.killpg(node.pid, signal.SIGKILL)
            assert node.wait(10) == -signal.SIGKILL
            assert node.wait_group_gone(10), "processes survived SIGKILL of the group"
        acked += writers.acked
        rounds += 1
        started = time.monotonic()
        node.start()
        restarts.append(time.monotonic() - started)
        lost = missing_over_http(node.port, acked)
        assert not lost, f"round {rounds}: {len(lost)} of {len(acked)} lost: {lost[:5]}"
    print(
        f"\n{rounds} whole-tree kills, {len(acked)} acknowledged writes, none lost; "
        f"restart to ready max {max(restarts):.2f} s"
    )
    assert node.stop() == 0
    verify(tmp_path / "var" / "safe" / "test.demo.chk")
