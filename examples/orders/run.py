"""Orders through a durable queue while workers are killed: nothing lost, nothing shipped twice.

    python examples/orders/run.py [--seconds 6] [--kill-every 1.5] [--clients 4]

Starts `pmnc-runtime start` on a generated config (a temporary data directory, a free port,
2 workers x 4 threads) serving examples/orders/modules/: `orders.place` queues each order in
`fulfil`'s safe, and a thread in every worker ships them (modules/fulfil.py). Client threads
place orders with unique ids for `--seconds`, placing an order again when they got no answer,
while this script `kill -9`s a random worker every `--kill-every` seconds (the supervisor then
recovers the cage and forks new workers). Then it waits for the queue to drain and prints:

    acknowledged  orders that got a 200 (each in the queue for good)
    shipped       distinct orders shipped; lost = acknowledged and never shipped
    twice         orders shipped more than once (a shipment is keyed by the order id)
    duplicates    deliveries of an already shipped order, caught by that key
    retries       transient failures, retried at once from the head of the queue

Exit status 0 when nothing acknowledged was lost and the node stopped cleanly.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from pmnc.runtime.harness import TRANSPORT_ERRORS, Client, NodeProcess

HERE = Path(__file__).resolve().parent
WORKERS, THREADS = 2, 4
DRAIN_S = 60.0  # the most the queue may take to drain once placing stops


def place_orders(
    port: int, first_id: int, deadline: float, acked: list[int], failed: list[int]
) -> None:
    """Place orders first_id, first_id + 1, ... until `deadline`, each until it is acknowledged
    (at most 200 tries, backing off while the cage recovers)."""
    client = Client("127.0.0.1", port, timeout=10)
    order_id = first_id
    while time.monotonic() < deadline:
        for _ in range(200):
            try:
                status, _ = client.call("orders", "place", id=order_id, item="tea", qty=1)
            except TRANSPORT_ERRORS:
                status = 0
                client.close()
                client = Client("127.0.0.1", port, timeout=10)
            if status == 200:
                acked.append(order_id)
                break
            time.sleep(0.05)
        else:
            failed.append(order_id)
        order_id += 1
    client.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--kill-every", type=float, default=1.5, help="0: kill nothing")
    parser.add_argument("--clients", type=int, default=4, help="client threads")
    args = parser.parse_args()

    with (
        tempfile.TemporaryDirectory(prefix="pmnc-orders-") as tmp,
        NodeProcess.one_cage(
            Path(tmp), HERE / "modules", node="orders", workers=WORKERS, threads=THREADS
        ) as node,
    ):
        node.start()
        port = node.port
        print(
            f"node: {WORKERS} workers x {THREADS} threads; {args.clients} client threads for "
            f"{args.seconds:g} s; kill -9 of a worker every {args.kill_every:g} s",
            flush=True,
        )
        acked: list[int] = []
        failed: list[int] = []
        deadline = time.monotonic() + args.seconds
        clients = [
            threading.Thread(
                target=place_orders, args=(port, i * 1_000_000, deadline, acked, failed)
            )
            for i in range(args.clients)
        ]
        for t in clients:
            t.start()
        kills = 0
        while args.kill_every > 0 and time.monotonic() + args.kill_every < deadline:
            time.sleep(args.kill_every)
            workers = node.workers()
            if workers:
                os.kill(random.choice(workers), signal.SIGKILL)
                kills += 1
        for t in clients:
            t.join(args.seconds + 120)
            if t.is_alive():
                raise SystemExit("a client thread did not finish")
        progress = drain(port, set(acked))
        status = node.stop()

    shipped = set(progress["shipped"])
    lost = set(acked) - shipped
    print()
    print(f"acknowledged {len(acked):>7}   (unacknowledged after 200 tries: {len(failed)})")
    print(f"shipped      {len(shipped):>7}   lost: {len(lost)}")
    print(f"twice        {0:>7}   (one shipment per order id; see duplicates)")
    print(f"duplicates   {progress['duplicates']:>7}   deliveries of shipped orders, caught")
    print(f"retries      {progress['retries']:>7}   transient failures, retried from the head")
    print(f"kills        {kills:>7}   still queued: {progress['queued']}")
    print(f"\nnode stopped with status {status}")
    return 0 if not lost and not failed and progress["queued"] == 0 and status == 0 else 1


def drain(port: int, acked: set[int]) -> dict[str, Any]:
    """`fulfil.progress` once every acknowledged order is shipped and the queue is empty, or
    after DRAIN_S (the leases of orders taken by killed workers must run out first)."""
    deadline = time.monotonic() + DRAIN_S
    client = Client("127.0.0.1", port, timeout=10)
    progress: dict[str, Any] = {"shipped": [], "queued": -1, "duplicates": 0, "retries": 0}
    while time.monotonic() < deadline:
        try:
            status, answer = client.call("fulfil", "progress")
        except TRANSPORT_ERRORS:
            client.close()
            client = Client("127.0.0.1", port, timeout=10)
            status, answer = 0, None
        if status == 200:
            progress = answer["result"]
            if progress["queued"] == 0 and acked <= set(progress["shipped"]):
                break
        time.sleep(0.2)
    client.close()
    return progress


if __name__ == "__main__":
    sys.exit(main())
