"""The agent's outbox: numbering, durability, cumulative acks, resend order, reopen."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import pytest

from gyoza.agent.outbox import HeldRecord, Outbox, OutboxError
from gyoza.agent.sink import OutboxSink
from gyoza.api.v1 import agent_service_pb2 as pb
from gyoza.api.v1 import resources_pb2
from gyoza.models.reports import ReportedEvent
from gyoza.models.resources import EventType, FailureClass

pytestmark = pytest.mark.timeout(30)

T = TypeVar("T")


def run(factory: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await factory()

    return asyncio.run(main())


def assignment(run_id: str = "run_a", attempt: int = 1) -> pb.Assignment:
    message = pb.Assignment(run_id=run_id, attempt=attempt, image="busybox")
    message.inputs.update({"sleep_ms": 5})
    return message


def keys(reports: list[pb.Report]) -> list[tuple[str, int, int]]:
    return [(r.run_id, r.attempt, r.seq) for r in reports]


async def open_outbox(path: Path, name: str = "agent-1", synchronous: str = "FULL") -> Outbox:
    return await Outbox.open(path / "outbox.sqlite3", agent_name=name, synchronous=synchronous)


def test_store_numbers_reports_per_attempt_and_keeps_store_order(tmp_path: Path) -> None:
    async def scenario() -> None:
        outbox = await open_outbox(tmp_path)
        await outbox.hold(assignment("run_a"))
        await outbox.hold(assignment("run_b"))
        a = OutboxSink(outbox, "run_a", 1)
        b = OutboxSink(outbox, "run_b", 1)
        await a.event(ReportedEvent(EventType.STARTED))
        await b.event(ReportedEvent(EventType.STARTED))
        await a.logs([("hello\n", "stdout")])
        await a.event(ReportedEvent(EventType.PROGRESS, progress=50))
        await b.event(ReportedEvent(EventType.PROGRESS, progress=10))
        assert keys(outbox.pending()) == [
            ("run_a", 1, 1),
            ("run_b", 1, 1),
            ("run_a", 1, 2),
            ("run_a", 1, 3),
            ("run_b", 1, 2),
        ]
        logs = outbox.pending()[2]
        assert logs.logs.lines[0].text == "hello"
        assert outbox.pending()[3].event.progress == 50
        assert outbox.held() == [
            HeldRecord("run_a", 1, 3, False),
            HeldRecord("run_b", 1, 2, False),
        ]
        await outbox.close()

    run(scenario)


@pytest.mark.parametrize("synchronous", ["FULL", "NORMAL"])
def test_concurrent_stores_are_group_committed_in_call_order(
    tmp_path: Path, synchronous: str
) -> None:
    async def scenario() -> None:
        outbox = await open_outbox(tmp_path, synchronous=synchronous)
        await outbox.hold(assignment())
        sink = OutboxSink(outbox, "run_a", 1)
        seen: list[int] = []
        outbox.subscribe(lambda report: seen.append(report.seq))
        await asyncio.gather(
            *(sink.event(ReportedEvent(EventType.INFO, f"{i}")) for i in range(50))
        )
        assert seen == list(range(1, 51))
        assert [r.event.message for r in outbox.pending()] == [str(i) for i in range(50)]
        await outbox.close()

    run(scenario)


def test_ack_is_cumulative_and_resend_starts_after_it(tmp_path: Path) -> None:
    async def scenario() -> None:
        outbox = await open_outbox(tmp_path)
        await outbox.hold(assignment())
        sink = OutboxSink(outbox, "run_a", 1)
        for i in range(5):
            await sink.event(ReportedEvent(EventType.INFO, f"{i}"))
        outbox.ack("run_a", 1, 3)
        assert keys(outbox.pending()) == [("run_a", 1, 4), ("run_a", 1, 5)]
        outbox.ack("run_a", 1, 2)  # older: no effect
        assert [r.seq for r in outbox.pending()] == [4, 5]
        assert not outbox.is_pending(pb.Report(run_id="run_a", attempt=1, seq=3))
        assert outbox.is_pending(pb.Report(run_id="run_a", attempt=1, seq=4))
        outbox.ack("run_b", 1, 9)  # not held: ignored
        await outbox.close()

    run(scenario)


def _reports_on_disk(path: Path) -> list[int]:
    with sqlite3.connect(path / "outbox.sqlite3") as db:
        return [seq for (seq,) in db.execute("SELECT seq FROM reports ORDER BY seq")]


def test_an_acks_deletes_reach_the_disk_with_the_next_write_or_on_close(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        outbox = await open_outbox(tmp_path)
        await outbox.hold(assignment())
        sink = OutboxSink(outbox, "run_a", 1)
        for i in range(3):
            await sink.event(ReportedEvent(EventType.INFO, f"{i}"))
        outbox.ack("run_a", 1, 2)
        assert [r.seq for r in outbox.pending()] == [3]  # at once in memory
        # The next report's transaction carries the deletes.
        await sink.event(ReportedEvent(EventType.INFO, "3"))
        assert _reports_on_disk(tmp_path) == [3, 4]
        # Without a later write, closing writes them.
        outbox.ack("run_a", 1, 3)
        await outbox.close()
        assert _reports_on_disk(tmp_path) == [4]

    run(scenario)


@pytest.mark.parametrize("synchronous", ["FULL", "NORMAL"])
def test_survives_reopen_with_seq_cursor_and_start_time(tmp_path: Path, synchronous: str) -> None:
    async def first() -> None:
        outbox = await open_outbox(tmp_path, synchronous=synchronous)
        await outbox.hold(assignment())
        sink = OutboxSink(outbox, "run_a", 1)
        await sink.event(ReportedEvent(EventType.STARTED), cursor=1)
        await sink.event(ReportedEvent(EventType.PROGRESS, progress=30), cursor=2)
        await sink.logs([("line", "stderr")], cursor=3)
        outbox.ack("run_a", 1, 1)
        await outbox.close()

    async def second() -> None:
        outbox = await open_outbox(tmp_path, synchronous=synchronous)
        assert outbox.held() == [HeldRecord("run_a", 1, 3, False)]
        assert [r.seq for r in outbox.pending()] == [2, 3]
        assert [a.run_id for a in outbox.unfinished()] == ["run_a"]
        assert outbox.unfinished()[0].inputs["sleep_ms"] == 5
        sink = OutboxSink(outbox, "run_a", 1)
        assert sink.cursor == 3
        started = sink.started_at
        assert started is not None and started.tzinfo is not None
        assert (datetime.now(UTC) - started).total_seconds() < 30
        await sink.event(ReportedEvent(EventType.COMPLETED, outputs={"x": 1}), cursor=4)
        assert [r.seq for r in outbox.pending()] == [2, 3, 4]
        assert outbox.held() == [HeldRecord("run_a", 1, 4, True)]
        assert outbox.unfinished() == []
        await outbox.close()

    run(first)
    run(second)


def test_seq_continues_after_everything_was_acknowledged_and_reopened(tmp_path: Path) -> None:
    async def first() -> None:
        outbox = await open_outbox(tmp_path)
        await outbox.hold(assignment())
        sink = OutboxSink(outbox, "run_a", 1)
        await sink.event(ReportedEvent(EventType.STARTED))
        await sink.event(ReportedEvent(EventType.INFO))
        outbox.ack("run_a", 1, 2)
        assert outbox.pending() == []
        await outbox.close()

    async def second() -> None:
        outbox = await open_outbox(tmp_path)
        await OutboxSink(outbox, "run_a", 1).event(ReportedEvent(EventType.INFO))
        assert [r.seq for r in outbox.pending()] == [3]
        await outbox.close()

    run(first)
    run(second)


def test_attempt_is_forgotten_once_its_terminal_event_is_acknowledged(tmp_path: Path) -> None:
    async def first() -> None:
        outbox = await open_outbox(tmp_path)
        await outbox.hold(assignment("run_a"))
        await outbox.hold(assignment("run_b"))
        sink = OutboxSink(outbox, "run_a", 1)
        await sink.event(ReportedEvent(EventType.STARTED))
        await sink.event(
            ReportedEvent(
                EventType.FAILED,
                failure_class=FailureClass.EXIT_CODE,
                exit_code=3,
                error_message="x",
            )
        )
        await sink.event(ReportedEvent(EventType.INFO, "after the end"))  # dropped
        assert [r.seq for r in outbox.pending()] == [1, 2]
        assert outbox.pending()[1].event.failure_class == resources_pb2.FAILURE_CLASS_EXIT_CODE
        assert outbox.pending()[1].event.exit_code == 3
        outbox.ack("run_a", 1, 1)
        assert outbox.holds("run_a", 1)
        outbox.ack("run_a", 1, 2)
        assert not outbox.holds("run_a", 1)
        assert outbox.pending() == []
        assert not outbox.empty  # run_b is still held
        await OutboxSink(outbox, "run_a", 1).event(
            ReportedEvent(EventType.INFO)
        )  # not held: dropped
        assert outbox.pending() == []
        await outbox.close()

    async def second() -> None:
        outbox = await open_outbox(tmp_path)
        assert [h.run_id for h in outbox.held()] == ["run_b"]
        outbox.forget("run_b", 1)
        assert outbox.empty
        await asyncio.wait_for(outbox.wait_empty(), 1)
        await outbox.close()

    async def third() -> None:
        outbox = await open_outbox(tmp_path)
        assert outbox.held() == []
        await outbox.close()

    run(first)
    run(second)
    run(third)
    with sqlite3.connect(tmp_path / "outbox.sqlite3") as db:
        assert db.execute("SELECT COUNT(*) FROM reports").fetchone() == (0,)
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_hold_is_idempotent(tmp_path: Path) -> None:
    async def scenario() -> None:
        outbox = await open_outbox(tmp_path)
        assert await outbox.hold(assignment())
        assert not await outbox.hold(assignment())
        assert len(outbox.held()) == 1
        await outbox.close()

    run(scenario)


def test_an_ack_beyond_what_was_written_moves_the_numbering_past_it(tmp_path: Path) -> None:
    # Reports lost here after the server recorded them (a power cut with NORMAL) must
    # never have their seqs reused for other reports.
    async def scenario() -> None:
        outbox = await open_outbox(tmp_path)
        await outbox.hold(assignment())
        sink = OutboxSink(outbox, "run_a", 1)
        await sink.event(ReportedEvent(EventType.STARTED))
        outbox.ack("run_a", 1, 7)
        await sink.event(ReportedEvent(EventType.INFO))
        assert [r.seq for r in outbox.pending()] == [8]
        await outbox.close()

    run(scenario)


def test_outbox_of_another_agent_that_still_holds_attempts_is_refused(tmp_path: Path) -> None:
    async def scenario() -> None:
        outbox = await open_outbox(tmp_path, "agent-1")
        await outbox.hold(assignment())
        await outbox.close()
        with pytest.raises(OutboxError, match="agent-1"):
            await open_outbox(tmp_path, "agent-2")

    run(scenario)


def test_a_cancelled_store_keeps_its_seq(tmp_path: Path) -> None:
    async def scenario() -> None:
        outbox = await open_outbox(tmp_path)
        await outbox.hold(assignment())
        sink = OutboxSink(outbox, "run_a", 1)
        task = asyncio.create_task(sink.event(ReportedEvent(EventType.STARTED)))
        await asyncio.sleep(0)  # the store is queued, its commit not awaited yet
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await sink.event(ReportedEvent(EventType.INFO))
        await outbox.flush()
        assert [r.seq for r in outbox.pending()] == [1, 2]
        await outbox.close()

    run(scenario)


def test_reports_stored_while_closing_are_dropped(tmp_path: Path) -> None:
    async def scenario() -> None:
        outbox = await open_outbox(tmp_path)
        await outbox.hold(assignment())
        sink = OutboxSink(outbox, "run_a", 1)
        await sink.event(ReportedEvent(EventType.STARTED), cursor=1)
        closing = asyncio.create_task(outbox.close())
        await asyncio.sleep(0)  # let close() begin
        await sink.event(ReportedEvent(EventType.INFO), cursor=2)  # the executor was still running
        await closing
        reopened = await open_outbox(tmp_path)
        assert [r.seq for r in reopened.pending()] == [1]
        assert reopened.cursor("run_a", 1) == 1
        await reopened.close()

    run(scenario)
