"""What an agent reports about an attempt: one typed value from the executor to the run.

An executor describes each event as a :class:`ReportedEvent`; the agent's sink stores it
in the outbox in its wire form, the server's mapping reads it back into the same value,
and :meth:`OpRun.consume_report <gyoza.models.op_run.OpRun.consume_report>` applies it.
Converting to the wire happens at the boundary (``gyoza.mapping``) and nowhere else, so a
new field is added here, in the proto and in the mapping: three edits.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from gyoza.models.resources import EventType, FailureClass

#: Event types an agent may report (the server records ASSIGNED and RETRIED itself).
REPORTABLE_EVENTS = frozenset(
    {
        EventType.STARTED,
        EventType.INFO,
        EventType.PROGRESS,
        EventType.ERROR,
        EventType.COMPLETED,
        EventType.FAILED,
        EventType.CANCELLED,
    }
)

#: Events that end an attempt.
TERMINAL_EVENTS = frozenset({EventType.COMPLETED, EventType.FAILED, EventType.CANCELLED})


@dataclass(frozen=True)
class ReportedEvent:
    """One event of an attempt, as its executor reports it.

    Parameters
    ----------
    type : EventType
        What happened; an agent reports one of :data:`REPORTABLE_EVENTS` (the run
        applies the server's own ASSIGNED and ending events in the same form).
    message : str
        Human-readable text (for PROGRESS: an optional note beside the percentage).
    progress : int
        Percentage 0-100, for PROGRESS.
    payload : Mapping[str, Any]
        Extra JSON the event carries.
    outputs : dict[str, Any] | None
        The attempt's outputs, for COMPLETED (``None``: none written).
    failure_class : FailureClass | None
        Why it failed, for FAILED (``None`` reads as ``EXIT_CODE``).
    exit_code : int | None
        The container's exit code, when there was one.
    error_message : str
        What went wrong, for FAILED (empty: the message is used).
    duration_ms : int
        How long the attempt ran as the executor measured it (0: unknown, the server
        measures it from its own timeline).
    outputs_bytes : int
        Size of the outputs as they travelled (0 when unknown); see
        :meth:`held_to`. Not part of the value's identity.
    """

    type: EventType
    message: str = ""
    progress: int = 0
    payload: Mapping[str, Any] = field(default_factory=dict)
    outputs: dict[str, Any] | None = None
    failure_class: FailureClass | None = None
    exit_code: int | None = None
    error_message: str = ""
    duration_ms: int = 0
    outputs_bytes: int = field(default=0, compare=False)

    @property
    def is_terminal(self) -> bool:
        """True for COMPLETED, FAILED and CANCELLED."""
        return self.type in TERMINAL_EVENTS

    def held_to(self, max_outputs_bytes: int) -> ReportedEvent:
        """The event under the server's size limit on outputs.

        Outputs larger than *max_outputs_bytes* fail the attempt as ``OUTPUT_INVALID``
        (rather than leave it running forever, or store a document nobody can read
        back); the outputs themselves are dropped.
        """
        if self.type is not EventType.COMPLETED or self.outputs_bytes <= max_outputs_bytes:
            return self
        return replace(
            self,
            type=EventType.FAILED,
            outputs=None,
            outputs_bytes=0,
            failure_class=FailureClass.OUTPUT_INVALID,
            error_message=(
                f"the outputs are larger than the server's limit of {max_outputs_bytes} bytes"
            ),
        )

    def as_recorded(self) -> ReportedEvent:
        """The event with the fields its type records and nothing else: what a run
        applies and what :meth:`timeline_entry` writes down.

        COMPLETED carries its outputs (``{}`` when none were written); FAILED a failure
        class (``EXIT_CODE`` when none was given), its exit code and an error message
        (the message when none was given); every other type none of these.
        """
        kind = self.type
        if kind is EventType.COMPLETED:
            return replace(
                self,
                outputs=self.outputs or {},
                failure_class=None,
                exit_code=None,
                error_message="",
            )
        if kind is EventType.FAILED:
            return replace(
                self,
                outputs=None,
                failure_class=self.failure_class or FailureClass.EXIT_CODE,
                error_message=self.error_message or self.message,
            )
        return replace(self, outputs=None, failure_class=None, exit_code=None, error_message="")

    def timeline_entry(
        self, worker_id: str, gpu_ids: list[int]
    ) -> tuple[str | int, dict[str, Any]]:
        """The ``(msg, payload)`` of the timeline entry this event becomes (the arguments
        of :meth:`OpRun.add_event <gyoza.models.op_run.OpRun.add_event>`).

        A STARTED event names the worker and GPUs unless it says otherwise; a terminal
        one carries its duration; FAILED always has a failure class and a message.
        """
        recorded = self.as_recorded()
        kind = recorded.type
        payload: dict[str, Any] = copy.deepcopy(dict(recorded.payload))
        if kind is EventType.PROGRESS:
            if self.message:
                payload.setdefault("message", self.message)
            return self.progress, payload
        if kind is EventType.STARTED:
            payload.setdefault("worker_id", worker_id)
            payload.setdefault("gpu_ids", list(gpu_ids))
        if kind in TERMINAL_EVENTS and self.duration_ms:
            payload["duration_ms"] = self.duration_ms
        if recorded.outputs is not None:
            payload["outputs"] = copy.deepcopy(recorded.outputs)
        if recorded.failure_class is not None:
            payload["failure_class"] = recorded.failure_class.value
        if kind is EventType.FAILED:
            if recorded.exit_code is not None:
                payload["exit_code"] = recorded.exit_code
            payload["error_message"] = recorded.error_message
        return self.message, payload


@dataclass(frozen=True)
class LogLine:
    """One line of an attempt's output; ``stream`` is ``"stdout"`` or ``"stderr"``."""

    text: str
    stream: str = "stdout"


@dataclass(frozen=True)
class AgentReport:
    """One numbered report of an attempt, as the server receives it.

    Exactly one of ``event`` and ``lines`` is set, unless ``refusal`` is: a report that
    is well addressed but malformed is refused, and its seq still consumed so that the
    attempt's later reports apply.

    Parameters
    ----------
    run_id, attempt : str, int
        The fencing token.
    seq : int
        The agent's sequence number (1-based, per attempt).
    time : datetime
        When the agent recorded it.
    event : ReportedEvent | None
        The event, for an event report.
    lines : tuple[LogLine, ...]
        Log output, for a log report.
    refusal : str
        Why the report is malformed (empty: it is not).
    """

    run_id: str
    attempt: int
    seq: int
    time: datetime
    event: ReportedEvent | None = None
    lines: tuple[LogLine, ...] = ()
    refusal: str = ""
