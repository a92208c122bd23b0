"""The outbox-backed :class:`~gyoza.agent.executor.ReportSink` of one attempt."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime

from gyoza import mapping
from gyoza.agent.outbox import Outbox
from gyoza.api.v1 import agent_service_pb2 as pb
from gyoza.models.reports import TERMINAL_EVENTS, LogLine, ReportedEvent
from gyoza.models.resources import EventType, FailureClass
from gyoza.models.timestamps import utc_now

log = logging.getLogger("gyoza.agent")

__all__ = ["TERMINAL_EVENTS", "OutboxSink"]


class OutboxSink:
    """Writes one attempt's reports to the outbox; each call returns once it is durable.

    Reports of an attempt the agent no longer holds (dropped by the server) or written
    after its terminal event are discarded silently, so an executor never needs to know.

    Values travel as the server reads them (:mod:`gyoza.mapping`): outputs that JSON
    over the wire cannot carry exactly (an integer beyond 2**53, a value that is not
    JSON) fail the attempt as ``OUTPUT_INVALID`` with the offending path named, and an
    event payload that cannot travel is dropped from its event with a note.

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

    async def event(self, event: ReportedEvent, *, cursor: int | None = None) -> None:
        """Record an event of the attempt."""
        report = self._report()
        report.event.CopyFrom(self._wire(event))
        await self._outbox.store(report, cursor=cursor, terminal=event.is_terminal)

    def _wire(self, event: ReportedEvent) -> pb.ReportedEvent:
        try:
            return mapping.reported_event_to_proto(event)
        except (TypeError, ValueError) as error:
            problem = str(error)
        if event.type is EventType.COMPLETED and event.outputs is not None:
            try:
                mapping.struct_to_proto(event.outputs, "outputs")
            except (TypeError, ValueError) as error:
                message = f"the outputs cannot be reported: {error}"
                log.warning("%s/%d: %s", self.run_id, self.attempt, message)
                return self._wire(
                    replace(
                        event,
                        type=EventType.FAILED,
                        message=message,
                        outputs=None,
                        failure_class=FailureClass.OUTPUT_INVALID,
                        error_message=message,
                    )
                )
        note = f"{event.message} (payload dropped: {problem})".lstrip()
        log.warning("%s/%d: event payload dropped: %s", self.run_id, self.attempt, problem)
        return self._wire(replace(event, payload={}, outputs=None, message=note))

    async def logs(self, lines: Sequence[tuple[str, str]], *, cursor: int | None = None) -> None:
        """Record log lines as ``(text, stream)`` pairs; nothing is stored for none."""
        if not lines:
            return
        report = self._report()
        report.logs.CopyFrom(mapping.log_chunk_to_proto([LogLine(t, s) for t, s in lines]))
        await self._outbox.store(report, cursor=cursor)

    def _report(self) -> pb.Report:
        return pb.Report(
            run_id=self.run_id, attempt=self.attempt, time=mapping.timestamp_to_proto(utc_now())
        )
