"""A safe's files are readable by their owner only (directories 0700, files 0600), whatever the
umask: live (while a node runs, log files it rolls over to included, and after it stops), backed
up, restored, dumped and loaded, through the real CLI and a real node.

Every command runs in a child whose umask `sh` sets (the pytest process keeps its own), and the
assertions walk every directory and file. One test runs as another user (root only) and shows
that they cannot read any of it, even through directories opened for traversal.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import EXAMPLES, Client, Node, cli
from pmnc.runtime.cli import dumpfile

# Enough to make the kv safe roll over to a second log file (10 MiB each) while the node runs.
BIG_VALUE = "x" * 900_000
BIG_PUTS = 13
CLI_TIMEOUT_S = 60.0


def _under_umask(mask: int, *argv: str) -> list[str]:
    """`argv` run by a shell that sets the umask first (exec: no extra process stays)."""
    return ["sh", "-c", 'umask "$0" && exec "$@"', f"{mask:03o}", *argv]


def _run(mask: int, *args: str | Path) -> str:
    """`pmnc-runtime ARGS` under `mask`; its stdout. Fails the test on a non-zero exit."""
    proc = subprocess.run(
        _under_umask(mask, *cli(), *map(str, args)),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, f"{args}: exit {proc.returncode}\n{proc.stderr}"
    return proc.stdout


def _python(mask: int, code: str, *args: str | Path) -> None:
    """A Python child (this interpreter) running `code` under `mask`."""
    proc = subprocess.run(
        _under_umask(mask, sys.executable, "-c", code, *map(str, args)),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _walk(root: Path) -> dict[Path, int]:
    """Every directory and file under `root` (itself included) with its mode bits. A file
    listed and gone before its look (a log file a live node's checkpoint removed: seen once
    under load) has no mode to check."""
    found = {root: os.lstat(root).st_mode}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(directory) / name
            try:
                found[path] = os.lstat(path).st_mode
            except FileNotFoundError:
                continue
    return found


def _assert_private(root: Path, *, safes: int) -> None:
    """Directories 0700, files 0600, nothing else; `safes` data files among them (so that an
    empty tree cannot pass)."""
    found = _walk(root)
    wrong = {
        str(p.relative_to(root.parent)): oct(stat.S_IMODE(m))
        for p, m in found.items()
        if not (stat.S_ISDIR(m) and stat.S_IMODE(m) == 0o700)
        and not (stat.S_ISREG(m) and stat.S_IMODE(m) == 0o600)
    }
    assert not wrong, f"not private (want dirs 0700, files 0600): {wrong}"
    data_files = [p for p in found if p.name == "safe.db"]
    assert len(data_files) == safes, sorted(map(str, found))
    assert all(list(p.parent.glob("log.*")) for p in data_files), "a safe without its log"


def _start(node: Node, mask: int) -> None:
    """Like Node.start, with the supervisor (and so its workers) under `mask`."""
    node.start(command=_under_umask(mask, *cli(), "start", str(node.config)), timeout=20.0)


@pytest.mark.parametrize("mask", [0o022, 0o000], ids=["umask022", "umask000"])
def test_every_file_of_a_safe_is_private_whatever_the_umask(
    tmp_path: Path, node_factory: Callable[..., Node], mask: int
) -> None:
    # The umask does reach the children: a directory made the ordinary way follows it.
    control = tmp_path / "control"
    subprocess.run(_under_umask(mask, "mkdir", str(control)), check=True, timeout=10)
    assert _mode(control) == 0o777 & ~mask

    node = node_factory(EXAMPLES, workers=1, threads=2)
    data = node.config.parent / "var"
    assert not data.exists()  # the node creates <data_dir>/safe/ and every safe in it
    _start(node, mask)
    live = data / "safe"
    kv = live / "test.demo.kv"
    client = Client(node.port)
    try:
        assert client.result("counter", "increment") == 1
        for i in range(BIG_PUTS):
            client.result("kv", "put", key=f"big{i}", value=BIG_VALUE)
        client.result("kv", "put", key="small", value={"a": [1, 2]})
    finally:
        client.close()
    assert max(int(p.name[4:]) for p in kv.glob("log.*")) >= 2, "no log file created later"

    # Live, while the node has it open: regions, __db.register, every log file.
    _assert_private(live, safes=2)
    assert _mode(data) == 0o700  # made by the node to hold its safes, like the rest

    # Hot backup of the whole data_dir into a DEST that does not exist yet.
    _run(mask, "safe", "backup", data, tmp_path / "backup-all")
    _assert_private(tmp_path / "backup-all", safes=2)

    # Backup of one safe into an empty directory the user made with the umask: tightened too.
    one = tmp_path / "backup-one"
    subprocess.run(_under_umask(mask, "mkdir", str(one)), check=True, timeout=10)
    _run(mask, "safe", "backup", live / "test.demo.counter", one)
    _assert_private(one, safes=1)

    # Dumps: a new file, and an existing file made with the umask (and made 0644 on purpose).
    dump = tmp_path / "kv.dump"
    _run(mask, "safe", "dump", kv, "-o", dump)
    assert _mode(dump) == 0o600
    existing = tmp_path / "existing.dump"
    subprocess.run(_under_umask(mask, "touch", str(existing)), check=True, timeout=10)
    os.chmod(existing, 0o644)
    _run(mask, "safe", "dump", kv, "-o", existing)
    assert _mode(existing) == 0o600
    with open(existing, "rb") as f:
        assert dumpfile.check(f) == BIG_PUTS + 1

    assert node.stop() == 0
    _assert_private(live, safes=2)  # closed: checkpointed, regions left behind

    # Restore onto a new path whose parents do not exist, and onto the stopped live safe.
    _run(mask, "safe", "restore", tmp_path / "backup-all" / kv.name, tmp_path / "r" / "deep" / "kv")
    _assert_private(tmp_path / "r", safes=1)
    _run(mask, "safe", "restore", tmp_path / "backup-all" / kv.name, kv)
    _assert_private(live, safes=2)

    # Load creates a safe (and its missing parents).
    _run(mask, "safe", "load", tmp_path / "loaded" / "kv", dump)
    _assert_private(tmp_path / "loaded", safes=1)

    # Every copy still holds the data.
    for path in (kv, tmp_path / "r" / "deep" / "kv", tmp_path / "loaded" / "kv"):
        assert _run(mask, "safe", "get", path, "small").strip() == "{'a': [1, 2]}"


OLD_SAFE = """
import sys
from pmnc.safe import Safe
with Safe.open(sys.argv[1]) as s:
    s["k"] = 1
"""


@pytest.mark.parametrize("opener", ["prepare", "cli"])
def test_a_safe_left_0755_0644_by_an_older_version_is_tightened_when_opened(
    tmp_path: Path, opener: str
) -> None:
    """What an older pmnc left (0755 directories, 0644 files) is made private by the next
    opening: the supervisor's `prepare` at start, or any tool that opens it."""
    path = tmp_path / "safe" / "node1.demo.kv"
    _python(0o022, OLD_SAFE, path)
    for p, m in _walk(path).items():
        os.chmod(p, 0o755 if stat.S_ISDIR(m) else 0o644)
    loose = {p: oct(_mode(p)) for p in _walk(path)}
    assert "0o644" in loose.values()
    if opener == "prepare":
        _python(0o022, "import sys; from pmnc.safe import prepare; prepare(sys.argv[1])", path)
    else:
        assert _run(0o022, "safe", "keys", path).split() == ["k"]
    _assert_private(path, safes=1)


def test_dump_to_stdout_or_a_symlink_writes_through_and_changes_no_mode(tmp_path: Path) -> None:
    """`-o /dev/fd/1` (what /dev/stdout links to) and `-o LINK` write into what they name: the
    link stays, the user's file keeps its mode; `-o -` likewise.

    Not /dev/stdout itself: run as root, a regression (a temporary file renamed over the name,
    as dump did before) would replace the machine's /dev/stdout; under /dev/fd it cannot."""
    safe = tmp_path / "s"
    _python(0o022, OLD_SAFE, safe)
    for how in ("/dev/fd/1", "-"):
        out = tmp_path / f"out{len(how)}.bin"
        out.touch()
        os.chmod(out, 0o644)
        with open(out, "wb") as f:
            proc = subprocess.run(
                [*cli(), "safe", "dump", str(safe), "-o", how],
                stdin=subprocess.DEVNULL,
                stdout=f,
                stderr=subprocess.PIPE,
                timeout=CLI_TIMEOUT_S,
                check=False,
            )
        assert proc.returncode == 0, proc.stderr
        assert _mode(out) == 0o644
        with open(out, "rb") as f:
            assert dumpfile.check(f) == 1  # the dump alone: the summary went to stderr

    target = tmp_path / "mine.dump"
    target.touch()
    os.chmod(target, 0o640)
    link = tmp_path / "link.dump"
    link.symlink_to(target)
    _run(0o022, "safe", "dump", safe, "-o", link)
    assert link.is_symlink() and _mode(target) == 0o640
    with open(target, "rb") as f:
        assert dumpfile.check(f) == 1


# Run as the other user: print each path it can list (a directory) or read a byte of (a file).
# Plain sh, ls and head: the test's own interpreter may live where that user cannot reach.
PROBE = """
for p; do
    if [ -d "$p" ]; then ls "$p" >/dev/null 2>&1 && echo "$p"
    else head -c 1 "$p" >/dev/null 2>&1 && echo "$p"; fi
done
exit 0
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="running a process as another user needs root")
def test_another_user_reads_nothing_of_a_safe(tmp_path: Path) -> None:
    """A second local user (nobody) can read no file and list no directory of a safe, its
    backup or its dump, even with every directory opened for traversal (so that the files'
    own modes are what stops them)."""
    try:
        other = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' to run as")
    # Under /tmp and traversable (pytest's tmp_path is 0700: it would hide everything anyway).
    base = Path(tempfile.mkdtemp(prefix="pmnc-modes-", dir="/tmp"))
    try:
        os.chmod(base, 0o711)
        safe, backup, dump = base / "data" / "safe" / "s", base / "backup", base / "s.dump"
        _python(0o022, OLD_SAFE, safe)
        _run(0o022, "safe", "backup", safe, backup)
        _run(0o022, "safe", "dump", safe, "-o", dump)
        paths = [p for root in (base / "data", backup) for p in _walk(root)] + [dump]

        def readable() -> list[str]:
            proc = subprocess.run(
                ["sh", "-c", PROBE, "sh", *map(str, paths)],
                user=other.pw_uid,
                group=other.pw_gid,
                extra_groups=[],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=CLI_TIMEOUT_S,
                check=False,
            )
            assert proc.returncode == 0, proc.stderr
            return proc.stdout.split()

        assert readable() == []
        for p, m in _walk(base).items():
            if stat.S_ISDIR(m):
                os.chmod(p, 0o711)
        assert readable() == []
    finally:
        shutil.rmtree(base, ignore_errors=True)
