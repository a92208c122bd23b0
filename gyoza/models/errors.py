"""Domain errors.

Every error the domain raises derives from :class:`GyozaError` and names an
UPPER_SNAKE ``reason``; the server's error catalog maps each reason to a status
code and puts it in the ``google.rpc.ErrorInfo`` it returns.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar


class GyozaError(Exception):
    """Base class of every domain error.

    Attributes
    ----------
    reason : str
        Machine-readable UPPER_SNAKE reason, stable across releases.
    """

    reason: ClassVar[str] = "GYOZA_ERROR"


class OpRunLockedException(GyozaError):
    """Raised when a run in a terminal state is asked to change.

    A COMPLETED, FAILED or CANCELLED run refuses events, assignment and cancel.
    """

    reason: ClassVar[str] = "RUN_LOCKED"


class InvalidTransition(GyozaError, ValueError):
    """Raised when a state change is not allowed from the run's current state.

    Examples: a STARTED event while PENDING, assigning a run that is not PENDING,
    retrying a COMPLETED or active run.
    """

    reason: ClassVar[str] = "INVALID_TRANSITION"


class MaxAttemptsReached(InvalidTransition):
    """Raised when a retry would exceed the retry policy's ``max_attempts``."""

    reason: ClassVar[str] = "MAX_ATTEMPTS_REACHED"


class StaleAttempt(GyozaError):
    """Raised when a report names an attempt that is not the run's current one.

    ``(run_id, attempt)`` is the fencing token of the agent stream: a lost agent
    that comes back must never write into a run that was retried meanwhile.

    Parameters
    ----------
    run_id : str
        The run the report was for.
    attempt : int
        The attempt number the report named.
    current_attempt : int
        The run's current attempt number.
    """

    reason: ClassVar[str] = "STALE_ATTEMPT"

    def __init__(self, run_id: str, attempt: int, current_attempt: int) -> None:
        self.run_id = run_id
        self.attempt = attempt
        self.current_attempt = current_attempt
        super().__init__(
            f"attempt {attempt} of run {run_id} is stale; the current attempt is {current_attempt}"
        )


@dataclass(frozen=True)
class FieldViolation:
    """One problem with one field of a request.

    Parameters
    ----------
    field : str
        Path of the offending field, e.g. ``"inputs.prompt"`` or ``"constraints.cpu"``.
    description : str
        What is wrong with it, in words a user can act on.
    """

    field: str
    description: str

    def __str__(self) -> str:
        return f"{self.field}: {self.description}"


class InvalidInput(GyozaError, ValueError):
    """Raised when a request carries invalid values; lists every violation at once.

    Parameters
    ----------
    violations : Iterable[FieldViolation]
        Every problem found, so that a user can fix them all in one go.

    Attributes
    ----------
    violations : list[FieldViolation]
        The problems found.
    """

    reason: ClassVar[str] = "INVALID_INPUT"

    def __init__(self, violations: Iterable[FieldViolation]) -> None:
        self.violations: list[FieldViolation] = list(violations)
        super().__init__(self._describe())

    def _describe(self) -> str:
        if not self.violations:
            return "invalid input"
        return "invalid input: " + "; ".join(str(v) for v in self.violations)


class NotFound(GyozaError):
    """Raised when a named thing (a run, a definition, an attempt, an agent) does not exist."""

    reason: ClassVar[str] = "NOT_FOUND"


class AlreadyExists(GyozaError):
    """Raised when a create names something that exists already.

    Examples: a run created with a ``request_id`` another run was created with, an
    event whose ``(run, attempt, seq)`` is already stored.
    """

    reason: ClassVar[str] = "ALREADY_EXISTS"


class MalformedReport(GyozaError, ValueError):
    """A well-addressed report of an agent that cannot be applied as sent."""

    reason: ClassVar[str] = "MALFORMED_REPORT"


class NotAssignedToAgent(GyozaError):
    """A report or reply for an attempt that is assigned to another agent (or none)."""

    reason: ClassVar[str] = "NOT_ASSIGNED_TO_AGENT"


class ReportGap(GyozaError):
    """A report past the next expected seq: the agent resends from the acknowledged one."""

    reason: ClassVar[str] = "REPORT_GAP"
