"""Value types of the store's interface besides the domain's own."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from gyoza.models.resources import EventEntry, OpRunState

LOG_STREAMS = frozenset({"stdout", "stderr"})
"""The streams a log line can come from."""

LOG_RETENTION = 10_000
"""Log lines kept per attempt: the newest; older ones are deleted as new ones arrive."""


@dataclass(frozen=True)
class RunFilter:
    """Which runs ``list_runs`` returns; the conditions combine with AND.

    Parameters
    ----------
    states : tuple[OpRunState, ...]
        Only runs in one of these states; empty means any state.
    op_definition : str | None
        Only runs created from this definition.
    image : str | None
        Only runs of this image.
    created_after : datetime | None
        Only runs created at or after this time.
    created_before : datetime | None
        Only runs created before this time.
    oldest_first : bool
        Order oldest first instead of newest first.
    """

    states: tuple[OpRunState, ...] = ()
    op_definition: str | None = None
    image: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    oldest_first: bool = False


@dataclass(frozen=True)
class TopicRecord:
    """One event in the durable topic log.

    Parameters
    ----------
    offset : int
        Position in the log (shared by all topics), increasing in commit order.
    topic : str
        The run's event delivery topic.
    run_id : str
        The run the event belongs to.
    attempt : int
        The attempt the event belongs to.
    event : EventEntry
        The event.
    attributes : dict[str, str]
        The run's event delivery attributes.
    run_state : OpRunState
        The run's state once the event was committed.
    op_definition : str | None
        The run's definition name; ``None`` for an ad-hoc run.
    """

    offset: int
    topic: str
    run_id: str
    attempt: int
    event: EventEntry
    attributes: dict[str, str] = field(default_factory=dict)
    run_state: OpRunState = OpRunState.PENDING
    op_definition: str | None = None


@dataclass(frozen=True)
class LogRecord:
    """One line of an attempt's log.

    Parameters
    ----------
    number : int
        Line number in the attempt's log, from 1.
    text : str
        The line, without its line ending.
    stream : str
        ``"stdout"`` or ``"stderr"``.
    t : datetime
        When the agent read it (aware, UTC).
    """

    number: int
    text: str
    stream: str
    t: datetime


@dataclass(frozen=True)
class AgentDrain:
    """An operator's drain of an agent, kept until the agent is undrained.

    Parameters
    ----------
    name : str
        The agent's name.
    reason : str
        Why it was drained.
    drained_at : datetime
        When (aware, UTC).
    """

    name: str
    reason: str
    drained_at: datetime
