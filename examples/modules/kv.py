"""A key-value store over HTTP: any JSON value under a string key.

Try: curl -d '{"key": "k", "value": [1, 2]}' http://127.0.0.1:8080/kv/put
and: curl -d '{"key": "k"}' http://127.0.0.1:8080/kv/get
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pmnc.safe import Safe

# The runtime binds `pmnc_safe` to this module's own safe before running this file.
pmnc_safe: Safe = globals()["pmnc_safe"]


def put(key: str, value: object) -> None:
    """Store `value` under `key`, replacing any old value. Durable when this returns."""
    pmnc_safe[key] = value


def get(key: str, default: object = None) -> object:
    """The value under `key`, or `default`."""
    return pmnc_safe.get(key, default)


def delete(key: str) -> bool:
    """Remove `key`; whether it was there."""
    return pmnc_safe.pop(key, _ABSENT) is not _ABSENT


def keys(prefix: str = "") -> list[str]:
    """The keys starting with `prefix`, sorted."""
    return sorted(k for k in pmnc_safe if k.startswith(prefix))


_ABSENT = object()
