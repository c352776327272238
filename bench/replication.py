"""What replication costs a durable write, and how long a group takes to serve writes again
after its master's node dies: `./dev bench replication`.

    ./dev bench replication [--seconds 5] [--rounds 1] [--failovers 3] [--node 2x8]
                            [--wrk 2x32] [--acks none,one,quorum,all] [--json FILE] [--markdown]

1. Durable writes over HTTP, loaded by wrk (bench/wrk.py: `counter/increment` of a counter no
   request wrote before, so every request commits a new key), the same module, function, wrk
   threads x connections and duration everywhere:
   - the anchor: ONE node without `replication:` (the same workers x threads);
   - the master node of a fresh 3-node group on this machine (runtime/harness.py's
     `write_group_configs`), once per ack policy (runtime/config.py ACK_POLICIES);
   - a CLIENT node of the quorum group: each write is forwarded over HTTP to the master's node
     (runtime/group.py) and its answer relayed.
   Each as writes/s, as a ratio to the anchor, p50/p99 from wrk, and the CPU time all the
   nodes' processes used per write (which moves much less than the rate when other programs
   take the CPUs). `--rounds` repeats the whole sequence (fresh nodes each time); the table
   shows each row's median round, its ratio taken to the anchor's median round.
2. Failover (on the last round's quorum group, kept running, or a fresh one when the quorum
   policy was not loaded): `--failovers` rounds of kill -9 of the master's whole node
   (its process group: supervisor, workers, replication process) while a Python prober writes
   to a survivor every ~10 ms; the time from the kill to the first write answered 200 that was
   sent after the kill; then the node is started again and the time until the group is formed
   again (every safe synced and connected to both peers, as tests/integration/test_group.py
   waits for it). Also checked on the way, reported not asserted: the first write served after
   the kill sees every write acknowledged before it (no acknowledged increment lost).
3. The disk's fdatasync rate (bench/fsync.py, append variant) in the same directory: a durable
   commit needs at least one flush on the master, and ack policies other than `none` wait for
   a peer's too, on the same disk here.

All nodes, wrk and the prober share this machine's CPUs and its one disk, where a real group
has a machine (and a disk) per node: the figures are what replication costs on one machine,
not what a group of machines would sustain.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pmnc.runtime.harness import (
    TRANSPORT_ERRORS,
    Client,
    NodeProcess,
    write_group_configs,
)

from bench import fsync, report, wrk
from bench.report import fmt_ms, fmt_ratio

ROOT = Path(__file__).resolve().parent.parent
MODULES = ROOT / "examples" / "modules"
MODULE = "counter"
PATH = "/counter/increment"
ACKS = ("none", "one", "quorum", "all")
READY_TIMEOUT = 60.0
FORM_TIMEOUT = 60.0  # a fresh group forms in ~10-15 s on 2 cores (tests/integration/test_group)
FAILOVER_TIMEOUT = 30.0
PROBE_INTERVAL = 0.01
PROBE_TIMEOUT = 5.0  # the prober's socket timeout: a request unanswered this long is given up
STOP_TIMEOUT = 30.0
SINGLE = "single node"
CLIENT = "client"
Progress = Callable[[str], None]


# --------------------------------------------------------------------------- the nodes


# One keep-alive connection per port for the many `/_status` polls (a new connection per poll
# left thousands of sockets in TIME_WAIT, and `free_port_range` then found no free ports).
_status_clients: dict[int, Client] = {}


def status(node: NodeProcess) -> dict[str, Any] | None:
    """The node's `/_status` document, None when it does not answer."""
    client = _status_clients.setdefault(node.port, Client(port=node.port, timeout=5.0))
    try:
        code, data = client.request("GET", "/_status")
        document: dict[str, Any] = json.loads(data)
    except TRANSPORT_ERRORS:
        return None  # the client reconnects on its next request
    return document if code == 200 else None


def close_status_clients() -> None:
    while _status_clients:
        _status_clients.popitem()[1].close()


def replication(node: NodeProcess, module: str = MODULE) -> dict[str, Any] | None:
    """The replication figures of `module`'s safe on `node` (role, master, synced, ...)."""
    document = status(node)
    if document is None:
        return None
    info = (document.get("safes") or {}).get(module, {}).get("replication")
    return info if isinstance(info, dict) else None


def formed(nodes: list[NodeProcess]) -> bool:
    """Every safe of every node synced and connected to all its peers: before that a master's
    write may find no site to acknowledge it (the same test as tests/integration/test_group)."""
    for node in nodes:
        document = status(node)
        if document is None:
            return False
        for figures in (document.get("safes") or {}).values():
            info = figures.get("replication")
            if (
                not info
                or not info.get("synced")
                or info.get("peers_connected", 0) < len(nodes) - 1
            ):
                return False
    return True


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll `check` until it holds; the seconds that took (RuntimeError past `timeout`)."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"{what}: not within {timeout:g} s")
        time.sleep(0.05)
    return time.monotonic() - started


def master_of(nodes: list[NodeProcess], module: str = MODULE, timeout: float = 10.0) -> NodeProcess:
    """The one node whose safe of `module` says it is master."""
    found: list[NodeProcess] = []

    def one() -> bool:
        found[:] = [n for n in nodes if (replication(n, module) or {}).get("role") == "master"]
        return len(found) == 1

    wait_until(one, timeout, f"exactly one master of {module}")
    return found[0]


def cpu_seconds(nodes: list[NodeProcess]) -> float:
    """User + system CPU time so far of every live process of the nodes' sessions (each node
    is its own process group: supervisor, workers, replication processes)."""
    groups = {n.pid for n in nodes if n.proc is not None}
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rpartition(")")[2].split()
            if int(fields[2]) in groups:  # pgrp; utime and stime are fields 14 and 15
                ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def start(nodes: list[NodeProcess]) -> float:
    """Start the nodes at once and wait for each one's "ready"; then, for a group, until it is
    formed. The seconds from the first start to formed."""
    started = time.monotonic()
    for node in nodes:
        node.start(wait_ready=False)
    for node in nodes:
        node.wait_log(" ready: ", READY_TIMEOUT)
    if len(nodes) > 1:
        wait_until(lambda: formed(nodes), FORM_TIMEOUT, "the group formed")
    return time.monotonic() - started


def stop(nodes: list[NodeProcess]) -> list[str]:
    """SIGTERM every node at once (a group's nodes lose their peers while stopping, as they
    would), then kill what is left; a note per node that did not exit 0."""
    notes = []
    for node in nodes:
        held = _status_clients.pop(node.port, None)
        if held is not None:
            held.close()
        if node.alive():
            with contextlib.suppress(ProcessLookupError):
                node.signal(signal.SIGTERM)
    for node in nodes:
        if node.proc is None:
            continue
        try:
            code = node.wait(STOP_TIMEOUT)
            if code != 0:
                notes.append(f"{node.config.stem}: exit status {code} after SIGTERM")
        except RuntimeError:
            notes.append(f"{node.config.stem}: still running {STOP_TIMEOUT:g} s after SIGTERM")
        finally:
            node.kill_group()
    return notes


def check_writes(node: NodeProcess, tag: str) -> None:
    """Two increments of a new counter through `node` answer 1 then 2 before wrk, which only
    sees status codes, is trusted."""
    client = Client(port=node.port, timeout=30.0)
    try:
        for expected in (1, 2):
            got = client.result(MODULE, "increment", name=f"{tag}-check")
            if got != expected:
                raise RuntimeError(f"{MODULE}.increment answered {got!r}, expected {expected}")
    finally:
        client.close()


# --------------------------------------------------------------------------- the load


@dataclass
class Options:
    workers: int = 2
    threads: int = 8
    wrk_threads: int = 2
    wrk_connections: int = 32
    seconds: float = 5.0
    wrk_timeout_s: float = 2.0
    rounds: int = 1
    failovers: int = 3
    acks: tuple[str, ...] = ACKS
    client: bool = True
    fsync_seconds: float = 2.0


@dataclass
class LoadRun:
    """One wrk run: against whom (`target`: single node, master or client) under which ack."""

    target: str
    ack: str
    round_no: int
    result: wrk.WrkResult
    cpu_s: float  # every node's processes, during the run
    formed_s: float | None  # start of the nodes until formed (None: reused, or one node)

    @property
    def label(self) -> str:
        return SINGLE if self.target == SINGLE else f"{self.target}, ack {self.ack}"

    @property
    def cpu_us_per_write(self) -> float:
        r = self.result
        return self.cpu_s / r.requests * 1e6 if r.requests and not r.failed else float("nan")

    def to_json(self) -> dict[str, object]:
        return {
            "target": self.target,
            "ack": self.ack,
            "round": self.round_no,
            "label": self.label,
            "cpu_s": self.cpu_s,
            "cpu_us_per_write": self.cpu_us_per_write,
            "formed_s": self.formed_s,
            "wrk": self.result.to_json(),
        }


def load(
    nodes: list[NodeProcess], target: NodeProcess, name: str, opts: Options, run_dir: Path
) -> tuple[wrk.WrkResult, float]:
    """wrk against `target`, new counters tagged `name`; and the CPU all `nodes` used."""
    tag = f"{name}-{os.getpid()}-{time.monotonic_ns()}"
    check_writes(target, tag)
    cpu = cpu_seconds(nodes)
    r = wrk.run(
        f"http://127.0.0.1:{target.port}{PATH}",
        wrk.script(PATH, wrk.write_body(tag), opts.wrk_threads),
        run_dir / f"{name}.lua",
        threads=opts.wrk_threads,
        connections=opts.wrk_connections,
        seconds=opts.seconds,
        timeout_s=opts.wrk_timeout_s,
    )
    return r, cpu_seconds(nodes) - cpu


def _line(r: wrk.WrkResult) -> str:
    if r.failed or r.starved:
        return f"FAILED: {r.failed or r.starved}"
    text = f"{r.per_s:,.0f} writes/s, p50 {fmt_ms(r.p50_ms)} ms, p99 {fmt_ms(r.p99_ms)} ms"
    if r.errors:
        text += f", {r.errors} errors ({r.timeouts} timeouts, {r.status_errors} non-2xx)"
    return text


# --------------------------------------------------------------------------- failover


@dataclass
class Failover:
    """One kill -9 of the master's node."""

    round_no: int
    killed: str  # the node
    prober_on: str  # the survivor the prober writes to
    prober_was_master: bool  # whether that survivor became the master (writes not forwarded)
    took_s: float | None = None  # kill -> first 200 of a write sent after the kill
    refused: int = 0  # 503 answers after the kill (no master yet)
    unknown: int = 0  # 502/504 or transport errors: "may or may not have run"
    acknowledged: int = 0  # the highest counter value answered 200 before the kill
    first_after: int | None = None  # the value the first write served after the kill returned
    rejoined_s: float | None = None  # restart of the killed node -> group formed
    longest_s: float = 0.0  # the longest attempt (sent after the kill) before the first 200
    failed: str | None = None

    @property
    def lost(self) -> bool | None:
        """Whether an acknowledged increment is missing from the first write after the kill."""
        if self.first_after is None:
            return None
        return self.first_after <= self.acknowledged


class Prober(threading.Thread):
    """Writes `counter/increment` of one counter to one node every ~10 ms on one keep-alive
    connection, and keeps (sent, answered, status, value) of every attempt."""

    def __init__(self, node: NodeProcess, name: str) -> None:
        super().__init__(daemon=True)
        self.node = node
        self.name_ = name
        self.stop_event = threading.Event()
        self.log: list[tuple[float, float, int, int | None]] = []  # status 0: transport error
        self.lock = threading.Lock()

    def run(self) -> None:
        client = Client(port=self.node.port, timeout=PROBE_TIMEOUT)
        try:
            while not self.stop_event.is_set():
                sent = time.monotonic()
                code, value = 0, None
                try:
                    code, body = client.call(MODULE, "increment", name=self.name_)
                    if code == 200:
                        value = int(body["result"])
                except TRANSPORT_ERRORS:
                    pass
                with self.lock:
                    self.log.append((sent, time.monotonic(), code, value))
                self.stop_event.wait(PROBE_INTERVAL)
        finally:
            client.close()

    def entries(self) -> list[tuple[float, float, int, int | None]]:
        with self.lock:
            return list(self.log)


def failover(nodes: list[NodeProcess], round_no: int, progress: Progress) -> Failover:
    """Kill the master's node under the prober; time the first answered write; restart it and
    wait until the group is formed again."""
    master = master_of(nodes)
    survivors = [n for n in nodes if n is not master]
    prober = Prober(survivors[0], f"failover-{round_no}")
    out = Failover(round_no, master.config.stem, survivors[0].config.stem, False)
    prober.start()
    try:
        # The prober has written before the kill: some acknowledged increments to lose.
        wait_until(lambda: any(e[2] == 200 for e in prober.entries()), 10.0, "the prober")
        time.sleep(0.2)
        killed = time.monotonic()
        master.kill_group()
        deadline = killed + FAILOVER_TIMEOUT
        while out.took_s is None and time.monotonic() < deadline:
            for _sent, answered, code, value in (e for e in prober.entries() if e[0] >= killed):
                if code == 200:
                    out.took_s, out.first_after = answered - killed, value
                    break
            time.sleep(0.005)
    finally:
        prober.stop_event.set()
        prober.join(10.0)
    entries = prober.entries()
    out.acknowledged = max(
        (v for sent, answered, code, v in entries if answered < killed and v is not None),
        default=0,
    )
    after = [
        e for e in entries if e[0] >= killed and (out.took_s is None or e[1] - killed <= out.took_s)
    ]
    out.refused = sum(1 for e in after if e[2] == 503)
    out.unknown = sum(1 for e in after if e[2] in (0, 502, 504))
    out.longest_s = max((e[1] - e[0] for e in after if e[2] != 200), default=0.0)
    if out.took_s is None:
        out.failed = f"no write answered within {FAILOVER_TIMEOUT:g} s of the kill"
    out.prober_was_master = (replication(survivors[0]) or {}).get("role") == "master"
    t0 = time.monotonic()
    master.start(wait_ready=False)
    master.wait_log(" ready: ", READY_TIMEOUT)
    wait_until(lambda: formed(nodes), FORM_TIMEOUT, "the group formed again")
    out.rejoined_s = time.monotonic() - t0
    took = "-" if out.took_s is None else f"{out.took_s:.3f} s"
    progress(
        f"failover {round_no}: killed {out.killed}; first write answered on {out.prober_on} "
        f"{took} after the kill ({out.refused} x 503, {out.unknown} unknown outcome, the "
        f"longest failed attempt {out.longest_s:.3f} s); "
        f"lost acknowledged: {out.lost}; rejoined and formed in {out.rejoined_s:.1f} s"
    )
    return out


# --------------------------------------------------------------------------- the run


@dataclass
class Result:
    options: Options
    fsync_start: fsync.FsyncResult | None = None
    fsync_end: fsync.FsyncResult | None = None
    loads: list[LoadRun] = field(default_factory=list)
    failovers: list[Failover] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def failed(self) -> bool:
        return (
            any("FAILED" in n for n in self.notes)
            or any(r.result.failed or r.result.starved for r in self.loads)
            or any(f.failed for f in self.failovers)
        )

    def to_json(self) -> dict[str, object]:
        return {
            "options": asdict(self.options),
            "fsync": [r.to_json() for r in (self.fsync_start, self.fsync_end) if r is not None],
            "loads": [r.to_json() for r in self.loads],
            "failovers": [{**asdict(f), "lost": f.lost} for f in self.failovers],
            "notes": self.notes,
        }


def _group(directory: Path, ack: str, opts: Options) -> list[NodeProcess]:
    """A 3-node group's configs in `directory`, replication ports kept free for the example
    modules' safes only (a run of 8 free ports was sometimes not found on this busy machine)."""
    directory.mkdir(exist_ok=True)
    safes = len([p for p in MODULES.glob("*.py") if not p.name.startswith("_")])
    return write_group_configs(
        directory, MODULES, ack=ack, workers=opts.workers, threads=opts.threads, safes=safes
    )


def run(base: Path, opts: Options, progress: Progress = report.progress) -> Result:
    """Every round of the load, then the failovers on a quorum group (the last round's, kept
    running, when there is one: a fresh group takes ~15 s to form); nodes are always stopped
    (and killed if need be) before returning."""
    result = Result(opts)
    result.fsync_start = fsync.measure(base, "append", opts.fsync_seconds)
    progress(f"fdatasync (append): {result.fsync_start.per_s:,.0f}/s")
    why = wrk.available()
    if why:
        result.notes.append(f"load not measured: {why}")
    kept: list[NodeProcess] | None = None
    try:
        for round_no in range(1, opts.rounds + 1) if not why else ():
            one = base / f"r{round_no}-single"
            one.mkdir()
            single = NodeProcess.one_cage(
                one, MODULES, name="node", workers=opts.workers, threads=opts.threads
            )
            _measure(result, [single], single, SINGLE, "-", round_no, one, progress)
            for ack in opts.acks:
                try:
                    nodes = _group(base / f"r{round_no}-{ack}", ack, opts)
                except RuntimeError as e:
                    result.notes.append(f"ack {ack}, round {round_no}: FAILED: {e}")
                    continue
                where = base / f"r{round_no}-{ack}"
                targets = ["master"] + (["client"] if ack == "quorum" and opts.client else [])
                keep = bool(opts.failovers) and ack == "quorum" and round_no == opts.rounds
                if _measure_group(result, nodes, targets, ack, round_no, where, progress, keep):
                    kept = nodes if keep else kept
        if opts.failovers:
            try:
                kept = kept or _group(base / "failover", "quorum", opts)
            except RuntimeError as e:
                result.notes.append(f"failover: FAILED: {e}")
            else:
                _failovers(result, kept, progress)
    finally:
        if kept is not None:
            result.notes += [f"failover group: {n}" for n in stop(kept)]
        close_status_clients()
    result.fsync_end = fsync.measure(base, "append", opts.fsync_seconds)
    return result


def _failovers(result: Result, nodes: list[NodeProcess], progress: Progress) -> None:
    try:
        if not any(n.alive() for n in nodes):
            formed_s = start(nodes)
            progress(f"failover group (ack quorum) formed in {formed_s:.1f} s")
        for n in range(1, result.options.failovers + 1):
            result.failovers.append(failover(nodes, n, progress))
    except Exception as e:
        result.notes.append(f"failover: FAILED: {type(e).__name__}: {e}")
        progress(result.notes[-1])


def _measure(
    result: Result,
    nodes: list[NodeProcess],
    target: NodeProcess,
    what: str,
    ack: str,
    round_no: int,
    where: Path,
    progress: Progress,
) -> None:
    label = SINGLE if what == SINGLE else f"{what}, ack {ack}"
    try:
        formed_s = start(nodes)
        r, cpu = load(nodes, target, what.replace(" ", "-"), result.options, where)
        run_ = LoadRun(what, ack, round_no, r, cpu, formed_s if len(nodes) > 1 else None)
        result.loads.append(run_)
        progress(f"round {round_no}: {label}: {_line(r)}")
    except Exception as e:
        result.notes.append(f"{label}, round {round_no}: FAILED: {type(e).__name__}: {e}")
        progress(result.notes[-1])
    finally:
        result.notes += [f"{label}, round {round_no}: {n}" for n in stop(nodes)]


def _measure_group(
    result: Result,
    nodes: list[NodeProcess],
    targets: list[str],
    ack: str,
    round_no: int,
    where: Path,
    progress: Progress,
    keep: bool,
) -> bool:
    """One fresh group: wrk against its master, then (quorum) against a client node. The
    group is stopped unless `keep` and all went well; whether all went well."""
    ok = False
    try:
        formed_s: float | None = start(nodes)
        progress(f"round {round_no}: group with ack {ack} formed in {formed_s:.1f} s")
        for what in targets:
            master = master_of(nodes)
            target = master if what == "master" else next(n for n in nodes if n is not master)
            r, cpu = load(nodes, target, f"{what}-{ack}", result.options, where)
            result.loads.append(LoadRun(what, ack, round_no, r, cpu, formed_s))
            formed_s = None
            progress(f"round {round_no}: {what}, ack {ack}: {_line(r)}")
            if what == "master" and master_of(nodes) is not master:
                result.notes.append(f"ack {ack}, round {round_no}: the master changed under load")
        ok = True
    except Exception as e:
        note = f"ack {ack}, round {round_no}: FAILED: {type(e).__name__}: {e}"
        result.notes.append(note)
        progress(note)
    finally:
        if not (keep and ok):
            result.notes += [f"ack {ack}, round {round_no}: {n}" for n in stop(nodes)]
    return ok


# --------------------------------------------------------------------------- the report


def _median(runs: list[LoadRun]) -> LoadRun:
    ok = sorted((r for r in runs if not r.result.failed), key=lambda r: r.result.per_s)
    return ok[(len(ok) - 1) // 2] if ok else runs[0]


def rows(result: Result) -> list[list[str]]:
    """The load table: one row per target, the median round, ratios to the single node's
    median round."""
    order: list[tuple[str, str]] = [(SINGLE, "-")]
    for ack in result.options.acks:
        order.append(("master", ack))
        if ack == "quorum" and result.options.client:
            order.append((CLIENT, ack))
    anchor = [r for r in result.loads if r.target == SINGLE]
    base = _median(anchor).result.per_s if anchor else 0.0
    out = [
        [
            "writes to",
            "ack",
            "writes/s",
            "x single node",
            "p50 ms",
            "p99 ms",
            "CPU us/write",
            "errors",
            "rounds (writes/s)",
        ]
    ]
    for target, ack in order:
        runs = [r for r in result.loads if (r.target, r.ack) == (target, ack)]
        if not runs:
            continue
        m = _median(runs)
        r = m.result
        name = {
            SINGLE: "single node (anchor)",
            "master": "master of 3",
            CLIENT: "client of 3 (forwarded)",
        }[target]
        ok = not (r.failed or r.starved)
        out.append(
            [
                name,
                ack,
                f"{r.per_s:,.0f}" if ok else "FAILED",
                fmt_ratio(r.per_s / base) if ok and base > 0 else "-",
                fmt_ms(r.p50_ms) if ok else "-",
                fmt_ms(r.p99_ms) if ok else "-",
                f"{m.cpu_us_per_write:,.0f}" if ok else "-",
                _errors(r) if ok else "-",
                "/".join(f"{x.result.per_s:,.0f}" for x in runs),
            ]
        )
    return out


def _errors(r: wrk.WrkResult) -> str:
    """wrk's errors by kind: timeouts (no answer within --timeout), non-2xx, socket errors."""
    parts = [
        f"{n} {what}"
        for n, what in (
            (r.timeouts, "timeouts"),
            (r.status_errors, "non-2xx"),
            (r.connect_errors + r.read_errors + r.write_errors, "socket"),
        )
        if n
    ]
    return ", ".join(parts) or "0"


def failover_rows(result: Result) -> list[list[str]]:
    out = [["", "min", "median", "max"]]
    took = [f.took_s for f in result.failovers if f.took_s is not None]
    back = [f.rejoined_s for f in result.failovers if f.rejoined_s is not None]
    for name, values in (
        ("kill -9 -> first answered write (s)", took),
        ("restart -> group formed again (s)", back),
    ):
        if values:
            out.append(
                [
                    name,
                    f"{min(values):.3f}",
                    f"{statistics.median(values):.3f}",
                    f"{max(values):.3f}",
                ]
            )
    return out


def markdown(table: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
    lines += ["| " + " | ".join(row) + " |" for row in table[1:]]
    return lines


def section(result: Result, *, as_markdown: bool = False) -> list[str]:
    opts = result.options
    fmt = markdown if as_markdown else report.columns
    lines = []
    for when, f in (("start", result.fsync_start), ("end", result.fsync_end)):
        if f is not None:
            lines.append(
                f"disk:      512 B append + fdatasync, one thread ({when}): {f.per_s:,.0f}/s, "
                f"p50 {fmt_ms(f.p50_ms)} ms, p99 {fmt_ms(f.p99_ms)} ms"
            )
    cores = os.cpu_count()
    lines += [
        f"NOTE:      every node, wrk and the prober share this machine's {cores} CPUs and its one "
        "disk;",
        "           a real group has a machine (and a disk) per node. The figures are what "
        "replication",
        "           costs here, not what a group of machines sustains.",
        "",
        f"== durable writes over HTTP: {MODULE}/increment of a new counter per request; "
        f"every node {opts.workers} workers x {opts.threads} threads ==",
        f"   wrk {opts.wrk_threads} threads x {opts.wrk_connections} connections, "
        f"{opts.seconds:g} s per run, --timeout {opts.wrk_timeout_s:g} s; a fresh node or group "
        f"per row; median of {opts.rounds} round(s)",
        "   CPU us/write: user + system time of every node's processes (3 for a group) per "
        "answered write",
        "",
    ]
    lines += fmt(rows(result))
    anchor = [r for r in result.loads if r.target == SINGLE and not r.result.failed]
    disks = [f.per_s for f in (result.fsync_start, result.fsync_end) if f is not None]
    if anchor and disks and max(disks) > 0:
        rate = _median(anchor).result.per_s
        lines.append(
            f"   single node: {rate:,.0f} writes/s = {fmt_ratio(rate / max(disks))} the disk's "
            f"fdatasync rate ({max(disks):,.0f}/s, the higher of start and end; above 1x: "
            "group commit)"
        )
    formed_s = [r.formed_s for r in result.loads if r.formed_s is not None]
    if formed_s:
        lines.append(
            f"   a fresh group formed (start -> every safe synced and connected) in "
            f"{min(formed_s):.1f}-{max(formed_s):.1f} s"
        )
    if result.failovers:
        lines += [
            "",
            f"== failover: kill -9 of the master's whole node (ack quorum), "
            f"{len(result.failovers)} round(s); a prober writes to a survivor every "
            f"{PROBE_INTERVAL * 1000:.0f} ms on one keep-alive connection, giving up on a "
            f"request after {PROBE_TIMEOUT:g} s ==",
            "",
            *fmt(failover_rows(result)),
            "",
        ]
        for fo in result.failovers:
            took = "-" if fo.took_s is None else f"{fo.took_s:.3f} s"
            lines.append(
                f"   round {fo.round_no}: killed {fo.killed}; prober on {fo.prober_on} "
                f"({'its new master' if fo.prober_was_master else 'a client: forwarded'}): "
                f"{took}, {fo.refused} x 503, {fo.unknown} unknown outcome (502/504/reset/"
                f"timeout), the longest failed attempt {fo.longest_s:.3f} s; "
                f"acknowledged increment lost: {_yes_no(fo.lost)}"
                + (f"; FAILED: {fo.failed}" if fo.failed else "")
            )
    lines += [f"   note: {n}" for n in result.notes]
    return lines


def _yes_no(x: bool | None) -> str:
    return "-" if x is None else "yes" if x else "no"


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="./dev bench replication",
        description="Durable writes/s over HTTP against one node and a 3-node group per ack "
        "policy (ratio to the single node), and failover after kill -9 of the master's node.",
    )
    ap.add_argument("--seconds", type=float, default=5.0, help="per wrk run (default 5)")
    ap.add_argument(
        "--rounds", type=int, default=1, help="load rounds, fresh nodes each (default 1)"
    )
    ap.add_argument("--failovers", type=int, default=3, help="kill -9 rounds (default 3; 0: none)")
    ap.add_argument("--node", default="2x8", help="workers x threads per node (default 2x8)")
    ap.add_argument("--wrk", default="2x32", help="wrk threads x connections (default 2x32)")
    ap.add_argument("--wrk-timeout", type=float, default=2.0, help="wrk --timeout, s (default 2)")
    ap.add_argument(
        "--acks",
        default=",".join(ACKS),
        help=f"ack policies, comma-separated, from {','.join(ACKS)} (default: all; '' none)",
    )
    ap.add_argument(
        "--no-client", action="store_true", help="skip the writes sent to a client node"
    )
    ap.add_argument("--fsync-seconds", type=float, default=2.0, help="fdatasync run (default 2)")
    ap.add_argument("--dir", type=Path, default=ROOT / "bench-results" / "tmp")
    ap.add_argument("--json", type=Path, default=None, help="also write raw results here")
    ap.add_argument("--markdown", action="store_true", help="tables as markdown")
    ap.add_argument("--keep", action="store_true", help="keep the nodes' directories and logs")
    args = ap.parse_args(argv)
    try:
        args.node_pair = tuple(int(x) for x in args.node.lower().split("x"))
        args.wrk_pair = tuple(int(x) for x in args.wrk.lower().split("x"))
        assert len(args.node_pair) == 2 and len(args.wrk_pair) == 2
        assert min(*args.node_pair, *args.wrk_pair) >= 1
    except (ValueError, AssertionError):
        ap.error("--node and --wrk: AxB with positive integers, such as 2x8")
    args.ack_list = tuple(a.strip() for a in args.acks.split(",") if a.strip())
    for a in args.ack_list:
        if a not in ACKS:
            ap.error(f"--acks: unknown {a!r} (known: {', '.join(ACKS)})")
    if args.seconds <= 0 or args.rounds < 1 or args.failovers < 0 or args.fsync_seconds <= 0:
        ap.error("--seconds, --rounds and --fsync-seconds must be positive, --failovers >= 0")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    opts = Options(
        workers=args.node_pair[0],
        threads=args.node_pair[1],
        wrk_threads=args.wrk_pair[0],
        wrk_connections=args.wrk_pair[1],
        seconds=args.seconds,
        wrk_timeout_s=args.wrk_timeout,
        rounds=args.rounds,
        failovers=args.failovers,
        acks=args.ack_list,
        client=not args.no_client,
        fsync_seconds=args.fsync_seconds,
    )
    started = datetime.datetime.now(datetime.UTC)
    load_start = report.loadavg()
    tree = report.tree_state(ROOT)
    args.dir.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="replication-", dir=args.dir))
    t0 = time.monotonic()
    try:
        result = run(base, opts)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    lines = [
        "pmnc replication benchmark",
        f"command:   ./dev bench replication {' '.join(argv)}".rstrip(),
        f"date:      {started.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"machine:   {report.machine_line()}",
        f"code:      {tree}",
        f"load avg:  {load_start} at start, {report.loadavg()} at end (1/5/15 min)",
        f"directory: {base} ({report.filesystem_of(base.parent)})",
        *section(result, as_markdown=args.markdown),
        "",
        f"total time {time.monotonic() - t0:.0f} s",
    ]
    print("\n".join(lines), flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {"argv": argv, "date": started.isoformat(), "code": tree, **result.to_json()},
                indent=1,
            )
            + "\n",
            encoding="utf-8",
        )
    return 1 if result.failed() else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
