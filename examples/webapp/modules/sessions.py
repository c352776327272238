"""Login sessions that expire: what a web front end keeps between requests, in any worker.

Try: curl -d '{"user": "alice", "ttl": 600}' http://127.0.0.1:8081/sessions/create
then: curl -d '{"token": "<the token>"}' http://127.0.0.1:8081/sessions/touch

A session is one key (its random token) holding a dict, stored with the safe's own expiry
(`pmnc_safe.set(token, session, ttl=...)`): once its time passes it is absent for every read
in every worker at once, it no longer counts in `len`, and the safe reclaims its space in the
background (docs/safe-api.md, "Expiring keys"). Nothing here compares times or purges.

Sliding expiry (`touch`) is one `modify(..., ttl=...)`: read, merge and re-arm the expiry in a
single transaction, so two workers touching the same session at once cannot resurrect an older
copy of it, and a touch racing a logout or the expiry cannot bring the session back: an
expired or deleted session is absent inside `modify` too, and `touch` then stores nothing.
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
    token = secrets.token_urlsafe(18)
    session = {"user": user, "data": dict(data or {}), "created": time.time(), "ttl": ttl}
    pmnc_safe.set(token, session, ttl=ttl)
    return {"token": token, **session, "expires_in": ttl}


def get(token: str) -> dict[str, Any] | None:
    """The live session under `token` (with the seconds it has left), None if none or expired."""
    session = pmnc_safe.get(token)
    if not isinstance(session, dict):
        return None
    try:
        left = pmnc_safe.ttl(token)
    except KeyError:
        return None  # expired (or logged out) between the two reads
    return {**session, "expires_in": left}


def touch(token: str, data: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Push a live session's expiry `ttl` s from now (merging `data` into it); None if dead."""

    def extend(session: object) -> dict[str, Any]:
        if not isinstance(session, dict):
            raise _Gone  # absent, expired or logged out: store nothing
        return {**session, "data": {**session["data"], **(data or {})}}

    # The session's own ttl is only known inside `extend`; every session of this module has one,
    # and a touch re-arms it with that same ttl: read it first (a session whose ttl changed
    # meanwhile cannot exist: it is never rewritten with another).
    current = pmnc_safe.get(token)
    if not isinstance(current, dict):
        return None
    try:
        new = pmnc_safe.modify(token, extend, None, ttl=current["ttl"])
    except _Gone:
        return None
    assert isinstance(new, dict)
    return {**new, "expires_in": current["ttl"]}


def delete(token: str) -> bool:
    """End a session (a logout); whether it was live."""
    return pmnc_safe.pop(token, None) is not None


def count() -> int:
    """How many sessions are live now (expired ones are counted out by the safe itself)."""
    return len(pmnc_safe)


def _ttl(ttl: object) -> float:
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 < ttl <= MAX_TTL:
        raise ValueError(f"ttl must be a number of seconds in (0, {MAX_TTL:g}], got {ttl!r}")
    return float(ttl)
