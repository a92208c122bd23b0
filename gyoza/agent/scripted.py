"""The scripted executor: plays an op from the run's inputs, without any container.

Inputs (all optional): ``sleep_ms`` (0), ``progress_steps`` (3), ``exit_code`` (0),
``outputs`` ({}). The script is STARTED, then for each step ``i`` of ``n`` a log line
``"step i/n"`` and a PROGRESS event at ``round(100 * i / n)``, spread evenly over
``sleep_ms``, then COMPLETED with the outputs (exit code 0) or FAILED with failure class
EXIT_CODE and the exit code. Cancel reports CANCELLED.

It costs one asyncio task per running attempt, so a benchmark can run hundreds of
simulated agents in one process. It also survives an agent restart: the cursor stored
with each report is the number of script steps written, and the STARTED event's time is
durable, so :meth:`ScriptedExecutor.adopt` continues the script where the wall clock says
it should be, without writing any step twice.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from gyoza.agent.executor import Assignment, Executor, ReportSink
from gyoza.models.reports import ReportedEvent
from gyoza.models.resources import EventType, FailureClass
from gyoza.models.timestamps import elapsed_ms, utc_now

log = logging.getLogger(__name__)


class ScriptError(ValueError):
    """Raised when a run's inputs do not describe a script."""


@dataclass(frozen=True)
class Script:
    """What a scripted op does.

    Steps are numbered from 0: step 0 is STARTED; steps ``2i - 1`` and ``2i`` are the log
    line and the PROGRESS event of progress step ``i`` (``1 <= i <= n``); step ``2n + 1``
    is the terminal event. The executor's cursor is the number of steps written.

    Parameters
    ----------
    sleep_ms : int
        How long the op runs, in milliseconds.
    progress_steps : int
        Number of progress steps.
    exit_code : int
        Exit status: 0 completes, anything else fails.
    outputs : dict[str, Any]
        Outputs of a completed run.
    """

    sleep_ms: int = 0
    progress_steps: int = 3
    exit_code: int = 0
    outputs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_inputs(cls, inputs: Mapping[str, Any]) -> Script:
        """Read a script from a run's inputs (other keys are ignored).

        Raises
        ------
        ScriptError
            When a value has the wrong type or is negative.
        """
        problems: list[str] = []
        sleep_ms = _whole(inputs, "sleep_ms", 0, problems)
        steps = _whole(inputs, "progress_steps", 3, problems)
        exit_code = _whole(inputs, "exit_code", 0, problems, allow_negative=True)
        outputs = inputs.get("outputs", {})
        if outputs is None:
            outputs = {}
        if not isinstance(outputs, Mapping):
            problems.append("outputs: must be a JSON object")
            outputs = {}
        if problems:
            raise ScriptError("invalid scripted inputs: " + "; ".join(problems))
        return cls(sleep_ms, steps, exit_code, dict(outputs))

    @property
    def step_count(self) -> int:
        """Steps in all, the terminal one included."""
        return 2 * self.progress_steps + 2

    def due_ms(self, step: int) -> float:
        """When *step* is due, in milliseconds after the start."""
        if step <= 0:
            return 0.0
        if step >= self.step_count - 1:
            return float(self.sleep_ms)
        progress_step = (step + 1) // 2
        return self.sleep_ms * progress_step / self.progress_steps


def _whole(
    inputs: Mapping[str, Any],
    key: str,
    default: int,
    problems: list[str],
    *,
    allow_negative: bool = False,
) -> int:
    value = inputs.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        problems.append(f"{key}: must be a number")
        return default
    if isinstance(value, float) and not value.is_integer():
        problems.append(f"{key}: must be a whole number")
        return default
    if value < 0 and not allow_negative:
        problems.append(f"{key}: must be >= 0")
        return default
    return int(value)


@dataclass
class _Play:
    """One attempt being played."""

    assignment: Assignment
    sink: ReportSink
    script: Script
    started_at: datetime
    started_loop_time: float
    next_step: int = 0
    ended: bool = False
    task: asyncio.Task[None] | None = None


class ScriptedExecutor(Executor):
    """Plays scripted ops; see the module's description.

    Parameters
    ----------
    durable : bool
        When False, :meth:`adopt` refuses every attempt, as an executor whose work dies
        with the agent would (the agent then fails the attempt).
    """

    name = "scripted"

    def __init__(self, *, durable: bool = True) -> None:
        self._durable = durable
        self._plays: dict[tuple[str, int], _Play] = {}

    @property
    def running(self) -> int:
        """Attempts being played."""
        return len(self._plays)

    async def start(self, assignment: Assignment, sink: ReportSink) -> None:
        """Write STARTED and play the rest of the script in the background."""
        if assignment.key in self._plays:
            return
        try:
            script = Script.from_inputs(assignment.inputs)
        except ScriptError as exc:
            await sink.event(
                ReportedEvent(
                    EventType.FAILED,
                    str(exc),
                    failure_class=FailureClass.EXECUTOR_ERROR,
                    error_message=str(exc),
                    duration_ms=0,
                )
            )
            return
        play = self._register(assignment, sink, script, utc_now())
        play.next_step = 1
        await sink.event(ReportedEvent(EventType.STARTED, "scripted op started"), cursor=1)
        self._spawn(play)

    async def adopt(self, assignment: Assignment, sink: ReportSink) -> bool:
        """Continue a script after an agent restart, from ``sink.cursor`` and the durable
        start time; steps whose time has passed are written at once."""
        if not self._durable:
            return False
        if assignment.key in self._plays:
            return True
        started_at = sink.started_at
        if sink.cursor == 0 or started_at is None:
            await self.start(assignment, sink)  # STARTED was never written
            return True
        try:
            script = Script.from_inputs(assignment.inputs)
        except ScriptError:
            return False
        play = self._register(assignment, sink, script, started_at)
        play.next_step = sink.cursor
        self._spawn(play)
        return True

    async def cancel(self, run_id: str, attempt: int, reason: str) -> None:
        """Stop playing and write CANCELLED (a no-op once the script has ended)."""
        play = self._plays.get((run_id, attempt))
        if play is None or play.ended:
            return
        play.ended = True
        if play.task is not None:
            play.task.cancel()
            await asyncio.gather(play.task, return_exceptions=True)
        self._plays.pop((run_id, attempt), None)
        await play.sink.event(
            ReportedEvent(
                EventType.CANCELLED,
                reason or "cancelled",
                failure_class=FailureClass.CANCELLED,
                duration_ms=elapsed_ms(play.started_at, utc_now()),
            ),
            cursor=play.script.step_count,
        )

    async def close(self) -> None:
        """Stop every play without reporting: the scripts carry on after a restart."""
        plays = list(self._plays.values())
        self._plays.clear()
        tasks = [p.task for p in plays if p.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _register(
        self, assignment: Assignment, sink: ReportSink, script: Script, started_at: datetime
    ) -> _Play:
        # The loop's clock drives the sleeps; the wall clock only places a restarted play.
        elapsed = max(0.0, (utc_now() - started_at).total_seconds())
        play = _Play(
            assignment=assignment,
            sink=sink,
            script=script,
            started_at=started_at,
            started_loop_time=asyncio.get_running_loop().time() - elapsed,
        )
        self._plays[assignment.key] = play
        return play

    def _spawn(self, play: _Play) -> None:
        if play.ended:
            return
        name = f"scripted {play.assignment.run_id}/{play.assignment.attempt}"
        play.task = asyncio.get_running_loop().create_task(self._play(play), name=name)

    async def _play(self, play: _Play) -> None:
        script = play.script
        loop = asyncio.get_running_loop()
        try:
            for step in range(play.next_step, script.step_count):
                delay = play.started_loop_time + script.due_ms(step) / 1000 - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                if play.ended:
                    return
                await self._write_step(play, step)
                play.next_step = step + 1
        finally:
            if self._plays.get(play.assignment.key) is play and play.next_step >= (
                script.step_count
            ):
                del self._plays[play.assignment.key]

    async def _write_step(self, play: _Play, step: int) -> None:
        script, sink, cursor = play.script, play.sink, step + 1
        last = script.step_count - 1
        if step == 0:
            await sink.event(ReportedEvent(EventType.STARTED, "scripted op started"), cursor=cursor)
        elif step < last:
            progress_step = (step + 1) // 2
            n = script.progress_steps
            if step % 2 == 1:
                await sink.logs([(f"step {progress_step}/{n}", "stdout")], cursor=cursor)
            else:
                progress = round(100 * progress_step / n)
                await sink.event(
                    ReportedEvent(
                        EventType.PROGRESS, f"step {progress_step}/{n}", progress=progress
                    ),
                    cursor=cursor,
                )
        else:
            play.ended = True  # a cancel that comes now finds the script over
            duration_ms = elapsed_ms(play.started_at, utc_now())
            if script.exit_code == 0:
                await sink.event(
                    ReportedEvent(
                        EventType.COMPLETED,
                        "scripted op completed",
                        outputs=script.outputs,
                        exit_code=0,
                        duration_ms=duration_ms,
                    ),
                    cursor=cursor,
                )
            else:
                message = f"scripted op exited with code {script.exit_code}"
                await sink.event(
                    ReportedEvent(
                        EventType.FAILED,
                        message,
                        failure_class=FailureClass.EXIT_CODE,
                        exit_code=script.exit_code,
                        error_message=message,
                        duration_ms=duration_ms,
                    ),
                    cursor=cursor,
                )
