"""The JSON types an op's inputs and outputs are declared with, and the check of a value
against one."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

__all__ = ["MISMATCH", "InputType", "coerce", "json_type"]


class InputType(StrEnum):
    """JSON type of an op input (or of a declared output)."""

    STRING = "STRING"
    INT = "INT"
    FLOAT = "FLOAT"
    BOOL = "BOOL"
    OBJECT = "OBJECT"
    ARRAY = "ARRAY"


class _Mismatch:
    """Marker for a value that does not fit its type."""


MISMATCH: Any = _Mismatch()
"""What :func:`coerce` returns for a value that does not fit."""


def coerce(kind: InputType, value: Any) -> Any:
    """*value* as the type wants it, or :data:`MISMATCH`.

    INT excludes bool but accepts an integral float (``3.0``): a protobuf ``Struct``
    carries every number as a double. FLOAT accepts int but not bool.
    """
    if kind is InputType.STRING:
        return value if isinstance(value, str) else MISMATCH
    if kind is InputType.BOOL:
        return value if isinstance(value, bool) else MISMATCH
    if isinstance(value, bool):
        return MISMATCH
    if kind is InputType.INT:
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return MISMATCH
    if kind is InputType.FLOAT:
        return value if isinstance(value, int | float) else MISMATCH
    if kind is InputType.OBJECT:
        return value if isinstance(value, dict) else MISMATCH
    return value if isinstance(value, list) else MISMATCH


def json_type(value: Any) -> str:
    """The type name of a JSON value, as :class:`InputType` spells it (``null`` for None)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "BOOL"
    names = {str: "STRING", int: "INT", float: "FLOAT", dict: "OBJECT", list: "ARRAY"}
    for python_type, name in names.items():
        if isinstance(value, python_type):
            return name
    return type(value).__name__
