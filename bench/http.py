"""End to end over HTTP: pmnc-runtime next to gunicorn's gthread worker, both loaded by wrk,
and the time a cage takes to serve again after one of its workers is killed with SIGKILL.

Both servers serve the same files, `examples/modules/` (`kv.get` for reads, `counter.increment`
for durable writes), at the same workers x threads (4 x 8 by default); gunicorn through
`bench/wsgi.py`, which opens a `pmnc.safe.Safe` per module in each worker after the fork.
Optionally a second pmnc-runtime (`--baseline-runtime`, e.g. from a worktree of the last
commit) is measured in the same run, so a change to the server is compared on one machine
state. Per server and round, on a freshly started server:

1. prefill `kv` with N keys (`k0`..), check one read and one write answer as expected;
2. durable writes: wrk `counter/increment` of a new counter name per request;
3. reads: wrk `kv/get` of a different prefilled key per request;
4. a fresh client: wrk with `Connection: close` (a new TCP connection per request) on one
   connection, reads, first alone, then while `bench/hostile.py` holds 1,000 idle keep-alive
   and 64 slow-head connections open against the same server.

Rounds alternate the servers (pmnc, baseline, gunicorn, pmnc, ...) so that the machine's
load, which moves on this shared VM, falls on all of them alike; the report gives the median
round and the range.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pmnc.runtime.harness import (
    TRANSPORT_ERRORS,
    Client,
    NodeProcess,
    free_port,
    percentile,
    pmnc_runtime,
    worker_pids,
    write_config,
)

from bench import wrk
from bench.hostile import raise_nofile
from bench.report import fmt_ms, fmt_ratio

__all__ = ["Options", "Part", "raise_nofile", "run", "section", "versions"]

ROOT = Path(__file__).resolve().parent.parent
MODULES = ROOT / "examples" / "modules"
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
REQUEST_TIMEOUT = 30.0
KEEPALIVE = 5  # s, pmnc's default keepalive_timeout; gunicorn is given the same
READ = "read"
WRITE = "write"
FRESH = "fresh"
FRESH_HOSTILE = "fresh_hostile"
WHATS = (WRITE, READ, FRESH, FRESH_HOSTILE)
TITLES = {
    WRITE: "durable write: counter/increment, a new counter per request",
    READ: "read: kv/get, a different prefilled key per request",
    FRESH: "fresh client: kv/get, a new connection per request, alone",
    FRESH_HOSTILE: "fresh client, while {idle:,} idle keep-alive + {slow} slow-head "
    "connections are held",
}
Progress = Callable[[str], None]


def versions() -> str:
    """wrk's and gunicorn's versions, as their own commands print them."""
    found = []
    for cmd in (["wrk", "--version"], [*(gunicorn_command() or ["gunicorn"]), "--version"]):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
            found.append((out.stdout + out.stderr).strip().splitlines()[0])
        except (OSError, subprocess.SubprocessError, IndexError):
            found.append(f"{cmd[0]}: not found")
    return "; ".join(found)


def gunicorn_command() -> list[str] | None:
    exe = Path(sys.executable).with_name("gunicorn")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("gunicorn")
    return [found] if found else None


class Server:
    """A server in its own session, logging to a file (a `harness.NodeProcess` running the
    server's command); `start` returns once it answers."""

    label = "?"

    def __init__(self, directory: Path, workers: int, threads: int) -> None:
        self.directory = directory
        self.workers = workers
        self.threads = threads
        self.port = free_port()
        self.log_path = directory / "server.log"
        self.node = NodeProcess(directory / "node.yaml", self.log_path, self.port)

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        proc: subprocess.Popen[bytes] | None = self.node.proc
        return proc

    def command(self) -> tuple[list[str], dict[str, str] | None]:
        raise NotImplementedError

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        cmd, env = self.command()
        self.node.start(command=cmd, env=env, cwd=ROOT, wait_ready=False)
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if not self.node.alive():
                code = self.proc.returncode if self.proc else None
                raise RuntimeError(f"{self.label} exited with {code}:\n{self.log_tail()}")
            client = Client(port=self.port, timeout=5.0)
            try:
                client.result("kv", "get", key="-")
            except (*TRANSPORT_ERRORS, RuntimeError):
                time.sleep(0.1)
                continue
            finally:
                client.close()
            return
        raise RuntimeError(f"{self.label} not ready in {READY_TIMEOUT:.0f} s:\n{self.log_tail()}")

    def log(self) -> str:
        text: str = self.node.text(0)
        return text

    def log_tail(self, n: int = 15) -> str:
        return "\n".join(self.log().splitlines()[-n:])

    def stop(self) -> int | None:
        """SIGTERM the session, then SIGKILL it if it is still there; the exit status."""
        proc = self.proc
        if proc is None:
            return None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            return proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            return None
        finally:
            # Workers left behind by a crashed master share its process group.
            self.node.kill_group()

    def cpu_seconds(self) -> float:
        """User + system CPU time of the master and its workers so far (every thread)."""
        assert self.proc is not None
        total = 0
        for pid in {self.proc.pid, *self.worker_pids()}:
            with contextlib.suppress(OSError, ValueError, IndexError):
                # Fields 14 and 15 (utime, stime), counted after the ")" ending the name.
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")

    def worker_pids(self) -> set[int]:
        """The master's child processes (its workers), from /proc."""
        assert self.proc is not None
        return set(worker_pids(self.proc.pid))


class PmncNode(Server):
    """`pmnc-runtime start` on a generated node: one cage serving examples/modules."""

    def __init__(
        self, directory: Path, workers: int, threads: int, label: str, runtime: list[str]
    ) -> None:
        super().__init__(directory, workers, threads)
        self.label = label
        self.runtime = runtime

    def command(self) -> tuple[list[str], dict[str, str] | None]:
        # Only keys every pmnc-runtime knows: a baseline from an older commit must accept it.
        config = write_config(
            self.node.config,
            MODULES,
            self.port,
            node="bench",
            cage="bench",
            workers=self.workers,
            threads=self.threads,
            data_dir=self.directory / "var",
        )
        return [*self.runtime, "start", str(config)], None


class Gunicorn(Server):
    """gunicorn, gthread worker, serving examples/modules through bench/wsgi.py."""

    label = "gunicorn"

    def command(self) -> tuple[list[str], dict[str, str] | None]:
        exe = gunicorn_command()
        assert exe is not None
        env = dict(os.environ)
        env["PMNC_BENCH_MODULES"] = str(MODULES)
        env["PMNC_BENCH_DATA"] = str(self.directory / "safe")
        env["PYTHONPATH"] = str(ROOT)
        return [
            *exe,
            "-c",
            str(ROOT / "bench" / "wsgi.py"),
            "--chdir",
            str(ROOT),
            "--worker-class",
            "gthread",
            "--workers",
            str(self.workers),
            "--threads",
            str(self.threads),
            "--worker-connections",
            "1024",  # pmnc's default max_connections per worker
            "--keep-alive",
            str(KEEPALIVE),
            "--bind",
            f"127.0.0.1:{self.port}",
            "--log-level",
            "warning",
            "bench.wsgi:app",
        ], env


def value(i: int) -> dict[str, object]:
    return {"a": [1, "bar", 1.5], "n": i}


def prefill(port: int, keys: int, connections: int = 8) -> None:
    """`kv/put` of k0..k{keys-1}, over `connections` keep-alive connections at once."""
    errors: list[str] = []

    def put(part: range) -> None:
        client = Client(port=port, timeout=REQUEST_TIMEOUT)
        try:
            for i in part:
                client.result("kv", "put", key=f"k{i}", value=value(i))
        except Exception as e:
            errors.append(f"{type(e).__name__}: {e}")
        finally:
            client.close()

    threads = [
        threading.Thread(target=put, args=(range(n, keys, connections),))
        for n in range(connections)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(REQUEST_TIMEOUT * 4)
    if errors or any(t.is_alive() for t in threads):
        raise RuntimeError(f"prefill failed: {errors[:3] or 'a thread is stuck'}")


def check(port: int, keys: int, tag: str) -> None:
    """One read and one write answer what the module says, before wrk trusts status codes."""
    client = Client(port=port, timeout=REQUEST_TIMEOUT)
    try:
        got = client.result("kv", "get", key=f"k{keys - 1}")
        if got != value(keys - 1):
            raise RuntimeError(f"kv/get k{keys - 1} answered {got!r}")
        for expected in (1, 2):
            got = client.result("counter", "increment", name=f"{tag}-check")
            if got != expected:
                raise RuntimeError(f"counter/increment answered {got!r}, expected {expected}")
    finally:
        client.close()


@dataclass
class Options:
    workers: int = 4
    threads: int = 8
    wrk_threads: int = 2
    wrk_connections: int = 32
    seconds: float = 5.0
    fresh_seconds: float = 5.0
    prefill: int = 10000
    idle: int = 1000
    slow: int = 64
    rounds: int = 1
    steps: tuple[str, ...] = WHATS  # which of the four measurements to run
    hostile_ready_s: float = 30.0  # at most this long to get the hostile connections held
    settle_s: float = 2.0  # then this long before the fresh client starts
    wrk_timeout_s: float = 2.0


@dataclass
class Part:
    """Everything the HTTP part measured: per server label, per measurement, one WrkResult
    per round; the hostile helper's counts per round; how each server stopped."""

    options: Options
    servers: list[str] = field(default_factory=list)
    commands: dict[str, str] = field(default_factory=dict)
    results: dict[str, dict[str, list[wrk.WrkResult]]] = field(default_factory=dict)
    hostile: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    kills: KillResult | None = None

    def failed(self) -> bool:
        """A server that could not be measured, or a wrk run that gave no result."""
        return any("FAILED" in n for n in self.notes) or any(
            r.failed for per in self.results.values() for rs in per.values() for r in rs
        )

    def add(self, label: str, what: str, r: wrk.WrkResult) -> None:
        self.results.setdefault(label, {}).setdefault(what, []).append(r)

    def to_json(self) -> dict[str, object]:
        return {
            "options": self.options.__dict__,
            "servers": self.servers,
            "commands": self.commands,
            "results": {
                label: {what: [r.to_json() for r in rs] for what, rs in per.items()}
                for label, per in self.results.items()
            },
            "hostile": self.hostile,
            "notes": self.notes,
            "kills": self.kills.to_json() if self.kills is not None else None,
        }


def _hostile_held(
    server: Server, run_dir: Path, opts: Options, progress: Progress
) -> tuple[subprocess.Popen[bytes], Path]:
    """Start the helper and wait until it holds its connections (or its deadline passes)."""
    status = run_dir / "hostile.json"
    with (run_dir / "hostile.log").open("wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.hostile",
                "--port",
                str(server.port),
                "--idle",
                str(opts.idle),
                "--slow",
                str(opts.slow),
                "--status",
                str(status),
                "--max-seconds",
                str(opts.hostile_ready_s + opts.settle_s + opts.fresh_seconds + 60),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    deadline = time.monotonic() + opts.hostile_ready_s
    counts: dict[str, Any] = {}
    while time.monotonic() < deadline and proc.poll() is None:
        counts = _read_status(status)
        # Held = TCP established (a server that never answers them is the point); the
        # servers close idle connections after their keep-alive timeout and the helper
        # reopens them, so a few are always on their way back: 95 % counts as held.
        if (
            counts.get("idle_connected", 0) >= 0.95 * opts.idle
            and counts.get("slow_connected", 0) >= opts.slow
        ):
            break
        time.sleep(0.2)
    progress(f"  hostile: {_held(counts)}")
    time.sleep(opts.settle_s)
    return proc, status


def _read_status(path: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data


def _held(c: dict[str, Any]) -> str:
    if not c:
        return "no status yet"
    return (
        f"{c['idle_connected']}/{c['idle_target']} idle connected "
        f"({c['idle_answered']} answered), {c['slow_connected']}/{c['slow_target']} slow-head "
        f"connected; reopened after a close by the server: {c['idle_closed_by_server']} idle, "
        f"{c['slow_closed_by_server']} slow ({c['slow_answered_408']} with a 408)"
    )


def _stop_helper(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def measure(server: Server, part: Part, run_dir: Path, round_no: int, progress: Progress) -> None:
    """Steps 1-4 of the module docstring on a started server."""
    opts = part.options
    label = server.label
    t0 = time.monotonic()
    prefill(server.port, opts.prefill)
    tag = f"w{round_no}{label}{random.randrange(1 << 30)}"
    check(server.port, opts.prefill, tag)
    progress(f"  {label}: prefilled {opts.prefill:,} keys in {time.monotonic() - t0:.1f} s")
    url = f"http://127.0.0.1:{server.port}"
    load = {"threads": opts.wrk_threads, "connections": opts.wrk_connections}
    runs: list[tuple[str, str, str, dict[str, int]]] = [
        (WRITE, "/counter/increment", wrk.write_body(tag), load),
        (READ, "/kv/get", wrk.read_body(opts.prefill), load),
        (FRESH, "/kv/get", wrk.read_body(opts.prefill), {"threads": 1, "connections": 1}),
    ]
    for what, path, body, shape in runs:
        if what not in opts.steps:
            continue
        seconds = opts.fresh_seconds if what == FRESH else opts.seconds
        headers = ("Connection: close",) if what == FRESH else ()
        cpu = server.cpu_seconds()
        r = wrk.run(
            url + path,
            wrk.script(path, body, shape["threads"], client_clock=what == FRESH),
            run_dir / f"{label}-{what}.lua",
            seconds=seconds,
            headers=headers,
            threads=shape["threads"],
            connections=shape["connections"],
            timeout_s=opts.wrk_timeout_s,
        )
        r.server_cpu_s = server.cpu_seconds() - cpu
        part.add(label, what, r)
        progress(f"  {label} {what}: {_line(r)}")
    if FRESH_HOSTILE not in opts.steps:
        return
    helper, status = _hostile_held(server, run_dir, opts, progress)
    try:
        before = _read_status(status)
        r = wrk.run(
            url + "/kv/get",
            wrk.script("/kv/get", wrk.read_body(opts.prefill), 1, client_clock=True),
            run_dir / f"{label}-{FRESH_HOSTILE}.lua",
            threads=1,
            connections=1,
            seconds=opts.fresh_seconds,
            headers=("Connection: close",),
            timeout_s=opts.wrk_timeout_s,
        )
        after = _read_status(status)
    finally:
        _stop_helper(helper)
    part.add(label, FRESH_HOSTILE, r)
    part.hostile.setdefault(label, []).append({"before": before, "after": after})
    progress(f"  {label} {FRESH_HOSTILE}: {_line(r)}; at its end: {_held(after)}")


def _line(r: wrk.WrkResult) -> str:
    if r.failed:
        return f"FAILED: {r.failed}"
    if r.starved:
        return f"no answer: {r.starved}"
    text = f"{r.per_s:,.0f} req/s, p50 {fmt_ms(r.p50_ms)} ms, p99 {fmt_ms(r.p99_ms)} ms"
    if r.stuck_s:
        text += f" (one request still unanswered at the end, after {r.stuck_s:.1f} s)"
    if r.server_cpu_s is not None:
        text += f", server CPU {r.cpu_us_per_request:.0f} us/request"
    if r.errors:
        text += f", {r.errors} errors ({r.timeouts} timeouts, {r.status_errors} non-2xx)"
    return text


def run(
    run_dir: Path,
    opts: Options,
    *,
    runtime: list[str] | None,
    baseline: list[str] | None,
    kills: int,
    do_load: bool,
    progress: Progress,
) -> Part:
    """The rounds over every server, then the kills (pmnc only)."""
    part = Part(opts)
    runtime = runtime or pmnc_runtime()
    makers: list[tuple[str, Callable[[Path], Server]]] = [
        ("pmnc", lambda d: PmncNode(d, opts.workers, opts.threads, "pmnc", runtime)),
    ]
    part.commands["pmnc"] = " ".join(runtime)
    if baseline:
        makers.append(
            ("baseline", lambda d: PmncNode(d, opts.workers, opts.threads, "baseline", baseline))
        )
        part.commands["baseline"] = " ".join(baseline)
    why = wrk.available()
    gunicorn = gunicorn_command()
    if gunicorn is None:
        part.notes.append("gunicorn: not installed (pip install -e '.[bench]')")
    else:
        makers.append(("gunicorn", lambda d: Gunicorn(d, opts.workers, opts.threads)))
        part.commands["gunicorn"] = " ".join(gunicorn) + " -k gthread (bench/wsgi.py)"
    part.servers = [label for label, _ in makers]
    if do_load and why:
        part.notes.append(f"HTTP load not measured: {why}")
    elif do_load:
        for round_no in range(1, opts.rounds + 1):
            for label, make in makers:
                server = make(run_dir / f"r{round_no}-{label}")
                progress(
                    f"http round {round_no}/{opts.rounds}: {label} "
                    f"({opts.workers}x{opts.threads}) on 127.0.0.1:{server.port}"
                )
                try:
                    server.start()
                    measure(server, part, run_dir / f"r{round_no}-{label}", round_no, progress)
                except Exception as e:
                    note = f"{label}, round {round_no}: FAILED: {type(e).__name__}: {e}"
                    part.notes.append(note)
                    progress(note)
                finally:
                    code = server.stop()
                if code != 0:
                    part.notes.append(
                        f"{label}, round {round_no}: stopped with exit status {code} after "
                        f"SIGTERM; log tail:\n{server.log_tail()}"
                    )
    if kills:
        node = PmncNode(run_dir / "kills", opts.workers, opts.threads, "pmnc", runtime)
        try:
            node.start()
            part.kills = kill_recovery(node, kills, progress)
        except Exception as e:
            part.notes.append(f"kill -9: FAILED: {type(e).__name__}: {e}")
        finally:
            code = node.stop()
        if code != 0:
            part.notes.append(f"kill -9 node: stopped with exit status {code} after SIGTERM")
    return part


# --------------------------------------------------------------------------- the report


def _median(rs: list[wrk.WrkResult], key: Callable[[wrk.WrkResult], float]) -> wrk.WrkResult:
    ok = sorted((r for r in rs if not r.failed), key=key)
    return ok[(len(ok) - 1) // 2] if ok else rs[0]


def _p99_key(r: wrk.WrkResult) -> float:
    return r.p99_ms


def _rate_key(r: wrk.WrkResult) -> float:
    return r.per_s


def pick(part: Part, label: str, what: str) -> wrk.WrkResult | None:
    """The median round: by rate for the load runs, by p99 for the fresh client."""
    rs = part.results.get(label, {}).get(what, [])
    if not rs:
        return None
    return _median(rs, _p99_key if what in (FRESH, FRESH_HOSTILE) else _rate_key)


def _spread(rs: list[wrk.WrkResult], what: str) -> str:
    ok = [r for r in rs if not r.failed]
    if len(ok) < 2:
        return ""
    if what in (FRESH, FRESH_HOSTILE):
        vals = [fmt_ms(r.p99_ms) if not r.failed else "-" for r in ok]
        return "p99 " + "/".join(vals)
    rates = [r.per_s for r in ok]
    lo, hi = min(rates), max(rates)
    return f"{lo:,.0f}-{hi:,.0f} ({(hi - lo) / statistics.median(rates) * 100:.0f} %)"


def _cpu(rs: list[wrk.WrkResult]) -> str:
    """The median over the rounds of the server's CPU time per request."""
    values = [r.cpu_us_per_request for r in rs if r.cpu_us_per_request == r.cpu_us_per_request]
    return f"{statistics.median(values):.0f}" if values else "-"


def section(part: Part) -> list[str]:
    opts = part.options
    lines = [
        "",
        f"== HTTP: {', '.join(part.servers)}, each {opts.workers} workers x {opts.threads} "
        f"threads, loaded by wrk ==",
        *(f"   {label}: {cmd}" for label, cmd in part.commands.items()),
        f"   load: wrk {opts.wrk_threads} threads x {opts.wrk_connections} connections, "
        f"{opts.seconds:g} s; fresh client: wrk 1 connection, Connection: close, "
        f"{opts.fresh_seconds:g} s, --timeout {opts.wrk_timeout_s:g} s; {opts.prefill:,} keys "
        f"prefilled; {opts.rounds} round(s), the median shown",
        "   (wrk, the servers and the hostile helper share the same CPUs; CPU us/req: the "
        "server's processes' user + system time per answered request, median of the rounds)",
    ]
    has_baseline = "baseline" in part.servers
    head = (
        f"{'server':<9} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'x gunicorn':>10}"
        + (f" {'x baseline':>10}" if has_baseline else "")
        + f" {'CPU us/req':>10}  errors; rounds"
    )
    for what in WHATS:
        if not any(what in per for per in part.results.values()):
            continue
        lines += ["", TITLES[what].format(idle=opts.idle, slow=opts.slow), head, "-" * len(head)]
        gun = pick(part, "gunicorn", what)
        base = pick(part, "baseline", what)
        fresh = what in (FRESH, FRESH_HOSTILE)
        for label in part.servers:
            r = pick(part, label, what)
            if r is None:
                continue

            def vs(other: wrk.WrkResult | None, r: wrk.WrkResult = r, fresh: bool = fresh) -> str:
                if other is None or other.failed or r.failed or other is r:
                    return "-"
                if fresh:  # lower is better: their p99 / ours, so > 1 means ours is better
                    a, b = other.p99_ms, r.p99_ms
                else:
                    a, b = r.per_s, other.per_s
                if not (0 < b < float("inf")) or not (0 < a < float("inf")):
                    return "-"
                # A p99 cut short by the run's end is a lower bound: so is the ratio.
                if fresh and other.stuck_s:
                    return ">100x" if a / b > 100 else ">" + fmt_ratio(a / b)
                return fmt_ratio(a / b)

            rate = "-" if r.failed else f"{r.per_s:,.0f}"
            p99 = None
            if r.p99_ms == float("inf"):
                p99 = "none" if r.starved else ">" + fmt_ms(opts.wrk_timeout_s * 1000)
            notes = (
                r.failed
                or r.starved
                or (
                    f"{r.errors} ({r.timeouts} timeouts, {r.status_errors} non-2xx)"
                    if r.errors
                    else "0"
                )
            )
            if r.stuck_s:
                notes += f", 1 unanswered at the end after {r.stuck_s:.1f} s"
            spread = _spread(part.results[label][what], what)
            lines.append(
                f"{label:<9} {rate:>8} {fmt_ms(r.p50_ms):>7} {p99 or fmt_ms(r.p99_ms):>7} "
                f"{vs(gun):>10}"
                + (f" {vs(base):>10}" if has_baseline else "")
                + f" {_cpu(part.results[label][what]):>10}  {notes}"
                f"{'; ' + spread if spread else ''}"
            )
        if fresh:
            lines.append(
                "  (latency from the end of the previous request: connect, request, answer; "
                "x columns: their p99 / this one's)"
            )
    for label, rounds in part.hostile.items():
        for n, c in enumerate(rounds, 1):
            lines.append(
                f"  hostile, {label} round {n}, at the fresh client's end: {_held(c['after'])}"
            )
    lines += targets(part)
    if part.kills is not None:
        k = part.kills
        lines += [
            "",
            f"kill -9 of one pmnc worker, {k.kills} time(s), one at a time:",
            "  from outside (kill until the cage has its full worker count again, the victim gone,",
            f"  and a durable write over a new connection returns 200): {summarize(k.external)}",
            f"  the supervisor's own 'serving again' log lines:          {summarize(k.supervisor)}",
        ]
        lines += [f"  {f}" for f in k.failures]
    lines += [f"  note: {n}" for n in part.notes]
    return lines


def targets(part: Part) -> list[str]:
    """Issue 8's targets, reported (not asserted) against this run's medians."""

    def verdict(ok: bool | None) -> str:
        return {True: "[met]    ", False: "[NOT MET]", None: "[n/a]    "}[ok]

    lines = ["", "== targets (issue 8), measured on this run =="]
    for what in (WRITE, READ):
        mine, gun = pick(part, "pmnc", what), pick(part, "gunicorn", what)
        if mine is None or gun is None or mine.failed or gun.failed or gun.per_s <= 0:
            lines.append(f"{verdict(None)} {what}: >= 2x gunicorn gthread: not measured")
        else:
            x = mine.per_s / gun.per_s
            lines.append(
                f"{verdict(x >= 2)} {what}: >= 2x gunicorn gthread: pmnc {mine.per_s:,.0f}/s vs "
                f"{gun.per_s:,.0f}/s = {x:.2f}x"
            )
        base = pick(part, "baseline", what)
        if mine is None or base is None or mine.failed or base.failed or base.per_s <= 0:
            lines.append(f"{verdict(None)} {what}: >= 0.9x the baseline pmnc: not measured")
        else:
            x = mine.per_s / base.per_s
            lines.append(
                f"{verdict(x >= 0.9)} {what}: >= 0.9x the baseline pmnc: {mine.per_s:,.0f}/s vs "
                f"{base.per_s:,.0f}/s = {x:.2f}x"
            )
    r = pick(part, "pmnc", FRESH_HOSTILE)
    if r is None or r.failed:
        lines.append(f"{verdict(None)} fresh-client p99 < 50 ms with hostile connections held")
    else:
        lines.append(
            f"{verdict(r.p99_ms < 50)} fresh-client p99 < 50 ms with {part.options.idle:,} idle "
            f"+ {part.options.slow} slow-head connections held: "
            + (
                f"{r.requests} answered, {r.timeouts} timed out "
                f"(over {part.options.wrk_timeout_s:g} s)"
                if r.p99_ms == float("inf")
                else f"{fmt_ms(r.p99_ms)} ms"
            )
        )
    return lines


# --------------------------------------------------------------------------- kill -9


@dataclass
class KillResult:
    kills: int = 0
    external: list[float] = field(default_factory=list)  # kill -> full worker set + a write
    supervisor: list[float] = field(default_factory=list)  # its "serving again" log lines
    failures: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {
            "kills": self.kills,
            "external_s": self.external,
            "supervisor_s": self.supervisor,
            "failures": self.failures,
        }


_SERVING_AGAIN = re.compile(r"serving again, ([0-9.]+) s after the crash")


def kill_recovery(node: Server, kills: int, progress: Progress) -> KillResult:
    """Kill one worker at a time with SIGKILL; time until the cage has its full complement of
    workers again (the victim gone) and a durable write over a fresh connection succeeds."""
    result = KillResult()
    rnd = random.Random(4242)
    for n in range(kills):
        old = node.worker_pids()
        if not old:
            result.failures.append(f"kill {n + 1}: the supervisor has no workers")
            break
        victim = rnd.choice(sorted(old))
        lines_before = len(_SERVING_AGAIN.findall(node.log()))
        t0 = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        deadline = t0 + 30.0
        took: float | None = None
        while time.monotonic() < deadline:
            now = node.worker_pids()
            if victim not in now and len(now) >= len(old):
                client = Client(port=node.port, timeout=5.0, keep_alive=False)
                try:
                    client.result("kv", "put", key=f"recovery-{n}", value=n)
                except (*TRANSPORT_ERRORS, RuntimeError):
                    time.sleep(0.002)
                    continue
                finally:
                    client.close()
                took = time.monotonic() - t0
                break
            time.sleep(0.002)
        result.kills += 1
        if took is None:
            result.failures.append(f"kill {n + 1}: not serving 30 s after killing {victim}")
            break
        result.external.append(took)
        # Let the supervisor log its own view and settle before the next kill.
        settle = time.monotonic() + 10.0
        while time.monotonic() < settle:
            if len(_SERVING_AGAIN.findall(node.log())) > lines_before:
                break
            time.sleep(0.05)
        time.sleep(1.0)
        progress(f"kill {n + 1}/{kills}: worker {victim}: serving again after {took:.3f} s")
    result.supervisor = [float(x) for x in _SERVING_AGAIN.findall(node.log())]
    return result


def summarize(values: list[float]) -> str:
    if not values:
        return "-"
    return (
        f"p50 {percentile(values, 50):.3f} s, max {max(values):.3f} s "
        f"(min {min(values):.3f} s, n={len(values)})"
    )
