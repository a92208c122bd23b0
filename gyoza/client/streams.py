"""What the client's streaming and event calls yield: run changes, topic events, log
lines."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

from gyoza.models.op_run import OpRun
from gyoza.models.resources import EventEntry, OpRunState

__all__ = ["AttemptEvent", "LogLine", "RunChange", "TopicEvent"]


class AttemptEvent(NamedTuple):
    """An event with the number of the attempt it belongs to."""

    attempt: int
    event: EventEntry


@dataclass(frozen=True)
class RunChange:
    """One message of a run watch: the run after a change.

    Unpacks as ``(sequence, run, event)``.

    Parameters
    ----------
    sequence : int
        Number of events the run had in all attempts once the change was committed;
        resume a watch from it with ``after_sequence``.
    run : OpRun
        The run after the change (with its current attempt).
    event : EventEntry | None
        The event that made the change; ``None`` on the snapshot that starts a watch.
    attempt : int
        The attempt *event* belongs to (0 when there is no event).
    """

    sequence: int
    run: OpRun
    event: EventEntry | None
    attempt: int = 0

    def __iter__(self) -> Iterator[Any]:
        return iter((self.sequence, self.run, self.event))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible dictionary: ``sequence``, ``attempt``, ``run``, ``event``."""
        return {
            "sequence": self.sequence,
            "attempt": self.attempt,
            "run": self.run.to_dict(),
            "event": None if self.event is None else self.event.to_dict(),
        }


@dataclass(frozen=True)
class TopicEvent:
    """One event delivered on a topic subscription.

    Parameters
    ----------
    offset : int
        Position in the server's durable event log; resume from it with
        ``after_offset``.
    topic : str
        The topic.
    run_id : str
        The run the event belongs to.
    attempt : int
        The attempt it belongs to.
    event : EventEntry
        The event.
    run_state : OpRunState | None
        The run's state right after the event.
    op_definition : str | None
        The run's definition name; ``None`` for an ad-hoc run.
    attributes : dict[str, str]
        The run's event-delivery attributes.
    """

    offset: int
    topic: str
    run_id: str
    attempt: int
    event: EventEntry
    run_state: OpRunState | None
    op_definition: str | None = None
    attributes: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible dictionary."""
        return {
            "offset": self.offset,
            "topic": self.topic,
            "run_id": self.run_id,
            "attempt": self.attempt,
            "event": self.event.to_dict(),
            "run_state": None if self.run_state is None else self.run_state.value,
            "op_definition": self.op_definition,
            "attributes": dict(self.attributes),
        }


@dataclass(frozen=True)
class LogLine:
    """One line of an attempt's log; ``str(line)`` is its text.

    Parameters
    ----------
    attempt : int
        The attempt it belongs to.
    number : int
        Line number in the attempt's log, from 1.
    text : str
        The text, without its line ending.
    stream : str
        ``"stdout"``, ``"stderr"`` or ``""`` when not known.
    time : datetime | None
        When the agent read it.
    """

    attempt: int
    number: int
    text: str
    stream: str = ""
    time: datetime | None = None

    def __str__(self) -> str:
        return self.text

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible dictionary."""
        return {
            "attempt": self.attempt,
            "number": self.number,
            "text": self.text,
            "stream": self.stream,
            "time": None if self.time is None else self.time.isoformat(),
        }
