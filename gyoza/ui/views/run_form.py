"""The create-run form of the definition page: its fields, and the inputs it sends."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gyoza.models.op_definition import InputSpec, InputType, OpDefinition

__all__ = ["InputField", "input_fields", "parse_form_inputs"]


@dataclass(frozen=True)
class InputField:
    """One field of the create-run form, for one input spec."""

    name: str
    type: str
    required: bool
    description: str
    widget: str  # text, number, bool, json
    placeholder: str
    value: str = ""
    error: str = ""


def _placeholder(spec: InputSpec) -> str:
    if spec.default is not None:
        return f"default: {json.dumps(spec.default)}"
    return "required" if spec.required else "optional"


def input_fields(
    definition: OpDefinition,
    values: Mapping[str, str] | None = None,
    errors: Mapping[str, str] | None = None,
) -> list[InputField]:
    """The form's fields for a definition's inputs, with submitted values and errors."""
    values = values or {}
    errors = errors or {}
    widgets = {
        InputType.INT: "number",
        InputType.FLOAT: "number",
        InputType.BOOL: "bool",
        InputType.OBJECT: "json",
        InputType.ARRAY: "json",
    }
    return [
        InputField(
            name=spec.name,
            type=spec.type.value,
            required=spec.required,
            description=spec.description,
            widget=widgets.get(spec.type, "text"),
            placeholder=_placeholder(spec),
            value=values.get(spec.name, ""),
            error=errors.get(spec.name, ""),
        )
        for spec in definition.inputs
    ]


def parse_form_inputs(definition: OpDefinition, form: Mapping[str, str]) -> dict[str, Any]:
    """The run inputs a submitted form asks for.

    Empty fields are left out (the server fills defaults). A value that does not parse
    as its type is sent as the text it is, so that the server (which checks inputs)
    names the problem.
    """
    inputs: dict[str, Any] = {}
    for spec in definition.inputs:
        raw = form.get(spec.name, "").strip()
        if raw == "":
            continue
        inputs[spec.name] = _parse_value(spec.type, raw)
    return inputs


def _parse_value(kind: InputType, raw: str) -> Any:
    try:
        if kind is InputType.INT:
            return int(raw)
        if kind is InputType.FLOAT:
            return float(raw)
        if kind is InputType.BOOL:
            lowered = raw.lower()
            if lowered in ("true", "false"):
                return lowered == "true"
            return raw
        if kind in (InputType.OBJECT, InputType.ARRAY):
            return json.loads(raw)
    except ValueError:
        return raw
    return raw
