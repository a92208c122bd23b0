"""Run inputs from the command line: ``--input KEY=VALUE`` and ``--inputs-json``.

A value is read as JSON when it parses (``steps=30`` is a number, ``tags=["a"]`` a list)
and as a string otherwise (``prompt=a cat``). When the run's definition declares the
input, its type decides instead: a ``string`` input keeps the text as typed
(``name=123`` is ``"123"``), an ``int`` input must be an integer, a ``bool`` input takes
``true``/``false`` (also ``yes``/``no``, ``on``/``off``, ``1``/``0``), and so on.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from gyoza.models.op_definition import InputSpec, InputType

__all__ = ["InputError", "coerce_input", "parse_inputs", "parse_inputs_json"]

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


class InputError(ValueError):
    """A run input given on the command line that cannot be used."""


def parse_inputs(pairs: Sequence[str], specs: Iterable[InputSpec] = ()) -> dict[str, Any]:
    """Read ``KEY=VALUE`` pairs, typed by *specs* when they declare the key.

    A key given twice takes its last value.

    Raises
    ------
    InputError
        A pair without ``=`` or with an empty key, or a value that does not fit its
        declared type.
    """
    by_name = {spec.name: spec for spec in specs}
    inputs: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise InputError(f"--input {pair!r}: expected KEY=VALUE")
        inputs[key] = coerce_input(key, text, by_name.get(key))
    return inputs


def coerce_input(key: str, text: str, spec: InputSpec | None) -> Any:
    """The value of ``--input key=text``: typed by *spec*, else JSON or the text.

    Raises
    ------
    InputError
        When *text* does not fit the declared type.
    """
    if spec is None:
        parsed = _json(text)
        return text if parsed is _NOT_JSON else parsed
    kind = spec.type
    if kind is InputType.STRING:
        return text
    if kind is InputType.BOOL:
        word = text.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
        raise _mismatch(key, text, "bool (true or false)")
    parsed = _json(text)
    if kind is InputType.INT:
        if isinstance(parsed, float) and parsed.is_integer():
            return int(parsed)
        if isinstance(parsed, int) and not isinstance(parsed, bool):
            return parsed
        raise _mismatch(key, text, "int (a whole number)")
    if kind is InputType.FLOAT:
        if isinstance(parsed, int | float) and not isinstance(parsed, bool):
            number = float(parsed)
            if math.isfinite(number):
                return number
        raise _mismatch(key, text, "float (a number)")
    if kind is InputType.OBJECT:
        if isinstance(parsed, dict):
            return parsed
        raise _mismatch(key, text, 'object (a JSON object, e.g. {"k": 1})')
    if isinstance(parsed, list):
        return parsed
    raise _mismatch(key, text, 'array (a JSON array, e.g. [1, "a"])')


def parse_inputs_json(text: str) -> dict[str, Any]:
    """Read ``--inputs-json``: a JSON object, or ``@PATH`` of a file holding one.

    Raises
    ------
    InputError
        When the file cannot be read or the text is not a JSON object.
    """
    source = "--inputs-json"
    if text.startswith("@"):
        path = Path(text[1:]).expanduser()
        source = f"--inputs-json {text}"
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise InputError(f"{source}: cannot read {path}: {error}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(f"{source}: not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise InputError(f"{source}: expected a JSON object, got {type(value).__name__}")
    return value


class _NotJson:
    pass


_NOT_JSON = _NotJson()


def _json(text: str) -> Any:
    """*text* as JSON, or ``_NOT_JSON``; NaN and Infinity are not JSON."""
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except ValueError:
        return _NOT_JSON


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _mismatch(key: str, text: str, expected: str) -> InputError:
    return InputError(f"--input {key}: expected {expected}, got {text!r}")
