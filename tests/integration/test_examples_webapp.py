"""The web-application example modules on a real node: sessions expire, the limiter is exact."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from helpers import Client, Node, once

WEBAPP = Path(__file__).resolve().parents[2] / "examples" / "webapp" / "modules"


def test_sessions_expire_slide_and_purge(node_factory: Callable[..., Node]) -> None:
    node = node_factory(WEBAPP, workers=2, threads=2).start()
    client = Client(node.port)
    made = client.result("sessions", "create", user="alice", ttl=0.6, data={"cart": 1})
    token = made["token"]
    assert client.result("sessions", "get", token=token)["user"] == "alice"
    time.sleep(0.4)
    touched = client.result("sessions", "touch", token=token, data={"page": 2})
    assert touched["data"] == {"cart": 1, "page": 2}
    time.sleep(0.4)  # 0.8 s after creation, 0.4 s after the touch: still live
    assert client.result("sessions", "get", token=token) is not None
    short = client.result("sessions", "create", user="bob", ttl=0.2)["token"]
    assert client.result("sessions", "count") == 2
    time.sleep(0.7)
    assert client.result("sessions", "get", token=token) is None
    assert client.result("sessions", "touch", token=short) is None, "expired is for good"
    assert client.result("sessions", "purge") == 2
    assert client.result("sessions", "count") == 0
    status, answer = client.call("sessions", "create", user="carol", ttl=-1)
    assert status == 500 and answer["error"].startswith("ValueError: ttl")
    assert client.result("sessions", "delete", token=short) is False
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
