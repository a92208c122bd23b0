"""Fan-out of committed changes to in-process watchers (WatchOpRun, SubscribeEvents, logs).

The run controller calls the ``publish_*`` methods after each commit; streaming RPCs
subscribe here. Publishing never blocks and never fails the writer: a watcher that falls
too far behind is dropped and must resume from its last sequence or offset.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from gyoza.models.op_run import OpRun
from gyoza.models.resources import EventEntry

if TYPE_CHECKING:
    from gyoza.server.store import TopicRecord


class Hub:
    """In-process publish/subscribe of run changes, topic events and log lines."""

    def publish_run(self, run: OpRun, new_events: Sequence[tuple[int, EventEntry]]) -> None:
        """A run changed; ``new_events`` are the ``(attempt, event)`` pairs it committed."""

    def publish_topic(self, records: Sequence[TopicRecord]) -> None:
        """Events were committed to the durable topic log."""

    def publish_logs(self, run_id: str, attempt: int, last_number: int) -> None:
        """Log lines up to ``last_number`` were committed for an attempt."""
