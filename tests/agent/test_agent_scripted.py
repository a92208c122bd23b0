"""The scripted executor: its event sequence, cancel, and adoption after a restart."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from gyoza.agent.executor import Assignment
from gyoza.agent.outbox import Outbox
from gyoza.agent.scripted import Script, ScriptedExecutor, ScriptError
from gyoza.agent.sink import OutboxSink
from gyoza.api.v1 import agent_service_pb2 as pb
from gyoza.api.v1 import resources_pb2
from gyoza.mapping import event_type_from_proto
from gyoza.models.resources import EventType

pytestmark = pytest.mark.timeout(30)

TERMINAL = {EventType.COMPLETED, EventType.FAILED, EventType.CANCELLED}


def describe(report: pb.Report) -> tuple[str, Any]:
    """``("log", text)`` or ``(event type, progress or message)``."""
    if report.HasField("logs"):
        return ("log", report.logs.lines[0].text)
    kind = event_type_from_proto(report.event.type)
    if kind is EventType.PROGRESS:
        return (kind.value, report.event.progress)
    return (kind.value, None)


class Recorder:
    """Collects what the outbox commits and wakes waiters on a condition."""

    def __init__(self, outbox: Outbox) -> None:
        self.reports: list[pb.Report] = []
        self._changed = asyncio.Event()
        outbox.subscribe(self._on_report)

    def _on_report(self, report: pb.Report) -> None:
        self.reports.append(report)
        self._changed.set()

    async def wait(self, predicate: Callable[[list[pb.Report]], bool]) -> None:
        while not predicate(self.reports):
            self._changed.clear()
            await self._changed.wait()

    async def wait_terminal(self) -> pb.Report:
        await self.wait(lambda rs: any(_terminal(r) for r in rs))
        return next(r for r in self.reports if _terminal(r))


def _terminal(report: pb.Report) -> bool:
    return report.HasField("event") and event_type_from_proto(report.event.type) in TERMINAL


async def held_sink(
    tmp_path: Path, inputs: dict[str, Any]
) -> tuple[Outbox, Assignment, OutboxSink]:
    outbox = await Outbox.open(tmp_path / "outbox.sqlite3", agent_name="a")
    message = pb.Assignment(run_id="run_s", attempt=1, image="scripted")
    message.inputs.update(inputs)
    await outbox.hold(message)
    assignment = Assignment(run_id="run_s", attempt=1, image="scripted", inputs=inputs)
    return outbox, assignment, OutboxSink(outbox, "run_s", 1)


def play(tmp_path: Path, inputs: dict[str, Any]) -> list[pb.Report]:
    async def scenario() -> list[pb.Report]:
        outbox, assignment, sink = await held_sink(tmp_path, inputs)
        recorder = Recorder(outbox)
        executor = ScriptedExecutor()
        await executor.start(assignment, sink)
        await asyncio.wait_for(recorder.wait_terminal(), 10)
        await executor.close()
        await outbox.close()
        return recorder.reports

    return asyncio.run(scenario())


def run(factory: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(factory())


def test_default_script_is_started_three_steps_then_completed(tmp_path: Path) -> None:
    reports = play(tmp_path, {"outputs": {"answer": 42}})
    assert [describe(r) for r in reports] == [
        ("STARTED", None),
        ("log", "step 1/3"),
        ("PROGRESS", 33),
        ("log", "step 2/3"),
        ("PROGRESS", 67),
        ("log", "step 3/3"),
        ("PROGRESS", 100),
        ("COMPLETED", None),
    ]
    assert [r.seq for r in reports] == list(range(1, 9))
    completed = reports[-1].event
    assert dict(completed.outputs) == {"answer": 42}
    assert completed.exit_code == 0


def test_non_zero_exit_fails_with_the_exit_code(tmp_path: Path) -> None:
    reports = play(tmp_path, {"exit_code": 3, "progress_steps": 0, "sleep_ms": 20})
    assert [describe(r) for r in reports] == [("STARTED", None), ("FAILED", None)]
    failed = reports[-1].event
    assert failed.failure_class == resources_pb2.FAILURE_CLASS_EXIT_CODE
    assert failed.exit_code == 3
    assert "3" in failed.error_message
    assert failed.duration_ms >= 20


def test_steps_are_spread_over_sleep_ms(tmp_path: Path) -> None:
    reports = play(tmp_path, {"sleep_ms": 200, "progress_steps": 2})
    times = [r.time.ToDatetime() for r in reports]
    started, first_progress, completed = times[0], times[2], times[-1]
    assert (first_progress - started).total_seconds() >= 0.09
    assert (completed - started).total_seconds() >= 0.19
    assert reports[-1].event.duration_ms >= 190


def test_invalid_inputs_fail_the_attempt(tmp_path: Path) -> None:
    reports = play(tmp_path, {"sleep_ms": "soon"})
    assert [describe(r) for r in reports] == [("FAILED", None)]
    assert reports[0].event.failure_class == resources_pb2.FAILURE_CLASS_EXECUTOR_ERROR
    with pytest.raises(ScriptError, match="progress_steps"):
        Script.from_inputs({"progress_steps": -1})
    assert Script.from_inputs({"sleep_ms": 5.0, "ignored": True}).sleep_ms == 5


def test_cancel_reports_cancelled_and_stops_the_script(tmp_path: Path) -> None:
    async def scenario() -> None:
        outbox, assignment, sink = await held_sink(tmp_path, {"sleep_ms": 60_000})
        recorder = Recorder(outbox)
        executor = ScriptedExecutor()
        await executor.start(assignment, sink)
        assert executor.running == 1
        await executor.cancel("run_s", 1, "user asked")
        await executor.cancel("run_s", 1, "again")  # no-op
        await executor.cancel("run_x", 1, "unknown")  # no-op
        assert [describe(r) for r in recorder.reports] == [("STARTED", None), ("CANCELLED", None)]
        cancelled = recorder.reports[-1].event
        assert cancelled.message == "user asked"
        assert cancelled.failure_class == resources_pb2.FAILURE_CLASS_CANCELLED
        assert executor.running == 0
        await executor.close()
        await outbox.close()

    run(scenario)


def test_adopt_continues_the_script_without_repeating_a_step(tmp_path: Path) -> None:
    inputs = {"sleep_ms": 600, "progress_steps": 6, "outputs": {"ok": True}}

    async def before_restart() -> None:
        outbox, assignment, sink = await held_sink(tmp_path, inputs)
        recorder = Recorder(outbox)
        executor = ScriptedExecutor()
        await executor.start(assignment, sink)
        await asyncio.wait_for(recorder.wait(lambda rs: len(rs) >= 4), 10)
        await executor.close()  # the agent dies; its scripts stop without a word
        await outbox.close()

    async def after_restart() -> None:
        outbox = await Outbox.open(tmp_path / "outbox.sqlite3", agent_name="a")
        written = outbox.pending()
        assert 4 <= len(written) < 14
        recorder = Recorder(outbox)
        executor = ScriptedExecutor()
        sink = OutboxSink(outbox, "run_s", 1)
        assert sink.cursor == len(written)
        assignment = Assignment(run_id="run_s", attempt=1, image="scripted", inputs=inputs)
        assert await executor.adopt(assignment, sink)
        assert await executor.adopt(assignment, sink)  # already playing
        await asyncio.wait_for(recorder.wait_terminal(), 10)
        everything = written + recorder.reports
        assert [r.seq for r in everything] == list(range(1, 15))
        steps = [describe(r) for r in everything]
        assert steps[0] == ("STARTED", None)
        assert steps[-1] == ("COMPLETED", None)
        assert [p for kind, p in steps if kind == "PROGRESS"] == [17, 33, 50, 67, 83, 100]
        assert [t for kind, t in steps if kind == "log"] == [f"step {i}/6" for i in range(1, 7)]
        # The start time is the first run's: the script is not replayed from zero.
        duration = recorder.reports[-1].event.duration_ms
        assert 590 <= duration < 10_000
        await executor.close()
        await outbox.close()

    run(before_restart)
    run(after_restart)


def test_adopt_before_started_starts_and_non_durable_adopt_refuses(tmp_path: Path) -> None:
    async def scenario() -> None:
        outbox, assignment, sink = await held_sink(tmp_path, {"progress_steps": 1})
        recorder = Recorder(outbox)
        assert not await ScriptedExecutor(durable=False).adopt(assignment, sink)
        executor = ScriptedExecutor()
        assert await executor.adopt(assignment, sink)
        await asyncio.wait_for(recorder.wait_terminal(), 10)
        assert [describe(r)[0] for r in recorder.reports] == [
            "STARTED",
            "log",
            "PROGRESS",
            "COMPLETED",
        ]
        await executor.close()
        await outbox.close()

    run(scenario)
