"""--input KEY=VALUE and --inputs-json: JSON when it parses, typed by the definition."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gyoza.cli.inputs import InputError, coerce_input, parse_inputs, parse_inputs_json
from gyoza.models.op_definition import InputSpec, InputType


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30", 30),
        ("-2", -2),
        ("7.5", 7.5),
        ("true", True),
        ("null", None),
        ('"quoted"', "quoted"),
        ('["a", 1]', ["a", 1]),
        ('{"k": {"n": 1}}', {"k": {"n": 1}}),
        ("a cat", "a cat"),
        ("", ""),
        ("True", "True"),  # not JSON: kept as typed
        ("NaN", "NaN"),  # not a JSON number
        ("Infinity", "Infinity"),
        ("[1, 2", "[1, 2"),
    ],
)
def test_undeclared_value_is_json_when_it_parses_else_text(text: str, expected: Any) -> None:
    value = coerce_input("k", text, None)
    assert value == expected
    assert type(value) is type(expected)


def spec(kind: InputType) -> InputSpec:
    return InputSpec("k", kind)


@pytest.mark.parametrize(
    ("kind", "text", "expected"),
    [
        (InputType.STRING, "123", "123"),
        (InputType.STRING, "true", "true"),
        (InputType.STRING, '"quoted"', '"quoted"'),
        (InputType.STRING, "", ""),
        (InputType.INT, "30", 30),
        (InputType.INT, "-4", -4),
        (InputType.INT, "3.0", 3),
        (InputType.INT, "1e3", 1000),
        (InputType.FLOAT, "2", 2.0),
        (InputType.FLOAT, "0.25", 0.25),
        (InputType.BOOL, "true", True),
        (InputType.BOOL, "False", False),
        (InputType.BOOL, "yes", True),
        (InputType.BOOL, "off", False),
        (InputType.BOOL, "1", True),
        (InputType.BOOL, "0", False),
        (InputType.OBJECT, '{"a": [1]}', {"a": [1]}),
        (InputType.OBJECT, "{}", {}),
        (InputType.ARRAY, '[1, "b"]', [1, "b"]),
        (InputType.ARRAY, "[]", []),
    ],
)
def test_declared_value_takes_its_type(kind: InputType, text: str, expected: Any) -> None:
    value = coerce_input("k", text, spec(kind))
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(
    ("kind", "text", "message"),
    [
        (InputType.INT, "abc", "--input k: expected int (a whole number), got 'abc'"),
        (InputType.INT, "2.5", "--input k: expected int (a whole number), got '2.5'"),
        (InputType.INT, "true", "--input k: expected int (a whole number), got 'true'"),
        (InputType.FLOAT, "fast", "--input k: expected float (a number), got 'fast'"),
        (InputType.FLOAT, "NaN", "--input k: expected float (a number), got 'NaN'"),
        (InputType.BOOL, "maybe", "--input k: expected bool (true or false), got 'maybe'"),
        (InputType.OBJECT, "[1]", "--input k: expected object (a JSON object"),
        (InputType.ARRAY, "a,b", "--input k: expected array (a JSON array"),
    ],
)
def test_value_that_does_not_fit_its_type_is_refused(
    kind: InputType, text: str, message: str
) -> None:
    with pytest.raises(InputError) as error:
        coerce_input("k", text, spec(kind))
    assert str(error.value).startswith(message)


def test_parse_inputs_types_declared_keys_only() -> None:
    specs = [InputSpec("steps", InputType.INT), InputSpec("name", InputType.STRING)]
    pairs = ["steps=30", "name=007", "extra=[1]", "text=a=b", "steps=40"]
    assert parse_inputs(pairs, specs) == {
        "steps": 40,  # the last value wins
        "name": "007",
        "extra": [1],
        "text": "a=b",  # only the first '=' splits
    }


@pytest.mark.parametrize("pair", ["novalue", "=1", " =1"])
def test_pair_without_key_or_equals_is_refused(pair: str) -> None:
    with pytest.raises(InputError, match="expected KEY=VALUE"):
        parse_inputs([pair])


def test_inputs_json_text_and_file(tmp_path: Path) -> None:
    assert parse_inputs_json('{"a": 1, "b": [true]}') == {"a": 1, "b": [True]}
    path = tmp_path / "inputs.json"
    path.write_text('{"prompt": "a cat"}')
    assert parse_inputs_json(f"@{path}") == {"prompt": "a cat"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[1]", "--inputs-json: expected a JSON object, got list"),
        ("{oops", "--inputs-json: not valid JSON"),
        ("@/nonexistent/inputs.json", "--inputs-json @/nonexistent/inputs.json: cannot read"),
    ],
)
def test_bad_inputs_json_is_refused(text: str, message: str) -> None:
    with pytest.raises(InputError) as error:
        parse_inputs_json(text)
    assert str(error.value).startswith(message)
