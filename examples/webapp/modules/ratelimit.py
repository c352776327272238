"""A rate limiter: one token bucket per client, shared by every worker of the node.

Try: curl -d '{"client": "10.0.0.7", "rate": 2, "burst": 5}' http://127.0.0.1:8081/ratelimit/allow

Each call refills the client's bucket for the time elapsed (`rate` tokens a second, at most
`burst`) and takes `cost` tokens if it has them. Refill and take are one `pmnc_safe.modify`, so
concurrent requests for one client in different workers never both spend the same token (a
get-then-set would: see examples/counter).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pmnc.safe import Safe

# The runtime binds `pmnc_safe` to this module's own safe before running this file.
pmnc_safe: Safe = globals()["pmnc_safe"]


def allow(
    client: str, rate: float = 10.0, burst: float = 20.0, cost: float = 1.0
) -> dict[str, Any]:
    """Whether `client` may go ahead now, and the tokens left: {"allowed": bool, "tokens": n}."""
    for name, value in (("rate", rate), ("burst", burst), ("cost", cost)):
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    # One timestamp for the whole call: modify may run `take` again after a deadlock retry.
    now = time.time()

    def take(bucket: object) -> dict[str, Any]:
        if isinstance(bucket, dict):
            elapsed = max(0.0, now - bucket["stamp"])  # wall clocks may step back
            tokens = min(burst, bucket["tokens"] + elapsed * rate)
        else:
            tokens = burst  # a new client starts with a full bucket
        allowed = tokens >= cost
        return {"tokens": tokens - cost if allowed else tokens, "stamp": now, "allowed": allowed}

    bucket = pmnc_safe.modify(client, take, None)
    assert isinstance(bucket, dict)
    return {"allowed": bucket["allowed"], "tokens": round(bucket["tokens"], 3)}


def status(client: str) -> dict[str, Any] | None:
    """The client's bucket as last stored (tokens not refilled), None if never seen."""
    bucket = pmnc_safe.get(client)
    return bucket if isinstance(bucket, dict) else None


def reset(client: str) -> bool:
    """Forget the client's bucket (it starts full again); whether there was one."""
    return pmnc_safe.pop(client, None) is not None
