"""The restricted unpickler builds plain data and placeholders and never runs the pickle's code."""

from __future__ import annotations

import collections
import datetime
import decimal
import fractions
import io
import os
import pathlib
import pickle
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from pmnc.runtime.cli.unpickle import Opaque, UndecodableError, loads

PLAIN: dict[str, Any] = {
    "none": None,
    "bools": [True, False],
    "int": -(10**40),
    "float": 1.5,
    "complex": 1 - 2j,
    "str": "héllo \udc80",
    "bytes": b"\x00\xff",
    "bytearray": bytearray(b"ab"),
    "tuple": (1, (2,)),
    "set": {1, 2},
    "frozenset": frozenset({"a"}),
    "decimal": decimal.Decimal("1.10"),
    "fraction": fractions.Fraction(1, 3),
    "date": datetime.date(2024, 2, 29),
    "time": datetime.time(1, 2, 3, tzinfo=datetime.timezone(datetime.timedelta(hours=2))),
    "datetime": datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC),
    "timedelta": datetime.timedelta(days=1, microseconds=5),
    "uuid": uuid.UUID(int=12345),
    "ordered": collections.OrderedDict(b=1, a=2),
    "defaultdict": collections.defaultdict(list, a=[1]),
    "deque": collections.deque([1, 2], maxlen=3),
    "counter": collections.Counter("aab"),
    "range": range(1, 10, 2),
    "slice": slice(1, None),
    "path": pathlib.PurePosixPath("/a/b"),
    "ellipsis": ...,
    (None,): "tuple key",
}


class Payload:
    """Unpickled by pickle.loads, this would create the file (as a safe's value could)."""

    def __init__(self, path: Path, how: str) -> None:
        self.path, self.how = path, how

    def __reduce__(self) -> Any:
        if self.how == "open":
            return (open, (str(self.path), "w"))
        return (os.system, (f"touch {self.path}",))


class User:
    def __init__(self) -> None:
        self.name = "bob"
        self.me = self


class Tags(list[int]):
    pass


class Table(dict[str, int]):
    pass


class Slotted:
    __slots__ = ("x",)

    def __init__(self) -> None:
        self.x = 1


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_plain_data_decodes_equal_in_every_protocol(protocol: int) -> None:
    decoded = loads(pickle.dumps(PLAIN, protocol))
    assert decoded == PLAIN
    assert type(decoded["ordered"]) is collections.OrderedDict  # type: ignore[index]
    assert decoded["defaultdict"].default_factory is list  # type: ignore[index]


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
@pytest.mark.parametrize("how", ["open", "system"])
def test_reduce_payload_never_runs(tmp_path: Path, protocol: int, how: str) -> None:
    target = tmp_path / "pwned"
    data = pickle.dumps({"v": [Payload(target, how)]}, protocol)
    value = loads(data)
    assert not target.exists()
    shown = repr(value)
    assert "<not decoded: " in shown
    assert ("io.open" if how == "open" else "system") in shown
    assert str(target) in shown  # the arguments are shown, as plain data
    control: Any = pickle.loads(data)  # the control: the real unpickler does run it
    if how == "open":
        control["v"][0].close()
    assert target.exists()


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_unknown_classes_become_placeholders_with_their_data(protocol: int) -> None:
    value: Any = loads(pickle.dumps([User(), User, Tags([1, 2]), Table(a=1)], protocol))
    user, cls, tags, table = value
    assert isinstance(user, Opaque)
    assert repr(user).startswith(f"<not decoded: {__name__}.User")
    assert "'name': 'bob'" in repr(user)  # self-reference shown as ..., no recursion error
    assert repr(cls) == f"<not decoded: {__name__}.User>"
    assert "1, 2" in repr(tags)
    assert "'a': 1" in repr(table)
    if protocol >= 2:  # __slots__ without __getstate__ pickles from protocol 2 on
        assert "'x': 1" in repr(loads(pickle.dumps(Slotted(), protocol)))


def test_finding_a_class_never_imports_its_module(tmp_path: Path) -> None:
    (tmp_path / "pmnc_import_trap.py").write_text(
        f"open({str(tmp_path / 'imported')!r}, 'w').close()\nclass Thing: pass\n"
    )
    data = b"cpmnc_import_trap\nThing\n)R."  # GLOBAL, EMPTY_TUPLE, REDUCE: protocol 0
    sys.path.insert(0, str(tmp_path))
    try:
        value = loads(data)
    finally:
        sys.path.remove(str(tmp_path))
    assert repr(value) == "<not decoded: pmnc_import_trap.Thing>"
    assert "pmnc_import_trap" not in sys.modules
    assert not (tmp_path / "imported").exists()


def test_copyreg_helpers_map_to_placeholders() -> None:
    # copyreg.__newobj__ called by name, and _reconstructor with an unknown class.
    newobj = b"\x80\x02ccopyreg\n__newobj__\ncposix\nsystem\nX\x02\x00\x00\x00lsq\x00\x86R."
    assert repr(loads(newobj)) == "<not decoded: posix.system args=('ls',)>"
    recon = b"ccopy_reg\n_reconstructor\n(cposix\nsystem\nc__builtin__\nobject\nNtR."
    assert repr(loads(recon)).startswith("<not decoded: posix.system")


def test_allowed_helpers_refuse_what_could_run_code() -> None:
    # _codecs.encode through a codec other than latin-1 could import a codec module.
    with pytest.raises(UndecodableError):
        loads(b"c_codecs\nencode\n(Vx\nVrot13\ntR.")
    with pytest.raises(UndecodableError):  # __newobj__ of something not a type
        loads(b"\x80\x02ccopyreg\n__newobj__\nccopyreg\n_reconstructor\n\x85R.")


def test_persistent_ids_are_refused() -> None:
    class WithPid(pickle.Pickler):
        def persistent_id(self, obj: object) -> Any:
            return "row-1" if obj == "ref" else None

    buffer = io.BytesIO()
    WithPid(buffer, 5).dump(["ref"])
    with pytest.raises(UndecodableError, match="persistent id"):
        loads(buffer.getvalue())


def test_an_unknown_tzinfo_keeps_the_datetime_as_a_placeholder() -> None:
    class Zone(datetime.tzinfo):
        def utcoffset(self, dt: datetime.datetime | None) -> datetime.timedelta:
            return datetime.timedelta(0)

    Zone.__qualname__ = "Zone"  # picklable by reference from this module
    globals()["Zone"] = Zone
    value = loads(pickle.dumps(datetime.datetime(2024, 1, 1, tzinfo=Zone()), 5))
    assert repr(value).startswith("<not decoded: datetime.datetime args=(")


@pytest.mark.parametrize(
    "data", [b"", b"garbage", pickle.dumps(list(range(100)), 5)[:-5], b"\x80\x05K\x01K\x02R."]
)
def test_damaged_pickles_raise_undecodable(data: bytes) -> None:
    with pytest.raises(UndecodableError):
        loads(data)


@pytest.mark.parametrize(
    "state",
    [
        b"}X\x06\x00\x00\x00targetcbuiltins\nlist\ns",  # BUILD with a __dict__ state
        b"N}X\x06\x00\x00\x00targetcbuiltins\nlist\ns\x86",  # BUILD with (None, slot state)
    ],
    ids=["dict-state", "slot-state"],
)
@pytest.mark.parametrize("name", ["datetime", "time"])
def test_a_pickle_cannot_build_state_into_the_shared_datetime_constructors(
    name: str, state: bytes
) -> None:
    """GLOBAL datetime.<name> resolves to a guard shared by every load in the process: a BUILD
    on it is refused, and later values still decode as they should."""
    attack = b"\x80\x04cdatetime\n" + name.encode() + b"\n" + state + b"b."
    with pytest.raises(UndecodableError):
        loads(attack)
    stamp = datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
    assert loads(pickle.dumps(stamp, 5)) == stamp
    assert loads(pickle.dumps(stamp.timetz(), 5)) == stamp.timetz()
    assert loads(pickle.dumps(stamp, 2)) == stamp


def test_a_pickle_cannot_set_state_on_an_allowed_class() -> None:
    """BUILD on a class would change how every later value decodes in the tool's process."""
    missing = collections.Counter.__dict__["__missing__"]
    payload = b"ccollections\nCounter\n}S'__missing__'\nNsb."
    with pytest.raises(UndecodableError, match="may not set state"):
        loads(payload)
    assert collections.Counter.__dict__["__missing__"] is missing
    assert loads(pickle.dumps(collections.Counter("aab"))) == collections.Counter("aab")
