"""Confirming a quorum write before it is reported acknowledged: the fence that closes the
election hole of docs/berkeleydb.md, "Replication", fact 4.

libdb 5.3's elections do not fence an old master out. A site that voted for a candidate at
election generation E can go back to following the master of generation g < E, and acknowledge
its writes, while the candidate waits to declare itself (a new master's start waits out libdb's
whole-second lockout sleep while calls are in flight: rep_util.c, `__rep_lockout_int`). When the
candidate declares, its newer generation wins, and the acknowledged writes are rolled back on
every site (tests/stress/test_replication_stall.py reproduced it with no site lost).

The fence: after the group acknowledged a write W under `ack: quorum`, the committing process
asks every peer site for its state (`Fence`: a UDP datagram to the site's own address, answered
by its replication process, `Responder`), in a round that starts after W's acknowledgement, and
reports W acknowledged only if one of two rules holds (`unconfirmed`). A peer is *settled* when
it follows this master's generation g, is in no election, and has no election won and not yet
declared (`pending`: the replication process sees DB_EVENT_REP_ELECTED before the takeover,
and DB_EVENT_REP_MASTER after it; a takeover that never says it ended counts for TAKEOVER_S,
safe/replication.py says why). A settled peer is *clean* when its election generation is still
g + 1, or still what it was when every peer was last seen settled (`Fence._note`): libdb moves a
site's election generation on when an election it took part in ends, won or lost (rep_util.c,
`__rep_elect_done`), so a clean peer has voted in no election since then.

1. Every peer answered and is settled. Then no election is under way and no winner waits to
   declare. An election that starts later cannot elect a site without W: its voters come from a
   majority, which meets W's acknowledgers, and they have W by then, and a site with W ranks its
   own longer log above a shorter one (rep_elect.c, `__rep_cmp_vote`).
2. At least N - 2 of the N - 1 peers are clean. Rolling W back needs a site C without W elected
   by a majority; the majority meets W's acknowledgers (the master does not vote while master)
   in a peer x, which must have voted for C before it had W (as above). So C and x, two different
   peers (one has W, the other not), both took part in an election since the last time every
   peer was settled: neither is clean. With at most one peer not clean, no such pair exists.

In a group of three, one clean peer is enough: one node down costs nothing. An election that
left the old master in place moves every site's election generation for good; rule 1 is what
lets writes be confirmed again, and it notes the new generations for rule 2. A write that is not
confirmed is reported SafeNotAcknowledgedError (committed on the master, may be rolled back), as
when the acknowledgements come late.

The argument counts acknowledgers as repmgr does for quorum: electable sites (priority > 0).
Under `ack: all` every site has W, so no site without it can win; under `one` and `none`
nothing survives a failover by promise. Only `quorum` with three or more sites is fenced.

Limits, from an independent reading of libdb 5.3's source: a site with W can rank a candidate
without it first when it votes while in internal init or a lockout (priority 0 then), in a group
of mixed libdb versions, or against a candidate with a newer data generation (rep_elect.c); rule
1 leans on the ranking, rule 2 does not. The answers are not authenticated: whatever answers on a
peer's replication port is believed, the trust repmgr 5.3 itself places in its peers' TCP
connections.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from berkeleydb import db

from .layout import publish

log = logging.getLogger("pmnc.safe")

MAGIC = b"pmnc-fence2\0"
# Requests are padded to at least the reply's size, so that an answer never amplifies a
# datagram sent with a forged source address.
REQUEST_SIZE = 64
_REPLY = struct.Struct("!12s8siiiii")  # magic, nonce, gen, egen, election, role, pending
ROUND_TIMEOUT_S = 1.0  # as long as repmgr's own wait for acknowledgements (replication.py)
RESEND_S = 0.05  # a lost datagram costs this much
# A round decided by enough clean answers still waits this long for the rest while the peers'
# election generations were last noted over a second ago (`Fence._note`).
GRACE_S = 0.02
NOTE_EVERY_S = 1.0
MASTER = db.DB_REP_MASTER  # rep_stat()["status"] values
CLIENT = db.DB_REP_CLIENT


@dataclass(frozen=True)
class SiteState:
    """What a site says about its part in its group: `rep_stat`, and whether it won an election
    and has not yet become master (`pending`: known from its own events, safe/replication.py)."""

    gen: int
    egen: int
    election: int  # 0: in none; 1, 2: the election phase it is in
    role: int  # MASTER, CLIENT, or 0
    pending: int = 0


def state_of(stat: dict[str, int], *, pending: bool = False) -> SiteState:
    return SiteState(
        gen=int(stat["gen"]),
        egen=int(stat["egen"]),
        election=int(stat["election_status"]),
        role=int(stat["status"]),
        pending=int(pending),
    )


def settled(peer: SiteState | None, gen: int) -> bool:
    """A peer following the master of generation `gen`, in no election, with no election won
    and not yet declared."""
    return (
        peer is not None
        and peer.role == CLIENT
        and peer.election == 0
        and not peer.pending
        and peer.gen == gen
    )


def clean(peer: SiteState | None, gen: int, since: int | None = None) -> bool:
    """A settled peer that has taken part in no election since the master's generation `gen`
    began (election generation gen + 1), or since `since`: its election generation when every
    peer was last seen settled at `gen` (`Fence`)."""
    return settled(peer, gen) and peer is not None and peer.egen in (gen + 1, since)


def unconfirmed(
    gen: int,
    own: SiteState,
    peers: Sequence[SiteState | None],
    since: Sequence[int | None] | None = None,
) -> str | None:
    """Why a write committed and acknowledged on this site at generation `gen` cannot be
    reported acknowledged (see the module's docstring), or None if it can. `peers` holds every
    peer's state (None: no answer); `since`, each peer's election generation when every peer
    was last seen settled at `gen` (None: never seen so)."""
    if own.role != MASTER or own.gen != gen:
        role = {MASTER: "master", CLIENT: "client"}.get(own.role, "neither master nor client")
        return (
            f"this site stopped being master at generation {gen} before the write was "
            f"confirmed (now {role} at {own.gen})"
        )
    if all(settled(p, gen) for p in peers):
        return None  # no election anywhere, and no winner waiting to declare
    marks = since if since is not None else [None] * len(peers)
    if sum(clean(p, gen, m) for p, m in zip(peers, marks, strict=True)) >= len(peers) - 1:
        return None
    busy = sum(p is not None and not settled(p, gen) for p in peers)
    voted = sum(settled(p, gen) and not clean(p, gen, m) for p, m in zip(peers, marks, strict=True))
    silent = sum(p is None for p in peers)
    return (
        f"of {len(peers)} peer sites, {busy} are in an election, have won one or follow "
        f"another master, {voted} took part in an election since, and {silent} did not "
        "answer: a site elected without the write could roll it back"
    )


class Responder:
    """Answers peers' fence questions with this site's state; runs in the site's replication
    process (the one that always has the environment open), on a thread of its own."""

    def __init__(self, address: tuple[str, int], state: Callable[[], SiteState]) -> None:
        family, _, _, _, sockaddr = socket.getaddrinfo(*address, type=socket.SOCK_DGRAM)[0]
        self._sock = socket.socket(family, socket.SOCK_DGRAM)
        self._sock.bind(sockaddr)
        self._sock.settimeout(0.2)
        self._state = state
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="pmnc-fence", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, sender = self._sock.recvfrom(256)
            except TimeoutError:
                continue
            except OSError:
                return
            if len(data) < REQUEST_SIZE or not data.startswith(MAGIC):
                continue
            nonce = data[len(MAGIC) : len(MAGIC) + 8]
            try:
                st = self._state()
            except db.DBError:  # the environment closing: the asker counts this site as silent
                continue
            reply = _REPLY.pack(MAGIC, nonce, st.gen, st.egen, st.election, st.role, st.pending)
            try:
                self._sock.sendto(reply, sender)
            except OSError:
                continue

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        self._sock.close()


def _resolve(address: tuple[str, int]) -> tuple[int, tuple[Any, ...]] | None:
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(*address, type=socket.SOCK_DGRAM)[0]
    except OSError:
        return None
    return family, tuple(sockaddr)


class Fence:
    """The committing side: rounds of questions to the peers, shared by the threads of this
    process that wait at once. A write waits for a round that started after it was
    acknowledged, so the answers are at least as new as its acknowledgements."""

    def __init__(self, peers: Sequence[tuple[str, int]], shared: Path | None = None) -> None:
        self._peers = tuple(peers)
        # Where the site's replication process publishes what it noted (`observe`), for the
        # processes that started since, or that have not yet seen every peer settled twice.
        self._shared = shared
        self._cond = threading.Condition()
        self._started = 0
        self._done = 0
        self._running = False
        self._answers: tuple[SiteState | None, ...] = ()
        self._own: SiteState | None = None
        self._socks: dict[int, socket.socket] = {}
        self._resolved: dict[int, tuple[int, tuple[Any, ...]]] = {}
        self._nonce = os.urandom(4)
        # Each peer's election generation when every peer was last seen settled, and the
        # generation of the master it was seen at (`clean`'s `since`).
        self._since: tuple[int | None, ...] = (None,) * len(self._peers)
        self._since_gen = -1
        self._noted = 0.0  # monotonic time of that sighting
        self._last_settled: tuple[int, int, tuple[int, ...]] | None = None  # round, gen, egens
        self.rounds = 0
        self.refused = 0

    def confirm(self, gen: int, own: Callable[[], SiteState]) -> str | None:
        """None if a write committed at generation `gen` may be reported acknowledged, else why
        not (`unconfirmed`)."""
        own_state, answers, since = self._round(gen, own)
        if own_state is None or len(answers) != len(self._peers):
            why: str | None = "this site's own state could not be read"
        else:
            why = unconfirmed(gen, own_state, answers, since)
            if why is not None:
                shared = self._load(gen)
                if shared is not None and shared != since:
                    why = unconfirmed(gen, own_state, answers, shared)
        if why is not None:
            self.refused += 1
        return why

    def observe(self, gen: int, own: Callable[[], SiteState]) -> None:
        """A round for no write, by the replication process of a master, every second or so:
        it notes the peers' election generations when they are settled (`_note`), and
        publishes them for the site's other processes."""
        _, _, since = self._round(gen, own)
        if since is not None and self._shared is not None and self._load(gen) != since:
            try:
                publish(self._shared, (gen, *since))
            except OSError as e:
                log.warning("cannot write %s: %s", self._shared, e)

    def _load(self, gen: int) -> tuple[int | None, ...] | None:
        if self._shared is None:
            return None
        try:
            values = [int(v) for v in self._shared.read_text().split()]
        except (OSError, ValueError):
            return None
        if len(values) != len(self._peers) + 1 or values[0] != gen:
            return None
        return tuple(values[1:])

    def _round(
        self, gen: int, own: Callable[[], SiteState]
    ) -> tuple[SiteState | None, tuple[SiteState | None, ...], tuple[int | None, ...] | None]:
        """This site's state and every peer's from a round that started after the call (one
        this thread runs, or another thread's that it waits for), and what was noted for `gen`
        (`clean`'s `since`) as the round ended."""
        with self._cond:
            target = self._started + 1
            while self._done < target:
                if self._running:
                    self._cond.wait()
                    continue
                self._running = True
                self._started += 1
                mine = self._started
                self._cond.release()
                answers: tuple[SiteState | None, ...] = ()
                own_state: SiteState | None = None
                try:
                    answers = self._ask(gen, mine)
                    own_state = own()
                except (db.DBError, OSError, ValueError) as e:  # no answers: not confirmed
                    log.warning("fence round failed: %s", e)
                finally:
                    self._cond.acquire()
                    self._running = False
                    self._done = mine
                    self._own = own_state
                    self._answers = answers
                    self.rounds += 1
                    self._note(mine, gen, answers)
                    self._cond.notify_all()
            since = self._since if self._since_gen == gen else None
            return self._own, self._answers, since

    def _note(self, round_no: int, gen: int, answers: Sequence[SiteState | None]) -> None:
        """Note the peers' election generations as `clean`'s `since` when two rounds in a row
        found every peer settled with the same ones. Between the end of the first round and the
        start of the second, every peer was then in no election, had no election won and not
        declared, and had the noted generation (one round alone would not do: its answers come
        at different instants, and a peer seen settled before it voted proves nothing)."""
        if len(answers) != len(self._peers) or not all(settled(a, gen) for a in answers):
            self._last_settled = None
            return
        egens = tuple(a.egen for a in answers if a is not None)
        if self._last_settled == (round_no - 1, gen, egens):
            self._since = egens
            self._since_gen = gen
            self._noted = time.monotonic()
        self._last_settled = (round_no, gen, egens)

    def _decided(self, gen: int, answers: dict[int, SiteState], decided_at: list[float]) -> bool:
        """Whether a round can end before every peer answered (`_ask`)."""
        n = len(self._peers)
        left = n - len(answers)
        if left == 0:
            return True
        since = self._since if self._since_gen == gen else (None,) * n
        good = sum(clean(a, gen, since[i]) for i, a in answers.items())
        if good >= n - 1:
            now = time.monotonic()
            if not decided_at:
                decided_at.append(now)
            return now - self._noted < NOTE_EVERY_S or now - decided_at[0] >= GRACE_S
        unsettled = any(not settled(a, gen) for a in answers.values())
        return unsettled and good + left < n - 1  # neither rule can be met any more

    def _targets(self) -> dict[int, tuple[int, tuple[Any, ...]] | None]:
        """Each peer's socket family and address, resolved once (until it resolves)."""
        for i, peer in enumerate(self._peers):
            if i not in self._resolved:
                target = _resolve(peer)
                if target is not None:
                    self._resolved[i] = target
        return {i: self._resolved.get(i) for i in range(len(self._peers))}

    def _socket(self, family: int) -> socket.socket:
        sock = self._socks.get(family)
        if sock is None:
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.setblocking(False)
            self._socks[family] = sock
        return sock

    def _ask(self, gen: int, round_no: int) -> tuple[SiteState | None, ...]:
        """Every peer's state, None for one silent for ROUND_TIMEOUT_S. Ends early once the
        answers decide: enough clean peers, or too few left to reach enough."""
        nonce = self._nonce + struct.pack("!I", round_no & 0xFFFFFFFF)
        request = (MAGIC + nonce).ljust(REQUEST_SIZE, b"\0")
        targets = self._targets()
        answers: dict[int, SiteState] = {}
        decided_at: list[float] = []
        deadline = time.monotonic() + ROUND_TIMEOUT_S
        by_address: dict[object, int] = {}
        for i, target in targets.items():
            if target is not None:
                by_address[_key(target[1])] = i
        while True:
            for i, target in targets.items():
                if target is not None and i not in answers:
                    with contextlib.suppress(OSError):  # asked again at the next resend
                        self._socket(target[0]).sendto(request, target[1])
            resend = min(deadline, time.monotonic() + RESEND_S)
            while time.monotonic() < resend:
                wait_until = resend if not decided_at else min(resend, decided_at[0] + GRACE_S)
                self._receive(nonce, by_address, answers, wait_until)
                if self._decided(gen, answers, decided_at):
                    return tuple(answers.get(i) for i in range(len(self._peers)))
            if time.monotonic() >= deadline:
                return tuple(answers.get(i) for i in range(len(self._peers)))

    def _receive(
        self,
        nonce: bytes,
        by_address: dict[object, int],
        answers: dict[int, SiteState],
        until: float,
    ) -> None:
        socks = list(self._socks.values())
        wait = max(0.0, until - time.monotonic())
        readable, _, _ = select.select(socks, [], [], wait)
        for sock in readable:
            while True:
                try:
                    data, sender = sock.recvfrom(256)
                except (BlockingIOError, OSError):
                    break
                if len(data) != _REPLY.size:
                    continue
                magic, got, gen, egen, election, role, pending = _REPLY.unpack(data)
                i = by_address.get(_key(sender))
                if magic != MAGIC or got != nonce or i is None:
                    continue  # another round's late answer, or not a peer
                answers[i] = SiteState(gen, egen, election, role, pending)

    def close(self) -> None:
        for sock in self._socks.values():
            sock.close()
        self._socks.clear()


def _key(sockaddr: object) -> object:
    """An address as a reply's sender shows it: (host, port) for IPv4 and IPv6 alike."""
    if isinstance(sockaddr, tuple):
        return (sockaddr[0], sockaddr[1])
    return sockaddr
