"""A restricted unpickler: plain data only, never code from the pickle.

`pickle.loads` imports whatever module a pickle names and calls whatever it finds there, so
inspecting a safe with it runs the safe's code (CPython's pickle docs, "Restricting Globals").
`loads` here resolves only an allowlist of plain data types (builtins, containers, Decimal,
Fraction, datetime, UUID, paths, ...); every other global becomes an `Opaque` placeholder class
named after it. Calling a placeholder (REDUCE, NEWOBJ, INST/OBJ), giving it state (BUILD) or items
(APPENDS, SETITEMS, ADDITEMS) only records the data, so a `__reduce__` payload such as
`(os.system, ("rm -rf ~",))` shows up as `<not decoded: posix.system args=('rm -rf ~',)>` and
nothing runs. Persistent ids are refused. What is not guarded against: a pickle that allocates a
lot of memory through an allowed constructor (it is a denial of service, not code execution).
"""

from __future__ import annotations

import codecs
import collections
import copyreg
import datetime
import decimal
import fractions
import io
import pathlib
import pickle
import reprlib
import uuid
from typing import Any, ClassVar, cast

__all__ = ["Opaque", "UndecodableError", "loads"]


class UndecodableError(ValueError):
    """The bytes are not a pickle this unpickler can build (damaged, or a refused construct)."""


class _OpaqueType(type):
    """Metaclass so that a placeholder class itself (a pickled class or function) reads well."""

    _pmnc_name: str

    def __repr__(cls) -> str:
        return f"<not decoded: {cls._pmnc_name}>"


class Opaque(metaclass=_OpaqueType):
    """Stands for an object of a class that was not allowed; keeps the plain data it was given.

    Every protocol path that would build the real object lands in a method here that only
    records its arguments, so no code named by the pickle ever runs.
    """

    _pmnc_name: ClassVar[str] = "?"

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    state: Any
    items: list[Any]
    dictitems: dict[Any, Any]

    def __new__(cls, *args: Any, **kwargs: Any) -> Opaque:  # REDUCE, NEWOBJ(_EX), INST, OBJ
        self = object.__new__(cls)
        self.args, self.kwargs, self.state = args, kwargs, None
        self.items, self.dictitems = [], {}
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:  # BUILD
        self.state = state

    def __call__(self, *args: Any, **kwargs: Any) -> Opaque:  # REDUCE on a placeholder object
        return type(self)(*args, **kwargs)

    def append(self, item: Any) -> None:  # APPEND(S) on a list subclass
        self.items.append(item)

    def extend(self, items: Any) -> None:
        self.items.extend(items)

    def add(self, item: Any) -> None:  # ADDITEMS on a set subclass
        self.items.append(item)

    def __setitem__(self, key: Any, value: Any) -> None:  # SETITEM(S) on a dict subclass
        self.dictitems[key] = value

    @reprlib.recursive_repr()
    def __repr__(self) -> str:
        parts = [f"<not decoded: {self._pmnc_name}"]
        parts += [f"args={self.args!r}"] if self.args else []
        parts += [f"kwargs={self.kwargs!r}"] if self.kwargs else []
        parts += [f"state={self.state!r}"] if self.state is not None else []
        parts += [f"items={self.items!r}"] if self.items else []
        parts += [f"dictitems={self.dictitems!r}"] if self.dictitems else []
        return " ".join(parts) + ">"


def _opaque_class(name: str) -> type[Opaque]:
    return cast("type[Opaque]", _OpaqueType(f"Opaque[{name}]", (Opaque,), {"_pmnc_name": name}))


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """copyreg._reconstructor (protocols 0 and 1) without calling anything not allowed."""
    if isinstance(cls, _OpaqueType) or isinstance(base, _OpaqueType):
        return _opaque_class(_name_of(cls))(state)
    return copyreg._reconstructor(cls, base, state)  # type: ignore[attr-defined]


def _newobj(cls: Any, *args: Any) -> Any:
    """copyreg.__newobj__ when a pickle calls it by name instead of using NEWOBJ."""
    if isinstance(cls, _OpaqueType):
        return cls(*args)
    if not isinstance(cls, type) or cls not in _ALLOWED_TYPES:
        raise pickle.UnpicklingError(f"__newobj__ of {cls!r} is not allowed")
    return cls.__new__(cls, *args)


def _newobj_ex(cls: Any, args: Any, kwargs: Any) -> Any:
    if isinstance(cls, _OpaqueType):
        return cls(*args, **kwargs)
    if not isinstance(cls, type) or cls not in _ALLOWED_TYPES:
        raise pickle.UnpicklingError(f"__newobj_ex__ of {cls!r} is not allowed")
    return cls.__new__(cls, *args, **kwargs)


def _encode(text: Any, encoding: str = "utf-8") -> bytes:
    """_codecs.encode as protocols 0-2 use it for bytes; other codecs could import modules."""
    if not isinstance(text, str) or codecs.lookup(encoding).name not in ("latin-1", "iso8859-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r} is not allowed")
    return text.encode("latin-1")


class _TzTolerant:
    """datetime/time whose tzinfo is a placeholder (pytz, dateutil): the constructor refuses a
    tzinfo of another class, so the whole value becomes a placeholder instead of an error.

    Immutable: one instance serves every load in the process, and a pickle can apply BUILD to
    whatever a global names (`GLOBAL datetime datetime` then state `{"target": list}`), which
    would change how every later value decodes. No `__dict__`, and setting an attribute raises.
    """

    __slots__ = ("target",)
    target: type

    def __init__(self, target: type) -> None:
        object.__setattr__(self, "target", target)

    def __setattr__(self, name: str, value: object) -> None:
        raise pickle.UnpicklingError(f"{self!r} is read-only: cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise pickle.UnpicklingError(f"{self!r} is read-only: cannot delete {name!r}")

    def __call__(self, *args: Any) -> Any:
        if any(isinstance(a, Opaque) for a in args):
            return _opaque_class(f"{self.target.__module__}.{self.target.__qualname__}")(*args)
        return self.target(*args)

    def __repr__(self) -> str:
        return repr(self.target)


def _name_of(obj: Any) -> str:
    if isinstance(obj, _OpaqueType):
        return obj._pmnc_name
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


_ALLOWED_TYPES: frozenset[type] = frozenset(
    {
        object,
        bool,
        int,
        float,
        complex,
        str,
        bytes,
        bytearray,
        list,
        tuple,
        dict,
        set,
        frozenset,
        range,
        slice,
        decimal.Decimal,
        fractions.Fraction,
        datetime.date,
        datetime.time,
        datetime.datetime,
        datetime.timedelta,
        datetime.timezone,
        uuid.UUID,
        uuid.SafeUUID,
        collections.OrderedDict,
        collections.defaultdict,
        collections.deque,
        collections.Counter,
        pathlib.PurePath,
        pathlib.PurePosixPath,
        pathlib.PureWindowsPath,
        pathlib.PosixPath,
        pathlib.WindowsPath,
    }
)

# (module, name) -> what find_class returns. Types are returned as themselves (NEWOBJ needs a
# real type); the few functions pickles name are replaced by guarded versions above.
_ALLOWED: dict[tuple[str, str], Any] = {(t.__module__, t.__qualname__): t for t in _ALLOWED_TYPES}
_ALLOWED.update(
    {
        ("datetime", "datetime"): _TzTolerant(datetime.datetime),
        ("datetime", "time"): _TzTolerant(datetime.time),
        ("builtins", "Ellipsis"): Ellipsis,
        ("builtins", "NotImplemented"): NotImplemented,
        ("copyreg", "_reconstructor"): _reconstructor,
        ("copyreg", "__newobj__"): _newobj,
        ("copyreg", "__newobj_ex__"): _newobj_ex,
        ("_codecs", "encode"): _encode,
    }
)
# Python 2 names that protocols 0-2 may carry.
_ALLOWED.update(
    {
        ("__builtin__", name): value
        for (module, name), value in list(_ALLOWED.items())
        if module == "builtins"
    }
)
_ALLOWED[("__builtin__", "xrange")] = range
_ALLOWED[("copy_reg", "_reconstructor")] = _reconstructor


_SHARED_IDS = frozenset(id(v) for v in _ALLOWED.values())


class _RestrictedUnpickler(pickle._Unpickler):
    """find_class consults the allowlist and never imports; persistent ids are refused.

    The pure-Python unpickler, for its dispatch table: BUILD into a class or into one of the
    shared allowlisted objects (e.g. `Counter`'s `__missing__`) would change how every later
    value decodes in this process, so it is refused. Slower than the C one; only tools use it.
    """

    dispatch: ClassVar[dict[int, Any]] = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file)
        self._opaque: dict[str, type[Opaque]] = {}

    def _load_build(self) -> None:
        target = self.stack[-2]  # type: ignore[attr-defined]  # [-1] is the state
        if isinstance(target, type) or id(target) in _SHARED_IDS:
            raise pickle.UnpicklingError(
                f"refused: a pickle may not set state on {getattr(target, '__name__', target)!r}"
            )
        pickle._Unpickler.load_build(self)  # type: ignore[attr-defined]

    dispatch[pickle.BUILD[0]] = _load_build

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED.get((module, name))
        if allowed is not None:
            return allowed
        full = f"{module}.{name}"
        cls = self._opaque.get(full)
        if cls is None:
            cls = self._opaque[full] = _opaque_class(full)
        return cls

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError(f"persistent id {pid!r} refused: a safe stores none")


def loads(data: bytes) -> object:
    """Decode a pickle into plain data and placeholders; UndecodableError if it cannot be built.

    Never imports a module or calls anything outside the allowlist, whatever the bytes say.
    """
    try:
        return _RestrictedUnpickler(io.BytesIO(data)).load()
    except RecursionError:
        raise UndecodableError("nested too deeply") from None
    except Exception as e:  # any constructor may refuse bad arguments: report, never crash
        raise UndecodableError(f"{type(e).__name__}: {e}") from e
