"""Spreading a cage's connections evenly over its workers, which share one listening socket.

Every worker's loop is woken when a connection arrives and the first to call `accept()` gets
it. With long-lived keep-alive connections that race decides for a connection's whole life
which worker (and so which `threads`) serves it, and it is uneven: measured with wrk opening 32
connections at once on 4 workers, they held 13, 10, 7 and 2, so one worker queued requests
behind its 8 threads while another had 6 of its threads idle, and durable writes, which need
many concurrent committers to share each fsync, lost throughput. (The old thread-per-connection
server did not have this: a thread accepted only when it was free.)

So the workers of a cage share a small table, an anonymous shared mapping the supervisor
creates before it forks them: one counter per worker slot, the connections that worker holds.
A worker accepts when it holds no more than the least loaded worker plus one; otherwise it
leaves the connection to the others for a moment. It never waits long: a connection still
pending after MAX_DEFER is accepted by whoever sees it, so a worker that is hung, booting or
dead cannot make others leave clients waiting. A slot whose worker is gone reads as ABSENT.

The counters are read and written without locks: a stale or torn value only makes one
accept a little less even, never refuses one.
"""

from __future__ import annotations

import mmap
import struct

__all__ = ["ABSENT", "MAX_DEFER", "Balance"]

ABSENT = 1 << 62  # a slot with no worker: never the least loaded
MAX_DEFER = 0.02  # seconds a worker leaves a pending connection to less loaded ones
_SLOT = struct.Struct("q")


class Balance:
    """Connections held per worker slot, shared by a cage's workers (created before fork)."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._map = mmap.mmap(-1, _SLOT.size * max(1, slots))  # MAP_SHARED | MAP_ANONYMOUS
        for slot in range(slots):
            self.set(slot, ABSENT)

    def set(self, slot: int, connections: int) -> None:
        _SLOT.pack_into(self._map, _SLOT.size * slot, connections)

    def fair(self, slot: int) -> bool:
        """Whether the worker in `slot` should take the next connection now."""
        counts: list[int] = [
            _SLOT.unpack_from(self._map, _SLOT.size * s)[0] for s in range(self.slots)
        ]
        return counts[slot] <= min(counts) + 1

    def close(self) -> None:
        self._map.close()
