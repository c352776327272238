"""Takes orders over HTTP and hands them to `fulfil`'s durable queue (examples/orders/run.py).

    curl -d '{"id": 1, "item": "tea", "qty": 2}' http://127.0.0.1:PORT/orders/place

An order is acknowledged (200) only once it is in the queue for good: `Queue.put` is durable
when it returns. A client that got no answer (the worker was killed) places the same order
again; the queue may then hold it twice, and `fulfil` ships it once all the same (its shipment
is keyed by the order id).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pmnc.runtime import Pmnc
    from pmnc.safe import Safe

pmnc_safe: Safe = globals()["pmnc_safe"]
pmnc: Pmnc = globals()["pmnc"]


def place(id: int, item: str, qty: int = 1) -> dict[str, Any]:
    """Accept an order: validated, remembered here, queued for `fulfil`."""
    if isinstance(id, bool) or not isinstance(id, int) or id < 0:
        raise ValueError(f"id must be an int >= 0, got {id!r}")
    if not isinstance(item, str) or not item:
        raise ValueError("item must be a non-empty string")
    if isinstance(qty, bool) or not isinstance(qty, int) or not 0 < qty <= 1000:
        raise ValueError(f"qty must be an int in [1, 1000], got {qty!r}")
    order = {"id": id, "item": item, "qty": qty}
    pmnc_safe.setdefault(f"order:{id}", order)
    pmnc.fulfil.submit(order=order)
    return {"queued": id}
