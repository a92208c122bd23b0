"""How the ``gyoza`` command shows things: rich tables for people, JSON for programs.

JSON output is the API's response messages in protobuf's canonical JSON mapping, exactly
as ``grpcurl`` prints them (the proto's snake_case field names, enum names, 64-bit
integers as strings, fields at their default value left out), so ``gyoza runs get ID -o
json | jq -r .op_run.state`` reads ``OP_RUN_STATE_COMPLETED``.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import click
from google.protobuf import json_format
from google.protobuf.message import Message
from rich.console import Console, RenderableType
from rich.table import Table
from rich.text import Text

from gyoza.client import Agent, AttemptEvent
from gyoza.models.op_attempt import OpAttempt
from gyoza.models.op_definition import OpDefinition
from gyoza.models.op_run import OpRun
from gyoza.models.resources import Constraints, EventEntry, EventType, OpRunState

__all__ = [
    "STATE_STYLES",
    "agents_table",
    "attempts_table",
    "console",
    "definition_detail",
    "definitions_table",
    "event_line",
    "events_table",
    "message_json",
    "print_message",
    "print_message_line",
    "run_detail",
    "runs_table",
    "show",
]

STATE_STYLES: dict[OpRunState, str] = {
    OpRunState.PENDING: "yellow",
    OpRunState.ASSIGNED: "cyan",
    OpRunState.RUNNING: "blue",
    OpRunState.COMPLETED: "green",
    OpRunState.FAILED: "red",
    OpRunState.CANCELLED: "magenta",
}

_EVENT_STYLES: dict[str, str] = {
    EventType.COMPLETED.value: "green",
    EventType.FAILED.value: "red",
    EventType.ERROR.value: "red",
    EventType.CANCELLED.value: "magenta",
    EventType.RETRIED.value: "yellow",
}


class _Console(Console):
    """A rich console that lets a closed pipe end the command the way every other write
    does (rich's own handling exits with status 1)."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError


def console(stderr: bool = False) -> Console:
    """A console on stdout (or stderr); wide enough not to cut IDs when piped."""
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else max(shutil.get_terminal_size((160, 24)).columns, 160)
    return _Console(file=stream, width=width, soft_wrap=False, highlight=False)


def show(*renderables: RenderableType) -> None:
    """Print tables and grids on stdout, one blank line between them.

    Piped, the lines lose the padding rich gives the last column, so that ``grep``,
    ``awk`` and ``tail`` see clean lines.
    """
    out = console()

    def emit() -> None:
        for index, renderable in enumerate(renderables):
            if index:
                out.print()
            out.print(renderable)

    if out.is_terminal:
        emit()
        return
    with out.capture() as captured:
        emit()
    for line in captured.get().splitlines():
        click.echo(line.rstrip())


# ----------------------------------------------------------------------------------------
# JSON
# ----------------------------------------------------------------------------------------


def message_json(message: Message) -> dict[str, Any]:
    """An API message in protobuf's canonical JSON mapping, as a JSON object.

    A whole number held in a double (a Struct value, ``cpu``) is written as an integer,
    as grpcurl writes it (``42``, not ``42.0``).
    """
    data: dict[str, Any] = _whole_numbers(
        json_format.MessageToDict(message, preserving_proto_field_name=True)
    )
    return data


def _whole_numbers(value: Any) -> Any:
    if isinstance(value, float):
        return int(value) if value.is_integer() and abs(value) < 2**53 else value
    if isinstance(value, dict):
        return {key: _whole_numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_whole_numbers(item) for item in value]
    return value


def print_message(message: Message) -> None:
    """Print an API message as one indented JSON document on stdout (grpcurl's shape)."""
    click.echo(json.dumps(message_json(message), indent=2, ensure_ascii=False))


def print_message_line(message: Message) -> None:
    """Print an API message as JSON on one line, flushed (for streams)."""
    click.echo(json.dumps(message_json(message), ensure_ascii=False, separators=(",", ":")))
    sys.stdout.flush()


# ----------------------------------------------------------------------------------------
# Pieces
# ----------------------------------------------------------------------------------------


def state_text(state: OpRunState) -> Text:
    """A run state in its colour."""
    return Text(state.value, style=STATE_STYLES.get(state, ""))


def when(moment: datetime | None) -> str:
    """A time in local time, to the second; ``-`` for none."""
    if moment is None:
        return "-"
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def duration(ms: int | None) -> str:
    """Milliseconds as ``850ms``, ``12.3s``, ``4m05s`` or ``2h03m``."""
    if ms is None:
        return "-"
    if ms < 1000:
        return f"{ms}ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, sec = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def compact_json(value: Any, limit: int = 80) -> str:
    """JSON on one line, cut at *limit* characters."""
    text = json.dumps(value, ensure_ascii=False, separators=(", ", ": "), default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def op_name(run: OpRun) -> str:
    """``definition:version`` for a run of a definition, else its image."""
    if run.op_definition:
        version = f":{run.op_definition_version}" if run.op_definition_version else ""
        return f"{run.op_definition}{version}"
    return run.image


def event_message(event: EventEntry) -> str:
    """An event's message; a PROGRESS event's percentage as ``40%``, with the op's own
    words (``payload.message``) when it gave some."""
    if event.type == EventType.PROGRESS.value:
        words = event.payload.get("message")
        return f"{event.msg}%" + (f" {words}" if isinstance(words, str) and words else "")
    return str(event.msg)


def log_text(text: str) -> Text:
    """A log line of the op, as a watch shows it among the events (indented)."""
    return Text(f"  {text}", style="dim")


def event_line(event: EventEntry, attempt: int | None = None) -> Text:
    """One line of a timeline: time, type, message (and attempt when given)."""
    line = Text()
    line.append(event.t.astimezone().strftime("%H:%M:%S.%f")[:-3], style="dim")
    if attempt is not None:
        line.append(f"  #{attempt}", style="dim")
    line.append(f"  {event.type:<9}", style=_EVENT_STYLES.get(event.type, "bold"))
    message = event_message(event)
    if message:
        line.append(f"  {message}")
    return line


def outcome_text(run: OpRun, *, with_id: bool = True) -> Text:
    """One line saying how a run ended (or where it stands), led by its id unless
    *with_id* is false (where the id is shown already)."""
    summary = run.execution_summary
    text = Text()
    if with_id:
        text.append(run.id, style="bold")
        text.append(" ")
    text.append_text(state_text(run.state))
    details: list[str] = []
    if run.current_attempt > 1:
        details.append(f"attempt {run.current_attempt}")
    if summary.duration_ms is not None:
        details.append(f"in {duration(summary.duration_ms)}")
    if summary.worker_id:
        details.append(f"on {summary.worker_id}")
    if details:
        text.append(" " + " ".join(details))
    if run.state in (OpRunState.FAILED, OpRunState.CANCELLED):
        reasons: list[str] = []
        if summary.failure_class is not None and run.state is OpRunState.FAILED:
            reasons.append(summary.failure_class.value)
        if summary.exit_code is not None:
            reasons.append(f"exit code {summary.exit_code}")
        if reasons:
            text.append(f" ({', '.join(reasons)})")
        if summary.error_message:
            text.append(f": {summary.error_message}")
    if run.next_retry_at is not None:
        text.append(f"; automatic retry at {when(run.next_retry_at)}", style="yellow")
    return text


# ----------------------------------------------------------------------------------------
# Tables and details
# ----------------------------------------------------------------------------------------


def runs_table(runs: Iterable[OpRun]) -> Table:
    """Runs, one a row."""
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("ID", "STATE", "OP", "PRIORITY", "PROGRESS", "ATTEMPT", "AGENT", "CREATED"):
        table.add_column(column, no_wrap=True)
    for run in runs:
        table.add_row(
            run.id,
            state_text(run.state),
            op_name(run),
            str(run.priority),
            f"{run.progress}%",
            str(run.current_attempt),
            run.execution_summary.worker_id or "-",
            when(run.created_at),
        )
    return table


def run_detail(run: OpRun) -> Table:
    """Everything about a run and its current attempt, as a two-column grid."""
    summary = run.execution_summary
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    rows: list[tuple[str, str | Text]] = [
        ("id", run.id),
        ("state", outcome_text(run, with_id=False) if run.is_locked else state_text(run.state)),
        ("op", op_name(run)),
        ("image", run.image),
        ("priority", str(run.priority)),
        ("attempt", str(run.current_attempt)),
        ("progress", f"{run.progress}%"),
        ("created", when(run.created_at)),
        ("updated", when(run.updated_at)),
    ]
    if summary.worker_id:
        rows.append(("agent", summary.worker_id))
    if summary.gpu_ids:
        rows.append(("gpus", ", ".join(str(g) for g in summary.gpu_ids)))
    if summary.duration_ms is not None:
        rows.append(("duration", duration(summary.duration_ms)))
    if summary.failure_class is not None:
        rows.append(("failure", summary.failure_class.value))
    if summary.exit_code is not None:
        rows.append(("exit code", str(summary.exit_code)))
    if summary.error_message:
        rows.append(("error", summary.error_message))
    if run.pending_reason is not None and run.state is OpRunState.PENDING:
        rows.append(
            ("waiting", Text(f"{run.pending_reason.message} ({run.pending_reason.code.value})"))
        )
    if run.cancel_requested:
        rows.append(("cancel", "requested"))
    if run.next_retry_at is not None:
        rows.append(("next retry", when(run.next_retry_at)))
    if run.request_id:
        rows.append(("request id", run.request_id))
    rows.append(("inputs", compact_json(run.inputs, 200)))
    if run.outputs:
        rows.append(("outputs", compact_json(run.outputs, 200)))
    rows.append(("constraints", constraints_text(run.constraints)))
    rows.append(
        (
            "retry policy",
            f"max {run.retry_policy.max_attempts} attempts, on "
            + ", ".join(c.value for c in run.retry_policy.retry_on),
        )
    )
    if run.event_delivery.topic:
        rows.append(("topic", run.event_delivery.topic))
    for label, value in rows:
        grid.add_row(label, value)
    return grid


def constraints_text(c: Constraints) -> str:
    """Resources in words: ``cpu 2, ram 4096 MiB, 1 gpu, vram 8000 MiB``."""
    parts = [f"cpu {c.cpu:g}", f"ram {c.ram_mb} MiB"]
    if c.gpus_needed:
        parts.append(f"{c.gpus_needed} gpu")
    if c.vram_mb:
        parts.append(f"vram {c.vram_mb} MiB")
    if c.gpu_id is not None:
        parts.append(f"gpu id {c.gpu_id}")
    if c.timeout_s is not None:
        parts.append(f"timeout {c.timeout_s:g}s")
    if c.queue_timeout_s is not None:
        parts.append(f"queue timeout {c.queue_timeout_s:g}s")
    if c.selector:
        parts.append(f"selector {c.selector}")
    return ", ".join(parts)


def events_table(events: Sequence[AttemptEvent]) -> Table:
    """Events with their attempt, in order."""
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("ATTEMPT", "SEQ", "TIME", "TYPE", "MESSAGE", "PAYLOAD"):
        table.add_column(column, no_wrap=column != "MESSAGE")
    for attempt, event in events:
        table.add_row(
            str(attempt),
            str(event.seq),
            when(event.t),
            Text(event.type, style=_EVENT_STYLES.get(event.type, "")),
            event_message(event),
            compact_json(event.payload, 60) if event.payload else "",
        )
    return table


def attempts_table(attempts: Sequence[OpAttempt]) -> Table:
    """Attempts, first to last."""
    table = Table(box=None, header_style="bold", pad_edge=False)
    columns = ("ATTEMPT", "STATE", "PROGRESS", "AGENT", "STARTED", "FINISHED", "DURATION")
    for column in (*columns, "FAILURE"):
        table.add_column(column, no_wrap=column != "FAILURE")
    for attempt in attempts:
        summary = attempt.execution_summary
        failure = [summary.failure_class.value] if summary.failure_class else []
        if summary.exit_code is not None:
            failure.append(f"exit {summary.exit_code}")
        if summary.error_message:
            failure.append(summary.error_message)
        table.add_row(
            str(attempt.attempt),
            state_text(attempt.state),
            f"{attempt.progress}%",
            summary.worker_id or "-",
            when(attempt.started_at),
            when(attempt.finished_at),
            duration(summary.duration_ms),
            ": ".join(failure) if failure else "",
        )
    return table


def definitions_table(definitions: Iterable[OpDefinition]) -> Table:
    """Definitions, one version a row."""
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("NAME", "VERSION", "IMAGE", "INPUTS", "CREATED", "DESCRIPTION"):
        table.add_column(column, no_wrap=column != "DESCRIPTION")
    for definition in definitions:
        table.add_row(
            definition.name,
            str(definition.version),
            definition.image,
            ", ".join(spec.name for spec in definition.inputs) or "-",
            when(definition.created_at),
            definition.description,
        )
    return table


def definition_detail(definition: OpDefinition) -> Table:
    """A definition and its inputs."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    policy = definition.retry_policy
    rows: list[tuple[str, str | Table]] = [
        ("name", definition.name),
        ("version", str(definition.version)),
        ("image", definition.image),
        ("created", when(definition.created_at)),
    ]
    if definition.description:
        rows.append(("description", definition.description))
    rows.append(("constraints", constraints_text(definition.constraints)))
    rows.append(
        (
            "retry policy",
            f"max {policy.max_attempts} attempts, delay {policy.initial_delay_s:g}s "
            f"x{policy.backoff_multiplier:g} up to {policy.max_delay_s:g}s, on "
            + ", ".join(c.value for c in policy.retry_on),
        )
    )
    if definition.event_delivery.topic:
        rows.append(("topic", definition.event_delivery.topic))
    if definition.inputs:
        inputs = Table(box=None, header_style="bold", pad_edge=False)
        for column in ("INPUT", "TYPE", "REQUIRED", "DEFAULT", "DESCRIPTION"):
            inputs.add_column(column)
        for spec in definition.inputs:
            inputs.add_row(
                spec.name,
                spec.type.value.lower(),
                "yes" if spec.required else "no",
                "-" if spec.default is None else compact_json(spec.default, 40),
                spec.description,
            )
        rows.append(("inputs", inputs))
    if definition.outputs:
        outputs = Table(box=None, header_style="bold", pad_edge=False)
        for column in ("OUTPUT", "TYPE", "REQUIRED", "DESCRIPTION"):
            outputs.add_column(column)
        for output in definition.outputs:
            outputs.add_row(
                output.name,
                output.type.value.lower(),
                "yes" if output.required else "no",
                output.description,
            )
        rows.append(("outputs", outputs))
    for label, value in rows:
        grid.add_row(label, value)
    return grid


def agents_table(agents: Iterable[Agent]) -> Table:
    """Agents with their capacity, GPUs (VRAM free for new runs) and runs; the replica
    holding each one's stream when some agent names one (several server replicas)."""
    agents = list(agents)
    with_replica = any(agent.replica for agent in agents)
    table = Table(box=None, header_style="bold", pad_edge=False)
    columns = ["NAME", "STATE", "CPU", "RAM MiB", "GPUS", "RUNS", "LAST SEEN", "LABELS"]
    if with_replica:
        columns.insert(2, "REPLICA")
    for column in columns:
        table.add_column(column, no_wrap=column not in ("GPUS", "LABELS"))
    for agent in agents:
        gpus = "\n".join(
            f"{g.index}: {g.name or 'gpu'} {g.vram_free_mb}/{g.vram_total_mb} MiB free"
            + (f", {g.run_count} run{'s' if g.run_count != 1 else ''}" if g.run_count else "")
            + ("" if g.healthy else f", UNHEALTHY {g.health_reason}".rstrip())
            for g in agent.gpus
        )
        cells = [
            agent.name,
            agent.state.value,
            f"{agent.cpu_reserved:g}/{agent.cpu:g}",
            f"{agent.ram_reserved_mb}/{agent.ram_mb}",
            gpus or "-",
            str(len(agent.runs)),
            _ago(agent.last_seen_time),
            "\n".join(f"{k}={v}" for k, v in sorted(agent.labels.items())) or "-",
        ]
        if with_replica:
            cells.insert(2, agent.replica or "-")
        table.add_row(*cells)
    return table


def _ago(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    seconds = max(0, int((datetime.now(UTC) - moment).total_seconds()))
    return f"{seconds}s ago" if seconds < 120 else when(moment)


def mapping_text(values: Mapping[str, Any]) -> str:
    """Pretty JSON of a mapping (outputs) for people."""
    return json.dumps(values, indent=2, ensure_ascii=False, default=str)
