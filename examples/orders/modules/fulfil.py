"""Ships queued orders from a worker thread, with retries, exactly once per order id.

Each worker process of the cage runs one shipping thread (started when the module loads): it
takes the oldest order from this module's durable queue, `with queue.get(lease=LEASE) as
order:`, and ships it. The queue delivers at least once:

- a transient failure (simulated: the first attempt at every fifth order) raises inside the
  block, so the order is back at the head of the queue at once and retried;
- a worker killed with `kill -9` inside the block leaves its order leased: it is delivered
  again once LEASE has passed, by whichever worker takes it then;
- an order placed twice by a client that got no answer is in the queue twice.

So an order can arrive more than once, and shipping must be idempotent: a shipment is one
`modify` of the key `shipped:<id>`, which stores it only if absent, in one transaction. A
second delivery of a shipped order finds the key and is counted as a duplicate caught, never
shipped again. `progress` tells a client what happened.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import TYPE_CHECKING, Any

from pmnc.safe import SafeError, SafeNotMasterError

if TYPE_CHECKING:
    from pmnc.safe import Safe

pmnc_safe: Safe = globals()["pmnc_safe"]

LEASE = 3.0  # seconds before an order taken by a dead worker is delivered again
WORK_S = 0.002  # what shipping takes: long enough for a kill to land inside the block


class _Transient(Exception):
    """A failure worth retrying (the carrier's API timed out, say)."""


class _Shipped(Exception):
    """Raised inside `modify` when the order was shipped already: store nothing."""


def submit(order: dict[str, Any]) -> None:
    """Queue `order` for shipping; durable when it returns (called by `orders.place`)."""
    pmnc_safe.queue("orders").put(order)


def progress() -> dict[str, Any]:
    """Ids shipped, orders still queued, and the duplicates and retries met on the way."""
    shipped = sorted(int(key[8:]) for key in pmnc_safe if key.startswith("shipped:"))
    return {
        "shipped": shipped,
        "queued": len(pmnc_safe.queue("orders")),
        "duplicates": pmnc_safe.get("duplicates", 0),
        "retries": pmnc_safe.get("retries", 0),
    }


def _ship(order: dict[str, Any], attempt: int) -> None:
    if order["id"] % 5 == 0 and attempt == 0:
        pmnc_safe.modify("retries", lambda n: n + 1, 0)
        raise _Transient(f"order {order['id']}: carrier timed out")
    time.sleep(WORK_S)

    def record(old: object) -> dict[str, Any]:
        if old is not None:
            raise _Shipped
        return {"order": order, "at": time.time()}

    try:
        pmnc_safe.modify(f"shipped:{order['id']}", record, None)
    except _Shipped:
        pmnc_safe.modify("duplicates", lambda n: n + 1, 0)


def _shipping() -> None:
    orders = pmnc_safe.queue("orders")
    while True:
        try:
            delivery = orders.get(timeout=1.0, lease=LEASE)
            with delivery as order:
                _ship(order, delivery.redelivered)
        except (queue.Empty, _Transient):
            continue
        except SafeNotMasterError:
            # In a node group only the node where this safe is master takes from its queue:
            # the others wait and take over if the master's node goes (README, "Replicated
            # safes").
            time.sleep(1.0)
            continue
        except SafeError:
            return  # the safe was closed (the worker is stopping) or needs recovery


threading.Thread(target=_shipping, name="fulfil shipping", daemon=True).start()
