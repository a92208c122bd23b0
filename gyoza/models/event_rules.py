"""What an event and its payload must hold before the run applies it.

The aggregate checks every event with these rules before it changes anything, so
that a refused event leaves the run as it was.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gyoza.models.errors import FieldViolation, InvalidInput
from gyoza.models.resources import EventType, FailureClass


def priority_violations(priority: Any) -> list[FieldViolation]:
    """Problems with a scheduling priority: an integer >= 0."""
    if isinstance(priority, bool) or not isinstance(priority, int):
        return [FieldViolation("priority", "must be an integer")]
    if priority < 0:
        return [FieldViolation("priority", f"must be >= 0 (got {priority})")]
    return []


def event_type(event_type: Any) -> EventType:
    """The :class:`EventType` named, or :class:`InvalidInput`."""
    try:
        return EventType(event_type)
    except ValueError:
        known = ", ".join(t.value for t in EventType)
        raise InvalidInput(
            [FieldViolation("type", f"unknown event type {event_type!r}; known: {known}")]
        ) from None


def failure_class(value: Any) -> FailureClass:
    """The :class:`FailureClass` named, or :class:`InvalidInput`."""
    try:
        return FailureClass(value)
    except ValueError:
        raise InvalidInput(
            [FieldViolation("failure_class", f"unknown failure class {value!r}")]
        ) from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _text(value: Any) -> str | None:
    return None if isinstance(value, str) else "must be a string"


def _worker(value: Any) -> str | None:
    return None if isinstance(value, str) and value.strip() else "must be a non-empty string"


def _index(value: Any) -> str | None:
    return None if _is_int(value) and value >= 0 else "must be an integer >= 0"


def _indexes(value: Any) -> str | None:
    if isinstance(value, list) and all(_is_int(v) and v >= 0 for v in value):
        return None
    return "must be a list of integers >= 0"


def _integer(value: Any) -> str | None:
    return None if _is_int(value) else "must be an integer"


def _duration(value: Any) -> str | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and value >= 0
    return None if ok else "must be a number >= 0"


def _object(value: Any) -> str | None:
    return None if isinstance(value, dict) else "must be an object"


def _failure_name(value: Any) -> str | None:
    try:
        FailureClass(value)
    except ValueError:
        known = ", ".join(c.value for c in FailureClass)
        return f"unknown failure class {value!r}; known: {known}"
    return None


_Rule = Callable[[Any], str | None]

# Payload keys each event type reads, and what each must hold. Keys not listed are
# recorded as they are.
_PAYLOAD_RULES: dict[EventType, dict[str, _Rule]] = {
    EventType.ASSIGNED: {"worker_id": _worker, "gpu_ids": _indexes},
    EventType.STARTED: {"worker_id": _text, "gpu_id": _index, "gpu_ids": _indexes},
    EventType.COMPLETED: {"outputs": _object, "duration_ms": _duration},
    EventType.FAILED: {
        "error_message": _text,
        "failure_class": _failure_name,
        "exit_code": _integer,
        "duration_ms": _duration,
    },
    EventType.CANCELLED: {
        "error_message": _text,
        "outputs": _object,
        "exit_code": _integer,
        "duration_ms": _duration,
    },
}

_REQUIRED_PAYLOAD: dict[EventType, tuple[str, ...]] = {EventType.ASSIGNED: ("worker_id",)}


def event_violations(kind: EventType, msg: Any, payload: Any) -> list[FieldViolation]:
    """Every problem with an event's msg and payload (empty when it is well formed)."""
    violations: list[FieldViolation] = []
    if kind is EventType.PROGRESS:
        if not _is_int(msg) or not 0 <= msg <= 100:
            violations.append(
                FieldViolation(
                    "msg", f"PROGRESS msg must be an integer from 0 to 100 (got {msg!r})"
                )
            )
    elif not isinstance(msg, str | int) or isinstance(msg, bool):
        violations.append(FieldViolation("msg", "must be a string or an integer"))
    if not isinstance(payload, dict):
        violations.append(FieldViolation("payload", "must be an object"))
        return violations
    for key in _REQUIRED_PAYLOAD.get(kind, ()):
        if payload.get(key) is None:
            violations.append(FieldViolation(f"payload.{key}", "is required"))
    for key, rule in _PAYLOAD_RULES.get(kind, {}).items():
        value = payload.get(key)
        if value is None:
            continue
        problem = rule(value)
        if problem is not None:
            violations.append(FieldViolation(f"payload.{key}", problem))
    return violations
