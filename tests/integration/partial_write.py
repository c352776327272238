"""Run by tests/integration/test_group.py in a fresh interpreter (a process that runs
replication must not fork, and pytest's does): a call that commits a write to one replicated
safe, then meets a client safe, must not be forwarded or run again. Prints one JSON line."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

from pmnc.runtime.app import Application, Call, Response
from pmnc.runtime.modules import AppModule
from pmnc.safe import Replication, Safe, SafeNotMasterError


def main() -> None:
    directory, port = Path(sys.argv[1]), int(sys.argv[2])
    safe = Safe.open(directory / "a", replication=Replication(local=("127.0.0.1", port)))
    forwarded: list[Call] = []

    def forward(e: SafeNotMasterError, call: Call, run_here: object) -> Response:
        forwarded.append(call)
        return Response(200, b'{"result": "forwarded"}')

    def writes_then_meets_a_client(fail: bool) -> int:
        safe.modify("n", lambda n: n + 1, 0)  # committed on this master
        if fail:  # as a second module's safe, mastered elsewhere, would raise
            raise SafeNotMasterError(directory / "b", "set", "a client", master=None)
        return int(safe["n"])

    def meets_a_client_first() -> int:
        raise SafeNotMasterError(directory / "b", "set", "a client", master=None)

    functions = {"partial": writes_then_meets_a_client, "clean": meets_a_client_first}
    module = AppModule("m", Path("m.py"), types.ModuleType("m"), functions)
    app = Application({"m": module}, forward=forward)
    partial = app.call("m", "partial", b'{"fail": true}')
    clean = app.call("m", "clean", b"{}")
    print(
        json.dumps(
            {
                "partial": [partial.status, json.loads(partial.body)],
                "clean": [clean.status, json.loads(clean.body)],
                "forwarded": [c.function for c in forwarded],
                "n": safe["n"],
            }
        ),
        flush=True,
    )
    safe.close()


if __name__ == "__main__":
    main()
