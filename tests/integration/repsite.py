"""One process on one replicated safe, driven over stdin/stdout by the replication tests.

    python repsite.py PATH LOCAL_PORT PEER_PORT[,PEER_PORT...] [ACK]

Prints {"ready": ...} once the safe is open, then answers one JSON line per command line:
["set", key, value], ["get", key], ["info"], ["wait_master", seconds], ["exit"]. Errors are
answered as {"error": class name, "message": ..., "master": ...}, never raised: a test reads
what a user of the safe would see. A real interpreter per site, not a fork: the first process
to open a replicated safe runs its replication and must not fork (safe/replication.py).
"""

from __future__ import annotations

import json
import sys
import time

from pmnc.safe import Replication, Safe, SafeError, SafeNotMasterError


def main() -> None:
    path, local, peers = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    ack = sys.argv[4] if len(sys.argv) > 4 else "quorum"
    replication = Replication(
        local=("127.0.0.1", local),
        peers=tuple(("127.0.0.1", int(p)) for p in peers.split(",") if p),
        ack=ack,
    )
    safe = Safe.open(path, replication=replication, timeout=5.0)
    print(json.dumps({"ready": safe.replication()}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        answer: dict[str, object]
        try:
            if command[0] == "set":
                safe[command[1]] = command[2]
                answer = {"ok": True}
            elif command[0] == "get":
                answer = {"value": safe.get(command[1])}
            elif command[0] == "info":
                answer = {"info": safe.replication()}
            elif command[0] == "wait_master":
                deadline = time.monotonic() + command[1]
                while True:
                    info = safe.replication()
                    if (info and info["master"]) or time.monotonic() > deadline:
                        break
                    time.sleep(0.05)
                answer = {"info": info}
            elif command[0] == "exit":
                safe.close()
                print(json.dumps({"ok": True}), flush=True)
                return
            else:
                answer = {"error": "unknown command"}
        except SafeNotMasterError as e:
            answer = {"error": type(e).__name__, "message": str(e), "master": e.master}
        except SafeError as e:
            answer = {"error": type(e).__name__, "message": str(e)}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
