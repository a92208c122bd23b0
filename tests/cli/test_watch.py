"""run_changes: a watch goes on across automatic retries and skips repeated snapshots."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from gyoza.cli.watch import run_changes
from gyoza.client import Client, RunChange
from gyoza.models.op_run import OpRun
from gyoza.models.resources import EventEntry, OpRunState


def run_in(state: OpRunState, next_retry_in: float | None = None) -> OpRun:
    run = OpRun.create(image="busybox")
    run.state = state
    if next_retry_in is not None:
        run.next_retry_at = datetime.now(UTC) + timedelta(seconds=next_retry_in)
    return run


def event(seq: int, type: str = "INFO") -> EventEntry:
    return EventEntry(t=datetime.now(UTC), type=type, msg="", seq=seq)


class Streams:
    """Answers each watch_run call with the next prepared stream; records the calls."""

    def __init__(self, *streams: list[RunChange]) -> None:
        self.streams = list(streams)
        self.calls: list[tuple[str, int]] = []

    def watch_run(self, run_id: str, after_sequence: int = 0) -> Iterator[RunChange]:
        self.calls.append((run_id, after_sequence))
        yield from self.streams.pop(0)


def changes(streams: Streams, after: int = 0) -> tuple[list[RunChange], list[float]]:
    sleeps: list[float] = []
    found = list(run_changes(cast(Client, streams), "run_x", after, sleep=sleeps.append))
    return found, sleeps


def test_a_terminal_run_ends_the_watch() -> None:
    done = run_in(OpRunState.COMPLETED)
    streams = Streams(
        [RunChange(2, done, None), RunChange(1, done, event(1), 1), RunChange(2, done, event(2), 1)]
    )
    found, sleeps = changes(streams)
    assert [c.sequence for c in found] == [2, 1, 2]
    assert streams.calls == [("run_x", 0)]
    assert sleeps == []


def test_a_failed_run_with_a_retry_due_is_watched_again_from_the_last_sequence() -> None:
    failed = run_in(OpRunState.FAILED, next_retry_in=1.0)
    running = run_in(OpRunState.RUNNING)
    done = run_in(OpRunState.COMPLETED)
    streams = Streams(
        [RunChange(3, failed, None), RunChange(3, failed, event(3, "FAILED"), 1)],
        [RunChange(3, failed, None)],  # not retried yet: the same snapshot, skipped
        [RunChange(5, running, None), RunChange(5, done, event(2, "COMPLETED"), 2)],
    )
    found, sleeps = changes(streams)
    assert [(c.sequence, c.event is None) for c in found] == [
        (3, True),
        (3, False),
        (5, True),
        (5, False),
    ]
    assert streams.calls == [("run_x", 0), ("run_x", 3), ("run_x", 3)]
    assert len(sleeps) == 2
    assert all(0.2 <= s <= 1.0 for s in sleeps)


def test_a_stream_that_ends_early_is_resumed() -> None:
    running = run_in(OpRunState.RUNNING)
    cancelled = run_in(OpRunState.CANCELLED)
    streams = Streams(
        [RunChange(4, running, None)],
        [RunChange(5, cancelled, None), RunChange(5, cancelled, event(5, "CANCELLED"), 1)],
    )
    found, sleeps = changes(streams, after=4)
    assert [c.sequence for c in found] == [4, 5, 5]
    assert streams.calls == [("run_x", 4), ("run_x", 4)]
    assert sleeps == [0.5]


def test_run_change_unpacks_as_a_triple() -> None:
    change = RunChange(7, run_in(OpRunState.PENDING), event(7), 2)
    sequence, run, entry = change
    assert (sequence, run, entry, change.attempt) == (7, change.run, change.event, 2)
    data: dict[str, Any] = change.to_dict()
    assert (data["sequence"], data["attempt"], data["event"]["seq"]) == (7, 2, 7)
