"""Checks of request fields that several servicers share: page sizes, required ids."""

from __future__ import annotations

from gyoza.models.errors import FieldViolation, InvalidInput

MAX_PAGE_BYTES = 3 * 1024 * 1024
"""A listing page stops before it grows past this (under gRPC's 4 MiB message limit);
its token then goes on from where it stopped."""


def page_size(value: int, *, default: int, maximum: int, field: str = "page_size") -> int:
    """The page size to use: *default* for 0, at most *maximum* (AIP-158).

    Raises
    ------
    InvalidInput
        When *value* is negative.
    """
    if value < 0:
        raise InvalidInput([FieldViolation(field, f"must be >= 0 (got {value})")])
    if value == 0:
        return default
    return min(value, maximum)


def required(value: str, field: str) -> str:
    """*value*, which must not be empty.

    Raises
    ------
    InvalidInput
        When *value* is empty or blank.
    """
    if not value.strip():
        raise InvalidInput([FieldViolation(field, "must not be empty")])
    return value
