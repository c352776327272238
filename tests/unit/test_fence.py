"""The fence's rule and its wire (safe/fence.py): which peer states let a quorum write count as
acknowledged, and the question and answer over real UDP sockets on loopback. The rule is pure
policy, checked on states written by hand; the states libdb really reports in the election hole
are exercised by tests/stress/test_replication_stall.py."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from pmnc.safe.fence import (
    CLIENT,
    MAGIC,
    MASTER,
    REQUEST_SIZE,
    ROUND_TIMEOUT_S,
    Fence,
    Responder,
    SiteState,
    unconfirmed,
)

GEN = 7
OWN = SiteState(gen=GEN, egen=GEN + 1, election=0, role=MASTER)
CLEAN = SiteState(gen=GEN, egen=GEN + 1, election=0, role=CLIENT)
VOTED = SiteState(gen=GEN, egen=GEN + 2, election=0, role=CLIENT)  # an election ended since
VOTING = SiteState(gen=GEN, egen=GEN + 1, election=2, role=CLIENT)  # in one now
NEWER = SiteState(gen=GEN + 2, egen=GEN + 3, election=0, role=CLIENT)  # follows a newer master
RIVAL = SiteState(gen=GEN + 2, egen=GEN + 3, election=0, role=MASTER)


PENDING = SiteState(gen=GEN, egen=GEN + 2, election=0, role=CLIENT, pending=1)  # won, waiting
BUSY = (VOTING, PENDING, NEWER, RIVAL)  # not settled


def test_three_sites_confirm_with_one_clean_peer_whatever_the_other() -> None:
    for other in (CLEAN, VOTED, *BUSY, None):
        assert unconfirmed(GEN, OWN, [CLEAN, other]) is None, other
        assert unconfirmed(GEN, OWN, [other, CLEAN]) is None, other


def test_every_peer_settled_confirms_even_after_elections_that_changed_nothing() -> None:
    """An election that ended with the old master still in place leaves every site's election
    generation moved for good: without this rule, no write would be confirmed again."""
    assert unconfirmed(GEN, OWN, [VOTED, VOTED]) is None


def test_a_peer_busy_with_an_election_or_silent_refuses_unless_the_other_is_clean() -> None:
    for a in (VOTED, *BUSY, None):
        for b in (*BUSY, None):
            assert unconfirmed(GEN, OWN, [a, b]) is not None, (a, b)
            assert unconfirmed(GEN, OWN, [b, a]) is not None, (b, a)


def test_a_peer_whose_election_generation_has_not_moved_since_all_were_settled_is_clean() -> None:
    assert unconfirmed(GEN, OWN, [VOTED, None], since=[GEN + 2, None]) is None
    assert unconfirmed(GEN, OWN, [VOTED, None], since=[GEN + 1, None]) is not None
    later = SiteState(gen=GEN, egen=GEN + 3, election=0, role=CLIENT)
    assert unconfirmed(GEN, OWN, [later, None], since=[GEN + 2, None]) is not None
    pending = SiteState(gen=GEN, egen=GEN + 2, election=0, role=CLIENT, pending=1)
    assert unconfirmed(GEN, OWN, [pending, None], since=[GEN + 2, None]) is not None


def test_five_sites_need_three_clean_peers_or_all_settled() -> None:
    assert unconfirmed(GEN, OWN, [CLEAN, CLEAN, CLEAN, None]) is None
    assert unconfirmed(GEN, OWN, [CLEAN, CLEAN, PENDING, CLEAN]) is None
    assert unconfirmed(GEN, OWN, [VOTED, CLEAN, VOTED, VOTED]) is None
    assert unconfirmed(GEN, OWN, [CLEAN, CLEAN, VOTED, None]) is not None
    assert unconfirmed(GEN, OWN, [CLEAN, CLEAN, VOTING, VOTED]) is not None


def test_a_site_no_longer_master_at_the_write_generation_confirms_nothing() -> None:
    assert unconfirmed(GEN, SiteState(GEN, GEN + 1, 0, CLIENT), [CLEAN, CLEAN]) is not None
    assert unconfirmed(GEN, SiteState(GEN + 2, GEN + 3, 0, MASTER), [CLEAN, CLEAN]) is not None


def test_the_reason_counts_what_the_peers_said() -> None:
    why = unconfirmed(GEN, OWN, [VOTED, None])
    assert why is not None
    assert "0 are in an election" in why and "1 took part" in why and "1 did not answer" in why


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def responders() -> object:
    made: list[Responder] = []

    def start(state: SiteState) -> tuple[str, int]:
        address = ("127.0.0.1", _free_udp_port())
        made.append(Responder(address, lambda: state))
        return address

    yield start
    for r in made:
        r.close()


def test_a_round_over_udp_confirms_with_one_clean_peer_and_a_silent_one(responders) -> None:  # type: ignore[no-untyped-def]
    clean = responders(CLEAN)
    silent = ("127.0.0.1", _free_udp_port())  # nobody answers there
    fence = Fence([silent, clean])
    try:
        started = time.monotonic()
        assert fence.confirm(GEN, lambda: OWN) is None
        # Decided by the clean answer: no wait for the silent peer.
        assert time.monotonic() - started < ROUND_TIMEOUT_S / 2
    finally:
        fence.close()


def test_a_round_refuses_when_one_peer_is_in_an_election_and_the_other_voted(responders) -> None:  # type: ignore[no-untyped-def]
    fence = Fence([responders(VOTED), responders(VOTING)])
    try:
        why = fence.confirm(GEN, lambda: OWN)
        assert why is not None and "1 are in an election" in why and "1 took part" in why
        assert fence.refused == 1
    finally:
        fence.close()


def test_a_round_remembers_generations_seen_settled_when_a_peer_then_falls_silent() -> None:
    """Both peers voted in an election that changed nothing; then one goes down. The other
    still confirms, since its election generation has not moved since both were settled in two
    rounds in a row. One such round is not enough: its answers come at different instants."""
    addresses = [("127.0.0.1", _free_udp_port()) for _ in range(2)]
    voted = [Responder(a, lambda: VOTED) for a in addresses]
    fence = Fence(addresses)
    try:
        assert fence.confirm(GEN, lambda: OWN) is None  # every peer settled
        voted[1].close()
        assert fence.confirm(GEN, lambda: OWN) is not None  # one such round: nothing noted
        voted[1] = Responder(addresses[1], lambda: VOTED)
        assert fence.confirm(GEN, lambda: OWN) is None
        assert fence.confirm(GEN, lambda: OWN) is None  # the second in a row: noted
        voted[1].close()
        assert fence.confirm(GEN, lambda: OWN) is None  # the other is clean since then
        moved = SiteState(gen=GEN, egen=GEN + 3, election=0, role=CLIENT)
        voted[0].close()
        voted[0] = Responder(addresses[0], lambda: moved)  # another election since
        why = fence.confirm(GEN, lambda: OWN)
        assert why is not None and "1 took part" in why and "1 did not answer" in why
    finally:
        voted[0].close()
        fence.close()


def test_a_round_with_every_peer_silent_gives_up_after_its_timeout() -> None:
    fence = Fence([("127.0.0.1", _free_udp_port()), ("127.0.0.1", _free_udp_port())])
    try:
        started = time.monotonic()
        why = fence.confirm(GEN, lambda: OWN)
        took = time.monotonic() - started
        assert why is not None and "2 did not answer" in why
        assert ROUND_TIMEOUT_S * 0.9 <= took < ROUND_TIMEOUT_S + 2.0
    finally:
        fence.close()


def test_concurrent_writes_share_rounds_each_started_after_it(responders) -> None:  # type: ignore[no-untyped-def]
    """Every confirmation comes from a round begun after the call (its answers are at least as
    new as the write's acknowledgement), and waiting threads share rounds."""
    asked: list[tuple[float, float]] = []  # (start, end) of each round
    lock = threading.Lock()

    def own() -> SiteState:
        return OWN

    fence = Fence([responders(CLEAN), responders(CLEAN)])
    original = fence._ask

    def ask(gen: int, round_no: int) -> tuple[SiteState | None, ...]:
        start = time.monotonic()
        time.sleep(0.01)
        answers = original(gen, round_no)
        with lock:
            asked.append((start, time.monotonic()))
        return answers

    fence._ask = ask  # type: ignore[method-assign]
    results: list[tuple[float, float, str | None]] = []

    def write() -> None:
        for _ in range(20):
            called = time.monotonic()
            why = fence.confirm(GEN, own)
            with lock:
                results.append((called, time.monotonic(), why))

    threads = [threading.Thread(target=write) for _ in range(8)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(results) == 160
        assert all(why is None for _, _, why in results)
        assert fence.rounds < 160  # shared
        for called, returned, _ in results:
            assert any(called <= start and end <= returned for start, end in asked)
    finally:
        fence.close()


def test_the_responder_ignores_short_or_foreign_datagrams(responders) -> None:  # type: ignore[no-untyped-def]
    address = responders(CLEAN)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.3)
        for junk in (b"", MAGIC, b"x" * REQUEST_SIZE, MAGIC + b"n" * 8):  # the last: too short
            s.sendto(junk, address)
            with pytest.raises(TimeoutError):
                s.recvfrom(256)
        s.sendto((MAGIC + b"12345678").ljust(REQUEST_SIZE, b"\0"), address)
        reply, _ = s.recvfrom(256)
        assert len(reply) <= REQUEST_SIZE  # never more than was asked: no amplification
        assert reply.startswith(MAGIC + b"12345678")


def test_a_process_started_later_uses_what_the_replication_process_noted(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A worker that starts after the peers voted in an election that changed nothing, and after
    one of them went down, never saw every peer settled itself: it uses what the master's
    replication process noted (`Fence.observe`, published in the safe's directory)."""
    addresses = [("127.0.0.1", _free_udp_port()) for _ in range(2)]
    voted = [Responder(a, lambda: VOTED) for a in addresses]
    shared = tmp_path / "repmgr.fence"
    observer = Fence(addresses, shared)
    worker = Fence(addresses, shared)
    try:
        observer.observe(GEN, lambda: OWN)
        assert not shared.exists()  # one round is not enough
        observer.observe(GEN, lambda: OWN)
        assert shared.read_text().split() == [str(GEN), str(GEN + 2), str(GEN + 2)]
        assert observer.refused == 0  # observing writes nothing and refuses nothing
        voted[1].close()
        assert worker.confirm(GEN, lambda: OWN) is None
        assert worker.confirm(GEN + 2, lambda: SiteState(GEN + 2, GEN + 3, 0, MASTER)) is not None
    finally:
        voted[0].close()
        observer.close()
        worker.close()
