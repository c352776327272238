"""Every hostile client at once, for PMNC_STRESS_SECONDS, against a real node of 2 x 4 threads.

Held throughout: 1,000 idle keep-alive connections, 64 slow heads and 64 trickling bodies (each
replaced as soon as `request_timeout` cuts it) and 200 keep-alive clients at a request a second,
while a fresh client makes request after request on new connections. What a user depends on:
the fresh client's p99 stays under 0.5 s, every keep-alive client is answered within 2 s, every
cut connection reads its 408 at `request_timeout` from its first byte, and the idle connections
are neither closed nor forgotten (each is served once more at the end).

The drivers are those of `tests/integration/test_serving.py` (one selector loop for every
connection), imported from there.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import Node, write_modules
from pmnc.runtime.harness import percentile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from test_serving import (
    HOSTILE,
    PROBE,
    Swarm,
    cut_report,
    fresh_latencies,
    hostile,
    keepalive_report,
    raise_nofile,
    request,
    swarm_running,
)

pytestmark = pytest.mark.stress


def test_a_fresh_client_is_served_promptly_among_1000_idle_128_hostile_and_200_busy_connections(
    tmp_path: Path, node_factory: Callable[..., Node], stress_seconds: float
) -> None:
    raise_nofile(8192)
    timeout = 2.0
    modules = write_modules(tmp_path / "modules", {"probe": PROBE})
    node = node_factory(
        modules,
        workers=2,
        threads=4,
        request_timeout=timeout,
        keepalive_timeout=600,  # the idle ones stay for the whole run
        max_connections=4096,  # however unevenly the kernel spreads them over the 2 workers
    ).start()
    swarm = Swarm(node.port)
    idle = [swarm.idle() for _ in range(1000)]
    start = time.monotonic() + 0.2
    hostile(swarm, start, heads=64, bodies=64, reused=0)
    busy = [swarm.keepalive(1.0, start + i / 200) for i in range(200)]
    latencies: list[float] = []
    failures: list[str] = []
    replaced = 0
    with swarm_running(swarm, stress_seconds + 30):
        end = start + stress_seconds
        while time.monotonic() < end and len(failures) < 3:
            got, failed = fresh_latencies(node.port, 20, give_up_after=3 - len(failures))
            latencies += got
            failures += failed
            cut = [p for p in swarm.peers if p.kind in HOSTILE and p.closed is not None]
            for peer in cut[replaced:]:  # keep 128 hostile connections held
                heads = int(peer.kind == "slow head")
                hostile(swarm, time.monotonic(), heads=heads, bodies=1 - heads, reused=0)
            replaced = len(cut)
        measured_until = time.monotonic()
        for peer in idle:  # each idle connection is served once more
            peer.sends.append((time.monotonic(), request(body=b'{"n": 2}')))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(len(p.answers) < 2 for p in idle):
            time.sleep(0.1)
        deadline = time.monotonic() + timeout + 3  # the last hostile ones are cut too
        bad = [p for p in swarm.peers if p.kind in HOSTILE]
        while time.monotonic() < deadline and any(p.closed is None for p in bad):
            time.sleep(0.1)
    hostile_cut = len([p for p in bad if p.closed is not None])
    print(
        f"\n{stress_seconds:.0f} s: fresh requests {len(latencies)} p50 "
        f"{percentile(latencies, 50) * 1000:.1f} ms p99 {percentile(latencies, 99) * 1000:.1f} ms; "
        f"keep-alive answers {sum(len(p.answers) for p in busy)}; hostile connections cut "
        f"{hostile_cut} of {len(bad)}"
    )
    assert not failures, "\n".join(failures)
    p99 = percentile(latencies, 99)
    assert p99 < 0.5, f"fresh client p99 {p99:.3f} s over {len(latencies)} requests"
    problems = keepalive_report(busy, int(measured_until - start) - 1, 2.0)
    assert not problems, "keep-alive clients:\n" + "\n".join(problems)
    problems = [why for p in bad if (why := cut_report(p, timeout, 1.5))]
    assert not problems, f"{len(problems)} of {len(bad)} hostile connections:\n" + "\n".join(
        problems[:10]
    )
    lost = [p for p in idle if p.closed is not None or len(p.answers) < 2]
    assert not lost, (
        f"{len(lost)} of {len(idle)} idle keep-alive connections were closed or not served "
        f"again: {[(p.error, [a.status for _, a in p.answers]) for p in lost[:5]]}"
    )
    assert node.stop() == 0
