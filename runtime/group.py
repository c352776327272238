"""A node group (the config's `replication:`): each safe's `Replication` settings, which node
a master site belongs to, and carrying a write that arrived where its safe is not master over
to the master's node.

The promise (README, "Replicated safes"): any node's cage accepts any call; a call that writes
where that safe is a client is carried out on the master and its caller gets the master's
answer. The safe raises SafeNotMasterError before writing anything (safe/env.py's funnel), so the
whole HTTP call is sent again, as it came, to the same cage on the master's node; the function
may therefore run more than once (like `modify`'s function). The forwarded request says so in
`X-Pmnc-Forwarded`, and is never forwarded again: a node that is not master either (an election
between the two hops) answers 503, which the first node takes as "ask again" until its
deadline. A function whose writes need two safes mastered on different nodes cannot succeed
while that lasts (each safe elects its own master): the caller gets 503 `NotMaster`.
"""

from __future__ import annotations

import http.client
import json
import select
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from pmnc.safe import Replication, Safe, SafeNotMasterError

from .app import Call, Response, error_response
from .calls import CHAIN_HEADER, master_route
from .config import NodeConfig, safe_sites
from .logs import logger

__all__ = [
    "FORWARDED_HEADER",
    "Forwarder",
    "node_of_site",
    "safe_replication",
]

FORWARDED_HEADER = "X-Pmnc-Forwarded"
# Between two looks for a master while there is none (an election takes about a second).
MASTER_POLL_S = 0.1
# How long a write waits for a master to carry it out, at most (request_timeout if shorter):
# the README's bound for a group to serve writes again after losing its master's node.
MASTER_WAIT_S = 10.0
# Connecting to and sending a call to the master's node, at most (a live node accepts at once).
CONNECT_S = 2.0


def safe_replication(cfg: NodeConfig, cage: str, module: str) -> Replication | None:
    """The `Replication` a process opens this safe with; None on a node without a group."""
    replication = cfg.replication
    if replication is None:
        return None
    local, peers = safe_sites(cfg)[(cage, module)]
    return Replication(
        local=local, peers=tuple(peers), ack=replication.ack, priority=replication.priority
    )


def node_of_site(cfg: NodeConfig, cage: str, module: str) -> dict[tuple[str, int], str]:
    """Which node each site of this safe's group is (its address -> node name)."""
    replication = cfg.replication
    if replication is None:
        return {}
    local, peers = safe_sites(cfg)[(cage, module)]
    names = {local: cfg.node}
    names.update(zip(peers, (p.node for p in replication.peers), strict=True))
    return names


class Forwarder:
    """Carries calls that met SafeNotMasterError to the master's node (see the module doc)."""

    def __init__(self, cfg: NodeConfig, cage: str, safes: Mapping[str, Safe]) -> None:
        self._cfg = cfg
        self._cage = cage
        self._timeout = min(cfg.request_timeout, MASTER_WAIT_S)
        self._by_path: dict[Path, tuple[Safe, dict[tuple[str, int], str]]] = {
            safe.path: (safe, node_of_site(cfg, cage, module)) for module, safe in safes.items()
        }

    def __call__(
        self, error: SafeNotMasterError, call: Call, run_here: Callable[[], Response]
    ) -> Response:
        """The answer to a call whose write met `error`: the master node's, or 503."""
        if call.forwarded:
            return error_response(
                503,
                "NotMaster",
                f"{error} (forwarded here as the master's node; the group's master changed: "
                "send the call again)",
            )
        entry = self._by_path.get(error.path)
        if entry is None:  # not a safe of this cage: nothing known of its group
            return error_response(503, "NotMaster", str(error))
        safe, nodes = entry
        deadline = time.monotonic() + self._timeout
        master = error.master
        last = str(error)
        while True:
            node = nodes.get(master) if master is not None else None
            if node == self._cfg.node and safe.is_master():
                return run_here()  # elected here meanwhile
            if node is not None and node != self._cfg.node:
                answer = self._send(node, call, deadline, safe, nodes)
                if answer is not None:
                    return answer
                last = f"the master's node {node} did not take the call"
            if time.monotonic() + MASTER_POLL_S > deadline:
                return error_response(
                    503,
                    "NotMaster",
                    f"{safe.path.name}: no master to carry the write out within "
                    f"{self._timeout:g} s ({last}); is a majority of the group up?",
                )
            time.sleep(MASTER_POLL_S)
            info = safe.replication() or {}
            master = _address(info.get("master"))

    def _send(
        self,
        node: str,
        call: Call,
        deadline: float,
        safe: Safe,
        nodes: Mapping[tuple[str, int], str],
    ) -> Response | None:
        """POST the call to `node`'s cage: its answer, or None if it could not be delivered
        or that node is no longer master (try again once a master is known).

        The answer is awaited for up to request_timeout, but a hung master node (stopped, or
        its machine frozen) accepts the connection and never answers: while waiting, the
        local site's view of the master is checked every MASTER_POLL_S, and once the group has
        elected another node the wait ends with 502 (the call may run there when it resumes,
        or not; it is not sent again, which could apply it twice)."""
        address = master_route(self._cfg, node, self._cage)
        if address is None:
            return error_response(
                503,
                "NotMaster",
                f"the master of this safe is node {node}, whose cage {self._cage} has no HTTP "
                "address in this node's replication.peers",
            )
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(address.host, address.host)
        headers = {"Content-Type": "application/json", FORWARDED_HEADER: self._cfg.node}
        if call.chain:
            headers[CHAIN_HEADER] = call.chain
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        conn = http.client.HTTPConnection(host, address.port, timeout=min(left, CONNECT_S))
        try:
            return self._exchange(conn, node, call, headers, safe=safe, nodes=nodes)
        finally:
            conn.close()

    def _exchange(
        self,
        conn: http.client.HTTPConnection,
        node: str,
        call: Call,
        headers: Mapping[str, str],
        *,
        safe: Safe,
        nodes: Mapping[tuple[str, int], str],
    ) -> Response | None:
        """One forwarded call on `conn` (see _send)."""
        try:
            conn.request("POST", f"/{call.module}/{call.function}", call.body, dict(headers))
        except OSError as e:
            logger.info("forwarding %s.%s to %s: %s", call.module, call.function, node, e)
            return None  # not sent: nothing ran there
        try:
            elected = self._await_answer(conn, node, safe, nodes)
            if elected is not None:
                return error_response(
                    502,
                    "ForwardError",
                    f"forwarded to node {node}, which gave no answer before the group "
                    f"elected node {elected}: the call may or may not have run there",
                )
            response = conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as e:
            return error_response(
                502,
                "ForwardError",
                f"forwarded to node {node} (the master), which gave no answer "
                f"({type(e).__name__}: {e}): the call may or may not have run there",
            )
        if response.status == 503 and _error_type(data) == "NotMaster":
            return None  # no longer master there: look again
        return Response(response.status, data)

    def _await_answer(
        self,
        conn: http.client.HTTPConnection,
        node: str,
        safe: Safe,
        nodes: Mapping[tuple[str, int], str],
    ) -> str | None:
        """Wait until `node` begins to answer (None), or the group elects another node (its
        name); TimeoutError past request_timeout."""
        answer_by = time.monotonic() + self._cfg.request_timeout
        while not _readable(conn, MASTER_POLL_S):
            master = _address((safe.replication() or {}).get("master"))
            elected = None if master is None else nodes.get(master)
            if elected is not None and elected != node:
                return elected
            if time.monotonic() > answer_by:
                raise TimeoutError(f"no answer within {self._cfg.request_timeout:g} s")
        if conn.sock is not None:
            conn.sock.settimeout(max(0.1, answer_by - time.monotonic()))
        return None


def _readable(conn: http.client.HTTPConnection, timeout: float) -> bool:
    """Whether the answer (or the connection's end) has begun to arrive within `timeout`."""
    if conn.sock is None:
        return True  # closed already: getresponse says how
    readable, _, _ = select.select([conn.sock], [], [], timeout)
    return bool(readable)


def _address(text: object) -> tuple[str, int] | None:
    if not isinstance(text, str) or ":" not in text:
        return None
    host, _, port = text.rpartition(":")
    return (host, int(port)) if port.isdigit() else None


def _error_type(data: bytes) -> str | None:
    """The type of an `{"error": "<Type>: <message>"}` answer (app.error_response)."""
    try:
        document = json.loads(data)
    except ValueError:
        return None
    text = document.get("error") if isinstance(document, dict) else None
    return text.partition(":")[0] if isinstance(text, str) else None
