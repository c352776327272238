"""Producers and consumers on one safe's queue, consumers SIGKILLed inside their `with q.get()`
block and restarted, with short leases; then nothing lost and every duplicate explained.

What docs/queues.md promises and this checks: every item whose `put` returned is delivered at
least once; a delivery whose block exited cleanly removes the item for good (no later
delivery); an item is delivered again only after a delivery that did not finish (its consumer
was killed, or needed recovery); an item whose consumer was killed inside its block is
delivered again (after the lease); one taker at a time (no two deliveries of an item carry the
same delivery count); and the order of delivery is the order of the puts' times, so one
producer's items (one putting thread) are first delivered in the order they were put.

A process killed with the safe open leaves a dead registrant: the others then fail with
SafeNeedsRecoveryError, or stay blocked on what the dead one held (README, "What it does not
guarantee"). So this test does what the runtime's supervisor does (docs/berkeleydb.md, "Why the
supervisor kills the rest of the cage"): it SIGKILLs a consumer that is inside its block, then
every other process of the round, recovers the safe and forks the next round. Every process
keeps a ledger, one `os.write` per line to its own O_APPEND file (a SIGKILL loses no completed
write), of what it did: the parent judges the outcome from the ledgers alone.

PMNC_STRESS_SECONDS (tests/stress/conftest.py) bounds the rounds; the final drain is bounded by
the leases.
"""

from __future__ import annotations

import mmap
import os
import queue
import random
import signal
import struct
import sys
import time
import traceback
from collections import defaultdict
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
from pmnc.safe import Safe, SafeError, verify

pytestmark = pytest.mark.stress

PRODUCERS = 3
CONSUMERS = 3
LEASE = 1.0  # short, so that the items of killed consumers come back within the run
PUT_PAUSE = 0.002  # between puts: about what the consumers take, so the final drain is short
WORK = 0.004  # the longest a consumer's block works on one item (random up to it)
SEQ_PER_ROUND = 1_000_000  # a producer restarted in round r numbers its items from r * this
SLOT = struct.Struct("q")  # per consumer, in shared memory: 1 while inside its block


def ledger(path: Path) -> Callable[[str], None]:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def note(line: str) -> None:
        os.write(fd, (line + "\n").encode())

    return note


def fork(fn: Callable[[], None], errors: Path) -> int:
    """A child that runs `fn` and ends in os._exit; an unexpected exception goes to `errors`."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fn()
            code = 0
        except SafeError:
            code = 3  # recovery needed after a death: the supervisor's EXIT_NEEDS_RECOVERY
        except BaseException:
            with open(errors, "a") as f:
                f.write(f"[pid {os.getpid()}] {traceback.format_exc()}\n")
        finally:
            os._exit(code)
    return pid


def producer(path: Path, p: int, first: int, book: Path) -> None:
    """Put (p, n) for n = first, first+1, ... until killed; `S` before each put, `A` after."""
    note = ledger(book)
    rng = random.Random(first + p)
    with Safe.open(path, recover=False) as safe:
        q = safe.queue("work")
        n = first
        while True:
            note(f"S {p} {n}")
            q.put((p, n, b"x" * rng.randrange(200)))
            note(f"A {p} {n}")
            n += 1
            time.sleep(PUT_PAUSE)


def consumer(path: Path, c: int, slots: mmap.mmap, book: Path) -> None:
    """Take items until killed: `G` on entering the block (with the delivery count), `B` as
    the last statement of the block, `D` once the block has exited (the item removed)."""
    note = ledger(book)
    rng = random.Random(os.getpid())
    with Safe.open(path, recover=False) as safe:
        q = safe.queue("work")
        while True:
            try:
                delivery = q.get(timeout=0.2, lease=LEASE)
            except queue.Empty:
                continue
            with delivery as (p, n, _):
                note(f"G {p} {n} {delivery.redelivered}")
                SLOT.pack_into(slots, c * SLOT.size, 1)
                time.sleep(rng.random() * WORK)
                SLOT.pack_into(slots, c * SLOT.size, 0)
                note(f"B {p} {n}")
            note(f"D {p} {n}")


def read_ledgers(directory: Path) -> dict[str, list[list[str]]]:
    """Ledger file name -> its lines split into fields."""
    return {
        f.name: [line.split() for line in f.read_text().splitlines()]
        for f in sorted(directory.iterdir())
    }


def test_killed_consumers_lose_nothing_and_duplicate_only_what_they_held(
    tmp_path: Path, stress_seconds: float
) -> None:
    path, errors, books = tmp_path / "s", tmp_path / "errors", tmp_path / "ledgers"
    books.mkdir()
    slots = mmap.mmap(-1, SLOT.size * CONSUMERS)  # shared with the children across fork
    rng = random.Random(1)
    rounds = killed_in_block = 0
    deadline = time.monotonic() + stress_seconds
    while rounds == 0 or time.monotonic() < deadline:
        Safe.open(path).close()  # recovers after the last round's deaths, then nothing open
        slots[:] = bytes(len(slots))
        pids = [
            fork(
                partial(producer, path, p, rounds * SEQ_PER_ROUND, books / f"p{p}-r{rounds}"),
                errors,
            )
            for p in range(PRODUCERS)
        ]
        consumers = [
            fork(partial(consumer, path, c, slots, books / f"c{c}-r{rounds}"), errors)
            for c in range(CONSUMERS)
        ]
        time.sleep(rng.uniform(0.3, 0.8))
        # A consumer that is inside its block now; the ledger says where it really was.
        victim = None
        for _ in range(1000):
            inside = [c for c in range(CONSUMERS) if SLOT.unpack_from(slots, c * SLOT.size)[0]]
            if inside:
                victim = consumers[rng.choice(inside)]
                break
            time.sleep(0.001)
        assert victim is not None, "no consumer was ever inside its block: nothing consumed"
        os.kill(victim, signal.SIGKILL)
        for pid in pids + consumers:  # the rest of the "cage", as the supervisor does
            if pid != victim:
                os.kill(pid, signal.SIGKILL)
        for pid in pids + consumers:
            _, status = os.waitpid(pid, 0)
            assert os.WIFSIGNALED(status), (
                pid,
                status,
                errors.read_text() if errors.exists() else "",
            )
        rounds += 1

    # The final drain, by this process: killed consumers' items come back once their lease ran out.
    note = ledger(books / "drain")
    with Safe.open(path) as safe:
        q = safe.queue("work")
        while True:
            try:
                delivery = q.get(timeout=LEASE + 1, lease=LEASE * 10)
            except queue.Empty:
                break
            with delivery as (p, n, _):
                note(f"G {p} {n} {delivery.redelivered}")
                note(f"B {p} {n}")
            note(f"D {p} {n}")
        assert len(q) == 0
    verify(path)
    assert not errors.exists(), errors.read_text()

    started: set[tuple[int, int]] = set()
    acked: set[tuple[int, int]] = set()
    deliveries: dict[tuple[int, int], list[tuple[str, int]]] = defaultdict(list)
    done: dict[tuple[int, int], int] = defaultdict(int)
    killed_in_body: list[tuple[int, int]] = []
    killed_in_exit: set[tuple[int, int]] = set()  # the removal may or may not have committed
    unfinished = 0
    fifo_breaks = []
    for name, lines in read_ledgers(books).items():
        if name.startswith("p"):
            for kind, p, n in lines:
                (started if kind == "S" else acked).add((int(p), int(n)))
            continue
        state: dict[tuple[int, int], str] = {}
        last_first: dict[int, int] = {}
        for kind, p, n, *rest in lines:
            item = (int(p), int(n))
            state[item] = kind
            if kind == "G":
                deliveries[item].append((name, int(rest[0])))
                if int(rest[0]) == 0:  # a first delivery: FIFO per producer within a taker
                    if last_first.get(item[0], -1) > item[1]:
                        fifo_breaks.append((name, item, last_first[item[0]]))
                    last_first[item[0]] = item[1]
            elif kind == "D":
                done[item] += 1
        for item, kind in state.items():  # a process's last item may be unfinished
            if kind == "G":
                killed_in_body.append(item)
            elif kind == "B":
                killed_in_exit.add(item)
            if kind != "D":
                unfinished += 1

    delivered = set(deliveries)
    duplicates = sum(len(d) - 1 for d in deliveries.values())
    assert acked, "no put was acknowledged"
    assert acked <= delivered, f"lost: {sorted(acked - delivered)[:10]}"
    assert delivered <= started, f"never put: {sorted(delivered - started)[:10]}"
    # A clean exit removes the item for good: never delivered (nor done) again after it. Every
    # item was removed by one clean exit, or by an exit its consumer was killed in.
    wrong = [
        (item, done[item])
        for item in delivered
        if done[item] > 1 or (done[item] == 0 and item not in killed_in_exit)
    ]
    assert not wrong, wrong[:10]
    # Duplicates only for deliveries that did not finish, and every item a killed consumer
    # held inside its block came again.
    assert duplicates <= unfinished, (duplicates, unfinished)
    assert all(len(deliveries[item]) >= 2 for item in killed_in_body), killed_in_body
    killed_in_block = len(killed_in_body)
    assert killed_in_block >= 1
    for item, ds in deliveries.items():  # one taker at a time: each delivery count once
        counts = [count for _, count in ds]
        assert len(counts) == len(set(counts)), (item, ds)
    assert not fifo_breaks, fifo_breaks[:10]
    print(
        f"\nqueue stress: {rounds} rounds, {len(acked)} puts acknowledged "
        f"({len(started) - len(acked)} unacknowledged), {len(delivered)} items delivered, "
        f"{duplicates} duplicates, {killed_in_block} killed inside the block, "
        f"{unfinished} unfinished deliveries"
    )
