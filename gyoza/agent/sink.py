"""The outbox-backed :class:`~gyoza.agent.executor.ReportSink` of one attempt."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from gyoza.agent import metrics
from gyoza.agent.mapping import (
    log_chunk_to_proto,
    reported_event_to_proto,
    timestamp_to_proto,
)
from gyoza.agent.outbox import Outbox
from gyoza.api.v1 import agent_service_pb2 as pb
from gyoza.models.resources import EventType, FailureClass
from gyoza.models.timestamps import utc_now

log = logging.getLogger("gyoza.agent.attempts")

#: Events that end an attempt; the outbox stores nothing after one.
TERMINAL_EVENTS = frozenset({EventType.COMPLETED, EventType.FAILED, EventType.CANCELLED})


class OutboxSink:
    """Writes one attempt's reports to the outbox; each call returns once it is durable.

    Reports of an attempt the agent no longer holds (dropped by the server) or written
    after its terminal event are discarded silently, so an executor never needs to know.

    Parameters
    ----------
    outbox : Outbox
        The agent's outbox.
    run_id : str
        Identifier of the run.
    attempt : int
        Attempt number.
    """

    def __init__(self, outbox: Outbox, run_id: str, attempt: int) -> None:
        self._outbox = outbox
        self.run_id = run_id
        self.attempt = attempt

    @property
    def cursor(self) -> int:
        """The last cursor stored with a report of this attempt (0 when none)."""
        return self._outbox.cursor(self.run_id, self.attempt)

    @property
    def started_at(self) -> datetime | None:
        """When the attempt's STARTED event was stored."""
        return self._outbox.started_at(self.run_id, self.attempt)

    @property
    def finished(self) -> bool:
        """True once the attempt's terminal event is stored (or it is no longer held)."""
        return self._outbox.is_finished(self.run_id, self.attempt)

    async def event(
        self,
        type: EventType,
        message: str = "",
        *,
        progress: int = 0,
        payload: dict[str, Any] | None = None,
        outputs: dict[str, Any] | None = None,
        failure_class: FailureClass | None = None,
        exit_code: int | None = None,
        error_message: str | None = None,
        duration_ms: int | None = None,
        cursor: int | None = None,
    ) -> None:
        """Record an event of the attempt."""
        report = self._report()
        report.event.CopyFrom(
            reported_event_to_proto(
                type,
                message,
                progress=progress,
                payload=payload,
                outputs=outputs,
                failure_class=failure_class,
                exit_code=exit_code,
                error_message=error_message,
                duration_ms=duration_ms,
            )
        )
        terminal = type in TERMINAL_EVENTS
        await self._outbox.store(report, cursor=cursor, terminal=terminal)
        if terminal:
            failure = "" if failure_class is None else failure_class.value
            metrics.EXECUTOR_OUTCOMES.labels(outcome=type.value, failure_class=failure).inc()
            log.info(
                "attempt %s/%d ended: %s",
                self.run_id,
                self.attempt,
                type.value,
                extra={
                    "run_id": self.run_id,
                    "attempt": self.attempt,
                    "outcome": type.value,
                    "failure_class": failure or None,
                    "duration_ms": duration_ms,
                },
            )

    async def logs(self, lines: Sequence[tuple[str, str]], *, cursor: int | None = None) -> None:
        """Record log lines as ``(text, stream)`` pairs; nothing is stored for none."""
        if not lines:
            return
        report = self._report()
        report.logs.CopyFrom(log_chunk_to_proto(list(lines)))
        await self._outbox.store(report, cursor=cursor)

    def _report(self) -> pb.Report:
        return pb.Report(
            run_id=self.run_id, attempt=self.attempt, time=timestamp_to_proto(utc_now())
        )
