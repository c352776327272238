"""`Application.call` on its own: the mapping from `/<module>/<function>` and a JSON body to an
answer, without a socket or a worker (the README's "Application modules" table of statuses;
`tests/integration/test_bad_input.py` sends the same over a live node)."""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any

import pytest
from pmnc.runtime.app import Application, Response
from pmnc.runtime.modules import AppModule
from pmnc.safe import SafeNeedsRecoveryError


def _add(a: int, b: int = 0) -> int:
    return a + b


def _boom() -> None:
    raise KeyError("nope")


def _exit() -> None:
    raise SystemExit(3)


def _panic() -> None:
    raise SafeNeedsRecoveryError("/var/safe/x", "get", "a process died inside Berkeley DB")


def _not_json() -> object:
    return {1, 2}


def _nan() -> float:
    return float("nan")


def _surrogate() -> str:
    return "\ud800"


def _huge() -> int:
    return 10**5000


@pytest.fixture(scope="module")
def app() -> Application:
    functions: dict[str, Any] = {
        "add": _add,
        "boom": _boom,
        "exit": _exit,
        "panic": _panic,
        "not_json": _not_json,
        "nan": _nan,
        "surrogate": _surrogate,
        "huge": _huge,
    }
    module = AppModule("m", Path("m.py"), types.ModuleType("m"), functions)
    return Application({"m": module})


def answer(response: Response) -> Any:
    assert response.content_type == "application/json"
    return json.loads(response.body)


def test_a_call_answers_its_result(app: Application) -> None:
    r = app.call("m", "add", b'{"a": 2, "b": 3}')
    assert (r.status, answer(r), r.fatal) == (200, {"result": 5}, False)
    assert answer(app.call("m", "add", b'{"a": 2}')) == {"result": 2}


def test_an_empty_body_is_no_arguments(app: Application) -> None:
    r = app.call("m", "boom", b"")
    assert r.status == 500 and answer(r) == {"error": "KeyError: 'nope'"}


@pytest.mark.parametrize(
    ("module", "function"), [("m", "missing"), ("x", "add"), ("m", "_add"), ("_m", "add")]
)
def test_unknown_or_private_names_are_404(app: Application, module: str, function: str) -> None:
    r = app.call(module, function, b"{}")
    assert r.status == 404 and answer(r)["error"].startswith("NotFound: "), answer(r)


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        (b"[1]", "TypeError"),  # not an object
        (b"{", "JSONDecodeError"),
        (b'{"a": NaN}', "ValueError"),
        (b'{"a": 1e999999}', "ValueError"),
        (b'{"a": "\\ud800"}', "ValueError"),
        (b"\xff", "UnicodeDecodeError"),
        (b'{"c": 1}', "TypeError"),  # does not fit the signature
        (b"{}", "TypeError"),  # a required argument missing
    ],
)
def test_bad_input_is_400_before_the_function_runs(
    app: Application, body: bytes, kind: str
) -> None:
    r = app.call("m", "add", body)
    assert r.status == 400, answer(r)
    assert answer(r)["error"].startswith(f"{kind}: "), answer(r)


def test_even_systemexit_from_a_module_is_answered_not_raised(app: Application) -> None:
    r = app.call("m", "exit", b"{}")
    assert r.status == 500 and answer(r)["error"].startswith("SystemExit"), answer(r)
    assert not r.fatal


def test_a_safe_needing_recovery_is_503_and_fatal_for_the_worker(app: Application) -> None:
    r = app.call("m", "panic", b"{}")
    assert r.status == 503 and r.fatal
    assert answer(r)["error"].startswith("SafeNeedsRecoveryError: /var/safe/x")


@pytest.mark.parametrize(
    ("function", "says"),
    [
        ("not_json", "TypeError"),
        ("nan", "ValueError"),
        ("surrogate", "a string with a lone surrogate"),
        ("huge", "an integer of more than"),
    ],
)
def test_a_result_json_cannot_carry_is_500(app: Application, function: str, says: str) -> None:
    r = app.call("m", function, b"{}")
    assert r.status == 500, answer(r)
    assert says in answer(r)["error"], answer(r)
    assert f"result of m.{function}" in answer(r)["error"]


def _kw_only(*, a: int, b: int = 2) -> int:
    return a * b


def _var_kw(a: int, **rest: object) -> int:
    return a + len(rest)


def _pos_only(a: int, /, b: int = 0) -> int:
    return a - b


def _var_pos(*args: int) -> int:
    return sum(args)


@pytest.mark.parametrize(
    ("fn", "body", "status", "result"),
    [
        (_kw_only, {"a": 3}, 200, 6),
        (_kw_only, {"a": 3, "b": 3}, 200, 9),
        (_kw_only, {"b": 3}, 400, None),  # a required keyword missing
        (_kw_only, {"a": 1, "c": 1}, 400, None),  # an unknown keyword
        (_var_kw, {"a": 1, "x": 1, "y": 2}, 200, 3),
        (_var_kw, {"x": 1}, 400, None),
        (_pos_only, {"b": 1}, 400, None),  # `a` cannot be given by keyword
        (_pos_only, {"a": 1}, 400, None),
        (_var_pos, {}, 200, 0),
        (_var_pos, {"args": [1]}, 400, None),
    ],
)
def test_arguments_fit_every_kind_of_signature_as_bind_would_say(
    fn: Any, body: dict[str, object], status: int, result: object
) -> None:
    """The fast check of keyword arguments agrees with `inspect.Signature.bind` whatever the
    parameters' kinds, and a 400 says why in bind's words."""
    module = types.ModuleType("sig")
    app = Application({"sig": AppModule("sig", Path("sig.py"), module, {"f": fn})})
    answer = app.call("sig", "f", json.dumps(body).encode())
    assert answer.status == status, answer
    if status == 200:
        assert json.loads(answer.body) == {"result": result}
    else:
        assert json.loads(answer.body)["error"].startswith("TypeError: sig.f(): "), answer
