"""Stopping and restarting under pressure: 503 on a safe needing recovery, a second SIGINT, the
graceful deadline, and the restart backoff of a cage that keeps dying."""

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
    wait_serving,
    wait_started,
    worker_pids,
    write_modules,
)

SLOW_AND_PANIC = """
    import time
    from pmnc.safe import SafeNeedsRecoveryError

    def wait(seconds=1.0, started=None):
        _started(started)
        time.sleep(seconds)
        return "done"

    def panic():
        raise SafeNeedsRecoveryError(pmnc_safe.path, "test", "simulated panic", "recover")
"""


def modules(tmp_path: Path) -> Path:
    directory = tmp_path / "modules"
    shutil.copytree(EXAMPLES, directory)
    return write_modules(directory, {"probe": SLOW_AND_PANIC + STARTED})


def background_call(
    port: int, answers: list[object], started: Path, **kwargs: object
) -> threading.Thread:
    """Call probe.wait in a thread; return once it is running in a worker.

    `answers` gets what the client saw: the (status, body) or the exception it raised.
    """

    def run() -> None:
        client = Client(port)
        try:
            answers.append(client.call("probe", "wait", started=str(started), **kwargs))
        except BaseException as e:
            answers.append(e)
        finally:
            client.close()

    thread = threading.Thread(target=run)
    thread.start()
    wait_started(started)
    return thread


def cut_off(answer: object) -> bool:
    """Whether the client lost its connection (not a timeout, not an HTTP answer)."""
    return isinstance(answer, OSError | http.client.HTTPException) and not isinstance(
        answer, TimeoutError
    )


def test_a_safe_needing_recovery_answers_503_and_the_cage_is_recovered(
    tmp_path: Path, node_factory: Callable[..., Node]
) -> None:
    node = node_factory(modules(tmp_path), workers=2, threads=2).start()
    once(node.port, "counter", "increment")
    mark = node.log_size()
    client = Client(node.port)
    status, answer = client.call("probe", "panic")
    client.close()
    assert status == 503
    assert answer["error"].startswith("SafeNeedsRecoveryError: ")
    text = node.wait_log("serving again", 10, since=mark)
    assert "exited leaving a safe to recover" in text and "recovered 3 safe(s)" in text
    assert wait_serving(node.port, 5) < 5
    assert once(node.port, "counter", "increment") == 2
    assert node.stop() == 0


def test_a_second_sigint_stops_at_once(tmp_path: Path, node_factory: Callable[..., Node]) -> None:
    node = node_factory(modules(tmp_path), workers=1, threads=2, graceful_timeout=60).start()
    answers: list[object] = []
    slow = background_call(node.port, answers, tmp_path / "started", seconds=30)
    node.signal(signal.SIGINT)
    node.wait_log("SIGINT: stopping gracefully", 5)
    started = time.monotonic()
    node.signal(signal.SIGINT)
    code = node.wait(10)
    assert time.monotonic() - started < 5
    assert code == 130
    slow.join(10)
    assert not slow.is_alive()
    assert len(answers) == 1 and cut_off(answers[0]), answers  # its worker was killed
    assert node.wait_group_gone(5)
    node.start()  # the safes were recovered on the way out
    assert once(node.port, "counter", "increment") == 1
    assert node.stop() == 0


def test_a_request_running_past_the_graceful_timeout_is_cut_and_the_safes_recovered(
    tmp_path: Path, node_factory: Callable[..., Node]
) -> None:
    node = node_factory(modules(tmp_path), workers=1, threads=2, graceful_timeout=0.5).start()
    answers: list[object] = []
    slow = background_call(node.port, answers, tmp_path / "started", seconds=20)
    started = time.monotonic()
    assert node.stop(timeout=15) == 0
    assert time.monotonic() - started < 8
    slow.join(10)
    assert not slow.is_alive()
    assert len(answers) == 1 and cut_off(answers[0]), answers  # its worker was killed
    text = node.text()
    assert "still running after 0.5 s" in text and "recovered 3 safe(s)" in text
    node.start()
    assert once(node.port, "counter", "increment") == 1
    assert node.stop() == 0


def test_a_cage_that_keeps_dying_backs_off_and_says_so(
    tmp_path: Path, node_factory: Callable[..., Node]
) -> None:
    node = node_factory(modules(tmp_path), workers=1, threads=1).start()
    for _ in range(3):
        mark = node.log_size()
        pids = worker_pids(node.pid)
        assert len(pids) == 1
        os.kill(pids[0], signal.SIGKILL)
        node.wait_log("serving again", 10, since=mark)
    text = node.text()
    assert "keeps dying (2 crashes in a row): next start in 0.1 s" in text
    assert "keeps dying (3 crashes in a row): next start in 0.2 s" in text
    assert once(node.port, "counter", "increment") == 1
    assert node.stop() == 0
