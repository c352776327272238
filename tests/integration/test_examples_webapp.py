"""The web-application example modules on a real node: sessions expire, the limiter is exact."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from helpers import Client, Node, once

WEBAPP = Path(__file__).resolve().parents[2] / "examples" / "webapp" / "modules"
T0 = 1_700_000_000.0  # the stepped clock's start


def test_sessions_expire_slide_and_purge(tmp_path: Path, node_factory: Callable[..., Node]) -> None:
    """The example's own code, with its private `_clock` reading a file the test steps: expiry
    is checked at exact times, never by sleeping."""
    clock = tmp_path / "clock"
    modules = tmp_path / "modules"
    modules.mkdir()
    source = (WEBAPP / "sessions.py").read_text()
    (modules / "sessions.py").write_text(
        source + f"\n\ndef _clock() -> float:\n    return float(open({str(clock)!r}).read())\n"
    )
    node = node_factory(modules, workers=2, threads=2).start()
    client = Client(node.port)

    def call(function: str, at: float, **kwargs: object) -> Any:
        clock.write_text(repr(T0 + at))
        return client.result("sessions", function, **kwargs)

    made = call("create", 0, user="alice", ttl=60, data={"cart": 1})
    token = made["token"]
    assert made["expires"] == T0 + 60
    assert call("get", 30, token=token)["user"] == "alice"
    touched = call("touch", 40, token=token, data={"page": 2})
    assert touched["data"] == {"cart": 1, "page": 2}
    assert touched["expires"] == T0 + 100
    assert call("get", 90, token=token) is not None, "90 s after creation, 50 s after the touch"
    short = call("create", 90, user="bob", ttl=5)["token"]
    assert call("count", 90) == 2
    assert call("count", 95) == 1, "bob's session ends at 95 s"
    assert call("get", 100, token=token) is None, "alice's ends at 100 s"
    assert call("touch", 99, token=short) is None, "expired is for good"
    assert call("count", 99) == 1
    assert call("purge", 99) == 1  # bob's
    assert call("purge", 100) == 1  # alice's
    assert call("count", 100) == 0
    status, answer = client.call("sessions", "create", user="carol", ttl=-1)
    assert status == 500 and answer["error"].startswith("ValueError: ttl")
    status, answer = client.call("sessions", "get", token=token, now=0)
    assert status == 400, "a client cannot pass its own clock"
    assert call("delete", 100, token=short) is False
    client.close()
    assert node.stop() == 0


def test_the_example_sessions_use_the_real_clock(node_factory: Callable[..., Node]) -> None:
    node = node_factory(WEBAPP, workers=1, threads=2).start()
    client = Client(node.port)
    live = client.result("sessions", "create", user="dave")["token"]
    assert client.result("sessions", "get", token=live)["user"] == "dave"
    assert client.result("sessions", "count") == 1
    assert client.result("sessions", "delete", token=live) is True
    client.close()
    assert node.stop() == 0


def test_rate_limit_grants_exactly_the_burst_to_concurrent_requests(
    node_factory: Callable[..., Node],
) -> None:
    node = node_factory(WEBAPP, workers=2, threads=4).start()
    allowed: list[bool] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def hammer() -> None:
        client = Client(node.port)
        try:
            for _ in range(25):
                # rate 0: no refill, so exactly `burst` requests in all may pass.
                answer = client.result("ratelimit", "allow", client="c1", rate=0, burst=30)
                with lock:
                    allowed.append(answer["allowed"])
        except BaseException as e:
            errors.append(e)
        finally:
            client.close()

    threads = [threading.Thread(target=hammer) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not [t for t in threads if t.is_alive()], "client threads deadlocked"
    assert not errors, errors
    assert len(allowed) == 150
    assert sum(allowed) == 30, f"{sum(allowed)} allowed, the burst is 30"
    assert once(node.port, "ratelimit", "allow", client="c2", rate=0, burst=1)["allowed"]
    assert once(node.port, "ratelimit", "reset", client="c1") is True
    assert node.stop() == 0
