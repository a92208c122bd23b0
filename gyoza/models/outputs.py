"""Declared outputs: what a definition says its op writes, and the check of a run's
outputs against it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gyoza.models.errors import FieldViolation
from gyoza.models.value_types import MISMATCH, InputType, coerce, json_type

__all__ = ["OutputSpec", "output_violations"]


@dataclass
class OutputSpec:
    """One output an op declares.

    Parameters
    ----------
    name : str
        Key in the run's outputs.
    type : InputType
        JSON type the value must have (the same types as inputs).
    required : bool
        Whether a completed run must have it.
    description : str
        What it is.
    """

    name: str
    type: InputType
    required: bool = False
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Serialise to a JSON-compatible dictionary."""
        return {
            "name": self.name,
            "type": self.type.value,
            "required": self.required,
            "description": self.description,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OutputSpec:
        """Deserialise; only ``name`` and ``type`` are needed."""
        return cls(
            name=str(data["name"]),
            type=InputType(data["type"]),
            required=bool(data.get("required", False)),
            description=str(data.get("description") or ""),
        )


def output_violations(
    specs: Sequence[OutputSpec], outputs: Mapping[str, Any]
) -> list[FieldViolation]:
    """Every way *outputs* break the declared *specs* (empty when they keep them).

    A required output must be there and not null; a declared output that is there must
    have its type (an integral float is an INT). Keys no spec declares are allowed: the
    specs say what the op promises, not all it may write.
    """
    violations: list[FieldViolation] = []
    for spec in specs:
        value = outputs.get(spec.name)
        where = f"outputs.{spec.name}"
        if value is None:
            if spec.required:
                violations.append(FieldViolation(where, f"is required ({spec.type.value})"))
        elif coerce(spec.type, value) is MISMATCH:
            violations.append(
                FieldViolation(where, f"expected {spec.type.value}, got {json_type(value)}")
            )
    return violations
