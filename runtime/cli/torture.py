"""`pmnc-runtime torture CONFIG`: kill -9 a node under write load and prove nothing was lost.

What a user runs against their own disk and config before trusting them. It starts the node
(on a scratch data directory unless `--in-place`), with one extra module in a scratch copy of
each cage's modules directory: `pmnc_torture` (`put(key, value)`, `get(key)`). Client threads
write unique keys to it over HTTP and log every acknowledged (200) write. Meanwhile a random
worker is SIGKILLed every `--kill-every` seconds (give or take half), or with `--whole-node`
the node's whole process group, which is then started again. When the time is up the node is
stopped gracefully, every `pmnc_torture` safe is opened directly with `pmnc.safe.Safe`, every
acknowledged write is looked up, and the database is verified. The last line of the report is
`lost: N`; the exit status is 0 only when nothing was lost (and every kill was recovered from).

A recovery time runs from the kill to the first write every cage acknowledges after the
supervisor logged it serving again (or, with `--whole-node`, after the restarted node's "ready").

With `--group N` (N >= 3) the config's cages run as a replicated group of N nodes on this
machine (README, "Replicated safes"; scratch configs written by `config.dump_config` with a
`replication:` section, every address on 127.0.0.1). Writers send each write to the nodes in
turn; a write reaching a client is carried out on the master (runtime/group.py). Each round
the node whose `pmnc_torture` safe (of the first cage) is master is found from `/_status`, its
whole process group SIGKILLed, the failover timed (from the kill until every cage acknowledged
a write sent after it), and the node started again until its safes are synced and it is a client.
At the end every acknowledged key is read back from every node over HTTP (reads are local, so
each node is given CATCHUP_TIMEOUT to catch up), the nodes are stopped and their safes
verified; `lost: N` counts the acknowledged writes missing on any node. Exit 1 if any, 3 if a
failover took over 10 s (the group's bound, tests/integration/test_group.py) or anything failed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pmnc.safe import Safe, SafeError, verify

from ..config import (
    ACK_POLICIES,
    CageConfig,
    ConfigError,
    HttpAddress,
    NodeConfig,
    PeerConfig,
    ReplicationConfig,
    dump_config,
    load_config,
    load_config_or_report,
)
from ..harness import (
    TRANSPORT_ERRORS,
    Client,
    NodeProcess,
    free_port,
    free_port_range,
    percentile,
)

__all__ = ["MODULE", "add_parser", "run"]

MODULE = "pmnc_torture"
_SOURCE = '''"""A write probe that `pmnc-runtime torture` adds to a scratch copy of the modules."""

pmnc_safe = globals()["pmnc_safe"]


def put(key: str, value: object) -> None:
    """Store `value` under `key`: durable when this returns (the write the torture logs)."""
    pmnc_safe[key] = value


def get(key: str) -> object:
    """The value under `key`, None if absent."""
    return pmnc_safe.get(key)


def missing(keys: list[str]) -> list[str]:
    """Those of `keys` whose value here is not the key itself (read locally, never forwarded)."""
    return [key for key in keys if pmnc_safe.get(key) != key]
'''
RECOVERY_TIMEOUT = 60.0  # a kill not recovered from by then is reported as a failure
EXIT_LOST = 1
EXIT_USAGE = 2
EXIT_FAILED = 3
MIN_GROUP = 3  # two nodes cannot elect a master once one is gone (see _run_group)


def add_parser(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "torture",
        help="kill -9 a node under write load, then check that no acknowledged write was lost",
        description="Start the node of CONFIG on a scratch data directory (unless --in-place), "
        f"add a '{MODULE}' module to a scratch copy of each cage's modules, write unique keys "
        "to it over HTTP while killing random workers (or with --whole-node the whole node, "
        "then restarting it), then check every acknowledged write. With --group N, run the "
        "cages as a group of N nodes on this machine and kill the master's node each round. "
        "Exit 0 only when none was lost; the last line of the report is 'lost: N'.",
    )
    parser.add_argument("config", metavar="CONFIG", help="the node's YAML file")
    parser.add_argument(
        "--duration",
        type=_positive,
        default=None,
        metavar="SECONDS",
        help="default 30 (not with --group, whose run is --rounds rounds)",
    )
    parser.add_argument(
        "--kill-every",
        type=_positive,
        default=2.0,
        metavar="SECONDS",
        help="mean interval between kills, each drawn from 0.5x to 1.5x of it (default 2); "
        "with --group, the writing between a node's rejoin and the next kill",
    )
    parser.add_argument(
        "--whole-node",
        action="store_true",
        help="SIGKILL the node's whole process group instead of one worker, then restart it",
    )
    parser.add_argument(
        "--in-place",
        action="store_true",
        help="use the config's own data_dir and ports (the node must not be running); "
        f"leaves the '{MODULE}' safe and its keys there",
    )
    parser.add_argument(
        "--clients", type=int, default=4, metavar="N", help="writer threads per cage (default 4)"
    )
    parser.add_argument("--seed", type=int, default=None, help="seed of the kill schedule")
    parser.add_argument(
        "--group",
        type=int,
        default=None,
        metavar="N",
        help=f"run CONFIG's cages as a replicated group of N >= {MIN_GROUP} nodes on this "
        "machine and, every round, SIGKILL the node that is master of the probe's safe, "
        "then start it again",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=5,
        metavar="N",
        help="with --group: how many master nodes to kill (default 5)",
    )
    parser.add_argument(
        "--ack",
        choices=ACK_POLICIES,
        default=None,
        help="with --group: the group's ack policy (default: CONFIG's, else quorum)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the scratch directory (its path is printed)"
    )
    parser.set_defaults(func=run)


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text}")
    return value


@dataclass
class _Target:
    """One cage under load: where it listens, its torture safe, and what was acknowledged."""

    cage: str
    host: str
    port: int
    safe_dir: Path
    acked: list[str] = field(default_factory=list)
    last_ack: float = 0.0  # time.monotonic() of the latest acknowledgement


class _Load:
    """Writer threads, `clients` per cage, each putting unique keys (value = key) forever."""

    def __init__(self, targets: list[_Target], clients: int) -> None:
        self.targets = targets
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.ops = 0
        self.failed = 0
        self.last_ack = 0.0
        self.longest_gap = 0.0
        self.errors: list[str] = []  # unexpected answers, a sample for the report
        self.threads = [
            threading.Thread(target=self._write, args=(t, i), daemon=True, name=f"{t.cage}-{i}")
            for t in targets
            for i in range(clients)
        ]

    def start(self) -> None:
        self.last_ack = time.monotonic()
        for thread in self.threads:
            thread.start()

    def finish(self, timeout: float = 30.0) -> list[str]:
        """Stop the writers; the names of those still alive after `timeout` (deadlocked)."""
        self.stop.set()
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return [t.name for t in self.threads if t.is_alive()]

    def _write(self, target: _Target, index: int) -> None:
        client = Client(target.host, target.port, timeout=10.0)
        n = 0
        try:
            while not self.stop.is_set():
                key = f"{target.cage}/{index}/{n}"
                n += 1
                try:
                    status, body = client.call(MODULE, "put", key=key, value=key)
                except TRANSPORT_ERRORS:
                    status, body = 0, None
                now = time.monotonic()
                with self.lock:
                    if status == 200:
                        target.acked.append(key)
                        target.last_ack = now
                        self.ops += 1
                        self.longest_gap = max(self.longest_gap, now - self.last_ack)
                        self.last_ack = now
                    else:
                        self.failed += 1
                        if status not in (0, 503) and len(self.errors) < 5:
                            self.errors.append(f"HTTP {status}: {body}")
                if status != 200:
                    time.sleep(random.uniform(0.005, 0.02))
        finally:
            client.close()

    def counts(self) -> tuple[int, int]:
        with self.lock:
            return self.ops, self.failed


def run(args: argparse.Namespace) -> int:
    """Torture the node of `args.config`; 0 when no acknowledged write was lost."""
    cfg = load_config_or_report(args.config)
    if cfg is None:
        return EXIT_USAGE
    if not any(cage.http for cage in cfg.cages):
        print(f"{args.config}: no cage has an http interface to drive", file=sys.stderr)
        return EXIT_USAGE
    if args.clients < 1:
        print("torture: --clients must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    if args.group is not None:
        return _run_group(args, cfg)
    if args.duration is None:
        args.duration = 30.0
    scratch = Path(tempfile.mkdtemp(prefix="pmnc-torture-"))
    try:
        try:
            config, targets = _scratch_config(cfg, scratch, in_place=args.in_place)
        except (OSError, ValueError) as e:
            print(f"torture: cannot prepare {scratch}: {e}", file=sys.stderr)
            return EXIT_FAILED
        with NodeProcess(config, scratch / "node.log") as node:
            return _torture(args, cfg, node, targets)
    finally:
        if args.keep:
            print(f"scratch directory kept: {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


def _copy_with_probe(cage: CageConfig, scratch: Path) -> Path:
    """A scratch copy of the cage's modules with the probe module added; ValueError if the
    cage already has a module of that name."""
    modules = scratch / "modules" / cage.name
    shutil.copytree(cage.modules, modules, ignore=shutil.ignore_patterns("__pycache__"))
    probe = modules / f"{MODULE}.py"
    if probe.exists():
        raise ValueError(f"cage {cage.name} already has a module named {MODULE}")
    probe.write_text(_SOURCE)
    return modules


def _scratch_config(
    cfg: NodeConfig, scratch: Path, *, in_place: bool
) -> tuple[Path, list[_Target]]:
    """A copy of the config: modules copied with the probe added, data_dir and ports scratch.

    Written by `config.dump_config`, so every node key carries over and the safe paths and the
    address format stay `config.py`'s.
    """
    cages = []
    for cage in cfg.cages:
        modules = _copy_with_probe(cage, scratch)
        http = cage.http
        if http is not None and not in_place:
            http = HttpAddress(http.host, free_port(http.host))
        cages.append(dataclasses.replace(cage, modules=modules, http=http))
    config = scratch / "node.yaml"
    copy = dataclasses.replace(
        cfg, file=config, data_dir=cfg.data_dir if in_place else scratch / "var", cages=tuple(cages)
    )
    config.write_text(dump_config(copy))
    targets = [
        _Target(cage.name, cage.http.host, cage.http.port, copy.safe_dir(cage.name, MODULE))
        for cage in copy.cages
        if cage.http is not None
    ]
    return config, targets


def _torture(
    args: argparse.Namespace, cfg: NodeConfig, node: NodeProcess, targets: list[_Target]
) -> int:
    rng = random.Random(args.seed)
    what = "the whole node" if args.whole_node else "a worker"
    shape = ", ".join(f"{c.name}: {c.workers}x{c.threads}" for c in cfg.cages)
    print(
        f"torture: node {cfg.node} ({shape}) for {args.duration:g} s, "
        f"killing {what} every ~{args.kill_every:g} s; log: {node.log}",
        flush=True,
    )
    try:
        node.start()
    except RuntimeError as e:
        print(f"torture: the node did not start: {e}", file=sys.stderr)
        return EXIT_FAILED
    load = _Load(targets, args.clients)
    load.start()
    started = time.monotonic()
    end = started + args.duration
    next_kill = started + args.kill_every * rng.uniform(0.5, 1.5)
    next_report = started + 1.0
    kills = 0
    recoveries: list[float] = []
    failure = ""
    try:
        while not failure and time.monotonic() < end:
            now = time.monotonic()
            if now >= next_report:
                ops, failed = load.counts()
                print(
                    f"[{now - started:6.1f} s] ops {ops}  failed {failed}  "
                    f"kills {kills}  recoveries {len(recoveries)}",
                    flush=True,
                )
                next_report = now + 1.0
            if now >= next_kill:
                killed, failure, took = (
                    _kill_node(node, targets)
                    if args.whole_node
                    else _kill_worker(node, targets, rng)
                )
                kills += killed
                if killed and not failure:
                    recoveries.append(took)
                next_kill = time.monotonic() + args.kill_every * rng.uniform(0.5, 1.5)
            time.sleep(max(0.0, min(next_kill, next_report, end) - time.monotonic()))
    finally:
        stuck = load.finish()
    elapsed = time.monotonic() - started
    status = _stop(node)
    lost, checked, problems = _check(targets)
    ops, failed = load.counts()
    requests = ops + failed
    print(f"duration: {elapsed:.1f} s")
    print(f"ops: {ops} acknowledged writes ({ops / elapsed:.0f}/s)")
    print(f"failed requests: {failed} of {requests} ({100 * failed / max(1, requests):.2f}%)")
    for error in load.errors:
        print(f"  unexpected answer: {error}")
    print(f"kills: {kills} ({'whole node' if args.whole_node else 'one worker each'})")
    print(
        f"recoveries: {len(recoveries)}, recovery time p50 {percentile(recoveries, 50):.3f} s, "
        f"max {max(recoveries, default=0.0):.3f} s"
    )
    print(f"longest gap between acknowledged writes: {load.longest_gap:.3f} s")
    print(f"final stop: exit status {status}")
    print(f"verify: {'; '.join(problems) or f'ok ({len(targets)} safe(s))'}")
    _print_failures(failure, stuck)
    bad = failure or stuck or problems or status != 0
    return _print_lost(lost, f"{checked} acknowledged writes", bad)


def _print_failures(failure: str | None, stuck: list[str]) -> None:
    if failure:
        print(f"FAILED: {failure}")
    if stuck:
        print(f"FAILED: writer threads still running (deadlocked?): {', '.join(stuck)}")


def _print_lost(lost: list[str], checked: str, bad: object) -> int:
    """The closing lines every torture run prints, and its exit status."""
    for key in lost[:100]:
        print(f"  lost {key}")
    if len(lost) > 100:
        print(f"  ... and {len(lost) - 100} more")
    print(f"checked: {checked}")
    print(f"lost: {len(lost)}")
    if lost:
        return EXIT_LOST
    return EXIT_FAILED if bad else 0


_KILLED = re.compile(r"cage (\S+): worker (\d+) killed by SIGKILL")


def _kill_worker(
    node: NodeProcess, targets: list[_Target], rng: random.Random
) -> tuple[int, str, float]:
    """SIGKILL one random worker; (kills, failure, seconds until every cage served again)."""
    if not node.alive():
        return 0, f"the node exited ({node.text()[-2000:]})", 0.0
    pids = node.workers()
    if not pids:
        return 0, "", 0.0  # between generations: try again at the next tick
    victim = rng.choice(pids)
    mark = node.log_size()
    killed_at = time.monotonic()
    try:
        os.kill(victim, signal.SIGKILL)
    except ProcessLookupError:
        return 0, "", 0.0
    deadline = killed_at + RECOVERY_TIMEOUT
    try:
        text = node.wait_log(f"worker {victim} killed by SIGKILL", RECOVERY_TIMEOUT, since=mark)
        match = next(m for m in _KILLED.finditer(text) if int(m.group(2)) == victim)
        node.wait_log(
            f"cage {match.group(1)}: serving again", deadline - time.monotonic(), since=mark
        )
        _wait_acked(targets, time.monotonic(), deadline)
    except (RuntimeError, StopIteration) as e:
        return 1, f"no recovery after killing worker {victim}: {e}", 0.0
    return 1, "", time.monotonic() - killed_at


def _kill_node(node: NodeProcess, targets: list[_Target]) -> tuple[int, str, float]:
    """SIGKILL the whole process group, start the node again; seconds until it serves."""
    killed_at = time.monotonic()
    node.kill_group()
    if node.group_alive():
        return 1, "processes of the node survived SIGKILL of its group", 0.0
    try:
        node.start(timeout=RECOVERY_TIMEOUT)
        _wait_acked(targets, time.monotonic(), killed_at + RECOVERY_TIMEOUT)
    except RuntimeError as e:
        return 1, f"no recovery after killing the node: {e}", 0.0
    return 1, "", time.monotonic() - killed_at


def _wait_acked(targets: list[_Target], since: float, deadline: float) -> None:
    """Until every cage has acknowledged a write after `since`; RuntimeError at the deadline.

    The writers' own requests are the probe: a fresh probe connection could wait behind their
    keep-alive connections when a cage has no more threads than writers.
    """
    for target in targets:
        while target.last_ack <= since:
            if time.monotonic() > deadline:
                raise RuntimeError(f"cage {target.cage} acknowledged no write since")
            time.sleep(0.002)


def _stop(node: NodeProcess) -> int:
    """A graceful stop; SIGKILL of the group if it does not come (the check recovers)."""
    try:
        return node.stop(timeout=60.0)
    except RuntimeError as e:
        print(f"torture: {e}", file=sys.stderr)
        return -signal.SIGKILL


def _check(targets: list[_Target]) -> tuple[list[str], int, list[str]]:
    """(lost keys, keys checked, problems) from the safes themselves, the node stopped."""
    lost: list[str] = []
    checked = 0
    problems: list[str] = []
    for target in targets:
        try:
            with Safe.open(target.safe_dir, create=False) as safe:
                for key in target.acked:
                    checked += 1
                    if safe.get(key) != key:
                        lost.append(key)
            verify(target.safe_dir)
        except SafeError as e:
            problems.append(str(e))
            if checked == 0:
                lost.extend(target.acked)  # the safe cannot be read: nothing is proven present
    return lost, checked, problems


# --- group mode (`--group N`) ------------------------------------------------------------------

FAILOVER_LIMIT = 10.0  # the group's contract: writes served again within 10 s (test_group.py)
FORM_TIMEOUT = 90.0  # a fresh group forms in ~10-15 s on 2 cores
REJOIN_TIMEOUT = 60.0  # a restarted node back as a synced client
CATCHUP_TIMEOUT = 30.0  # the final reads: every node's copy has every acknowledged write
READ_BATCH = 2000  # keys per `missing` call, well under the default max_body of 1 MiB
# Longer than the node's own request_timeout (30 s by default): a forwarded write waiting for a
# new master gets the node's answer (200 or 503) rather than a client-side timeout.
WRITE_TIMEOUT = 40.0


@dataclass
class _GroupTarget:
    """One cage of the group: its address and probe safe on every node, what was acknowledged."""

    cage: str
    addresses: list[tuple[str, int]]  # node i's HTTP address of this cage
    safe_dirs: list[Path]  # node i's `pmnc_torture` safe of this cage
    acked: list[str] = field(default_factory=list)


class _GroupLoad:
    """Writer threads, `clients` per cage, each sending its writes to every node in turn.

    An answer is one of: 200 (acknowledged: must survive anything), 502/504 or a connection
    cut after sending (unknown: the write may or may not have run, README "Replicated safes"),
    a refused connection (the node is down: nothing was sent), 503 (not run: sent again later).
    """

    def __init__(self, targets: list[_GroupTarget], clients: int) -> None:
        self.targets = targets
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.acked = 0
        self.unknown = 0
        self.refused = 0
        self.retry = 0  # 503
        self.errors: list[str] = []
        self.probe_from = math.inf  # each cage's first acknowledgement of a write sent after
        self.probe_at: dict[str, float] = {}  # this came at this time.monotonic()
        self.threads = [
            threading.Thread(target=self._write, args=(t, i), daemon=True, name=f"{t.cage}-{i}")
            for t in targets
            for i in range(clients)
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def finish(self, timeout: float = WRITE_TIMEOUT + 5.0) -> list[str]:
        """Stop the writers; the names of those still alive after `timeout` (deadlocked)."""
        self.stop.set()
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return [t.name for t in self.threads if t.is_alive()]

    def probe(self, since: float) -> None:
        """Watch for each cage's first acknowledgement of a write sent after `since`."""
        with self.lock:
            self.probe_from = since
            self.probe_at = {}

    def served(self, deadline: float) -> float | None:
        """When every cage had acknowledged a write sent after the probe's `since` (each cage's
        safe may have had its master on the killed node); None at the deadline."""
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.probe_at) == len(self.targets):
                    return max(self.probe_at.values())
            time.sleep(0.005)
        return None

    def _write(self, target: _GroupTarget, index: int) -> None:
        clients = [Client(host, port, timeout=WRITE_TIMEOUT) for host, port in target.addresses]
        n = 0
        try:
            while not self.stop.is_set():
                client = clients[(index + n) % len(clients)]  # every node in turn
                key = f"{target.cage}/{index}/{n}"
                n += 1
                sent = time.monotonic()
                try:
                    status, body = client.call(MODULE, "put", key=key, value=key)
                except ConnectionRefusedError:
                    status, body = -1, None
                except TRANSPORT_ERRORS:
                    status, body = 0, None
                now = time.monotonic()
                with self.lock:
                    if status == 200:
                        target.acked.append(key)
                        self.acked += 1
                        if sent > self.probe_from:
                            self.probe_at.setdefault(target.cage, now)
                    elif status in (0, 502, 504):
                        self.unknown += 1
                    elif status == -1:
                        self.refused += 1
                    elif status == 503:
                        self.retry += 1
                    elif len(self.errors) < 5:
                        self.errors.append(f"HTTP {status}: {body}")
                if status != 200:
                    time.sleep(random.uniform(0.005, 0.02))
        finally:
            for client in clients:
                client.close()


def _run_group(args: argparse.Namespace, cfg: NodeConfig) -> int:
    """`--group N`: CONFIG's cages as a group of N nodes on this machine, the master's node
    killed every round under writes to all nodes; 0 when no acknowledged write is missing on
    any node and every failover took at most FAILOVER_LIMIT.

    N >= 3: a group elects a master only with a majority of its sites, so a group of two that
    lost one node never takes a write again (and with ack: quorum, neither does its master).
    """
    if args.group < MIN_GROUP:
        print(
            f"torture: --group {args.group}: a group needs at least {MIN_GROUP} nodes; electing "
            "a master takes a majority of the group, which a two-node group no longer has once "
            "the master's node is killed",
            file=sys.stderr,
        )
        return EXIT_USAGE
    for flag, given in (
        ("--in-place", args.in_place),
        ("--whole-node", args.whole_node),
        ("--duration", args.duration is not None),
    ):
        if given:
            print(f"torture: {flag} does not apply with --group", file=sys.stderr)
            return EXIT_USAGE
    if args.rounds < 1:
        print("torture: --rounds must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    ack = args.ack or (cfg.replication.ack if cfg.replication else "quorum")
    scratch = Path(tempfile.mkdtemp(prefix="pmnc-torture-group-"))
    nodes: list[NodeProcess] = []
    try:
        try:
            nodes, targets = _group_configs(cfg, scratch, args.group, ack)
        except (OSError, ValueError, RuntimeError, ConfigError) as e:
            print(f"torture: cannot prepare {scratch}: {e}", file=sys.stderr)
            return EXIT_FAILED
        return _torture_group(args, cfg, ack, nodes, targets)
    finally:
        for node in nodes:
            node.kill_group()
        if args.keep:
            print(f"scratch directory kept: {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


def _group_configs(
    cfg: NodeConfig, scratch: Path, count: int, ack: str
) -> tuple[list[NodeProcess], list[_GroupTarget]]:
    """N copies of the config, nodes `<node>-1` .. `<node>-N`, written by `dump_config`.

    One scratch copy of each cage's modules (with the probe) serves every node: a group runs
    the same modules. All addresses are on 127.0.0.1 (the nodes share this machine): each node
    gets a fresh HTTP port per cage, and a replication base 100 ports away from the others'
    (safe i replicates on base + i, `config.safe_sites`). CONFIG's own `replication:` is
    replaced; only its ack policy is kept (unless --ack says otherwise).
    """
    cages = []
    for cage in cfg.cages:
        modules = _copy_with_probe(cage, scratch)
        cages.append(dataclasses.replace(cage, modules=modules))
    safes = len(dataclasses.replace(cfg, cages=tuple(cages)).safes())
    bases: list[int] = []
    while len(bases) < count:
        base = free_port_range(safes)
        if all(abs(base - b) >= 100 for b in bases):
            bases.append(base)
    taken = {port for base in bases for port in range(base, base + safes)}
    http: list[dict[str, HttpAddress]] = []
    for _ in range(count):
        ports: dict[str, HttpAddress] = {}
        for cage in cages:
            if cage.http is not None:
                port = free_port()
                while port in taken:
                    port = free_port()
                taken.add(port)
                ports[cage.name] = HttpAddress("127.0.0.1", port)
        http.append(ports)
    names = [f"{cfg.node[:60]}-{i + 1}" for i in range(count)]
    priority = cfg.replication.priority if cfg.replication else 100
    nodes: list[NodeProcess] = []
    copies: list[NodeConfig] = []
    for i, name in enumerate(names):
        peers = tuple(
            PeerConfig(node=names[j], address=HttpAddress("127.0.0.1", bases[j]), http=http[j])
            for j in range(count)
            if j != i
        )
        path = scratch / f"{name}.yaml"
        copy = dataclasses.replace(
            cfg,
            file=path,
            node=name,
            data_dir=scratch / f"var{i + 1}",
            cages=tuple(dataclasses.replace(c, http=http[i].get(c.name)) for c in cages),
            replication=ReplicationConfig(
                address=HttpAddress("127.0.0.1", bases[i]), ack=ack, priority=priority, peers=peers
            ),
        )
        path.write_text(dump_config(copy))
        load_config(path)  # ConfigError if the copy is not a valid config (reported)
        copies.append(copy)
        first = next(iter(http[i].values()))
        nodes.append(NodeProcess(path, scratch / f"{name}.log", first.port))
    targets = [
        _GroupTarget(
            cage.name,
            [("127.0.0.1", ports[cage.name].port) for ports in http],
            [copy.safe_dir(cage.name, MODULE) for copy in copies],
        )
        for cage in cages
        if cage.http is not None
    ]
    return nodes, targets


def _torture_group(
    args: argparse.Namespace,
    cfg: NodeConfig,
    ack: str,
    nodes: list[NodeProcess],
    targets: list[_GroupTarget],
) -> int:
    rng = random.Random(args.seed)
    shape = ", ".join(f"{c.name}: {c.workers}x{c.threads}" for c in cfg.cages)
    watched = targets[0]  # the safe whose master is killed: the first cage's probe
    print(
        f"torture: group of {len(nodes)} nodes ({shape} each), ack {ack}, {args.rounds} round(s) "
        f"killing the node that is master of {watched.cage}.{MODULE}; logs: {nodes[0].log.parent}",
        flush=True,
    )
    started = time.monotonic()
    try:
        for node in nodes:
            node.start(wait_ready=False)
        for node in nodes:
            node.wait_log(" ready: ", FORM_TIMEOUT)
        _wait(
            lambda: all(_joined(i, targets, len(nodes)) for i in range(len(nodes))),
            started + FORM_TIMEOUT,
            "the group did not form",
        )
    except RuntimeError as e:
        print(f"torture: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(f"formed: {time.monotonic() - started:.1f} s", flush=True)
    load = _GroupLoad(targets, args.clients)
    load.start()
    began = time.monotonic()
    failovers: list[float] = []
    rejoins: list[float] = []
    failure = ""
    try:
        for round_ in range(1, args.rounds + 1):
            time.sleep(args.kill_every * rng.uniform(0.5, 1.5))  # writes flow meanwhile
            took, rejoined, failure = _round(round_, nodes, targets, load)
            if took is not None:
                failovers.append(took)
            if rejoined is not None:
                rejoins.append(rejoined)
            if failure:
                break
        time.sleep(args.kill_every * rng.uniform(0.5, 1.5))  # a last stretch with all nodes
    finally:
        stuck = load.finish()
    elapsed = time.monotonic() - began
    missing, checked, problems = _check_group(nodes, targets)
    statuses = _stop_group(nodes)
    for target in targets:
        for path in target.safe_dirs:
            try:
                verify(path)
            except SafeError as e:
                problems.append(str(e))
    lost = sorted({key for keys in missing for key in keys})
    requests = load.acked + load.unknown + load.refused + load.retry
    print(f"duration: {elapsed:.1f} s of writes")
    print(f"acknowledged: {load.acked} writes ({load.acked / elapsed:.0f}/s)")
    print(
        f"unknown: {load.unknown} (502/504/connection cut: may or may not have been stored), "
        f"refused: {load.refused} (node down), 503: {load.retry}, of {requests} requests"
    )
    for error in load.errors:
        print(f"  unexpected answer: {error}")
    print(
        f"rounds: {len(failovers)} of {args.rounds}, failover p50 "
        f"{percentile(failovers, 50):.3f} s, max failover: {max(failovers, default=0.0):.3f} s, "
        f"rejoin max {max(rejoins, default=0.0):.1f} s"
    )
    print(f"final stop: exit statuses {', '.join(map(str, statuses))}")
    print(f"verify: {'; '.join(problems) or f'ok ({len(nodes) * len(targets)} safe(s))'}")
    slow = [t for t in failovers if t > FAILOVER_LIMIT]
    if slow:
        failure = failure or f"{len(slow)} failover(s) took over {FAILOVER_LIMIT:g} s"
    _print_failures(failure, stuck)
    for i, keys in enumerate(missing):
        if keys:
            print(f"  node {_name(nodes[i])}: {len(keys)} acknowledged write(s) missing")
    bad = failure or stuck or problems or any(s != 0 for s in statuses)
    return _print_lost(lost, f"{checked} acknowledged writes on each of {len(nodes)} nodes", bad)


def _round(
    round_: int, nodes: list[NodeProcess], targets: list[_GroupTarget], load: _GroupLoad
) -> tuple[float | None, float | None, str]:
    """Kill the master's node, time the failover, start it again and wait until it is back:
    (failover seconds, rejoin seconds, failure)."""
    watched = targets[0]
    victim = _master(nodes, watched, time.monotonic() + 10.0)
    if victim is None:
        return None, None, f"round {round_}: no single master of {watched.cage}.{MODULE}"
    node = nodes[victim]
    unknown = load.unknown
    killed_at = time.monotonic()
    node.kill_group()
    if node.group_alive():
        return None, None, f"round {round_}: processes of {_name(node)} survived SIGKILL"
    load.probe(time.monotonic())  # only writes sent once the node is gone count
    served = load.served(killed_at + RECOVERY_TIMEOUT)
    if served is None:
        return (
            None,
            None,
            f"round {round_}: writes not served {RECOVERY_TIMEOUT:g} s after the kill",
        )
    took = served - killed_at
    print(
        f"round {round_}: killed {_name(node)} (master), writes served again after {took:.3f} s",
        end="",
        flush=True,
    )
    restarted = time.monotonic()
    try:
        node.start(timeout=REJOIN_TIMEOUT)
        _wait(
            lambda: _joined(victim, targets, len(nodes), client=watched),
            restarted + REJOIN_TIMEOUT,
            f"{_name(node)} did not come back as a synced client",
        )
    except RuntimeError as e:
        print(flush=True)
        return took, None, f"round {round_}: {e}"
    rejoined = time.monotonic() - restarted
    print(
        f"; back as a synced client {rejoined:.1f} s after its restart; "
        f"unknown outcomes this round: {load.unknown - unknown}",
        flush=True,
    )
    return took, rejoined, ""


def _name(node: NodeProcess) -> str:
    return node.config.stem


def _status(address: tuple[str, int]) -> dict[str, Any] | None:
    """The cage's GET /_status, None if it does not answer (a node down or starting)."""
    client = Client(*address, timeout=5.0)
    try:
        code, data = client.request("GET", "/_status")
        document = json.loads(data) if code == 200 else None
    except TRANSPORT_ERRORS:
        return None
    finally:
        client.close()
    return document if isinstance(document, dict) else None


def _joined(
    index: int,
    targets: list[_GroupTarget],
    count: int,
    *,
    client: _GroupTarget | None = None,
) -> bool:
    """Whether every safe of the node's cages is synced and connected to all its peers (until
    then a master may find no site to acknowledge a write), and `client`'s probe safe, if
    given, a client (a restarted node rejoins as one); node `index` is asked through its
    cages' addresses."""
    for target in targets:
        status = _status(target.addresses[index])
        if status is None:
            return False
        for module, figures in status.get("safes", {}).items():
            info = figures.get("replication") if isinstance(figures, dict) else None
            if not info or not info.get("synced") or info.get("peers_connected", 0) < count - 1:
                return False
            if target is client and module == MODULE and info.get("role") != "client":
                return False
    return True


def _master(nodes: list[NodeProcess], target: _GroupTarget, deadline: float) -> int | None:
    """The index of the one node whose probe safe of `target` is master; None at the deadline."""
    while time.monotonic() < deadline:
        masters = []
        for i in range(len(nodes)):
            status = _status(target.addresses[i])
            safe = (status or {}).get("safes", {}).get(MODULE, {})
            if (safe.get("replication") or {}).get("role") == "master":
                masters.append(i)
        if len(masters) == 1:
            return masters[0]
        time.sleep(0.1)
    return None


def _wait(check: Any, deadline: float, what: str) -> None:
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(what)
        time.sleep(0.1)


def _check_group(
    nodes: list[NodeProcess], targets: list[_GroupTarget]
) -> tuple[list[list[str]], int, list[str]]:
    """(per node, the acknowledged keys it lacks; keys checked; problems), read over HTTP from
    every node while the group still runs. Reads are local and a client applies the master's
    log a little later, so a node's missing keys are asked for again until CATCHUP_TIMEOUT."""
    deadline = time.monotonic() + CATCHUP_TIMEOUT
    missing: list[list[str]] = []
    problems: list[str] = []
    for i, node in enumerate(nodes):
        lacking: list[str] = []
        for target in targets:
            client = Client(*target.addresses[i], timeout=30.0)
            try:
                todo = list(target.acked)
                while True:
                    todo = _missing(client, todo)
                    if not todo or time.monotonic() > deadline:
                        break
                    time.sleep(0.2)
            except (RuntimeError, *TRANSPORT_ERRORS) as e:
                problems.append(f"node {_name(node)} cage {target.cage}: cannot read: {e}")
            finally:
                client.close()
            lacking += todo
        missing.append(lacking)
    return missing, sum(len(t.acked) for t in targets), problems


def _missing(client: Client, keys: list[str]) -> list[str]:
    """Those of `keys` the node's safe lacks, asked READ_BATCH at a time."""
    lacking: list[str] = []
    for start in range(0, len(keys), READ_BATCH):
        result = client.result(MODULE, "missing", keys=keys[start : start + READ_BATCH])
        lacking += result
    return lacking


def _stop_group(nodes: list[NodeProcess]) -> list[int]:
    """SIGTERM every node at once, then their exit statuses (-9: killed after 60 s)."""
    for node in nodes:
        with contextlib.suppress(ProcessLookupError, RuntimeError):
            node.signal(signal.SIGTERM)
    statuses = []
    for node in nodes:
        try:
            statuses.append(node.wait(60.0))
        except RuntimeError as e:
            print(f"torture: {e}", file=sys.stderr)
            node.kill_group()
            statuses.append(-signal.SIGKILL)
    return statuses
