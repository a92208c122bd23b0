"""Following a run to its end: ``gyoza runs watch`` and ``gyoza runs create --watch``.

The server's watch stream ends once the run is terminal. A run that FAILED with an
automatic retry due is not over yet: the watch waits for the retry and goes on (the
stream is resumed from the last sequence seen, so nothing is shown twice).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterator
from datetime import UTC, datetime

from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)

from gyoza.cli import render
from gyoza.cli.exit_codes import ExitCode, exit_code_for_run
from gyoza.client import Client, RunChange
from gyoza.models.op_run import OpRun

__all__ = ["follow_run", "run_changes"]

#: Exit status of a watch stopped with Ctrl-C (128 + SIGINT).
INTERRUPTED = 130


def run_changes(
    client: Client,
    run_id: str,
    after_sequence: int = 0,
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> Generator[RunChange, None, None]:
    """Every change of a run until it is over, across automatic retries.

    The first item is the run's snapshot (``event`` is ``None``); a snapshot sent again
    on a resumed stream is skipped unless the run moved on meanwhile.
    """
    sequence = after_sequence
    first = True
    while True:
        last: OpRun | None = None
        for change in client.watch_run(run_id, sequence):
            last = change.run
            if change.event is None and not first and change.sequence <= sequence:
                continue  # the snapshot of a resumed stream: nothing new
            first = False
            sequence = max(sequence, change.sequence)
            yield change
        if last is not None and last.is_locked and last.next_retry_at is None:
            return
        sleep(_wait_before_resuming(last))


def _wait_before_resuming(run: OpRun | None) -> float:
    """How long to wait before watching again: until an automatic retry is due (at
    most a few seconds), else a moment."""
    if run is None or run.next_retry_at is None:
        return 0.5
    due = (run.next_retry_at - datetime.now(UTC)).total_seconds()
    return min(max(due, 0.2), 5.0)


def follow_run(client: Client, run_id: str, output: str, after_sequence: int = 0) -> int:
    """Show a run's changes until it is over; return the exit code for its outcome.

    With ``output="json"``: one JSON line per change (``sequence``, ``run``, ``event``).
    Otherwise a live progress bar over the event timeline, then the outcome and outputs.
    """
    changes = run_changes(client, run_id, after_sequence)
    try:
        if output == "json":
            return _follow_json(changes)
        return _follow_live(run_id, changes)
    except KeyboardInterrupt:
        return INTERRUPTED
    finally:
        changes.close()


def _follow_json(changes: Iterator[RunChange]) -> int:
    last: OpRun | None = None
    for change in changes:
        last = change.run
        data = change.to_dict()
        data["run"] = render.run_json(change.run)
        render.print_json_line(data)
    return ExitCode.RUN_FAILED if last is None else exit_code_for_run(last.state)


def _follow_live(run_id: str, changes: Iterator[RunChange]) -> int:
    console = render.console()
    last: OpRun | None = None
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
    try:
        with progress:
            task = progress.add_task(run_id, total=100)
            for change in changes:
                run = change.run
                # The snapshot's events are sent again one by one: show only those.
                if change.event is not None:
                    progress.console.print(render.event_line(change.event, change.attempt))
                last = run
                progress.update(
                    task, completed=run.progress, description=f"{run.id} {run.state.value}"
                )
    except KeyboardInterrupt:
        if last is not None:
            console.print(f"stopped watching {last.id} ({last.state.value})")
        raise
    if last is None:
        return ExitCode.RUN_FAILED
    console.print(render.outcome_text(last))
    if last.outputs:
        console.print("outputs:", style="bold")
        console.print_json(data=last.outputs)
    return exit_code_for_run(last.state)
