"""What the node-group tests share (test_group.py, test_group_faults.py, test_group_status.py):
starting a group of real nodes on this machine and waiting for it to form, and reading each
node's view of its safes' replication from `/_status`. The `group` and `connect` fixtures
built on these are in tests/integration/conftest.py."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from typing import Any

from pmnc.runtime.harness import TRANSPORT_ERRORS, Client, NodeProcess

FAILOVER_S = 10.0  # the contract's bound for serving writes again while a majority is up
FORM_S = 40.0  # a fresh group forms in ~10-15 s on 2 cores (README); margin for a loaded CI


def eventually(check: Callable[[], object], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout:g} s: {what or check}"
        time.sleep(0.05)


def put_acknowledged(client: Client, key: str, value: object, timeout: float = 10.0) -> None:
    """kv.put until the group acknowledges it. A put is idempotent, so a write that came back
    SafeNotAcknowledgedError (committed on the master, outcome unknown: README, "Replicated
    safes") may simply be sent again; on a loaded machine the first writes of a group just
    formed or just rejoined can take longer than the 1 s ack timeout (seen running the
    integration suite twice at once). Anything else fails at once."""
    deadline = time.monotonic() + timeout
    while True:
        code, body = client.call("kv", "put", key=key, value=value)
        if code == 200:
            return
        unacknowledged = code == 500 and "SafeNotAcknowledgedError" in str(body)
        assert unacknowledged and time.monotonic() < deadline, (code, body)
        time.sleep(0.1)


def result(client: Client, module: str, function: str, timeout: float = 10.0, **args: Any) -> Any:
    """The result of a call that must answer 200, sent again while it is answered 503 (nothing
    written: README, "Replicated safes"), as a caller may: e.g. GroupNotFormed from a worker
    of a group just formed that has no connection of its own to the group yet and is about
    to make way for one that has (runtime/worker.py). Safe for writes that are not idempotent."""
    deadline = time.monotonic() + timeout
    while True:
        code, body = client.call(module, function, **args)
        if code == 200:
            return body["result"]
        assert code == 503 and time.monotonic() < deadline, (module, function, code, body)
        time.sleep(0.1)


def get(node: NodeProcess, path: str) -> bytes:
    """The body of a GET that must answer 200."""
    client = Client(port=node.port, timeout=5)
    try:
        code, data = client.request("GET", path)
    finally:
        client.close()
    assert code == 200, (path, data[:500])
    return data


def status(node: NodeProcess) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(get(node, "/_status"))
    return document


def replication(node: NodeProcess, module: str) -> dict[str, Any]:
    info = status(node)["safes"][module]["replication"]
    assert isinstance(info, dict), f"{node.config}: no replication figures for {module}"
    return info


def formed(nodes: list[NodeProcess]) -> bool:
    """Every safe of every node synced and connected to every peer: until then a master's
    write may find no site to acknowledge it (README, "Replicated safes"). A node whose cage
    restarts meanwhile (a worker making way, runtime/worker.py) is not formed yet."""
    for node in nodes:
        client = Client(port=node.port, timeout=5)
        try:
            code, data = client.request("GET", "/_status")
        except TRANSPORT_ERRORS:
            return False
        finally:
            client.close()
        if code != 200:  # 503 GroupNotFormed: a cage still waiting for its group
            return False
        safes = json.loads(data)["safes"]
        for figures in safes.values():
            info = figures["replication"]
            if not info or not info["synced"] or info["peers_connected"] < len(nodes) - 1:
                return False
    return True


def start_group(nodes: list[NodeProcess]) -> None:
    """Start every node at once, wait for each to be ready and for the group to form, then for
    one acknowledged write to each example module's safe (`warm_up`)."""
    for node in nodes:
        node.start(wait_ready=False)
    for node in nodes:
        node.wait_log(" ready: ", 60)
    eventually(lambda: formed(nodes), FORM_S)
    warm_up(nodes[0])


def warm_up(node: NodeProcess, timeout: float = 20.0) -> None:
    """An idempotent write to each example module's safe through `node`, sent again until the
    group acknowledges it. The first writes of a group just formed can outlast the 1 s ack
    timeout on a loaded machine (SafeNotAcknowledgedError, as the README allows; a full run
    saw it for a test's first increment), or meet a worker making way for a fresh one; tests
    of other things start from a group that has acknowledged a write."""
    client = Client(port=node.port, timeout=15)
    try:
        for module, function, args in (
            ("kv", "put", {"key": "_warm", "value": 1}),
            ("counter", "reset", {"name": "_warm"}),
        ):
            deadline = time.monotonic() + timeout
            while True:
                try:
                    code, body = client.call(module, function, **args)
                except TRANSPORT_ERRORS as e:
                    code, body = 0, repr(e)
                if code == 200:
                    break
                unacknowledged = code == 500 and "SafeNotAcknowledgedError" in str(body)
                retry = code in (0, 503) or unacknowledged
                assert retry and time.monotonic() < deadline, (module, code, body)
                time.sleep(0.1)
    finally:
        client.close()


def master_of(nodes: list[NodeProcess], module: str, timeout: float = 10.0) -> NodeProcess:
    """The one node whose safe of `module` says it is master (within `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
        masters = [n for n in nodes if replication(n, module)["role"] == "master"]
        if len(masters) == 1:
            return masters[0]
        assert time.monotonic() < deadline, f"masters of {module}: {len(masters)}"
        time.sleep(0.1)


def agreed(nodes: list[NodeProcess], module: str) -> bool:
    """Every node names the same, known master of `module`."""
    masters = {replication(n, module)["master"] for n in nodes}
    return len(masters) == 1 and None not in masters


def replicator_pid(node: NodeProcess, cage: str = "demo") -> int:
    """The live replication process of `cage`: a direct child of the supervisor that the log
    announced as "cage <cage>: replication process <pid> started" (supervisor.py)."""
    started = re.findall(rf"cage {cage}: replication process (\d+) started", node.text(0))
    assert started, node.text(0)[-2000:]
    pid = int(started[-1])
    assert pid in node.workers(), (pid, node.workers())
    return pid
