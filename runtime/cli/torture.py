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
"""

from __future__ import annotations

import argparse
import dataclasses
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

from ..config import HttpAddress, NodeConfig, dump_config, load_config_or_report
from ..harness import TRANSPORT_ERRORS, Client, NodeProcess, free_port, percentile

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
'''
RECOVERY_TIMEOUT = 60.0  # a kill not recovered from by then is reported as a failure
EXIT_LOST = 1
EXIT_USAGE = 2
EXIT_FAILED = 3


def add_parser(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "torture",
        help="kill -9 a node under write load, then check that no acknowledged write was lost",
        description="Start the node of CONFIG on a scratch data directory (unless --in-place), "
        f"add a '{MODULE}' module to a scratch copy of each cage's modules, write unique keys "
        "to it over HTTP while killing random workers (or with --whole-node the whole node, "
        "then restarting it), then check every acknowledged write. Exit 0 only when none was "
        "lost; the last line of the report is 'lost: N'.",
    )
    parser.add_argument("config", metavar="CONFIG", help="the node's YAML file")
    parser.add_argument(
        "--duration", type=_positive, default=30.0, metavar="SECONDS", help="default 30"
    )
    parser.add_argument(
        "--kill-every",
        type=_positive,
        default=2.0,
        metavar="SECONDS",
        help="mean interval between kills, each drawn from 0.5x to 1.5x of it (default 2)",
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


def _scratch_config(
    cfg: NodeConfig, scratch: Path, *, in_place: bool
) -> tuple[Path, list[_Target]]:
    """A copy of the config: modules copied with the probe added, data_dir and ports scratch.

    Written by `config.dump_config`, so every node key carries over and the safe paths and the
    address format stay `config.py`'s.
    """
    cages = []
    for cage in cfg.cages:
        modules = scratch / "modules" / cage.name
        shutil.copytree(cage.modules, modules, ignore=shutil.ignore_patterns("__pycache__"))
        probe = modules / f"{MODULE}.py"
        if probe.exists():
            raise ValueError(f"cage {cage.name} already has a module named {MODULE}")
        probe.write_text(_SOURCE)
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
    if failure:
        print(f"FAILED: {failure}")
    if stuck:
        print(f"FAILED: writer threads still running (deadlocked?): {', '.join(stuck)}")
    for key in lost[:100]:
        print(f"  lost {key}")
    if len(lost) > 100:
        print(f"  ... and {len(lost) - 100} more")
    print(f"checked: {checked} acknowledged writes")
    print(f"lost: {len(lost)}")
    if lost:
        return EXIT_LOST
    return EXIT_FAILED if failure or stuck or problems or status != 0 else 0


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
