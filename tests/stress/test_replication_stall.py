"""A majority of a group's sites stall (SIGSTOP) and resume together while the master writes:
the known hole of docs/berkeleydb.md, "Replication", fact 4, reproduced on purpose.

Each round: three real sites (tests/integration/repsite.py); each client site runs a process
reading without pause (a busy worker: a new master's start then waits out libdb's 1 s lockout
sleep, which opens the window); three writers on the master write all along; both client sites
are stopped for 1.5 s, then resumed. What must hold: every site ends in one state. What should
hold and does not always: every write acknowledged under `ack: quorum` is in that state. A lost
acknowledged write is reported as an expected failure (xfail) with the counts, not a pass, so
that a run shows how often the hole opened; anything else that goes wrong fails.

Rounds: PMNC_STRESS_SECONDS / 5, at least one (about 12 s each). Measured: 1 round in 20 lost
writes (500-650 of some 1,200 acknowledged), and 2 in 34 with a 2.0 s election timeout instead
of 0.5 s, which therefore was not taken.
"""

from __future__ import annotations

import signal
import time

import pytest

from tests.integration.test_replication_safe import (  # noqa: F401  (group is a fixture)
    Group,
    Site,
    group,
    put_stream,
    the_master,
    wait_for,
)

pytestmark = pytest.mark.stress

WRITERS = 3
WRITES = 400  # per writer: the stall costs each a 1 s ack wait, the rest runs into the window
STALL_S = 1.5  # over the heartbeat monitor (1 s): the clients call an election when they resume


def _missing(site: Site, n: int) -> frozenset[str] | None:
    out: set[str] = set()
    for j in range(WRITERS):
        answer = site.procs[0].ask("missing", f"w{j}_", n)
        if "missing" not in answer:
            return None  # mid-rollback or mid-sync: ask again
        out |= set(answer["missing"])
    return frozenset(out)


def _round(sites: list[Site]) -> tuple[int, int]:
    """(acknowledged, lost) for one stall of both clients."""
    master, _ = the_master(sites)
    clients = [s for s in sites if s is not master]
    for client in clients:
        reader = client.start()
        reader.send("spin_reads", 60)
        assert reader.next() == {"ok": True}
    writers = []
    for j in range(WRITERS):
        writer = master.start()
        writer.send("put_many", f"w{j}_", WRITES, 10)
        writers.append(writer)
    time.sleep(0.5)
    for client in clients:
        for proc in client.procs:
            proc.signal(signal.SIGSTOP)
    time.sleep(STALL_S)
    for client in clients:
        for proc in client.procs:
            proc.signal(signal.SIGCONT)
    acked: list[str] = []
    for writer in writers:
        keys, _, finished = put_stream(writer)
        assert finished
        acked += keys
    new, _ = the_master(sites, 20.0)

    def one_state() -> bool:
        states = [_missing(site, WRITES) for site in sites]
        return None not in states and len(set(states)) == 1

    wait_for("every site in one state", one_state, 30.0)
    missing = _missing(new, WRITES)
    assert missing is not None
    return len(acked), len(set(acked) & missing)


def test_a_majority_stall_under_writes_ends_in_one_state(
    group: Group,  # noqa: F811
    stress_seconds: float,
) -> None:
    rounds = max(1, int(stress_seconds // 5))
    results = []
    for _ in range(rounds):
        results.append(_round(group(3, together=False)))
    print(f"\n{rounds} round(s): (acknowledged, lost) {results}")
    lost = [r for r in results if r[1]]
    if lost:
        pytest.xfail(
            f"known hole (docs/berkeleydb.md, Replication, fact 4): {len(lost)} of {rounds} "
            f"round(s) lost acknowledged writes: {lost}"
        )
