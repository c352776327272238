"""Lost updates, shown: a naive increment against `modify`, on a real node under concurrent load.

    python examples/counter/run.py [--seconds 5] [--clients 4] [--threads 4]

Starts `pmnc-runtime start` on a generated config (a temporary data directory, a free port,
4 workers x 8 threads) serving examples/counter/modules/tally.py, then has several client
processes, each with several threads, call over HTTP, for the same number of requests each:

    naive: pmnc_safe["naive"] = pmnc_safe.get("naive", 0) + 1      two transactions
    exact: pmnc_safe.modify("exact", lambda n: n + 1, 0)            one transaction

Every call that answered 200 is one increment the client saw succeed. The naive counter ends
below that count: two workers read the same old value and both write old + 1. The `modify`
counter ends exactly at it.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import threading
import time
from multiprocessing.queues import Queue
from pathlib import Path

from pmnc.runtime.harness import TRANSPORT_ERRORS, Client, NodeProcess

HERE = Path(__file__).resolve().parent
WORKERS, THREADS = 4, 8


def client_process(port: int, threads: int, seconds: float, results: Queue[dict[str, int]]) -> None:
    """Alternate naive and exact increments from `threads` threads until the time is up."""
    counts = {"naive": 0, "exact": 0, "failed": 0}
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def hammer() -> None:
        client = Client("127.0.0.1", port)
        while time.monotonic() < deadline:
            for function in ("naive", "exact"):
                try:
                    status, _ = client.call("tally", function, name=function)
                except TRANSPORT_ERRORS:
                    status = 0
                with lock:
                    counts[function if status == 200 else "failed"] += 1
        client.close()

    pool = [threading.Thread(target=hammer) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(seconds + 30)
    results.put(counts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=4, help="client processes")
    parser.add_argument("--threads", type=int, default=4, help="threads per client process")
    args = parser.parse_args()

    with (
        tempfile.TemporaryDirectory(prefix="pmnc-counter-") as tmp,
        NodeProcess.one_cage(
            Path(tmp), HERE / "modules", node="counter", workers=WORKERS, threads=THREADS
        ) as node,
    ):
        node.start()
        port = node.port
        print(
            f"node: {WORKERS} workers x {THREADS} threads; clients: {args.clients} processes "
            f"x {args.threads} threads, {args.seconds:g} s",
            flush=True,
        )
        # fork before this process starts any thread of its own
        fork = multiprocessing.get_context("fork")
        results: Queue[dict[str, int]] = fork.Queue()
        procs = [
            fork.Process(target=client_process, args=(port, args.threads, args.seconds, results))
            for _ in range(args.clients)
        ]
        for p in procs:
            p.start()
        totals = {"naive": 0, "exact": 0, "failed": 0}
        for _ in procs:
            for key, value in results.get(timeout=args.seconds + 60).items():
                totals[key] += value
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                raise SystemExit("a client process did not finish")
        client = Client("127.0.0.1", port)
        stored = {f: client.result("tally", "get", name=f) for f in ("naive", "exact")}
        client.close()
        status = node.stop()

    print()
    print(f"{'':44} {'acknowledged':>12} {'stored':>8} {'lost':>8}")
    for function, code in (
        ("naive", 'pmnc_safe["naive"] = pmnc_safe.get(...) + 1'),
        ("exact", 'pmnc_safe.modify("exact", lambda n: n + 1, 0)'),
    ):
        acked, value = totals[function], stored[function]
        lost = acked - value
        share = f" ({100 * lost / acked:.1f}%)" if acked else ""
        print(f"{code:44} {acked:>12} {value:>8} {lost:>8}{share}")
    print(f"\nfailed requests: {totals['failed']}; node stopped with status {status}")
    return 0 if stored["exact"] == totals["exact"] and status == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
