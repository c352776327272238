"""`pmnc-runtime safe ...` end to end: real safes in tmp_path, the real CLI in a subprocess."""

from __future__ import annotations

import collections
import datetime
import decimal
import importlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from pmnc.safe import Safe

CLI = [sys.executable, "-m", "pmnc.runtime.cli", "safe"]

HELPER = '''
import os

class User:
    def __init__(self, name):
        self.name = name
        self.friends = []

class Payload:
    """pickle.loads of this creates the file at `path`."""
    def __init__(self, path):
        self.path = path
    def __reduce__(self):
        return (os.system, ("touch " + self.path,))
'''


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    """An importable module of application classes, as a node's modules directory would hold."""
    directory = tmp_path_factory.mktemp("models")
    (directory / "pmnc_cli_models.py").write_text(HELPER)
    sys.path.insert(0, str(directory))
    try:
        yield importlib.import_module("pmnc_cli_models")
    finally:
        sys.path.remove(str(directory))
        sys.modules.pop("pmnc_cli_models", None)


def cli(*args: str | Path, stdin: bytes | None = None, timeout: float = 60) -> Any:
    return subprocess.run(
        [*CLI, *map(str, args)], input=stdin, capture_output=True, timeout=timeout, check=False
    )


def every_kind(models: ModuleType) -> dict[str, object]:
    user = models.User("bob")
    user.friends.append(user)
    return {
        "": None,
        "int": 2**70,
        "float": -0.0,
        "str": "h\u00e9\u20ac\U0001f600",
        "bytes": bytes(range(256)),
        "containers": {(None,): [1, "bar", decimal.Decimal("1.0")], "s": {1}, "f": frozenset()},
        "datetime": datetime.datetime(2024, 5, 1, 12, tzinfo=datetime.UTC),
        "uuid": uuid.UUID(int=7),
        "ordered": collections.OrderedDict(z=1, a=2),
        "user": user,
        "big": "x" * (1 << 20),
        "line\nbreak": 1,
        "lone \udc80 surrogate": 2,
    }


def make_safe(path: Path, values: dict[str, object]) -> Path:
    with Safe.open(path) as safe:
        safe.update(values)
    return path


def raw_items(path: Path) -> dict[str, bytes]:
    with Safe.open(path, create=False) as safe:
        return dict(safe.raw_items())


def one_error_line(result: Any, path: Path | str) -> str:
    """A failure says one line on stderr naming the path, and no traceback."""
    assert result.returncode != 0, result
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert str(path) in lines[0]
    return str(lines[0])


# -- dump and load --------------------------------------------------------------------------------


def test_dump_load_round_trips_every_kind_of_value_byte_for_byte(
    tmp_path: Path, models: ModuleType
) -> None:
    source = make_safe(tmp_path / "a", every_kind(models))
    dump = tmp_path / "a.dump"
    result = cli("dump", source, "-o", dump)
    assert result.returncode == 0, result.stderr
    assert b"dumped 13 keys" in result.stdout
    result = cli("load", tmp_path / "b", dump)  # a new safe: load creates it
    assert result.returncode == 0, result.stderr
    assert raw_items(tmp_path / "b") == raw_items(source)
    with Safe.open(tmp_path / "b", create=False) as copy:
        user: Any = copy["user"]
        assert user.name == "bob"
        assert user.friends[0] is user
    # -o - streams the same bytes, and load reads them back from stdin.
    streamed = cli("dump", source, "-o", "-")
    assert streamed.returncode == 0
    assert streamed.stdout == dump.read_bytes()
    result = cli("load", tmp_path / "c", "-", stdin=streamed.stdout)
    assert result.returncode == 0, result.stderr
    assert raw_items(tmp_path / "c") == raw_items(source)


def test_load_replaces_the_keys_it_has_and_leaves_the_others(tmp_path: Path) -> None:
    make_safe(tmp_path / "src", {"shared": "new", "added": 1})
    make_safe(tmp_path / "dst", {"shared": "old", "kept": [2]})
    assert cli("dump", tmp_path / "src", "-o", tmp_path / "d").returncode == 0
    result = cli("load", tmp_path / "dst", tmp_path / "d")
    assert result.returncode == 0, result.stderr
    assert b"loaded 2 keys" in result.stdout
    with Safe.open(tmp_path / "dst", create=False) as safe:
        assert dict(safe.items()) == {"shared": "new", "added": 1, "kept": [2]}


def test_a_dump_that_cannot_be_written_names_the_file_given(tmp_path: Path) -> None:
    make_safe(tmp_path / "src", {"k": 1})
    target = tmp_path / "nodir" / "x"
    result = cli("dump", tmp_path / "src", "-o", target)
    line = one_error_line(result, target)
    assert line.startswith(f"{target}: cannot write the dump: "), line
    assert ".x." not in line, "the temporary file is ours, not the user's"
    assert not (tmp_path / "nodir").exists()


def test_a_truncated_or_altered_dump_is_refused_before_anything_is_written(
    tmp_path: Path,
) -> None:
    make_safe(tmp_path / "src", {f"k{i}": i for i in range(100)})
    dump = tmp_path / "d"
    assert cli("dump", tmp_path / "src", "-o", dump).returncode == 0
    data = dump.read_bytes()
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 1
    bad = {"cut": data[: len(data) // 2], "no-trailer": data[:-41], "flipped": bytes(flipped)}
    bad |= {"extra": data + b"x", "empty": b"", "foreign": b"hello\n"}
    for name, content in bad.items():
        path = tmp_path / name
        path.write_bytes(content)
        result = cli("load", tmp_path / f"target-{name}", path)
        one_error_line(result, path)
        assert not (tmp_path / f"target-{name}").exists(), name


# -- get, keys, list ------------------------------------------------------------------------------


def test_get_shows_plain_data_and_never_runs_a_payload_without_trust(
    tmp_path: Path, models: ModuleType
) -> None:
    target = tmp_path / "pwned"
    path = make_safe(
        tmp_path / "s", {"evil": models.Payload(str(target)), "user": models.User("ann"), "n": 5}
    )
    result = cli("get", path, "evil")
    assert result.returncode == 0, result.stderr
    assert b"<not decoded: posix.system" in result.stdout
    assert not target.exists()
    result = cli("get", path, "user")
    assert result.stdout.startswith(b"<not decoded: pmnc_cli_models.User")
    assert b"'name': 'ann'" in result.stdout
    assert cli("get", path, "n").stdout == b"5\n"
    assert not target.exists()
    # --trust unpickles for real (the control): it imports the class and runs the payload.
    env = {**os.environ, "PYTHONPATH": os.path.dirname(models.__file__ or "")}
    trusted = subprocess.run(
        [*CLI, "get", str(path), "evil", "--trust"],
        capture_output=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert trusted.returncode == 0, trusted.stderr
    assert target.exists()


def test_get_a_missing_key_exits_1(tmp_path: Path) -> None:
    path = make_safe(tmp_path / "s", {"a": 1})
    result = cli("get", path, "nope")
    assert result.returncode == 1
    assert "nope" in one_error_line(result, path)


def test_keys_with_prefix_and_null(tmp_path: Path) -> None:
    path = make_safe(tmp_path / "s", {"a.1": 1, "a.2": 2, "b": 3, "a\n3": 4})
    result = cli("keys", path)
    assert result.stdout.decode().splitlines() == ["'a\\n3'", "a.1", "a.2", "b"]
    assert cli("keys", path, "--prefix", "a.").stdout == b"a.1\na.2\n"
    assert cli("keys", path, "--null").stdout == b"a\n3\0a.1\0a.2\0b\0"


def test_list_shows_every_safe_with_its_key_count(tmp_path: Path) -> None:
    make_safe(tmp_path / "safe" / "n.c.one", {f"k{i}": i for i in range(42)})
    make_safe(tmp_path / "safe" / "n.c.two", {})
    (tmp_path / "safe" / ".n.c.two.restore-1").mkdir()
    result = cli("list", tmp_path)
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.decode().splitlines()]
    assert rows[0][:2] == ["SAFE", "KEYS"]
    assert [row[:2] for row in rows[1:]] == [["n.c.one", "42"], ["n.c.two", "0"]]


# -- verify ---------------------------------------------------------------------------------------


def test_verify_passes_then_detects_undecodable_values_and_a_damaged_file(tmp_path: Path) -> None:
    path = make_safe(tmp_path / "s", {f"k{i:04d}": "v" * 100 for i in range(2000)})
    result = cli("verify", path)
    assert result.returncode == 0, result.stderr
    assert b"ok, 2000 keys" in result.stdout
    with Safe.open(path) as safe:
        safe.set_raw("k0007", b"not a pickle")
    result = cli("verify", path)
    assert result.returncode == 4
    assert "k0007" in one_error_line(result, path)
    data_file = path / "safe.db"
    with open(data_file, "r+b") as f:
        f.seek(data_file.stat().st_size // 2)
        f.write(b"\xde\xad\xbe\xef" * 64)
    result = cli("verify", path)
    assert result.returncode == 1
    assert "damaged" in one_error_line(result, path)


# -- backup, restore, recover ---------------------------------------------------------------------


def _hold_open(path: Path) -> int:
    """A child process with the safe open until killed."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read)
            with Safe.open(path, recover=False):
                os.write(write, b"1")
                time.sleep(60)
        finally:
            os._exit(0)
    os.close(write)
    assert os.read(read, 1) == b"1"
    os.close(read)
    return pid


def test_recover_and_verify_refuse_while_a_process_holds_the_safe_and_name_it(
    tmp_path: Path,
) -> None:
    path = make_safe(tmp_path / "s", {"a": 1})
    pid = _hold_open(path)
    try:
        for command in (["recover", path], ["recover", path, "--catastrophic"], ["verify", path]):
            result = cli(*command)
            assert result.returncode == 3
            assert str(pid) in one_error_line(result, path)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    result = cli("recover", path)
    assert result.returncode == 0, result.stderr
    assert cli("get", path, "a").stdout == b"1\n"


def test_backup_during_writes_restores_every_write_acknowledged_before_it(tmp_path: Path) -> None:
    path, acks = make_safe(tmp_path / "safe" / "n.c.m", {}), tmp_path / "acks"
    pid = os.fork()
    if pid == 0:
        try:
            fd = os.open(acks, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            with Safe.open(path, recover=False) as safe:
                for i in range(10**9):
                    safe[f"k{i}"] = {"i": i}
                    os.write(fd, f"k{i}\n".encode())
        finally:
            os._exit(1)
    try:
        time.sleep(0.5)
        acknowledged = acks.read_text().split()
        result = cli("backup", tmp_path, tmp_path / "backup")  # the whole data_dir
        assert result.returncode == 0, result.stderr
        result = cli("backup", path, tmp_path / "backup")  # not empty any more
        one_error_line(result, tmp_path / "backup")
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert len(acknowledged) > 10
    result = cli("restore", tmp_path / "backup" / "n.c.m", tmp_path / "restored")
    assert result.returncode == 0, result.stderr
    with Safe.open(tmp_path / "restored", create=False) as safe:
        missing = [k for k in acknowledged if k not in safe]
        assert missing == []
        assert all(safe[k] == {"i": int(k[1:])} for k in acknowledged[-10:])


def test_restore_refuses_a_target_that_is_not_a_safe_and_not_empty(tmp_path: Path) -> None:
    """restore replaces its target whole: a user's directory (or file) must never be it."""
    make_safe(tmp_path / "s", {"k": 1})
    assert cli("backup", tmp_path / "s", tmp_path / "b").returncode == 0
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "precious.txt").write_text("keep me")
    note = tmp_path / "note.txt"
    note.write_text("keep me too")
    before = sorted(tmp_path.rglob("*"))
    for target, why in ((docs, "not a safe"), (note, "not a directory")):
        result = cli("restore", tmp_path / "b", target)
        assert result.returncode == 3
        assert f"restore refused: {why}" in one_error_line(result, target)
    assert sorted(tmp_path.rglob("*")) == before
    assert (docs / "precious.txt").read_text() == "keep me"
    assert note.read_text() == "keep me too"
    empty = tmp_path / "empty"
    empty.mkdir()
    for target in (empty, tmp_path / "s", tmp_path / "new"):  # empty, a stopped safe, new
        result = cli("restore", tmp_path / "b", target)
        assert result.returncode == 0, result.stderr
        assert cli("get", target, "k").stdout == b"1\n"


# -- every error: one line naming the path, nothing created ---------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        ["keys", "{p}"],
        ["get", "{p}", "k"],
        ["dump", "{p}", "-o", "{tmp}/out"],
        ["verify", "{p}"],
        ["recover", "{p}"],
        ["backup", "{p}", "{tmp}/bk"],
        ["restore", "{p}", "{tmp}/target"],
        ["list", "{p}"],
    ],
)
@pytest.mark.parametrize("kind", ["missing", "empty-dir", "file"])
def test_errors_are_one_line_naming_the_path_and_create_nothing(
    tmp_path: Path, command: list[str], kind: str
) -> None:
    p = tmp_path / kind
    if kind == "empty-dir":
        p.mkdir()
    elif kind == "file":
        p.write_text("not a safe")
    before = sorted(tmp_path.rglob("*"))
    result = cli(*(arg.format(p=p, tmp=tmp_path) for arg in command))
    one_error_line(result, p)
    assert sorted(tmp_path.rglob("*")) == before
