"""The executor interface: how the agent runs one attempt.

An executor starts an assigned attempt and reports what happens to it through a
:class:`ReportSink`. The sink writes each report to the agent's on-disk outbox before it
is sent, so an executor never talks to the server itself. Executors: ``scripted`` (plays an
op from its inputs, for tests and benchmarks) and ``docker`` (one container per attempt).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from gyoza.models.reports import ReportedEvent
from gyoza.models.resources import Constraints


@dataclass(frozen=True)
class Assignment:
    """An attempt the server assigned to this agent.

    Parameters
    ----------
    run_id : str
        Identifier of the run.
    attempt : int
        Attempt number; with ``run_id`` the fencing token of every report.
    image : str
        Docker image reference.
    inputs : dict[str, Any]
        The run's inputs (defaults filled in).
    constraints : Constraints
        Resources reserved for the attempt: the container's limits.
    gpu_ids : tuple[int, ...]
        Indices of the GPUs reserved for it on this agent.
    gpu_uuids : tuple[str, ...]
        UUIDs of those GPUs.
    op_definition : str | None
        Definition name, ``None`` for an ad-hoc run.
    op_definition_version : int | None
        Definition version, ``None`` for an ad-hoc run.
    """

    run_id: str
    attempt: int
    image: str
    inputs: dict[str, Any] = field(default_factory=dict)
    constraints: Constraints = field(default_factory=Constraints)
    gpu_ids: tuple[int, ...] = ()
    gpu_uuids: tuple[str, ...] = ()
    op_definition: str | None = None
    op_definition_version: int | None = None

    @property
    def key(self) -> tuple[str, int]:
        """The ``(run_id, attempt)`` fencing token."""
        return (self.run_id, self.attempt)


class ReportSink(Protocol):
    """Where an executor reports one attempt's events and log lines.

    Each call returns once the report is durable in the outbox (not once the server has
    it). ``cursor`` is an executor-defined resume point stored atomically with the report
    (for the docker executor: how many output lines it has consumed), so that an
    executor that adopts a running attempt after an agent restart can skip what it
    already reported; :attr:`cursor` returns the last one stored.
    """

    @property
    def cursor(self) -> int:
        """The last cursor stored with a report of this attempt (0 when none)."""
        ...

    @property
    def started_at(self) -> datetime | None:
        """When the attempt's STARTED event was recorded (``None`` before it was). Durable
        like the cursor: after an agent restart it gives the executor the attempt's start
        (for ``duration_ms``, or to replay a script on the wall clock)."""
        ...

    async def event(self, event: ReportedEvent, *, cursor: int | None = None) -> None:
        """Record an event of the attempt."""
        ...

    async def logs(self, lines: Sequence[tuple[str, str]], *, cursor: int | None = None) -> None:
        """Record log lines of the attempt as ``(text, stream)`` pairs, stream ``"stdout"``
        or ``"stderr"``."""
        ...


class Executor(ABC):
    """Runs attempts. One instance per agent; it may run many attempts at once."""

    #: Name used by ``gyoza agent --executor``.
    name: str = ""

    @abstractmethod
    async def start(self, assignment: Assignment, sink: ReportSink) -> None:
        """Start the attempt and return once it is started (STARTED reported) or failed to
        start (FAILED reported). The executor keeps following it in the background and
        reports every later event, ending with exactly one of COMPLETED, FAILED or
        CANCELLED."""

    def refusal(self, assignment: Assignment) -> str | None:
        """Why this executor cannot take *assignment* now, or ``None`` when it can. The
        agent refuses the assignment with this reason (the server then places it
        elsewhere) instead of accepting it and failing it."""
        return None

    @abstractmethod
    async def cancel(self, run_id: str, attempt: int, reason: str) -> None:
        """Stop the attempt (TERM, a grace period, KILL) and report CANCELLED. A no-op when
        the attempt is unknown or already ended."""

    @abstractmethod
    async def adopt(self, assignment: Assignment, sink: ReportSink) -> bool:
        """After an agent restart, take over an attempt that the outbox says is held but
        has not ended: follow it again from ``sink.cursor`` (or report how it ended while
        the agent was down). Return False when there is nothing to adopt (the attempt is
        then reported FAILED by the agent)."""

    async def prune(self, keep: Collection[tuple[str, int]]) -> list[tuple[str, int]]:
        """Remove what this agent left of attempts that are not in ``keep`` (after a
        restart: e.g. a container whose terminal report was stored just before the agent
        died). Returns their ``(run_id, attempt)``; nothing to do by default."""
        return []

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources. Running attempts are left running (they are adopted on the
        next start)."""
