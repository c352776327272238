"""Long values on a replicated safe (safe/env.py, LARGE): their file is created by the master
and reaches the clients through the log like the data file; a client reads them, and after a
failover the new master serves and replaces them. Real sites (tests/integration/repsite.py)."""

from __future__ import annotations

import signal

from tests.integration.test_replication_safe import (  # noqa: F401  (group is a fixture)
    Group,
    group,
    put_stream,
    the_master,
    wait_for,
)

LONG = "L" * 20_000  # over the data file's on-page limit (4,078 bytes at 16 KiB pages)


def test_long_values_replicate_and_survive_a_failover(group: Group) -> None:  # noqa: F811
    sites = group(3)
    master, _ = the_master(sites)
    assert master.main.ask("set", "long", LONG) == {"ok": True}
    assert master.main.ask("set", "short", "s") == {"ok": True}
    writer = master.start()
    writer.send("put_many", "k", 40, 12_000)
    acked, errors, finished = put_stream(writer)
    assert finished and len(acked) == 40, (len(acked), errors)
    for site in sites:
        wait_for(
            f"{site.path.name} reads the long values",
            lambda s=site: (  # type: ignore[misc]
                s.main.ask("get", "long")["value"] == LONG
                and not s.main.ask("missing", "k", 40)["missing"]
            ),
            10.0,
        )
        assert (site.path / "large.db").exists()

    for proc in master.procs:
        proc.signal(signal.SIGKILL)
    master.kill()
    survivors = [s for s in sites if s is not master]
    new, _ = the_master(survivors)
    assert new.main.ask("get", "long")["value"] == LONG
    wait_for(
        "the new master replaces a long value (acknowledged)",
        lambda: new.main.ask("set", "long", "short now") == {"ok": True},
        10.0,
    )
    assert new.main.ask("set", "short", LONG * 2) == {"ok": True}
    for site in survivors:
        wait_for(
            f"{site.path.name} reads the replaced values",
            lambda s=site: (  # type: ignore[misc]
                s.main.ask("get", "long")["value"] == "short now"
                and s.main.ask("get", "short")["value"] == LONG * 2
            ),
            10.0,
        )


def test_a_long_write_on_a_client_is_refused_as_not_master_before_any_long_value_exists(
    group: Group,  # noqa: F811
) -> None:
    """Only a master creates `large.db`: a client asked to write the group's first long value
    must say "not master" (naming the master), which the runtime forwards, not fail to open a
    file it cannot create (found by a review: a plain SafeError, never forwarded)."""
    sites = group(3)
    master, _ = the_master(sites)
    client = next(s for s in sites if s is not master)
    assert not (client.path / "large.db").exists()
    refused = client.main.ask("set", "long", LONG)
    assert refused["error"] == "SafeNotMasterError", refused
    assert refused["master"] == master.address
    assert master.main.ask("set", "long", LONG) == {"ok": True}
    wait_for("large.db reaches the client", (client.path / "large.db").exists, 10.0)
    refused = client.main.ask("set", "long2", LONG)
    assert refused["error"] == "SafeNotMasterError", refused
