"""A replicated node group (README, "Replicated safes"): three real nodes on this machine, each
a real `pmnc-runtime start` with its own replication process per cage, killed with real
SIGKILLs. What a user of a group depends on:

- any node answers any call: a write that arrives where its safe is a client is carried out on
  the master, and the caller gets the master's answer (runtime/group.py);
- kill -9 of the master's whole node: the others serve writes again within 10 s, losing no
  write that was answered (ack: quorum), and the killed node, started again, catches up;
- a worker crash on a replicated cage restarts the cage, whose safes rejoin the group;
- every node stops cleanly (exit 0, nothing left to recover);
- `/_status` shows each safe's role and master.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pmnc.runtime.config import load_config
from pmnc.runtime.harness import (
    TRANSPORT_ERRORS,
    Client,
    NodeProcess,
    free_port_range,
    write_group_configs,
)

from tests.helpers import EXAMPLES
from tests.integration.groups import (
    FAILOVER_S,
    eventually,
    master_of,
    put_acknowledged,
    replication,
    result,
)


def test_any_node_takes_writes_and_the_master_answers(
    group: list[NodeProcess], connect: Callable[..., Client]
) -> None:
    clients = [connect(n) for n in group]
    for i in range(30):  # round robin: two of every three calls land where the safe is a client
        assert result(clients[i % 3], "counter", "increment", name="rr") == i + 1
    clients[1].result("kv", "put", key="where", value="everywhere")
    for client in clients:  # reads are local: each node's copy catches up by itself
        eventually(lambda c=client: c.result("kv", "get", key="where") == "everywhere", 5)
    master = master_of(group, "counter")
    site = replication(master, "counter")["master"]
    for node in group:
        info = replication(node, "counter")
        assert info["master"] == site
        assert info["role"] == ("master" if node is master else "client")


def test_master_node_killed_others_serve_writes_and_it_rejoins(
    group: list[NodeProcess], connect: Callable[..., Client]
) -> None:
    clients = {n.port: connect(n) for n in group}
    acknowledged = 0
    unknown = 0  # answers that say the call may or may not have run
    for i in range(40):
        try:
            result(clients[group[i % 3].port], "counter", "increment", name="c")
            acknowledged += 1
        except AssertionError as e:
            # Committed on the master, acknowledged too late on this loaded machine (README:
            # SafeNotAcknowledgedError, outcome unknown); seen once in a full run.
            assert "SafeNotAcknowledgedError" in str(e), e
            unknown += 1
    master = master_of(group, "counter")
    survivors = [n for n in group if n is not master]
    master.kill_group()
    killed = time.monotonic()
    served = None
    while served is None:
        assert time.monotonic() - killed < FAILOVER_S, "no write served within 10 s"
        try:
            code, body = clients[survivors[0].port].call("counter", "increment", name="c")
        except TRANSPORT_ERRORS:
            unknown += 1
            continue
        if code == 200:
            served = body["result"]
        elif code in (502, 504):
            unknown += 1
        else:
            assert code == 503, body
            time.sleep(0.05)
    # Nothing answered before the kill is lost; an increment with an unknown outcome (the master
    # died under it, or its acknowledgement came late) may count.
    assert acknowledged + 1 <= served <= acknowledged + 1 + unknown
    assert clients[survivors[1].port].result("counter", "increment", name="c") == served + 1
    master.start(timeout=60)  # the killed node again: it recovers and rejoins as a client
    eventually(lambda: replication(master, "counter")["role"] == "client", 10)
    back = connect(master)
    eventually(lambda: back.result("counter", "get", name="c") == served + 1, 10)
    assert back.result("counter", "increment", name="c") == served + 2  # forwarded by it


def test_a_worker_crash_restarts_the_cage_and_its_safes_rejoin(
    group: list[NodeProcess], connect: Callable[..., Client]
) -> None:
    client_node = next(n for n in group if n is not master_of(group, "counter"))
    client = connect(client_node, keep_alive=False)  # not held by the worker that is killed
    assert result(client, "counter", "increment", name="w") == 1
    since = client_node.log_size()
    os.kill(client_node.workers()[-1], signal.SIGKILL)  # a worker or the replication process
    client_node.wait_log("serving again", 30, since=since)
    assert "replication process" in client_node.text(since)
    assert client.result("counter", "increment", name="w") == 2
    eventually(lambda: replication(client_node, "counter")["role"] == "client", 10)


def test_every_node_stops_cleanly(group: list[NodeProcess], connect: Callable[..., Client]) -> None:
    result(connect(group[0]), "counter", "increment", name="s")
    for node in group:
        node.signal(signal.SIGTERM)  # all at once: each loses its peers while stopping
    for node in group:
        assert node.wait(30) == 0
        text = node.text()
        assert "needs recovery" not in text, text[-2000:]
        assert "stopped (exit status 0)" in text


def test_a_two_node_group_that_loses_its_master_serves_reads_and_refuses_writes(
    tmp_path: Path, connect: Callable[..., Client]
) -> None:
    """Berkeley DB's default for two sites (2SITE_STRICT): the survivor cannot elect itself
    without the other's vote, so it goes on serving reads and answers writes with 503
    NotMaster after waiting for a master (README, "Replicated safes": a group of two)."""
    nodes = write_group_configs(tmp_path, EXAMPLES, nodes=2, workers=1, threads=4)
    try:
        for node in nodes:
            node.start(wait_ready=False)
        for node in nodes:
            node.wait_log(" ready: ", 60)
        deadline = time.monotonic() + 30
        while not all(
            replication(n, "counter")["synced"] and replication(n, "counter")["peers_connected"]
            for n in nodes
        ):
            assert time.monotonic() < deadline, "the group of two did not form"
            time.sleep(0.1)
        assert connect(nodes[0]).result("counter", "increment", name="two") == 1
        master = master_of(nodes, "counter")
        survivor = next(n for n in nodes if n is not master)
        client = connect(survivor, timeout=30)
        eventually(lambda: client.result("counter", "get", name="two") == 1, 5)
        master.kill_group()
        started = time.monotonic()
        code, body = client.call("counter", "increment", name="two")
        if code == 502:  # sent to the master's node as it died (reset): ask again
            started = time.monotonic()
            code, body = client.call("counter", "increment", name="two")
        waited = time.monotonic() - started
        assert code == 503 and body["error"].startswith("NotMaster"), (code, body)
        assert waited < 15, waited  # the forwarder's bound, not the request timeout
        assert client.result("counter", "get", name="two") == 1  # reads go on
        assert replication(survivor, "counter")["role"] != "master"
    finally:
        for node in nodes:
            node.kill_group()


def test_the_group_creator_restarted_without_its_data_joins_the_group(
    group: list[NodeProcess], connect: Callable[..., Client]
) -> None:
    """The node whose address sorts lowest creates the group when its safes are new; started
    again on an empty data directory (a lost disk) while the others serve, it must join them
    (getting every safe by internal init), not create a second group (runtime/replicator.py)."""

    def base(node: NodeProcess) -> tuple[str, int]:
        replication = load_config(node.config).replication
        assert replication is not None
        return (replication.address.host, replication.address.port)

    creator = min(group, key=base)
    others = [n for n in group if n is not creator]
    for i in range(10):
        put_acknowledged(connect(others[0]), f"k{i}", i)
    creator.kill_group()
    data = load_config(creator.config).data_dir
    shutil.rmtree(data)
    since = creator.log_size()
    creator.start(timeout=60)
    assert "joining the group rather than creating one" in creator.text(since)
    back = connect(creator)
    eventually(lambda: back.result("kv", "get", key="k9") == 9, 10)
    for node in group:
        eventually(lambda n=node: replication(n, "kv")["role"] in ("master", "client"), 10)
    masters = {replication(n, "kv")["master"] for n in group}
    assert len(masters) == 1, masters  # one group: every node names the same master
    put_acknowledged(connect(creator), "after", 1)
    eventually(lambda: connect(others[1]).result("kv", "get", key="after") == 1, 10)


def test_a_hung_master_node_is_replaced_and_rejoins_when_it_resumes(
    group: list[NodeProcess], connect: Callable[..., Client]
) -> None:
    """SIGSTOP of the master's whole node (a hung machine): its TCP connections stay open, so
    only heartbeats tell the others (safe/replication.py); they elect a new master and serve
    writes within 10 s. Resumed, the old master finds a newer master and becomes its client;
    the group agrees on one master and on the writes made meanwhile."""
    master = master_of(group, "counter")
    survivors = [n for n in group if n is not master]
    client = connect(survivors[0], timeout=15)
    assert result(client, "counter", "increment", name="h") == 1
    os.killpg(master.pid, signal.SIGSTOP)
    try:
        stopped = time.monotonic()
        while True:
            assert time.monotonic() - stopped < FAILOVER_S, "no write served within 10 s"
            try:
                code, body = client.call("counter", "increment", name="h")
            except TRANSPORT_ERRORS:
                continue
            if code == 200:
                break
        served = body["result"]
        assert served >= 2
    finally:
        os.killpg(master.pid, signal.SIGCONT)
    # Generous bounds: on a loaded 2-core CI the resumed node's processes catch up slowly.
    eventually(lambda: replication(master, "counter")["role"] == "client", 30, "demoted")

    def agreed() -> bool:
        masters = {replication(n, "counter")["master"] for n in group}
        return len(masters) == 1 and None not in masters

    eventually(agreed, 20, "one master named by all")  # one may be between masters a moment
    resumed = connect(master)
    eventually(lambda: resumed.result("counter", "get", name="h") == served, 20, "caught up")
    assert resumed.result("counter", "increment", name="h") == served + 1


def test_a_call_that_wrote_before_meeting_a_client_safe_is_not_run_again(tmp_path: Path) -> None:
    """Each safe elects its own master: a call may commit a write to a safe mastered here,
    then meet a safe mastered elsewhere. Forwarding it (or running it again) would repeat the
    first write, so it is answered 500 PartiallyWritten; a call that wrote nothing before is
    forwarded as usual (found by review: runtime/app.py, pmnc.safe.writes_committed)."""
    script = Path(__file__).with_name("partial_write.py")
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path), str(free_port_range(1))],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["partial"][0] == 500, result
    assert result["partial"][1]["error"].startswith("PartiallyWritten"), result
    assert result["forwarded"] == ["clean"], result  # only the call that wrote nothing
    assert result["clean"] == [200, {"result": "forwarded"}], result
    assert result["n"] == 1, result  # the write was made once, not again
