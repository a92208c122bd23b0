"""The gyoza domain: runs, attempts, definitions and their value objects (stdlib only)."""

from __future__ import annotations

from gyoza.models.errors import (
    AlreadyExists,
    FieldViolation,
    GyozaError,
    InvalidInput,
    InvalidTransition,
    MaxAttemptsReached,
    NotFound,
    OpRunLockedException,
    RunNotFinished,
    StaleAttempt,
)
from gyoza.models.op_attempt import OpAttempt
from gyoza.models.op_definition import NAME_PATTERN, InputSpec, InputType, OpDefinition
from gyoza.models.op_run import OpRun
from gyoza.models.resources import (
    Constraints,
    EventDelivery,
    EventEntry,
    EventType,
    ExecutionSummary,
    FailureClass,
    OpRunState,
    RetryPolicy,
)

__all__ = [
    "NAME_PATTERN",
    "AlreadyExists",
    "Constraints",
    "EventDelivery",
    "EventEntry",
    "EventType",
    "ExecutionSummary",
    "FailureClass",
    "FieldViolation",
    "GyozaError",
    "InputSpec",
    "InputType",
    "InvalidInput",
    "InvalidTransition",
    "MaxAttemptsReached",
    "NotFound",
    "OpAttempt",
    "OpDefinition",
    "OpRun",
    "OpRunLockedException",
    "OpRunState",
    "RetryPolicy",
    "RunNotFinished",
    "StaleAttempt",
]
