"""Following a run to its end: ``gyoza runs watch`` and ``gyoza runs create --watch``.

The server's watch stream ends once the run is terminal. A run that FAILED with an
automatic retry due is not over yet: the watch waits for the retry and goes on. A server
that goes away (a restart) is waited for: the watch resumes from the last sequence it
saw, so nothing is shown twice or missed. With ``--logs``, the run's log lines are
followed alongside, attempt after attempt, each from the last line seen.
"""

from __future__ import annotations

import functools
import queue
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import click
import grpc
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)

from gyoza import mapping
from gyoza.api.v1 import op_run_pb2, op_run_service_pb2
from gyoza.cli import render
from gyoza.cli.exit_codes import ExitCode, exit_code_for_run
from gyoza.client import Client, GyozaClientError
from gyoza.models.op_run import OpRun

__all__ = ["follow_run", "log_line_messages", "run_changes"]

#: Exit status of a watch stopped with Ctrl-C (128 + SIGINT).
INTERRUPTED = 130

#: Waits between tries to reach a server that went away (seconds), the last repeated.
RECONNECT_DELAYS = (0.2, 0.5, 1.0, 2.0)

Notify = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def run_changes(
    client: Client,
    run_id: str,
    after_sequence: int = 0,
    *,
    sleep: Callable[[float], None] = time.sleep,
    notify: Notify = _quiet,
) -> Generator[op_run_service_pb2.WatchOpRunResponse, None, None]:
    """Every change of a run until it is over, across automatic retries and server
    restarts, as the server's ``WatchOpRunResponse`` messages.

    The first item is the run's snapshot (no ``event``); the snapshots of resumed streams
    are skipped (their events follow them one by one). *notify* is told, in words, when
    the server went away and when it is back.

    Raises
    ------
    GyozaClientError
        A refusal (no such run...), or UNAVAILABLE when the server was never reached.
    """
    sequence = after_sequence
    first = True
    lost = False
    delays = 0
    while True:
        last: op_run_pb2.OpRun | None = None
        try:
            for response in client.api.watch_op_run(run_id, sequence):
                if lost:
                    notify("reconnected; resuming the watch")
                    lost = False
                delays = 0
                last = response.op_run
                if not response.HasField("event") and not first:
                    continue  # the snapshot of a resumed stream
                first = False
                if response.HasField("event"):
                    # Only a delivered event moves the resume point: the snapshot's
                    # sequence counts events the server has yet to send after it.
                    sequence = max(sequence, response.sequence)
                yield response
        except GyozaClientError as error:
            if error.code is not grpc.StatusCode.UNAVAILABLE or first:
                raise
            if not lost:
                notify(f"lost the server ({error.message}); reconnecting")
                lost = True
            sleep(RECONNECT_DELAYS[min(delays, len(RECONNECT_DELAYS) - 1)])
            delays += 1
            continue
        if last is not None:
            run = mapping.run_from_proto(last)
            if run.is_locked and run.next_retry_at is None:
                return
            sleep(_wait_before_resuming(run))
        else:
            sleep(0.5)


def _wait_before_resuming(run: OpRun) -> float:
    """How long to wait before watching again: until an automatic retry is due (at
    most a few seconds), else a moment."""
    if run.next_retry_at is None:
        return 0.5
    due = (run.next_retry_at - datetime.now(UTC)).total_seconds()
    return min(max(due, 0.2), 5.0)


def log_line_messages(
    response: op_run_service_pb2.GetOpRunLogsResponse,
) -> Iterator[op_run_service_pb2.GetOpRunLogsResponse]:
    """One ``GetOpRunLogsResponse`` per line of *response* (its ``dropped_lines`` on the
    first): what ``--output json`` prints, one JSON line per log line."""
    for index, line in enumerate(response.lines):
        yield op_run_service_pb2.GetOpRunLogsResponse(
            lines=[line],
            attempt=response.attempt,
            dropped_lines=response.dropped_lines if index == 0 else 0,
        )


# ----------------------------------------------------------------------------------------
# Following the run (and its logs) on threads, into one queue
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Item:
    """What a source thread hands the printing thread."""

    kind: str  # "change", "logs", "error", "end"
    message: Any = None


class _Follower:
    """Reads the run's changes, and with *logs* its log lines, each on a daemon thread,
    into one queue that the caller's thread prints from.

    The log thread follows one attempt at a time: the current attempt once the watch
    has shown it, until that attempt's stream ends, then the next one the watch shows.
    """

    def __init__(
        self, client: Client, run_id: str, after_sequence: int, logs: bool, notify: Notify
    ) -> None:
        self._client = client
        self._run_id = run_id
        self._after_sequence = after_sequence
        self._notify = notify
        self.items: queue.Queue[_Item] = queue.Queue()
        self._attempt = 0
        self._over = False
        self._changed = threading.Condition()
        self._threads = [threading.Thread(target=self._watch, daemon=True)]
        if logs:
            self._threads.append(threading.Thread(target=self._follow_logs, daemon=True))

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def saw(self, run: op_run_pb2.OpRun) -> None:
        """The printing thread has shown this state of the run."""
        with self._changed:
            if run.current_attempt > self._attempt:
                self._attempt = run.current_attempt
                self._changed.notify_all()

    def finish(self, timeout: float = 10.0) -> None:
        """The run is over: let the log thread print the last lines, then stop."""
        with self._changed:
            self._over = True
            self._changed.notify_all()
        for thread in self._threads[1:]:
            thread.join(timeout)

    def _watch(self) -> None:
        try:
            for response in run_changes(
                self._client, self._run_id, self._after_sequence, notify=self._notify
            ):
                self.items.put(_Item("change", response))
        except Exception as error:  # handed to the printing thread, which raises it
            self.items.put(_Item("error", error))
        finally:
            self.items.put(_Item("end"))

    def _follow_logs(self) -> None:
        try:
            self._follow_attempts()
        except Exception as error:
            # Raised by the printing thread if it is still reading (else the command is
            # ending, its channel closed under this thread: nothing to say).
            self.items.put(_Item("error", error))

    def _follow_attempts(self) -> None:
        followed = 0
        while True:
            with self._changed:
                self._changed.wait_for(functools.partial(self._past, followed))
                if self._attempt <= followed:
                    return
                followed = self._attempt
            self._follow_attempt(followed)

    def _past(self, attempt: int) -> bool:
        return self._attempt > attempt or self._over

    def _follow_attempt(self, attempt: int) -> None:
        after = 0
        delays = 0
        while True:
            try:
                for response in self._client.api.get_op_run_logs(
                    self._run_id, attempt, follow=True, after_line=after
                ):
                    delays = 0
                    if response.lines:
                        after = response.lines[-1].number
                        self.items.put(_Item("logs", response))
                return  # the attempt is over: every line was sent
            except GyozaClientError as error:
                if error.code is not grpc.StatusCode.UNAVAILABLE:
                    return  # the watch reports what went wrong
                time.sleep(RECONNECT_DELAYS[min(delays, len(RECONNECT_DELAYS) - 1)])
                delays += 1

    def __iter__(self) -> Iterator[_Item]:
        """Items until the watch ends (its error, if any, is raised)."""
        while True:
            item = self.items.get()
            if item.kind == "end":
                return
            if item.kind == "error":
                raise item.message
            yield item

    def drain(self) -> Iterator[_Item]:
        """What the log thread put in the queue after the watch ended."""
        while True:
            try:
                item = self.items.get_nowait()
            except queue.Empty:
                return
            if item.kind == "logs":
                yield item


def follow_run(
    client: Client, run_id: str, output: str, after_sequence: int = 0, *, logs: bool = False
) -> int:
    """Show a run's changes until it is over; return the exit code for its outcome.

    With ``output="json"``: one JSON line per change, the server's
    ``WatchOpRunResponse`` (the first with the whole run, the others with the sequence
    and the event only), and with *logs* one ``GetOpRunLogsResponse`` line per log line.
    Otherwise a live progress bar over the event timeline (and the log lines), then the
    outcome and outputs. Notices about the connection go to stderr.
    """

    def notify(text: str) -> None:
        click.echo(f"gyoza: {text}", err=True)

    follower = _Follower(client, run_id, after_sequence, logs, notify)
    follower.start()
    try:
        if output == "json":
            return _follow_json(follower)
        return _follow_live(run_id, follower)
    except KeyboardInterrupt:
        return INTERRUPTED


def _follow_json(follower: _Follower) -> int:
    last: op_run_pb2.OpRun | None = None
    first = True

    def print_logs(item: _Item) -> None:
        for message in log_line_messages(item.message):
            render.print_message_line(message)

    for item in follower:
        if item.kind == "logs":
            print_logs(item)
            continue
        response: op_run_service_pb2.WatchOpRunResponse = item.message
        last = response.op_run
        follower.saw(last)
        if first:
            render.print_message_line(response)
            first = False
        else:
            render.print_message_line(
                op_run_service_pb2.WatchOpRunResponse(
                    sequence=response.sequence, event=response.event
                )
            )
    follower.finish()
    for item in follower.drain():
        print_logs(item)
    if last is None:
        return ExitCode.RUN_FAILED
    return exit_code_for_run(mapping.run_from_proto(last).state)


def _follow_live(run_id: str, follower: _Follower) -> int:
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
            for item in follower:
                if item.kind == "logs":
                    for line in item.message.lines:
                        progress.console.print(render.log_text(line.text), highlight=False)
                    continue
                response: op_run_service_pb2.WatchOpRunResponse = item.message
                follower.saw(response.op_run)
                run = mapping.run_from_proto(response.op_run)
                # The snapshot's events are sent again one by one: show only those.
                if response.HasField("event"):
                    attempt, event = mapping.event_from_proto(response.event)
                    progress.console.print(render.event_line(event, attempt))
                last = run
                progress.update(
                    task, completed=run.progress, description=f"{run.id} {run.state.value}"
                )
            follower.finish()
            for item in follower.drain():
                for line in item.message.lines:
                    progress.console.print(render.log_text(line.text), highlight=False)
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
