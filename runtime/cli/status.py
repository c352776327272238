"""`pmnc-runtime status CONFIG`: a running node's workers and safes, per cage.

On a node group (the config's `replication:`) each replicated safe also shows its role, its
master's site and node, and its lag: the bytes of log its master had written, when the cage's
replication process last asked it, that this copy had not applied (status.py).

Each cage's figures come from its own `GET /_status`, that is from a worker actually serving, so
the answer also proves the interface works; a cage without HTTP is read from the reports the
endpoint itself combines (`status.py`). Exit 0, 2 for an invalid config, 3 with one line on
stderr when the node is not running or a cage does not answer.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
from typing import Any

from .. import status
from ..config import CageConfig, NodeConfig, load_config_or_report

__all__ = ["add_parser", "run"]

_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1"}  # listening everywhere: ask locally


def add_parser(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "status",
        help="show a running node's workers and safes",
        description="Print, per cage of the node described by CONFIG, its workers (pid, uptime, "
        "restarts, requests) and its safes (ops/s, p50/p99 per operation, retries, errors, log "
        "size, last checkpoint, cache hit ratio; on a node group each safe's role, master node and "
        "lag behind its master), as served by the cage's GET /_status. "
        "Exit 3 if the node is not running.",
    )
    parser.add_argument("config", metavar="CONFIG", help="the node's YAML file")
    parser.add_argument("--json", action="store_true", help="print the /_status documents")
    parser.add_argument(
        "--timeout", type=float, default=5.0, metavar="S", help="per cage (default 5)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = load_config_or_report(args.config)
    if config is None:
        return 2
    documents = []
    for cage in config.cages:
        try:
            documents.append(_fetch(config, cage, args.timeout))
        except status.NotRunningError as e:
            print(f"pmnc-runtime status: node {config.node}: {e}", file=sys.stderr)
            return 3
    if args.json:
        print(json.dumps({"node": config.node, "cages": documents}, indent=2))
    else:
        print("\n\n".join(status.render(d) for d in documents))
    return 0


def _fetch(config: NodeConfig, cage: CageConfig, timeout: float) -> dict[str, Any]:
    """The cage's `/_status` document; NotRunningError saying why there is none."""
    if cage.http is None:
        try:
            return status.cage_status(status.run_dir(config, cage.name))
        except status.NotRunningError as e:
            raise status.NotRunningError(f"not running (cage {cage.name}: {e})") from None
    host = _WILDCARDS.get(cage.http.host, cage.http.host)
    url = f"http://{cage.http}{status.STATUS_PATH}"
    conn = http.client.HTTPConnection(host, cage.http.port, timeout=timeout)
    try:
        conn.request("GET", status.STATUS_PATH)
        response = conn.getresponse()
        body = response.read()
    except ConnectionRefusedError:
        raise status.NotRunningError(
            f"not running (nothing listens on {url} for cage {cage.name})"
        ) from None
    except (OSError, http.client.HTTPException) as e:
        raise status.NotRunningError(f"cage {cage.name}: {url}: {e or type(e).__name__}") from None
    finally:
        conn.close()
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    if response.status != 200 or not isinstance(document, dict):
        raise status.NotRunningError(
            f"cage {cage.name}: {url} answered {response.status} {body[:200]!r}"
        )
    if document.get("node") != config.node or document.get("cage") != cage.name:
        raise status.NotRunningError(
            f"cage {cage.name}: {url} answered for node {document.get('node')!r} "
            f"cage {document.get('cage')!r}: another node on that address?"
        )
    return document
