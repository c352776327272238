"""Loading application modules, each with the global `pmnc_safe` bound to its own safe.

A module is executed in a fresh module object whose `pmnc_safe` is set *before* its code runs,
so top-level code may already use it. Nothing else of the runtime is reachable from there: the
module gets its own safe, never a registry of safes, so it cannot reach another module's data
through `pmnc_safe`. The other global, `pmnc` (`calls.py`, `docs/calls.md`), is bound the same
way; it reaches other modules only through their served functions, and only once every module
of the cage is loaded (top-level code runs in name order, before later modules exist).

The module is registered in `sys.modules` under a flat private name (`pmnc_app__<cage>__<name>`)
so that classes it defines can be pickled into its safe and unpickled again in any worker of the
cage (pickle finds a class by importing its module's name; a dotted name would need parents).
"""

from __future__ import annotations

import inspect
import sys
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from pmnc.safe import Safe

from .calls import Calls
from .logs import logger

__all__ = ["AppModule", "ModuleLoadError", "load_module", "module_qualname"]


class ModuleLoadError(Exception):
    """A module file that cannot be read, compiled or executed; the message names the file."""


@dataclass(frozen=True)
class AppModule:
    """A loaded module and the functions callable over HTTP."""

    name: str
    path: Path
    module: types.ModuleType
    functions: Mapping[str, Callable[..., object]]


def module_qualname(cage: str, name: str) -> str:
    """The private `sys.modules` name of a cage's module."""
    return f"pmnc_app__{cage}__{name}"


def load_module(
    cage: str, name: str, path: Path, safe: Safe, calls: Calls | None = None
) -> AppModule:
    """Execute `path` as module `name` of `cage` with `pmnc_safe = safe` and, given `calls`,
    `pmnc = calls.bind(name)`; once loaded, its served functions are registered there.

    Callable functions are the plain functions the module itself defines with `def` under a
    public name: `helper = lambda ...`, aliases (`other = real`), names it imported
    (`from os import remove`) and classes are not callable over HTTP, nor are `async def`
    functions (workers run plain threads, no event loop): those are logged at load.
    """
    qualname = module_qualname(cage, name)
    module = types.ModuleType(qualname)
    module.__file__ = str(path)
    module.pmnc_safe = safe  # type: ignore[attr-defined]
    bound = None if calls is None else calls.bind(name)
    if bound is not None:
        module.pmnc = bound  # type: ignore[attr-defined]
    try:
        source = path.read_bytes()
        code = compile(source, str(path), "exec")
    except (OSError, SyntaxError, ValueError) as e:
        raise ModuleLoadError(f"{path}: cannot compile module {name!r}: {_describe(e)}") from e
    sys.modules[qualname] = module
    try:
        exec(code, module.__dict__)
    except BaseException as e:
        del sys.modules[qualname]
        if not isinstance(e, Exception):
            raise
        raise ModuleLoadError(f"{path}: module {name!r} failed to load: {_describe(e)}") from e
    functions: dict[str, Callable[..., object]] = {}
    asynchronous: list[str] = []
    for attr, value in vars(module).items():
        if attr.startswith("_") or not inspect.isfunction(value) or value.__module__ != qualname:
            continue
        if value.__name__ != attr:  # a lambda, or an alias of another function: not a `def`
            continue
        if inspect.iscoroutinefunction(value) or inspect.isasyncgenfunction(value):
            asynchronous.append(attr)  # nothing would run it: calling it only makes a coroutine
        else:
            functions[attr] = value
    if asynchronous:
        logger.warning(
            "%s: module %r: async functions are not served over HTTP: %s",
            path,
            name,
            ", ".join(asynchronous),
        )
    if calls is not None:
        if vars(module).get("pmnc") is not bound:
            logger.warning(
                "%s: module %r rebinds the global 'pmnc' (`import pmnc...`?): its calls to "
                "other modules and cages need it (import names from pmnc's packages instead)",
                path,
                name,
            )
        calls.add_module(name, functions)
    return AppModule(name=name, path=path, module=module, functions=functions)


def _describe(e: BaseException) -> str:
    if isinstance(e, SyntaxError) and e.lineno is not None:
        return f"SyntaxError: {e.msg} (line {e.lineno})"
    return f"{type(e).__name__}: {e}"
