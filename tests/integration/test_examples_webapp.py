"""The web-application example modules on a real node: sessions expire (the safe's `ttl`), the
limiter is exact."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from helpers import Client, Node, once

WEBAPP = Path(__file__).resolve().parents[2] / "examples" / "webapp" / "modules"


def test_sessions_expire_slide_and_are_counted_out(node_factory: Callable[..., Node]) -> None:
    """Real short expiries on a node of 2 workers: each check is made where the times measured
    around the call make its answer certain (a session is live when the call returned before
    its expiry, gone when it started after it), with wide margins for a loaded machine."""
    node = node_factory(WEBAPP, workers=2, threads=2).start()
    client = Client(node.port)

    def call(function: str, **kwargs: object) -> tuple[float, float, Any]:
        before = time.time()
        result = client.result("sessions", function, **kwargs)
        return before, time.time(), result

    def sleep_until(t: float) -> None:
        time.sleep(max(0.0, t - time.time()))

    _, made_at, made = call("create", user="alice", ttl=2.0, data={"cart": 1})
    token = made["token"]
    assert made["user"] == "alice" and made["expires_in"] == 2.0
    assert call("get", token=token)[2]["user"] == "alice"
    assert call("count")[2] == 1
    _, bob_at, short = call("create", user="bob", ttl=0.5)
    sleep_until(bob_at + 0.6)  # bob's session is gone
    assert call("get", token=short["token"])[2] is None
    assert call("touch", token=short["token"])[2] is None, "expired is for good"
    assert call("count")[2] == 1
    touched_at, _, touched = call("touch", token=token, data={"page": 2})
    assert touched["data"] == {"cart": 1, "page": 2}
    sleep_until(made_at + 2.2)  # past alice's first expiry, before the touched one
    _, after, live = call("get", token=token)
    if after < touched_at + 2.0:
        assert live is not None and live["data"] == {"cart": 1, "page": 2}
        assert 0 < live["expires_in"] <= 2.0
    sleep_until(touched_at + 2.0 + 0.2)  # the touched expiry has passed too
    assert call("get", token=token)[2] is None
    assert call("count")[2] == 0
    status, answer = client.call("sessions", "create", user="carol", ttl=-1)
    assert status == 500 and answer["error"].startswith("ValueError: ttl")
    status, answer = client.call("sessions", "get", token=token, now=0)
    assert status == 400, "a client cannot pass its own clock"
    assert call("delete", token=short["token"])[2] is False
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
