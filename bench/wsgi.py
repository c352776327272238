"""The benchmark's anchor: the same module functions served as a WSGI app by gunicorn.

gunicorn's `gthread` worker (a poller for keep-alive connections, a thread pool for requests)
at the same workers x threads as the pmnc cage, serving the very files the node serves
(`examples/modules/*.py`, e.g. `kv.get` and `counter.increment`) the way the node does:
`POST /<module>/<function>` with a JSON object of keyword arguments, `200 {"result": ...}`,
errors as `{"error": "<Type>: <message>"}`. Each module gets its own `pmnc.safe.Safe`, created
once in gunicorn's master (`on_starting`) and opened again in every worker after the fork
(`post_fork`): a Safe is not carried across fork(). Durable like the node's (the default).

Run as `gunicorn -c bench/wsgi.py bench.wsgi:app` with PMNC_BENCH_MODULES (a directory of
modules) and PMNC_BENCH_DATA (where the safes go) in the environment.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from types import FunctionType
from typing import Any

MODULES_ENV = "PMNC_BENCH_MODULES"
DATA_ENV = "PMNC_BENCH_DATA"

_safes: list[Any] = []  # pmnc.safe.Safe
_functions: dict[str, dict[str, Callable[..., object]]] = {}


def _safe_open(path: Path) -> Any:
    # By name, like bench/stores.py: `mypy bench` does not follow the editable install.
    return importlib.import_module("pmnc.safe").Safe.open(path)


def _module_files() -> list[Path]:
    return sorted(
        p for p in Path(os.environ[MODULES_ENV]).glob("*.py") if not p.name.startswith("_")
    )


def _safe_dir(module: str) -> Path:
    return Path(os.environ[DATA_ENV]) / module


def create_safes() -> None:
    """In the master before any fork: create every safe once, then close it, so the workers
    only join existing environments."""
    for path in _module_files():
        _safe_open(_safe_dir(path.stem)).close()


def load_modules() -> None:
    """In each worker after the fork: open the safes and load the modules with `pmnc_safe`
    bound, as the runtime's worker does; serve functions defined with `def` under their own
    public name."""
    for path in _module_files():
        safe = _safe_open(_safe_dir(path.stem))
        _safes.append(safe)
        namespace: dict[str, Any] = {"__name__": path.stem, "pmnc_safe": safe}
        exec(compile(path.read_text(encoding="utf-8"), str(path), "exec"), namespace)
        _functions[path.stem] = {
            name: f
            for name, f in namespace.items()
            if isinstance(f, FunctionType)
            and not name.startswith("_")
            and f.__name__ == name
            and f.__module__ == path.stem
        }


def close_safes() -> None:
    """On a graceful stop: close the safes (a checkpoint)."""
    while _safes:
        _safes.pop().close()


# gunicorn runs this file as its config (`-c`) in a namespace of its own, and imports
# `bench.wsgi:app` separately: the hooks reach the imported module, which holds the state.


def on_starting(server: object) -> None:
    importlib.import_module("bench.wsgi").create_safes()


def post_fork(server: object, worker: object) -> None:
    importlib.import_module("bench.wsgi").load_modules()


def worker_exit(server: object, worker: object) -> None:
    importlib.import_module("bench.wsgi").close_safes()


def _object(args: object) -> dict[str, Any]:
    if not isinstance(args, dict):
        raise TypeError("the body must be a JSON object")
    return args


def _no_constant(text: str) -> object:
    raise ValueError(f"{text} is not JSON")


def _answer(start_response: Callable[..., object], status: str, payload: object) -> Iterable[bytes]:
    body = json.dumps(payload).encode()
    start_response(
        status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    )
    return [body]


def app(environ: dict[str, Any], start_response: Callable[..., object]) -> Iterable[bytes]:
    """POST /<module>/<function> with a JSON object body: the function's result as JSON."""
    parts = environ.get("PATH_INFO", "").strip("/").split("/")
    functions = _functions.get(parts[0]) if len(parts) == 2 else None
    function = functions.get(parts[1]) if functions is not None else None
    if function is None:
        return _answer(start_response, "404 Not Found", {"error": "NotFound: no such function"})
    if environ.get("REQUEST_METHOD") != "POST":
        return _answer(
            start_response, "405 Method Not Allowed", {"error": "MethodNotAllowed: POST"}
        )
    length = int(environ.get("CONTENT_LENGTH") or 0)
    raw = environ["wsgi.input"].read(length) if length else b""
    try:
        args = json.loads(raw, parse_constant=_no_constant) if raw else {}
        inspect.signature(function).bind(**_object(args))
    except (ValueError, TypeError) as e:
        return _answer(start_response, "400 Bad Request", {"error": f"{type(e).__name__}: {e}"})
    try:
        result = function(**args)
        return _answer(start_response, "200 OK", {"result": result})
    except Exception as e:
        return _answer(
            start_response, "500 Internal Server Error", {"error": f"{type(e).__name__}: {e}"}
        )
