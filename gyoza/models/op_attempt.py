"""OpAttempt: one try at executing a run."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from gyoza.models.resources import (
    Constraints,
    EventEntry,
    EventType,
    ExecutionSummary,
    OpRunState,
)
from gyoza.models.timestamps import (
    format_optional_timestamp,
    format_timestamp,
    parse_optional_timestamp,
    parse_timestamp,
    utc_now,
)


@dataclass
class OpAttempt:
    """One execution attempt of an :class:`~gyoza.models.op_run.OpRun`.

    Each attempt has its own events, progress, outputs and execution summary. It is
    changed only through its run, which owns the state machine.

    Parameters
    ----------
    id : str
        ``"<run id>_att_<attempt>"``.
    op_run_id : str
        The run this attempt belongs to.
    attempt : int
        1-based attempt number; with the run id, the fencing token of agent reports.
    state : OpRunState
        State of this attempt.
    progress : int
        Progress percentage (0-100).
    events : list[EventEntry]
        Timeline of this attempt, ``seq`` 1, 2, 3…
    inputs : dict[str, Any]
        Inputs the attempt runs with.
    outputs : dict[str, Any]
        Outputs it produced.
    execution_summary : ExecutionSummary
        How it ran.
    constraints : Constraints
        Resources it holds.
    started_at : datetime | None
        When its STARTED event arrived; ``None`` while never started.
    finished_at : datetime | None
        When it ended.
    reported_seq : int
        Last agent report sequence number applied to this attempt: the server's
        exactly-once watermark.
    created_at : datetime
        When the attempt was created.
    """

    id: str
    op_run_id: str
    attempt: int
    state: OpRunState = OpRunState.PENDING
    progress: int = 0
    events: list[EventEntry] = field(default_factory=list)
    inputs: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    execution_summary: ExecutionSummary = field(default_factory=ExecutionSummary)
    constraints: Constraints = field(default_factory=Constraints)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    reported_seq: int = 0
    created_at: datetime = field(default_factory=utc_now)

    @property
    def last_seq(self) -> int:
        """``seq`` of the newest event (0 when there is none)."""
        return self.events[-1].seq if self.events else 0

    @property
    def is_finished(self) -> bool:
        """True once the attempt reached a terminal state."""
        return self.state.is_terminal

    @property
    def was_released(self) -> bool:
        """True when the attempt ended because its assignment was released.

        Such attempts (a lost agent, a refused assignment) do not count against the
        retry policy's ``max_attempts``.
        """
        return any(
            e.type == EventType.ERROR.value and e.payload.get("released") is True
            for e in self.events
        )

    def to_dict(self) -> dict[str, Any]:
        """Serialise the whole attempt, events included."""
        return {
            "id": self.id,
            "op_run_id": self.op_run_id,
            "attempt": self.attempt,
            "state": self.state.value,
            "progress": self.progress,
            "events": [e.to_dict() for e in self.events],
            "inputs": copy.deepcopy(self.inputs),
            "outputs": copy.deepcopy(self.outputs),
            "execution_summary": self.execution_summary.to_dict(),
            "constraints": self.constraints.to_dict(),
            "started_at": format_optional_timestamp(self.started_at),
            "finished_at": format_optional_timestamp(self.finished_at),
            "reported_seq": self.reported_seq,
            "created_at": format_timestamp(self.created_at),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OpAttempt:
        """Deserialise what :meth:`to_dict` wrote (camelCase timestamps accepted)."""
        created_at = data.get("created_at") or data.get("createdAt")
        return cls(
            id=str(data["id"]),
            op_run_id=str(data["op_run_id"]),
            attempt=int(data["attempt"]),
            state=OpRunState(data.get("state") or OpRunState.PENDING.value),
            progress=int(data.get("progress") or 0),
            events=number_events([EventEntry.from_dict(e) for e in data.get("events") or []]),
            inputs=copy.deepcopy(dict(data.get("inputs") or {})),
            outputs=copy.deepcopy(dict(data.get("outputs") or {})),
            execution_summary=ExecutionSummary.from_dict(data.get("execution_summary") or {}),
            constraints=Constraints.from_dict(data.get("constraints") or {}),
            started_at=parse_optional_timestamp(data.get("started_at") or data.get("startedAt")),
            finished_at=parse_optional_timestamp(data.get("finished_at") or data.get("finishedAt")),
            reported_seq=int(data.get("reported_seq") or 0),
            created_at=utc_now() if created_at is None else parse_timestamp(created_at),
        )


def number_events(events: list[EventEntry]) -> list[EventEntry]:
    """Give events that carry no ``seq`` (older serialisations) their position."""
    for position, event in enumerate(events, start=1):
        if event.seq <= 0:
            event.seq = position
    return events
