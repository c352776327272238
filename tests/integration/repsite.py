"""One process on one replicated safe, driven over stdin/stdout by the replication tests
(tests/integration/test_replication_safe.py).

    python repsite.py PATH LOCAL_PORT PEER_PORT[,PEER_PORT...] [ACK]

PEER_PORT may be "" (a group of one). Prints {"ready": info, "open_s": seconds} once the safe is
open, then answers one JSON line per command line:

- ["set", key, value], ["get", key], ["pop", key], ["info"], ["wait_master", seconds], ["exit"];
- ["wait_role", role, seconds]: until `replication()["role"]` is `role` (or the time is up);
- ["put_many", prefix, n, size]: writes prefix0..prefix{n-1} (values of `size` bytes), one
  line per key as it returns, {"k": key} if it returned without error, {"k": key, "error":
  class name} if not, then {"done": true, "ok": count, "errors": {class: count}, "s": seconds}.
  Lines are printed as each write returns, so that a test that kills this process with
  kill -9 still reads every write that was acknowledged before it died;
- ["missing", prefix, n]: {"missing": keys of prefix0..prefix{n-1} that are absent here};
- ["spin_reads", seconds]: reads without pause in a thread for `seconds` (a busy worker);
- ["count"]: {"count": len(safe)};
- ["checkpoint"]: checkpoints, then {"logs": the log files left in the directory};
- ["stat"]: {"info": replication(), "count": len(safe), "logs": log files}.

Errors are answered as {"error": class name, "message": ..., "master": ...}, never raised: a test
reads what a user of the safe would see. A real interpreter per site, not a fork: the first
process to open a replicated safe runs its replication and must not fork (safe/replication.py).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

from pmnc.safe import Replication, Safe, SafeError, SafeNotMasterError


def say(answer: dict[str, Any]) -> None:
    print(json.dumps(answer), flush=True)


def logs(path: str) -> list[str]:
    return sorted(p.name for p in Path(path).glob("log.*"))


def put_many(safe: Safe, prefix: str, n: int, size: int) -> dict[str, Any]:
    started = time.monotonic()
    ok = 0
    errors: dict[str, int] = {}
    value = "x" * size
    for i in range(n):
        key = f"{prefix}{i}"
        try:
            safe[key] = value
        except SafeError as e:
            errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
            say({"k": key, "error": type(e).__name__})
        else:
            ok += 1
            say({"k": key})
    return {"done": True, "ok": ok, "errors": errors, "s": time.monotonic() - started}


def spin_reads(safe: Safe, seconds: float) -> None:
    """Read without pause for `seconds` in a thread of its own, so that this process nearly
    always has a Berkeley DB call in flight (what a busy worker has)."""

    def spin() -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                safe.get("spin")
            except SafeError:
                time.sleep(0.01)

    threading.Thread(target=spin, daemon=True).start()


def wait_for(safe: Safe, ready: Any, seconds: float) -> dict[str, Any] | None:
    deadline = time.monotonic() + seconds
    while True:
        info = safe.replication()
        if ready(info) or time.monotonic() > deadline:
            return info
        time.sleep(0.02)


def main() -> None:
    path, local, peers = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    ack = sys.argv[4] if len(sys.argv) > 4 else "quorum"
    replication = Replication(
        local=("127.0.0.1", local),
        peers=tuple(("127.0.0.1", int(p)) for p in peers.split(",") if p),
        ack=ack,
    )
    started = time.monotonic()
    safe = Safe.open(path, replication=replication, timeout=5.0)
    say({"ready": safe.replication(), "open_s": time.monotonic() - started})
    for line in sys.stdin:
        command = json.loads(line)
        answer: dict[str, Any]
        try:
            if command[0] == "set":
                safe[command[1]] = command[2]
                answer = {"ok": True}
            elif command[0] == "get":
                answer = {"value": safe.get(command[1])}
            elif command[0] == "pop":
                answer = {"value": safe.pop(command[1], None)}
            elif command[0] == "info":
                answer = {"info": safe.replication()}
            elif command[0] == "wait_master":
                answer = {"info": wait_for(safe, lambda i: i and i["master"], command[1])}
            elif command[0] == "wait_role":
                answer = {
                    "info": wait_for(safe, lambda i, r=command[1]: i and i["role"] == r, command[2])
                }
            elif command[0] == "put_many":
                answer = put_many(safe, command[1], command[2], command[3])
            elif command[0] == "missing":
                prefix, n = command[1], command[2]
                answer = {
                    "missing": [f"{prefix}{i}" for i in range(n) if f"{prefix}{i}" not in safe]
                }
            elif command[0] == "spin_reads":
                spin_reads(safe, command[1])
                answer = {"ok": True}
            elif command[0] == "count":
                answer = {"count": len(safe)}
            elif command[0] == "checkpoint":
                safe.checkpoint()
                answer = {"logs": logs(path)}
            elif command[0] == "stat":
                answer = {"info": safe.replication(), "count": len(safe), "logs": logs(path)}
            elif command[0] == "exit":
                safe.close()
                say({"ok": True})
                return
            else:
                answer = {"error": "unknown command"}
        except SafeNotMasterError as e:
            answer = {"error": type(e).__name__, "message": str(e), "master": e.master}
        except SafeError as e:
            answer = {"error": type(e).__name__, "message": str(e)}
        say(answer)


if __name__ == "__main__":
    main()
