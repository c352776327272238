"""Login sessions that expire: what a web front end keeps between requests, in any worker.

Try: curl -d '{"user": "alice", "ttl": 600}' http://127.0.0.1:8081/sessions/create
then: curl -d '{"token": "<the token>"}' http://127.0.0.1:8081/sessions/touch

A session is one key (its random token) holding a dict. Sliding expiry (`touch`) is a `modify`,
so two workers touching the same session at once cannot resurrect an older copy of it. An
expired session is dead for good: `get` and `touch` ignore it and `purge` deletes it, which is
why `purge` may read and delete in two transactions without losing a session touched meanwhile.

The clock is the module-level `_clock` (time.time): a client cannot choose the time it is judged
by; tests load a copy of this file whose `_clock` they step, instead of sleeping.
"""

from __future__ import annotations

import secrets
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pmnc.safe import Safe

# The runtime binds `pmnc_safe` to this module's own safe before running this file.
pmnc_safe: Safe = globals()["pmnc_safe"]

DEFAULT_TTL = 1800.0  # seconds a session lives without a touch
MAX_TTL = 86400.0 * 30
_clock = time.time  # what "now" is; private, so no request can pass another one


class _Gone(Exception):
    """Raised inside `modify` to store nothing when the session is absent or expired."""


def create(
    user: str,
    ttl: float = DEFAULT_TTL,
    data: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Start a session for `user` that expires `ttl` seconds after its last touch."""
    if not isinstance(user, str) or not user:
        raise ValueError("user must be a non-empty string")
    ttl = _ttl(ttl)
    now = _clock()
    token = secrets.token_urlsafe(18)
    session = {
        "user": user,
        "data": dict(data or {}),
        "created": now,
        "ttl": ttl,
        "expires": now + ttl,
    }
    pmnc_safe[token] = session
    return {"token": token, **session}


def get(token: str) -> dict[str, Any] | None:
    """The live session under `token`, None if there is none or it expired."""
    now = _clock()
    session = pmnc_safe.get(token)
    if not isinstance(session, dict) or session["expires"] <= now:
        return None
    return session


def touch(token: str, data: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Push a live session's expiry `ttl` s from now (merging `data` into it); None if dead."""
    now = _clock()

    def extend(session: object) -> dict[str, Any]:
        if not isinstance(session, dict) or session["expires"] <= now:
            raise _Gone
        return {
            **session,
            "data": {**session["data"], **(data or {})},
            "expires": now + session["ttl"],
        }

    try:
        new = pmnc_safe.modify(token, extend, None)
    except _Gone:
        return None
    assert isinstance(new, dict)
    return new


def delete(token: str) -> bool:
    """End a session (a logout); whether it was there."""
    return pmnc_safe.pop(token, None) is not None


def count() -> int:
    """How many sessions are live now."""
    now = _clock()
    return sum(1 for s in pmnc_safe.values() if isinstance(s, dict) and s["expires"] > now)


def purge() -> int:
    """Delete every expired session; how many were deleted."""
    now = _clock()
    expired = [t for t, s in pmnc_safe.items() if isinstance(s, dict) and s["expires"] <= now]
    return sum(1 for t in expired if pmnc_safe.pop(t, None) is not None)


def _ttl(ttl: object) -> float:
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 < ttl <= MAX_TTL:
        raise ValueError(f"ttl must be a number of seconds in (0, {MAX_TTL:g}], got {ttl!r}")
    return float(ttl)
