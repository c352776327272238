"""A cage's application as HTTP sees it: `/<module>/<function>` plus a JSON body -> a call.

`Application.call` never raises for anything a module or a client does: every outcome is a
`Response`. Input is checked before the function runs, so that nothing a client sends can be
stored and then never be answered again (each case below was a real failure of an earlier
version; `tests/integration/test_bad_input.py` sends them):

- NaN and Infinity are not JSON (RFC 8259), and neither is a number that overflows a float:
  `json` turns `1e999999` into `inf` without asking `parse_constant`, so `parse_float` refuses
  any float that is not finite.
- An integer over Python's int/str conversion limit (`sys.get_int_max_str_digits()`, 4300
  digits) cannot be parsed, and one that a function computes cannot be written back: the first
  is a 400, the second a 500 naming the limit.
- A string holding a lone surrogate (the JSON escape `"\\ud800"`, in a key or a value at any
  depth) decodes to a Python str that no UTF-8 encoder accepts: stored, it would make every
  answer that contains it fail. It is refused with 400; a result that holds one is a 500, and
  an error message that holds one is answered with the surrogate replaced.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import re
import sys
from collections.abc import Callable, Mapping
from typing import NamedTuple

from pmnc.safe import (
    SafeGroupNotFormedError,
    SafeNeedsRecoveryError,
    SafeNotMasterError,
    writes_committed,
)

from .calls import request_chain
from .logs import logger
from .modules import AppModule

__all__ = [
    "JSON",
    "Application",
    "BadInput",
    "Response",
    "describe",
    "error_response",
    "needs_recovery",
    "parse_arguments",
]

JSON = "application/json"

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class Call(NamedTuple):
    """One HTTP call as it came, for a node of the group to send it on (group.Forwarder)."""

    module: str
    function: str
    body: bytes
    chain: str | None  # X-Pmnc-Chain
    forwarded: bool  # X-Pmnc-Forwarded: it came from another node as the master's


class Response(NamedTuple):
    status: int
    body: bytes
    fatal: bool = False  # the worker must exit (its safe needs recovery) once this is sent
    content_type: str = JSON
    allow: str | None = None  # the Allow header of a 405


# (the error, the call, a way to run it here again) -> the answer: group.Forwarder.
Forward = Callable[[SafeNotMasterError, Call, Callable[[], Response]], Response]


def error_response(
    status: int, exc_type: str, message: str, *, fatal: bool = False, allow: str | None = None
) -> Response:
    """`{"error": "<Type>: <message>"}`; a lone surrogate in the message is replaced, so an
    error is always answered."""
    text = f"{exc_type}: {message}".encode(errors="replace").decode()
    body = json.dumps({"error": text}, ensure_ascii=False).encode()
    return Response(status, body, fatal, allow=allow)


def describe(e: BaseException) -> str:
    """`str(e)`, or a placeholder when the exception's own `__str__` raises: a module's
    exception must be answered whatever it is made of."""
    try:
        return str(e)
    except Exception:  # noqa: BLE001 - any failure of its __str__
        return f"<{type(e).__name__} whose str() failed>"


def needs_recovery(e: BaseException) -> bool:
    """Whether `e` or an exception it was raised from says a safe needs recovery."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, SafeNeedsRecoveryError):
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False


class BadInput(ValueError):
    """A request body refused before any call; `kind` is the error type the client is told
    (ValueError, or RecursionError for nesting, as Python itself would have said)."""

    def __init__(self, message: str, kind: str = "ValueError") -> None:
        super().__init__(message)
        self.kind = kind


def _reject_constant(name: str) -> object:
    raise BadInput(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BadInput(f"number {text[:40]}{'...' if len(text) > 40 else ''} overflows a float")
    return value


def _check_strings(value: object) -> None:
    """Refuse a lone surrogate anywhere in a parsed body; iterative, so depth costs no stack."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _LONE_SURROGATE.search(item):
                raise BadInput(f"string with a lone surrogate: {ascii(item)[:60]}")
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)


def parse_arguments(body: bytes) -> dict[str, object]:
    """The keyword arguments in a request body (empty: `{}`); BadInput or ValueError if bad.

    Decoded strictly here rather than by `json.loads(bytes)`, which decodes with
    "surrogatepass": the UTF-8 bytes of a lone surrogate (ED A0 80) would then arrive as one
    without any `\\u` escape. Strict, they are a UnicodeDecodeError (400).
    """
    if not body.strip():
        return {}
    try:
        text = body.decode(json.detect_encoding(body))
        args = _DECODER.decode(text)
    except RecursionError:  # "[" * 100000 fits in max_body: nesting is the client's fault
        raise BadInput("the JSON body is nested too deeply", "RecursionError") from None
    except ValueError as e:
        if "integer string conversion" in str(e):
            limit = sys.get_int_max_str_digits()
            raise BadInput(f"an integer of more than {limit} digits cannot be parsed") from None
        raise  # JSONDecodeError, UnicodeDecodeError, BadInput: said as they are
    if not isinstance(args, dict):
        raise TypeError(f"expected a JSON object, got {type(args).__name__}")
    if "\\u" in text:  # the only way a strictly decoded JSON text can carry a surrogate
        _check_strings(args)
    return args


class _Arguments:
    """Whether keyword arguments fit a function, checked per call. For the usual signature
    (named parameters, perhaps `**kwargs`) two set operations do it; `Signature.bind`, about
    ten times slower, is kept for the rest (positional-only parameters, `*args`) and for the
    message when they do not fit."""

    __slots__ = ("names", "open", "required", "signature", "simple")

    def __init__(self, fn: Callable[..., object]) -> None:
        self.signature = inspect.signature(fn)
        params = self.signature.parameters.values()
        kinds = {p.kind for p in params}
        keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        self.simple = kinds <= {*keyword, inspect.Parameter.VAR_KEYWORD}
        self.open = inspect.Parameter.VAR_KEYWORD in kinds
        self.names = frozenset(p.name for p in params if p.kind in keyword)
        self.required = frozenset(
            p.name for p in params if p.kind in keyword and p.default is inspect.Parameter.empty
        )

    def check(self, args: dict[str, object]) -> None:
        """TypeError (as `Signature.bind` words it) if `args` do not fit."""
        if (
            self.simple
            and self.required <= args.keys()
            and (self.open or args.keys() <= self.names)
        ):
            return
        self.signature.bind(**args)


class Application:
    """Maps `/<module>/<function>` plus a JSON body to a call and its JSON answer."""

    def __init__(self, modules: Mapping[str, AppModule], forward: Forward | None = None) -> None:
        # On a replicated node: carries a call whose write met a client safe to the master's
        # node (runtime/group.py); without it SafeNotMasterError is answered like any error.
        self._forward = forward
        self._functions: dict[tuple[str, str], tuple[Callable[..., object], _Arguments]] = {
            (m.name, f): (fn, _Arguments(fn))
            for m in modules.values()
            for f, fn in m.functions.items()
        }

    def serves(self, module: str, function: str) -> bool:
        """Whether `module.function` is callable over HTTP (its names may become labels)."""
        return (module, function) in self._functions

    def call(
        self,
        module: str,
        function: str,
        body: bytes,
        chain: str | None = None,
        forwarded: bool = False,
    ) -> Response:
        """Run one call; never raises for anything the module or the client does. `chain`:
        the request's X-Pmnc-Chain header (calls.request_chain refuses a cycle across cages);
        `forwarded`: it came from another node of the group as the master's (group.py)."""
        target = self._functions.get((module, function))
        if target is None or module.startswith("_") or function.startswith("_"):
            return error_response(404, "NotFound", f"no function {function!r} in module {module!r}")
        fn, arguments = target
        try:
            args = parse_arguments(body)
        except (ValueError, TypeError) as e:  # JSONDecodeError, UnicodeDecodeError, BadInput
            return error_response(
                400, e.kind if isinstance(e, BadInput) else type(e).__name__, str(e)
            )
        try:
            arguments.check(args)
        except TypeError as e:
            return error_response(400, "TypeError", f"{module}.{function}(): {e}")
        before = writes_committed()
        try:
            return self._run(module, function, fn, args, chain)
        except SafeNotMasterError as e:
            # Not carried elsewhere: a call that already wrote (it would write again), and a
            # master whose group has not formed (no other node can do better).
            stays = isinstance(e, SafeGroupNotFormedError) or writes_committed() != before
            if self._forward is None or stays:
                logger.warning("%s.%s: %s", module, function, e)
                return _not_master(e, before)
            call = Call(module, function, body, chain, forwarded)
            again = functools.partial(self._run, module, function, fn, args, chain)
            return self._forward(e, call, functools.partial(_run_here, again))

    def _run(
        self,
        module: str,
        function: str,
        fn: Callable[..., object],
        args: dict[str, object],
        chain: str | None,
    ) -> Response:
        """The function's answer; SafeNotMasterError is let through for the caller to forward."""
        try:
            with request_chain(chain, module, function):
                result = fn(**args)
        except SafeNotMasterError:
            raise
        except BaseException as e:  # noqa: BLE001 - whatever a module raises is answered:
            # sys.exit(), KeyboardInterrupt or GeneratorExit from a module must not end the
            # serving thread (the worker would go on with one thread fewer).
            message = describe(e)
            if needs_recovery(e):
                logger.error("%s.%s: %s: %s", module, function, type(e).__name__, message)
                return error_response(503, type(e).__name__, message, fatal=True)
            logger.warning(
                "%s.%s raised %s: %s", module, function, type(e).__name__, message, exc_info=True
            )
            return error_response(500, type(e).__name__, message)
        return _answer(module, function, result)


def _run_here(run: Callable[[], Response]) -> Response:
    """Run a call again where this node has just become master (the forwarder found it so)."""
    before = writes_committed()
    try:
        return run()
    except SafeNotMasterError as e:
        return _not_master(e, before)


def _not_master(e: SafeNotMasterError, before: int) -> Response:
    """The answer to a call whose write met a client safe and that is not carried out
    elsewhere: 503 NotMaster when it wrote nothing (a caller may send it again), 500
    PartiallyWritten when it had already committed writes to other safes before (running it
    again, here or on the master, would repeat them: README, "Replicated safes")."""
    if writes_committed() == before:
        kind = "GroupNotFormed" if isinstance(e, SafeGroupNotFormedError) else "NotMaster"
        return error_response(503, kind, describe(e))
    return error_response(
        500,
        "PartiallyWritten",
        f"{describe(e)}; the call had already written to another safe, so it was not sent "
        "to the master (it would write that again): its outcome is partial",
    )


def _answer(module: str, function: str, result: object) -> Response:
    where = f"result of {module}.{function}"
    try:
        return Response(
            200, json.dumps({"result": result}, allow_nan=False, ensure_ascii=False).encode()
        )
    except UnicodeEncodeError:
        return error_response(500, "ValueError", f"{where}: a string with a lone surrogate")
    except ValueError as e:
        if "integer string conversion" in str(e):
            limit = sys.get_int_max_str_digits()
            return error_response(
                500, "ValueError", f"{where}: an integer of more than {limit} digits"
            )
        return error_response(500, type(e).__name__, f"{where}: {e}")
    except (TypeError, RecursionError) as e:
        return error_response(500, type(e).__name__, f"{where}: {e}")
