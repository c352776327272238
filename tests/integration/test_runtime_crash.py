"""Crashes under load: kill -9 of a worker, of the whole tree, a hung worker, a lost supervisor.

Every write a client saw acknowledged (200) must be there afterwards; Berkeley DB locks left by a
dead worker must not freeze the cage (the supervisor kills and recovers: docs/berkeleydb.md,
"Why the supervisor kills the rest of the cage").
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

from helpers import (
    EXAMPLES,
    STARTED,
    Client,
    Node,
    once,
    wait_gone,
    wait_serving,
    wait_started,
    worker_pids,
    write_modules,
)
from pmnc.safe import Safe


class Writers:
    """Client threads writing unique keys (value = key) and recording every acknowledged one."""

    def __init__(self, port: int, threads: int = 4) -> None:
        self.port = port
        self.stop = threading.Event()
        self.acked: list[str] = []
        self.failed = 0
        self.last_ack = 0.0
        self.lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)
        ]

    def __enter__(self) -> Writers:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)
        assert not [t for t in self.threads if t.is_alive()], "writer threads deadlocked"

    def _run(self, index: int) -> None:
        client = Client(self.port, timeout=10.0)
        n = 0
        while not self.stop.is_set():
            key = f"w{index}-{n}"
            n += 1
            try:
                status, _ = client.call("kv", "put", key=key, value=key)
            except (OSError, http.client.HTTPException, ValueError):
                status = 0
                client.close()
                time.sleep(0.01)
            with self.lock:
                if status == 200:
                    self.acked.append(key)
                    self.last_ack = time.monotonic()
                else:
                    self.failed += 1
        client.close()

    def count(self) -> int:
        with self.lock:
            return len(self.acked)


SLOW = """
    import time

    def wait(seconds=1.0, started=None):
        _started(started)
        time.sleep(seconds)
        return 1
"""


def modules(tmp_path: Path) -> Path:
    directory = tmp_path / "modules"
    shutil.copytree(EXAMPLES, directory)
    return directory


def test_kill_9_of_a_worker_under_load_loses_no_acknowledged_write(
    tmp_path: Path, node_factory: Callable[..., Node]
) -> None:
    node = node_factory(modules(tmp_path), workers=2, threads=4).start()
    victims = worker_pids(node.pid)
    assert len(victims) == 2
    with Writers(node.port) as writers:
        time.sleep(1.0)
        before = writers.count()
        assert before > 0
        mark = node.log_size()
        killed_at = time.monotonic()
        os.kill(victims[0], signal.SIGKILL)
        # Until the supervisor acts the other worker may still answer: measure to the moment
        # the new workers are all ready *and* a fresh connection is served.
        node.wait_log("serving again", 10, since=mark)
        wait_serving(node.port, 10)
        serving_after = time.monotonic() - killed_at
        time.sleep(1.0)
        after = writers.count()
    assert after > before, "no write acknowledged after the crash"
    assert serving_after < 3.0, f"cage took {serving_after:.2f} s to serve again"
    text = node.text(mark)
    assert f"worker {victims[0]} killed by SIGKILL" in text
    assert "recovered 2 safe(s)" in text
    new = worker_pids(node.pid)
    assert len(new) == 2 and not set(new) & set(victims), "the whole cage is replaced"
    print(f"kill -9 -> serving again in {serving_after:.3f} s; {after} writes acknowledged")
    assert node.stop() == 0
    with Safe.open(tmp_path / "var" / "safe" / "test.demo.kv", create=False) as kv:
        missing = [k for k in writers.acked if kv.get(k) != k]
    assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:5]}"


def test_kill_9_of_the_whole_tree_under_load_then_restart_loses_nothing(
    tmp_path: Path, node_factory: Callable[..., Node]
) -> None:
    node = node_factory(modules(tmp_path), workers=2, threads=4).start()
    with Writers(node.port) as writers:
        time.sleep(1.5)
        os.killpg(node.pid, signal.SIGKILL)
        assert node.wait(5) == -signal.SIGKILL
        assert node.wait_group_gone(10)
        acked = list(writers.acked)  # nothing can be acknowledged any more
    assert acked
    node.start()
    stored = set(once(node.port, "kv", "keys", prefix="w"))
    missing = [k for k in acked if k not in stored]
    assert not missing, f"{len(missing)} of {len(acked)} acknowledged writes lost: {missing[:5]}"
    assert node.stop() == 0


def test_a_hung_worker_is_killed_and_the_cage_recovers(
    tmp_path: Path, node_factory: Callable[..., Node]
) -> None:
    node = node_factory(modules(tmp_path), workers=2, threads=2, heartbeat_timeout=1).start()
    victim = worker_pids(node.pid)[0]
    mark = node.log_size()
    os.kill(victim, signal.SIGSTOP)
    text = node.wait_log("serving again", 10, since=mark)
    assert f"worker {victim} serving but silent for" in text
    assert victim not in worker_pids(node.pid)
    assert wait_serving(node.port, 5) < 5
    assert once(node.port, "counter", "increment") == 1
    assert node.stop() == 0


def test_workers_exit_by_themselves_when_the_supervisor_is_gone(
    tmp_path: Path, node_factory: Callable[..., Node]
) -> None:
    node = node_factory(modules(tmp_path), workers=2, threads=2, heartbeat_timeout=2).start()
    once(node.port, "counter", "increment")
    mark = node.log_size()
    os.kill(node.pid, signal.SIGKILL)
    assert node.wait(5) == -signal.SIGKILL
    assert node.wait_group_gone(10), "workers outlived their supervisor"
    assert node.text(mark).count("the supervisor is gone") == 2
    node.start()  # the workers closed their safes: a plain start
    assert once(node.port, "counter", "get") == 1
    assert node.stop() == 0


def test_a_crash_during_a_graceful_stop_still_exits_zero_with_safes_recovered(
    tmp_path: Path, node_factory: Callable[..., Node]
) -> None:
    directory = modules(tmp_path)
    write_modules(directory, {"slow": SLOW + STARTED})
    node = node_factory(directory, workers=2, threads=2, graceful_timeout=10).start()
    answers: list[object] = []
    started = tmp_path / "started"

    def call_slow() -> None:
        client = Client(node.port)
        try:
            answers.append(client.call("slow", "wait", seconds=20, started=str(started)))
        except BaseException as e:
            answers.append(e)
        finally:
            client.close()

    slow = threading.Thread(target=call_slow)
    slow.start()
    busy = wait_started(started)  # the request is in flight in worker `busy`
    victims = worker_pids(node.pid)
    assert busy in victims and len(victims) == 2
    idle = [pid for pid in victims if pid != busy]
    node.signal(signal.SIGTERM)
    assert wait_gone(idle, node.pid, 10), "the idle worker did not leave"
    os.kill(busy, signal.SIGKILL)  # the busy one is still draining (20 s to go)
    slow.join(15)
    assert not slow.is_alive()
    assert len(answers) == 1, answers
    assert isinstance(answers[0], OSError | http.client.HTTPException), answers
    assert not isinstance(answers[0], TimeoutError), answers
    assert node.wait(15) == 0
    assert "killed by SIGKILL" in node.text() and "recovered 3 safe(s)" in node.text()
    assert node.wait_group_gone(5)
    node.start()
    assert once(node.port, "counter", "increment") == 1
    assert node.stop() == 0
